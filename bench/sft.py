"""SFT throughput benchmark: steptrain vs TRL's SFTTrainer, with and without packing, on one CPU machine.

    python bench/sft.py            # the full benchmark (make bench); roughly 10-15 minutes on 2 quiet cores
    python bench/sft.py --quick    # smoke run with tiny step counts: 1-2 minutes, mostly process start-up

Everything is built in a temporary directory in the same run: variable-length chat data (ms-swift JSONL,
long-tailed lengths), a byte-level BPE tokenizer trained on it, and one randomly initialised "small-20m"
Qwen2 saved with ``save_pretrained`` so that every contender starts from the same weights. The machine's
peak fp32 matmul FLOP/s is measured before and after the contenders; MFU is taken against the best figure.

Each contender trains in its own subprocess, one after the other, with torch using every usable core:

    steptrain          data.packing=false (group_by_length, the default), padded to the longest row
    steptrain-packed   data.packing=true  (best-fit-decreasing bins of max_length, block-diagonal attention)
    trl                SFTTrainer packing=False, padded; TRL's default random sampler (--trl-sampler)
    trl-packed         SFTTrainer packing=True, packing_strategy="bfd" (padding-free)

Timing: the wall time between the end of the last warmup step and the end of the last step, where "end of a
step" is the moment the optimizer step is done (steptrain: its metrics record is logged; TRL: on_step_end).
Data loading, collation and logging between steps are therefore inside the timed window for both.
Tokens are counted from the batches each framework actually feeds its model (non-pad tokens only).

Results go to bench/results/sft.json and a Markdown table on stdout; --update-readme also rewrites the
results block of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    STEPTRAIN_CPU_OVERRIDES,
    TRL_CPU_FP32_OPTIONS,
    TRL_RUN_OPTIONS,
    add_only_option,
    add_output_options,
    chosen_contenders,
    driver_parser,
    fmt,
    machine_info,
    markdown_table,
    peak_matmul_flops,
    readme_head,
    resolve_settings,
    run_in_worker,
    steptrain_config,
    trl_optim_options,
    usable_cores,
    versions,
    work_dir,
    worker_main,
    write_results,
)
from sft_data import TRL_CHAT_TEMPLATE, prepare

RESULTS = ROOT / "bench" / "results" / "sft.json"
README = ROOT / "bench" / "README.md"
README_START, README_END = "<!-- sft-results:start -->", "<!-- sft-results:end -->"


FULL = {"rows": 3000, "max_length": 512, "tokens_per_step": 2048, "steps": 20, "warmup": 3, "matmul_size": 2048}
QUICK = {"rows": 300, "max_length": 128, "tokens_per_step": 256, "steps": 2, "warmup": 1, "matmul_size": 1024}

CONTENDERS: dict[str, dict] = {
    "steptrain": {"framework": "steptrain", "packing": False, "label": "steptrain, padded (group_by_length)"},
    "steptrain-packed": {"framework": "steptrain", "packing": True, "label": "steptrain, packed"},
    "trl": {"framework": "trl", "packing": False, "label": "TRL SFTTrainer, padded"},
    "trl-packed": {"framework": "trl", "packing": True, "label": "TRL SFTTrainer, packed (bfd, padding-free)"},
}

# The Step chat template of data_pipelines.demo_tokenizer, rendered identically, with the assistant reply and
# its end-of-turn token inside {% generation %} markers: TRL's assistant_only_loss then trains on exactly the
# tokens steptrain's data.loss_on=all_assistant trains on (checked token by token in prepare()).
# --- data ------------------------------------------------------------------------------------------------


# --- workers (one subprocess per contender) ---------------------------------------------------------------


class _Counts:
    """What one optimizer step fed the model: real tokens, tensor slots, label tokens, examples, sum of L^2."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.tokens = self.slots = self.label_tokens = self.examples = self.sum_sq_len = 0

    def add(self, lengths: list[int], slots: int, label_tokens: int):
        self.tokens += sum(lengths)
        self.sum_sq_len += sum(n * n for n in lengths)
        self.examples += len(lengths)
        self.slots += slots
        self.label_tokens += label_tokens

    def pop(self) -> dict:
        out = {k: getattr(self, k) for k in ("tokens", "slots", "label_tokens", "examples", "sum_sq_len")}
        self.reset()
        return out


