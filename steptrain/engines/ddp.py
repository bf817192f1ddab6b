"""Data parallel over torchrun ranks: gloo on CPU, nccl on GPU.

Gradients are synchronised only on the last micro-batch of an optimizer step (``no_sync`` otherwise).
DDP averages gradients over ranks, so the recipe's loss (divided by the global token count) is scaled
by ``world_size`` in ``backward`` to keep the token-mean over the whole global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from steptrain.engines.process_group import ProcessGroupCollectives
from steptrain.engines.single import resolve_device
from steptrain.engines.torch_engine import TorchEngine


class DDPEngine(ProcessGroupCollectives, TorchEngine):
    name = "ddp"

    def __init__(self, engine_cfg, trainer_cfg):
        super().__init__(engine_cfg, trainer_cfg)
        if "RANK" not in os.environ:
            raise RuntimeError(
                "engine=ddp needs a launcher: torchrun --nproc_per_node N -m steptrain train engine=ddp ..."
            )
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._device = resolve_device(engine_cfg.device, self.local_rank)
        backend = engine_cfg.backend
        if backend == "auto":
            backend = "nccl" if self._device.type == "cuda" else "gloo"
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    @property
    def device(self) -> torch.device:
        return self._device

    def prepare(self, model, param_groups, optim_cfg, total_steps):
        self._optim_cfg = optim_cfg
        self.module = model.to(self.device)
        ids = [self.local_rank] if self.device.type == "cuda" else None
        self.model = DistributedDataParallel(
            self.module, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters
        )
        self._build_optim(param_groups, optim_cfg, total_steps)
        return self.model, self.optimizer, self.scheduler

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()

