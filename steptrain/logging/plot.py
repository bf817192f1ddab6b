"""Training curves from metrics.jsonl as a PNG: loss per step and per evaluation (RL runs: the mean reward)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    rl = any("reward" in r for r in records)  # RL: the reward is the curve to watch (its loss is ~0 and signed)
    key, label = ("reward", "mean reward") if rl else ("loss", "loss (nats/token, log scale)")
    train = [(r["step"], r[key]) for r in records if key in r]
    evals = [(r["step"], r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label=f"train {key}", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label=f"eval {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    if not rl:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
