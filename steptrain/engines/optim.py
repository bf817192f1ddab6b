"""AdamW parameter groups (per-group learning-rate multipliers) and warmup + decay schedules.

Shared by every engine so that "lr_mult", weight-decay exclusions and schedules mean the same thing
whether the model runs on one process, DDP, DeepSpeed or Megatron.
"""

from __future__ import annotations

import math
import re

import torch

NO_DECAY = re.compile(r"(bias|norm|ln_|layernorm)", re.IGNORECASE)


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """Group trainable parameters by (lr multiplier, weight decay).

    The multiplier is the first ``optim.lr_mult`` regex that matches the parameter name (``re.search``);
    biases, norms and 1-D tensors get no weight decay.
    """
    return named_param_groups(model.named_parameters(), optim_cfg)


def named_param_groups(named, optim_cfg) -> list[dict]:
    """``param_groups`` of (name, parameter) pairs (an engine whose modules are named otherwise passes
    the HF-style names the patterns are written for)."""
    patterns = [(re.compile(k), float(v)) for k, v in optim_cfg.lr_mult.items()]
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        mult = next((m for rx, m in patterns if rx.search(name)), 1.0)
        wd = 0.0 if (p.ndim < 2 or NO_DECAY.search(name)) else float(optim_cfg.weight_decay)
        g = groups.setdefault((mult, wd), {"params": [], "names": [], "lr_mult": mult, "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (check peft.* and model settings)")
    for g in groups.values():
        g["lr"] = float(optim_cfg.lr) * g["lr_mult"]
    return list(groups.values())


def optimizer_groups(groups: list[dict]) -> list[dict]:
    """``groups`` without the bookkeeping keys an optimizer does not take."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def build_optimizer(groups: list[dict], optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        optimizer_groups(groups), lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps)
    )


def warmup_steps(optim_cfg, total_steps: int) -> int:
    return int(optim_cfg.warmup_steps or round(optim_cfg.warmup_ratio * total_steps))


def lr_factor(step: int, *, total_steps: int, warmup: int, kind: str, min_ratio: float, hold: int = 0) -> float:
    """Multiplier on the base lr after ``step`` optimizer steps: 0 for ``hold`` steps (the weights do not
    move, weight decay included), then linear warmup, then decay to min_ratio over the remaining steps."""
    if step < hold:
        return 0.0
    step, total_steps = step - hold, total_steps - hold
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(optim_cfg, total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps=total_steps, warmup=warm, kind=optim_cfg.scheduler, min_ratio=optim_cfg.min_lr_ratio,
            hold=optim_cfg.hold_steps,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
