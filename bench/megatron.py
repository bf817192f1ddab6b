"""Step time and per-rank peak memory: plain PyTorch (engine=single) vs Megatron TP=2 vs PP=2, same model.

One invocation trains the same Qwen2 (random weights saved as an HF directory) on the same demo data with
the same SFT recipe and the same global batch per optimizer step (``grad_accum`` micro-batches of
``batch_size`` rows: the pipeline needs several micro-batches to fill its stages), and reads the recipe's
own per-step ``step_time``, ``peak_mem_gb`` (the largest rank's process peak) and ``peak_mem_gb_min`` (the
smallest rank's) from ``metrics.jsonl``. The loss curves must agree (same math, different split).

Contenders: ``single`` (plain PyTorch, one process, both cores), ``megatron-1`` (megatron-core, one
process, no model parallelism: the engine's own overhead), ``tp2`` and ``pp2`` (2 ranks under torchrun,
one core each). On CPU the engine runs through its CPU shim (gloo); on GPUs run it as is for real figures.

    python bench/megatron.py            # 8 steps per contender (about 4 min on 2 cores)
    python bench/megatron.py --quick    # 3 steps, a smaller model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine_info, markdown_table, replace_readme_block, versions  # noqa: E402
from bench.engines import write_model  # noqa: E402

MG = ["engine=megatron", "engine.megatron_cpu=true"]
CONTENDERS = {  # name: (ranks, overrides)
    "single": (1, []),
    "megatron-1": (1, MG),
    "tp2": (2, [*MG, "engine.tensor_parallel=2"]),
    "pp2": (2, [*MG, "engine.pipeline_parallel=2"]),
}
START, END = "<!-- bench:megatron:start -->", "<!-- bench:megatron:end -->"


def run(name: str, model_dir: Path, train: Path, out: Path, steps: int, grad_accum: int) -> list[dict]:
    ranks, extra = CONTENDERS[name]
    args = [
        f"model.path={model_dir}", f"data.train_files=[{train}]", f"output_dir={out}", "resume=none",
        "data.max_length=128", "trainer.batch_size=4", f"trainer.grad_accum={grad_accum}", f"trainer.max_steps={steps}",
        "trainer.save_every=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false", *extra,
    ]
    threads = str(2 // ranks)  # the same two cores for every contender
    env = {**os.environ, "OMP_NUM_THREADS": threads, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    proc = subprocess.run([*launcher, "-m", "steptrain", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def summarize(records: list[dict]) -> dict:
    return {
        "step_time_median_s": statistics.median(r["step_time"] for r in records[1:]),  # step 1: one-off allocations
        "peak_mem_gb_max_rank": records[-1]["peak_mem_gb"],
        "peak_mem_gb_min_rank": records[-1]["peak_mem_gb_min"],
        "losses": [r["loss"] for r in records],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "megatron.json"))
    ap.add_argument("--readme", action="store_true", help="also rewrite the table in bench/README.md")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 8)
    hidden, layers = (256, 4) if args.quick else (768, 8)  # TP=2 must divide heads, KV groups and the MLP width
    grad_accum = 4

    from data_pipelines.make_demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = make_demo(work / "assets", seed=0, n_train=2000, n_eval=16)
        params = write_model(work / "model", Path(assets["tokenizer"]), hidden, layers)
        results = {name: summarize(run(name, work / "model", Path(assets["train"]), work / name, steps, grad_accum))
                   for name in CONTENDERS}
    ref = results["single"]["losses"]
    agree = {n: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref, strict=True)) for n, r in results.items()}
    result = {
        "params": params, "hidden": hidden, "layers": layers, "steps": steps, "batch_size": 4, "grad_accum": grad_accum,
        "results": results, "max_rel_loss_diff_vs_single": agree, "machine": machine_info(), "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if args.readme:
        replace_readme_block(ROOT / "bench" / "README.md", START, END, table)
    return result


def render(r: dict) -> str:
    res, single = r["results"], r["results"]["single"]
    rows = [[
        name, str(CONTENDERS[name][0]), f"{x['step_time_median_s']:.3f}",
        f"{x['step_time_median_s'] / single['step_time_median_s']:.2f}x",
        f"{x['peak_mem_gb_max_rank']:.2f}", f"{x['peak_mem_gb_min_rank']:.2f}",
        f"{x['peak_mem_gb_max_rank'] / single['peak_mem_gb_max_rank']:.2f}x",
        f"{r['max_rel_loss_diff_vs_single'][name]:.1e}",
    ] for name, x in res.items()]
    return markdown_table(
        ["contender", "ranks", "step s", "vs single", "peak GB, largest rank", "peak GB, smallest rank",
         "largest vs single", "max rel. loss diff"], rows)


if __name__ == "__main__":
    main()
