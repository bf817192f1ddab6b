"""Peak memory and step time of the LM head's loss, plain ``[N, V]`` logits vs the chunked head, at V = 158,720.

Step-Audio 2's vocabulary is 158,720: plain fp32 logits of 4096 tokens are 2.6 GB, and the loss keeps a
log-softmax of the same size for backward. ``objective.head_chunk_tokens`` (steptrain/objectives/chunked_head.py)
computes the same loss ``n`` labelled tokens at a time and recomputes each chunk's logits in backward.

Each variant runs in its own subprocess (so one's allocations do not hide the other's peak): steptrain's
``lm_loss_sum`` on ``[B, T, H]`` final hidden states and a ``[V, H]`` head weight (both trained, fp32), then
backward; the plain variant first makes the logits with ``F.linear`` as the model's ``lm_head`` would.
Memory: on CPU the peak resident set (``ru_maxrss``) of the step minus the resident set just before it (the
inputs, the weight and its gradient are there in both: the gradient is allocated by a first, untimed step);
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step. Also reported: the
largest tensors each variant holds at once, computed from the shapes (the analytic footprint).

    python bench/chunked_head.py                 # V=158720, H=256, 4 x 1024 tokens, chunks 512 and 1024
    python bench/chunked_head.py --quick         # smoke: V=32000, 2 x 256 tokens
    python bench/chunked_head.py --update-readme # also rewrite the results block in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine_info, markdown_table, replace_readme_block, usable_cores, versions  # noqa: E402

START, END = "<!-- chunked_head results start -->", "<!-- chunked_head results end -->"


def _rss_bytes() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from steptrain.objectives import lm_loss_sum
    from steptrain.objectives.chunked_head import HeadInput

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    b, t, h, v, chunk = spec["batch"], spec["seq"] + 1, spec["hidden"], spec["vocab"], spec["chunk"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g).to(device).requires_grad_(True)
    weight = (0.02 * torch.randn(v, h, generator=g)).to(device).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    labels[:, 0] = -100

    def step() -> float:
        if chunk:
            loss, _ = lm_loss_sum(HeadInput(hidden, weight, None, chunk), labels)
        else:
            logits = F.linear(hidden, weight)  # what the model's lm_head returns
            loss, _ = lm_loss_sum(logits, labels)
            del logits
        loss.backward()
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss = step()  # allocates the gradients (kept: they exist in both variants during training)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        start_max = _maxrss_bytes()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _maxrss_bytes() - before
    return {
        "loss": loss,
        "grad_weight": weight.grad.double().reshape(-1)[:: max(1, weight.numel() // 4096)].tolist(),
        "grad_hidden": hidden.grad.double().reshape(-1)[:: max(1, hidden.numel() // 4096)].tolist(),
        "step_s": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "peak_step_bytes": peak,
        "rss_before_bytes": before,
        "maxrss_before_step_bytes": None if device.type == "cuda" else start_max,
    }


def analytic_bytes(spec: dict) -> int:
    """The largest set of [tokens, V]-sized fp32 tensors alive at once (plain: the logits, the log-softmax
    cross-entropy keeps for backward, and the gradient of the logits; chunked: one chunk's logits, whose
    logsumexp (forward) and gradient (backward) are built in place in the same buffer)."""
    n = spec["batch"] * spec["seq"]
    rows = min(spec["chunk"], n) if spec["chunk"] else n
    return (3 if not spec["chunk"] else 1) * rows * spec["vocab"] * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=158720)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024, help="labelled positions per row (tokens = batch x seq)")
    ap.add_argument("--chunks", default="512,1024", help="chunk sizes of the chunked variants")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one untimed step")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chunked_head.json"))
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec)))
        return
    if args.quick:
        args.vocab, args.batch, args.seq, args.chunks, args.steps = 32000, 2, 256, "128", 1
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    base = {"vocab": args.vocab, "hidden": args.hidden, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "device": device, "threads": usable_cores()}
    variants = {"plain": 0, **{f"chunked-{c}": int(c) for c in args.chunks.split(",")}}
    t_start = time.perf_counter()
    results = {}
    for name, chunk in variants.items():
        spec = {**base, "chunk": chunk}
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "chunk": chunk,
                         "analytic_bytes": analytic_bytes(spec)}
        print(f"  step {results[name]['step_s']:.2f}s, peak {results[name]['peak_step_bytes'] / 2**30:.2f} GiB",
              flush=True)
    plain = results["plain"]
    rows = []
    for name, r in results.items():
        r["loss_abs_diff_vs_plain"] = abs(r["loss"] - plain["loss"])
        r["loss_rel_diff_vs_plain"] = r["loss_abs_diff_vs_plain"] / abs(plain["loss"])
        for key in ("grad_weight", "grad_hidden"):  # a strided sample of the accumulated gradients
            diff = max(abs(a - b) for a, b in zip(r[key], plain[key], strict=True))
            r[f"{key}_max_rel_diff_vs_plain"] = diff / max(abs(b) for b in plain[key])
        r["peak_ratio_vs_plain"] = r["peak_step_bytes"] / plain["peak_step_bytes"]
        r["step_time_ratio_vs_plain"] = r["step_s"] / plain["step_s"]
        rows.append([name, f"{r['peak_step_bytes'] / 2**30:.2f}", f"{r['analytic_bytes'] / 2**30:.2f}",
                     f"{r['peak_ratio_vs_plain']:.3f}", f"{r['step_s']:.2f}", f"{r['step_time_ratio_vs_plain']:.2f}",
                     f"{r['loss_rel_diff_vs_plain']:.1e}", f"{r['grad_weight_max_rel_diff_vs_plain']:.1e}"])
    for r in results.values():
        del r["grad_weight"], r["grad_hidden"]
    tokens = args.batch * args.seq
    block = (f"V = {args.vocab:,}, H = {args.hidden}, {tokens:,} labelled tokens ({args.batch} x {args.seq}), fp32, "
             f"{device} ({usable_cores()} threads), median of {args.steps} step(s) after one untimed:\n\n"
             + markdown_table(["variant", "peak GiB (measured)", "[N,V]-tensors GiB (analytic)", "peak / plain",
                               "step s", "step / plain", "loss rel. diff",
                               "grad rel. diff"], rows))
    res = {"config": base, "variants": results, "machine": machine_info(), "versions": versions(),
           "total_wall_s": time.perf_counter() - t_start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(block)
    print(f"\nresults: {out}")
    if args.update_readme:
        replace_readme_block(ROOT / "bench" / "README.md", START, END, block)


if __name__ == "__main__":
    main()
