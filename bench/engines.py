"""Per-rank peak memory and step time: DDP (plain PyTorch) vs DeepSpeed ZeRO-2 vs ZeRO-3, same model.

One invocation trains the same ~80M-parameter Qwen2 (random weights saved as an HF directory, so ZeRO-3
loads it partitioned with zero.Init) on the same demo data with the same SFT recipe, 2 ranks under
torchrun each time, and reads the recipe's own per-step ``step_time``, ``mem_gb`` (the largest rank's memory
after each step: resident set size on CPU, allocated device memory on GPU; its maximum over the run is
"train GB") and ``peak_mem_gb`` (the process peak, which on CPU includes model loading) from ``metrics.jsonl``. It also
checks that the three loss curves agree (same math, different sharding).

``zero3-lean`` is ZeRO-3 with a user DeepSpeed file (``engine.config_file``) that releases gathered layers
right after use (see LEAN). Expected per-rank model state (fp32, Adam, P parameters, 2 ranks): DDP 16P bytes (weights 4P, grads 4P,
Adam 8P); ZeRO-2 4P + 12P/2; ZeRO-3 16P/2. On CPU the process itself (torch, DeepSpeed, tokenizer,
data) adds a constant of several hundred MB to every contender.

    python bench/engines.py            # 10 steps per engine (about 3-4 min on 2 cores)
    python bench/engines.py --quick    # 3 steps, a smaller model
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

from bench.common import ROOT, machine_info, markdown_table, versions  # noqa: E402

ENGINES = {
    "ddp": ["engine=ddp"],
    "zero2": ["engine=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine=deepspeed", "engine.zero_stage=3"],
    "zero3-lean": ["engine=deepspeed", "engine.zero_stage=3", "engine.config_file={work}/lean.json"],
}
# DeepSpeed's ZeRO-3 defaults let up to 1e9 gathered parameter elements stay live and be reused (and
# buckets of 5e8 elements): below a billion parameters a rank then keeps every layer it gathered. These
# settings release each layer after use, which is what makes ZeRO-3 save memory at this size.
LEAN = {
    "zero_optimization": {
        "stage3_max_live_parameters": 1e6, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 1e6,
        "stage3_param_persistence_threshold": 1e4, "reduce_bucket_size": 1e6,
    }
}


def write_model(out: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    """A random Qwen2 (hidden ``hidden``, ``layers`` layers) saved with the demo tokenizer; returns P."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def run_engine(name: str, model_dir: Path, train: Path, out: Path, steps: int) -> list[dict]:
    (out.parent / "lean.json").write_text(json.dumps(LEAN))
    args = [
        f"model.path={model_dir}", f"data.train_files=[{train}]", f"output_dir={out}", "resume=none",
        "data.max_length=128", "trainer.batch_size=4", f"trainer.max_steps={steps}", "trainer.save_every=0",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        *(a.format(work=out.parent) for a in ENGINES[name]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "steptrain", "train", *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def summarize(records: list[dict], params: int, name: str) -> dict:
    timed = [r["step_time"] for r in records[1:]]  # the first step includes one-off allocations
    state_bytes = {"ddp": 16, "zero2": 4 + 6, "zero3": 8, "zero3-lean": 8}[name] * params
    return {
        "step_time_median_s": statistics.median(timed),
        "train_mem_gb": max(r["mem_gb"] for r in records),
        "peak_mem_gb": records[-1]["peak_mem_gb"],
        "expected_model_state_gb": state_bytes / 2**30,
        "losses": [r["loss"] for r in records],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engines.json"))
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    hidden, layers = (256, 4) if args.quick else (768, 12)

    from data_pipelines.make_demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = make_demo(work / "assets", seed=0, n_train=2000, n_eval=16)
        params = write_model(work / "model", Path(assets["tokenizer"]), hidden, layers)
        results = {name: summarize(run_engine(name, work / "model", Path(assets["train"]), work / name, steps),
                                   params, name) for name in ENGINES}
    ref = results["ddp"]["losses"]
    agree = {n: max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref, strict=True)) for n, r in results.items()}
    result = {
        "params": params, "steps": steps, "ranks": 2, "results": results, "max_rel_loss_diff_vs_ddp": agree,
        "machine": machine_info(), "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return result


def render(r: dict) -> str:
    res, ddp = r["results"], r["results"]["ddp"]
    rows = [[
        name, f"{x['train_mem_gb']:.2f}", f"{x['train_mem_gb'] / ddp['train_mem_gb']:.2f}x", f"{x['peak_mem_gb']:.2f}",
        f"{x['expected_model_state_gb']:.2f}", f"{x['step_time_median_s']:.2f}",
        f"{x['step_time_median_s'] / ddp['step_time_median_s']:.2f}x", f"{r['max_rel_loss_diff_vs_ddp'][name]:.1e}",
    ] for name, x in res.items()]
    return markdown_table(
        ["engine (2 ranks)", "train GB / rank", "vs ddp", "process peak GB", "model state GB / rank (expected)", "step s",
         "vs ddp", "max rel. loss diff vs ddp"], rows)


if __name__ == "__main__":
    main()