def _worker_steptrain(spec: dict) -> dict:
    import torch

    import steptrain.recipes.sft as sft
    from steptrain.logging import MetricsLogger

    overrides = [
        f"model.path={spec['model_dir']}",
        f"data.train_files=[{spec['data_file']}]",
        f"output_dir={spec['out_dir']}",
        f"trainer.max_steps={spec['max_steps']}",
        f"trainer.batch_size={spec['batch_size']}",
        "trainer.grad_accum=1",
        f"trainer.seed={spec['seed']}",
        "trainer.precision=fp32",
        f"data.packing={'true' if spec['packing'] else 'false'}",
        f"data.max_length={spec['max_length']}",
        f"optim.lr={spec['lr']}",
        *STEPTRAIN_CPU_OVERRIDES,
    ]
    cfg = steptrain_config(overrides)
    counts, steps = _Counts(), []
    collate, log = sft.collate, MetricsLogger.log

    def counting_collate(rows, examples, **kwargs):
        batch = collate(rows, examples, **kwargs)
        counts.add([len(examples[i].input_ids) for row in rows for i in row], batch["input_ids"].numel(),
                   int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    def timed_log(self, record):
        if "loss" in record:  # a train step's record (evaluations log "eval/..." keys)
            steps.append({"t_end": time.perf_counter(), **counts.pop(), "loss": record["loss"],
                          "own_step_time": record.get("step_time"), "own_tokens": record.get("tokens")})
        return log(self, record)

    sft.collate = counting_collate
    MetricsLogger.log = timed_log
    sft.run(cfg)
    return {"steps": steps, "threads": torch.get_num_threads(), "options": overrides,
            "optimizer": "torch.optim.AdamW (steptrain engine default)"}


def _worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    with open(spec["data_file"]) as f:
        dataset = Dataset.from_list([{"messages": json.loads(line)["messages"]} for line in f if line.strip()])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.chat_template = TRL_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    options = {
        "max_steps": spec["max_steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        **trl_optim_options(spec["lr"], "cosine"),
        **TRL_CPU_FP32_OPTIONS,
        "seed": spec["seed"],
        "max_length": spec["max_length"],
        "packing": spec["packing"],
        "packing_strategy": "bfd",
        "assistant_only_loss": True,
        "train_sampling_strategy": "random" if spec["packing"] else spec["trl_sampler"],
        **TRL_RUN_OPTIONS,
    }
    args = SFTConfig(output_dir=spec["out_dir"], **options)
    counts, steps, losses = _Counts(), [], {}

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                ids = inputs["input_ids"]
                if "attention_mask" in inputs:
                    lengths = inputs["attention_mask"].sum(dim=1).tolist()
                else:  # padding-free: one flattened row, every example restarts its position ids at 0
                    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
                    lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
                counts.add(lengths, ids.numel(), int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"t_end": time.perf_counter(), **counts.pop()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[StepTimer()])
    prepared = trainer.train_dataset
    trainer.train()
    for i, step in enumerate(steps, 1):
        step["loss"] = losses.get(i)
    return {
        "steps": steps,
        "threads": torch.get_num_threads(),
        "options": {**options, "attn_implementation": "sdpa", "chat_template": "Step format + {% generation %}"},
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (transformers default)",
        "padding_free": bool(trainer.padding_free),
        "activation_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
        "prepared_rows": len(prepared),
    }


def run_worker(spec_path: str) -> None:
    worker_main(spec_path, {"steptrain": _worker_steptrain, "trl": _worker_trl})


# --- driver -----------------------------------------------------------------------------------------------


def summarize(name: str, result: dict, warmup: int, model: dict, peak: float) -> dict:
    steps = result["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"{name}: only {len(steps)} steps recorded, warmup is {warmup}")
    timed = steps[warmup:]
    seconds = timed[-1]["t_end"] - steps[warmup - 1]["t_end"]
    total = {k: sum(s[k] for s in timed) for k in ("tokens", "slots", "label_tokens", "examples", "sum_sq_len")}
    # Model FLOPs: 6 per parameter per token for the matmul weights (forward 2 + backward 4; the embedding
    # lookup is not a matmul), plus attention scores and values, 12 * layers * d_attn * L^2 per example of L
    # tokens (PaLM's convention: the full L x L, i.e. causal masking not discounted). Padding is not counted.
    flops = 6 * model["n_matmul_params"] * total["tokens"] + 12 * model["n_layers"] * model["d_attn"] * total["sum_sq_len"]
    tokens_per_s = total["tokens"] / seconds
    losses = [s.get("loss") for s in steps]
    return {
        "name": name,
        **CONTENDERS[name],
        "batch_size": result["batch_size"],
        "steps_timed": len(timed),
        "seconds_timed": seconds,
        "step_time_s": seconds / len(timed),
        "tokens_per_s": tokens_per_s,
        "label_tokens_per_s": total["label_tokens"] / seconds,
        "tokens_per_step": total["tokens"] / len(timed),
        "examples_per_step": total["examples"] / len(timed),
        "padding_fraction": 1 - total["tokens"] / total["slots"],
        "model_flops_per_s": flops / seconds,
        "mfu": flops / seconds / peak,
        "mfu_6n_all_params": 6 * model["n_params"] * tokens_per_s / peak,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "threads": result["threads"],
        "optimizer": result["optimizer"],
        "options": result["options"],
        "worker_wall_s": result["wall_s"],
        **{k: result[k] for k in ("padding_free", "activation_checkpointing", "prepared_rows") if k in result},
    }


def run_contender(name: str, spec: dict, work: Path) -> dict:
    result = run_in_worker(__file__, name, {**spec, **CONTENDERS[name]}, work)
    result["batch_size"] = spec["batch_size"]
    return result


def batch_sizes(tokens_per_step: int, max_length: int, data: dict) -> dict[bool, int]:
    """Rows per step so that packed and padded runs see about the same real tokens per optimizer step."""
    packed = max(1, round(tokens_per_step / max_length))
    real_per_step = packed * max_length * data["pack_fill"]
    return {True: packed, False: max(1, round(real_per_step / data["length_tokens"]["mean"]))}


def tables(res: dict) -> str:
    rows = []
    for c in res["contenders"]:
        rows.append([
            c["label"], c["batch_size"], fmt(c["tokens_per_step"]), f"{100 * c['padding_fraction']:.1f}%",
            fmt(c["step_time_s"], 2), fmt(c["tokens_per_s"]), f"{100 * c['mfu']:.1f}%",
            f"{c['loss_first']:.3f} → {c['loss_last']:.3f}" if c["loss_first"] is not None else "n/a",
        ])
    out = [markdown_table(["contender", "rows/step", "real tokens/step", "padding", "step time (s)", "tokens/s",
                           "MFU", "loss first → last"], rows)]
    if res["ratios"]:
        out.append("")
        out.append(markdown_table(["ratio", "tokens/s"], [[k, f"{v:.2f}x"] for k, v in res["ratios"].items()]))
    return "\n".join(out)


def ratios(by_name: dict) -> dict:
    pairs = [
        ("steptrain / TRL, padded", "steptrain", "trl"),
        ("steptrain / TRL, packed", "steptrain-packed", "trl-packed"),
        ("steptrain packed / padded", "steptrain-packed", "steptrain"),
        ("TRL packed / padded", "trl-packed", "trl"),
    ]
    return {label: by_name[a]["tokens_per_s"] / by_name[b]["tokens_per_s"]
            for label, a, b in pairs if a in by_name and b in by_name}


def readme_block(res: dict) -> str:
    s, pk = res["settings"], res["peak_matmul"]
    lines = [
        *readme_head(res, load_at_end=False),
        f"Peak fp32 matmul ({pk['size']}x{pk['size']}, {pk['threads']} threads): {pk['before'] / 1e9:.1f} GFLOP/s "
        f"before the contenders, {pk['after'] / 1e9:.1f} after; MFU uses the better one.",
        f"Settings: {res['data']['rows']} rows, max_length {s['max_length']}, ~{s['tokens_per_step']} tokens/step, "
        f"{s['warmup']} warmup + {s['steps']} timed steps, model {res['model']['n_params'] / 1e6:.2f}M params "
        f"(vocab {res['model']['vocab_size']}).",
        "",
        tables(res),
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = driver_parser(__doc__, QUICK, FULL, quick_note=" (1-2 minutes)")
    p.add_argument("--max-length", type=int, help=f"max tokens per row / packed bin (default {FULL['max_length']})")
    p.add_argument("--rows", type=int, help=f"conversations generated (default {FULL['rows']})")
    p.add_argument("--tokens-per-step", type=int,
                   help=f"target real tokens per optimizer step (default {FULL['tokens_per_step']})")
    p.add_argument("--matmul-size", type=int, help=f"square matmul for peak FLOP/s (default {FULL['matmul_size']})")
    add_only_option(p, CONTENDERS)
    p.add_argument("--trl-sampler", default="random", choices=["random", "group_by_length"],
                   help="TRL's train_sampling_strategy without packing (default: TRL's default, random); "
                        "see bench/README.md before using group_by_length")
    p.add_argument("--lr", type=float, default=1e-4)
    add_output_options(p, seed=42, results=RESULTS,
                       work_dir_help="keep data, model and logs here (default: a deleted temp dir)")
    args = p.parse_args(argv)
    resolve_settings(p, args, QUICK, FULL)
    args.contenders = chosen_contenders(p, args.only, CONTENDERS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    import torch

    threads = usable_cores()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    res = {"settings": {"quick": args.quick, **{k: getattr(args, k) for k in
                                                ("steps", "warmup", "max_length", "rows", "tokens_per_step",
                                                 "matmul_size", "trl_sampler", "lr", "seed")},
                        "threads": threads, "contenders": args.contenders},
           "machine": machine_info(), "versions": versions()}
    print(f"machine: {res['machine']['cpu_model']}, {threads} cores; torch {torch.__version__}", flush=True)

    failures = []
    with work_dir(args.work_dir, "steptrain-bench-") as work:
        assets = prepare(work, args.rows, args.max_length, args.seed)
        res["data"], res["model"] = assets["data"], assets["model"]
        print(f"data: {assets['data']['rows']} rows, lengths {assets['data']['length_tokens']}, "
              f"TRL tokenization mismatches {assets['data']['trl_tokenization_mismatches']}; model "
              f"{assets['model']['n_params']:,} params; prepared in {assets['prepare_s']}s", flush=True)
        sizes = batch_sizes(args.tokens_per_step, args.max_length, assets["data"])
        peaks = [peak_matmul_flops(args.matmul_size, trials=3 if args.quick else 5)]
        print(f"peak fp32 matmul: {peaks[0]['best_flops'] / 1e9:.1f} GFLOP/s", flush=True)

        spec = {"model_dir": assets["model_dir"], "data_file": assets["data_file"], "max_length": args.max_length,
                "max_steps": args.warmup + args.steps, "lr": args.lr, "seed": args.seed, "threads": threads,
                "trl_sampler": args.trl_sampler}
        results = {}
        for name in args.contenders:
            bs = sizes[CONTENDERS[name]["packing"]]
            print(f"running {name} (batch_size {bs}) ...", flush=True)
            try:
                results[name] = run_contender(name, {**spec, "batch_size": bs}, work)
                print(f"  done in {results[name]['wall_s']:.0f}s", flush=True)
            except RuntimeError as e:
                failures.append(str(e))
                print(e, file=sys.stderr, flush=True)
        peaks.append(peak_matmul_flops(args.matmul_size, trials=3 if args.quick else 5))
        best = max(peaks, key=lambda p: p["best_flops"])
        res["peak_matmul"] = {**best, "before": peaks[0]["best_flops"], "after": peaks[1]["best_flops"]}
        summaries = [summarize(n, r, args.warmup, res["model"], best["best_flops"]) for n, r in results.items()]
        res["contenders"] = summaries
        res["ratios"] = ratios({c["name"]: c for c in summaries})
        res["failures"] = failures
        res["total_wall_s"] = time.perf_counter() - t_start

    write_results(res, args.out, readme_block(res), README if args.update_readme else None, README_START, README_END)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
