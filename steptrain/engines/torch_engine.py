"""State handling shared by the plain-PyTorch engines (single process and DDP).

Weights go to safetensors; optimizer and scheduler states go through ``torch.save`` and come back with
``weights_only=True``, so a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steptrain.engines.base import Engine
from steptrain.engines.optim import build_optimizer, build_scheduler

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"


class TorchEngine(Engine):
    def _build_optim(self, param_groups, optim_cfg, total_steps):
        self.optimizer = build_optimizer(param_groups, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = float(self._optim_cfg.max_grad_norm)
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            n: p.detach().to("cpu").contiguous() for n, p in self.module.named_parameters() if p.requires_grad
        }

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu").contiguous() for n, t in self.module.state_dict().items()}

    def save(self, ckpt_dir: Path) -> None:
        if not self.is_main:
            return  # weights and optimizer are replicated: rank 0 writes them
        save_file(self.trainable_state_dict(), str(ckpt_dir / WEIGHTS))
        torch.save(self.optimizer.state_dict(), ckpt_dir / OPTIMIZER)
        torch.save(self.scheduler.state_dict(), ckpt_dir / SCHEDULER)

    def load(self, ckpt_dir: Path) -> None:
        load_trainable(self.module, ckpt_dir / WEIGHTS)
        self.optimizer.load_state_dict(torch.load(ckpt_dir / OPTIMIZER, weights_only=True, map_location="cpu"))
        self.scheduler.load_state_dict(torch.load(ckpt_dir / SCHEDULER, weights_only=True, map_location="cpu"))


def load_trainable(module: torch.nn.Module, weights: Path | dict[str, torch.Tensor], source: str = "") -> None:
    """Load saved trainable weights (a file or a state dict); every trainable parameter must be present
    and nothing unknown."""
    state = load_file(str(weights)) if isinstance(weights, Path) else weights
    path = source or weights
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - state.keys())
    unknown = sorted(set(state) - set(module.state_dict()))  # buffers and tied aliases are known names
    if missing or unknown:
        raise ValueError(
            f"{path}: does not match the model: missing {missing[:5]} unknown {unknown[:5]} "
            "(was it written with other model/peft settings?)"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name in params:
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
