"""`steptrain <verb>`: train (Hydra overrides), config (print the resolved config), inspect, export, merge, eval, sample.

    steptrain train experiment=sft_lora model.path=DIR data.train_files=[a.jsonl] output_dir=OUT
    torchrun --nproc_per_node 2 -m steptrain train engine=ddp ...
    steptrain inspect experiment=sft_lora model.path=DIR data.train_files=[a.jsonl] output_dir=OUT [--rows N] [--json]
    steptrain export OUT/checkpoints/step_100 EXPORT_DIR [--merge-lora]
    steptrain merge A B OUT_DIR --weights 0.5 0.5 [--method linear|task_arithmetic|ties] [--base BASE]
    steptrain eval OUT/checkpoints/step_100 eval.jsonl [--limit 200]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from steptrain.config import ConfigError, load_config
from steptrain.recipes import RECIPES


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _file_log(output_dir: str) -> logging.Handler:
    """Mirror the main rank's log into <output_dir>/train.log."""
    if int(os.environ.get("RANK", 0)) != 0:
        return logging.NullHandler()
    os.makedirs(output_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(output_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def cmd_train(args) -> int:
    cfg = load_config(args.overrides, args.config_dir)
    import importlib

    recipe = importlib.import_module(RECIPES[cfg.recipe.name].module)
    handler = _file_log(cfg.output_dir)
    logging.getLogger().addHandler(handler)
    try:
        result = recipe.run(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"checkpoint: {result['checkpoint']}")
        if result["eval"]:
            from steptrain.logging import format_metrics

            print("eval: " + format_metrics(result["eval"]))
    return 0


def cmd_config(args) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(load_config(args.overrides, args.config_dir)), end="")
    return 0


def cmd_inspect(args) -> int:
    from steptrain.inspect_data import inspect_data

    inspect_data(args.overrides, rows=args.rows, as_json=args.json, config_dir=args.config_dir)
    return 0


def cmd_export(args) -> int:
    from steptrain.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, merge_lora=args.merge_lora)
    print(f"exported: {out}")
    return 0


def cmd_merge(args) -> int:
    from steptrain.export import ExportError
    from steptrain.export.merge import merge_models

    if len(args.paths) < 2:
        print("steptrain: error: merge needs at least one input and the output directory", file=sys.stderr)
        return 2
    *inputs, out_dir = args.paths
    try:
        out = merge_models(inputs, out_dir, weights=args.weights, method=args.method, base=args.base,
                           density=args.density)
    except ExportError as exc:
        print(f"steptrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged: {out}")
    return 0


def cmd_eval(args) -> int:
    import json

    from steptrain.eval.run import evaluate_model

    metrics = evaluate_model(args.model, args.data, max_new_tokens=args.max_new_tokens, limit=args.limit,
                             batch_size=args.batch_size, overrides=args.set)
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_sample(args) -> int:
    import json

    from steptrain.rollout.generate import Sampling
    from steptrain.rollout.sample import sample_model

    pass_range = None
    if args.pass_range:
        lo, _, hi = args.pass_range.partition(":")
        if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) <= args.num_samples):
            print(f"steptrain: error: --pass-range {args.pass_range!r} must be LO:HI with 0 <= LO <= HI <= "
                  f"--num-samples ({args.num_samples})", file=sys.stderr)
            return 2
        pass_range = (int(lo), int(hi))
    stats = sample_model(
        args.model, args.data, args.out, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_p, args.top_k), keep=args.keep, pass_range=pass_range,
        min_reward=args.min_reward, seed=args.seed, batch_size=args.batch_size, overrides=args.set,
    )
    print(json.dumps(stats, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steptrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The `deepspeed` launcher passes --local_rank=N before the verb; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, fn, help_ in (("train", cmd_train, "train with Hydra overrides"),
                            ("config", cmd_config, "print the resolved config and exit")):
        p = sub.add_parser(verb, help=help_)
        p.add_argument("overrides", nargs="*", help="Hydra overrides: experiment=NAME key=value ...")
        p.add_argument("--config-dir", default=None, help="config tree (default: the repository's configs/)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("inspect", help="show the token ids, labels and rendering of the first rows, and the data "
                                       "report, as training would see them (no model weights are loaded)")
    p.add_argument("overrides", nargs="*", help="the same overrides as `steptrain train`")
    p.add_argument("--rows", type=int, default=3, help="rows to show (-1: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per row (source, input_ids, labels, ...), "
                                                         "then {\"report\": ...}")
    p.add_argument("--config-dir", default=None, help="config tree (default: the repository's configs/)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("export", help="checkpoint -> HF directory or PEFT adapter")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA into the base and write a full model")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("merge", help="weighted merge of HF directories, PEFT adapters or checkpoints -> HF directory")
    p.add_argument("paths", nargs="+", metavar="PATH", help="the inputs (A B ...), then the output directory")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per input")
    p.add_argument("--method", choices=("linear", "task_arithmetic", "ties"), default="linear")
    p.add_argument("--base", default=None,
                   help="base model: theta_base for task_arithmetic/ties; also the base PEFT adapter inputs load onto")
    p.add_argument("--density", type=float, default=None, help="ties: fraction of each task vector kept (default 1)")
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("eval", help="exact match / CER / WER and loss of a checkpoint or HF directory on JSONL")
    p.add_argument("model", help="a checkpoint directory (checkpoints/step_N) or an HF-format model directory")
    p.add_argument("data", nargs="+", help="ms-swift JSONL file(s); the last assistant reply is the reference")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], help="config keys, e.g. data.template=jinja data.max_length=4096")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("sample", help="K scored samples per prompt: filter RL prompts by pass count, or keep good "
                                      "responses as SFT rows (MGRD self-distillation)")
    p.add_argument("model", help="a checkpoint directory (checkpoints/step_N) or an HF-format model directory")
    p.add_argument("data", nargs="+", help="ms-swift prompt JSONL (a final assistant turn or 'solution' is the reference)")
    p.add_argument("--out", required=True, help="the JSONL to write")
    p.add_argument("--keep", choices=("prompts", "responses"), default="prompts")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--pass-range", default=None, help="prompts: keep those with LO..HI passing samples, e.g. 3:6")
    p.add_argument("--min-reward", type=float, default=1.0, help="a sample passes at this weighted reward or more")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call (x --num-samples sequences)")
    p.add_argument("--set", nargs="*", default=[],
                   help="config keys, e.g. objective.rewards={mgrd:1.0} (default: accuracy) data.template=jinja")
    p.set_defaults(fn=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may also follow the options: steptrain inspect --rows 5 data.max_length=512
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from steptrain.checkpoint import CheckpointError
    from steptrain.data import DataError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"steptrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
