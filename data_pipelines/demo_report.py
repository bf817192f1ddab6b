"""Print the demo's before/after evaluation from a run's metrics.jsonl, and where the export is.

    python -m data_pipelines.demo_report RUN_DIR EXPORT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def report(run_dir: str | Path, export_dir: str | Path) -> str:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if "eval/exact_match" in r]
    if len(evals) < 2:
        raise SystemExit(f"{run_dir}/metrics.jsonl: expected evaluations before and after training")
    first, last = evals[0], evals[-1]
    cer = (
        [f"held-out CER:         {100 * first['eval/cer']:.1f}% -> {100 * last['eval/cer']:.1f}%"]
        if "eval/cer" in last
        else []
    )
    return "\n".join([
        "",
        f"held-out exact match: {100 * first['eval/exact_match']:.1f}% (step {first['step']}) -> "
        f"{100 * last['eval/exact_match']:.1f}% (step {last['step']}), on {last['eval/generated']} prompts",
        *cer,
        f"held-out loss:        {first['eval/loss']:.3f} -> {last['eval/loss']:.3f} nats/token",
        f"loss curve:           {Path(run_dir) / 'loss.png'}",
        f"exported HF model:    {Path(export_dir).resolve()}",
    ])


if __name__ == "__main__":
    print(report(*sys.argv[1:3]))
