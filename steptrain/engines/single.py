"""One process, one device."""

from __future__ import annotations

import torch

from steptrain.engines.torch_engine import TorchEngine


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class SingleEngine(TorchEngine):
    name = "single"

    def __init__(self, engine_cfg, trainer_cfg):
        super().__init__(engine_cfg, trainer_cfg)
        self._device = resolve_device(engine_cfg.device)

    @property
    def device(self) -> torch.device:
        return self._device

    def prepare(self, model, param_groups, optim_cfg, total_steps):
        self._optim_cfg = optim_cfg
        self.module = self.model = model.to(self.device)
        self._build_optim(param_groups, optim_cfg, total_steps)
        return self.model, self.optimizer, self.scheduler
