"""The engine interface: how a model is placed, stepped, saved and reduced across ranks.

A recipe talks only to this interface, so the same loop runs on one process, DDP, DeepSpeed or
Megatron. A recipe's task says how the model is called on a micro-batch (``forward``, by default
``lm_logits``) and how its output is scored (``score(output, batch) -> (summed loss, stats)``); the
engine runs them. Per optimizer step:

    stats = engine.forward_backward(micro_batches, score, scale=1 / n_global)
    grad_norm = engine.step()               # clip, optimizer, scheduler, zero_grad

The default ``forward_backward`` is the plain loop (accumulate, autocast, forward, score, backward per
micro-batch); a pipeline-parallel engine runs the micro-batches through its schedule instead, calling
``score`` on the last stage only. Data is sharded over ``data_rank``/``data_world`` (the data-parallel
coordinates; model-parallel ranks of one replica see the same batches) and per-step sums are reduced
with ``data_all_reduce``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from steptrain.models.forward import eval_mode, lm_logits


class Engine(ABC):
    name: str = "base"

    def __init__(self, engine_cfg, trainer_cfg):
        self.cfg = engine_cfg
        self.trainer_cfg = trainer_cfg
        self.model: torch.nn.Module | None = None  # what forward() is called on (maybe wrapped)
        self.module: torch.nn.Module | None = None  # the unwrapped model (for generate, export)
        self.optimizer = None
        self.scheduler = None

    # --- topology -------------------------------------------------------------------------------
    # True when every rank must run every forward together (ZeRO-3 parameter gathers, model
    # parallelism): evaluation and generation then give each rank the same number of batches.
    lockstep: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel index: which share of the data it trains on."""
        return self.rank

    @property
    def data_world(self) -> int:
        """Number of data-parallel replicas (ranks that see different data)."""
        return self.world_size

    def data_all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a per-replica quantity (counts, stats) over the data-parallel replicas, in place."""
        return self.all_reduce(tensor, op)

    def barrier(self) -> None:  # noqa: B027 - a no-op is the right default for one process
        """Wait for every rank (no-op on one process)."""

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks in place and return it (sum | max | min)."""
        return tensor

    def memory_gb(self) -> tuple[float, float]:
        """(now, peak so far) of this rank: allocated device memory on GPU; resident set size on CPU,
        where the peak also covers model loading."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30, torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * resource.getpagesize() / 2**30
        return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB

    def close(self) -> None:  # noqa: B027
        """Release process groups and other resources."""

    # --- training ---------------------------------------------------------------------------------
    def init_context(self, model_cfg):
        """Context in which the recipe builds the model (e.g. partitioned at construction)."""
        return contextlib.nullcontext()

    @abstractmethod
    def prepare(self, model, param_groups: list[dict], optim_cfg, total_steps: int):
        """Place/wrap the model and build the optimizer and scheduler; returns (model, optimizer, scheduler)."""

    def precision(self) -> str:
        p = self.trainer_cfg.precision
        if p != "auto":
            return p
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"

    def autocast(self):
        p = self.precision()
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def accumulate(self, last: bool):
        """Context for one micro-batch; gradient sync happens only when ``last`` is True."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    def forward_backward(self, batches: list[dict], score, scale: float, forward=lm_logits) -> torch.Tensor:
        """Forward, score and backward every micro-batch of a step (gradients of ``loss_sum * scale``);
        returns the summed stats vectors."""
        totals = None
        for i, batch in enumerate(batches):
            with self.accumulate(last=i == len(batches) - 1):
                with self.autocast():
                    output = forward(self.model, batch)
                loss_sum, stats = score(output, batch)
                self.backward(loss_sum * scale)
            totals = stats if totals is None else totals + stats
        return totals

    @torch.no_grad()
    def forward_only(self, batches: list[dict], score, forward=lm_logits) -> list:
        """``score(output, batch)`` of every batch in eval mode without gradients, on every rank."""
        out = []
        with eval_mode(self.module) as model:
            for batch in batches:
                with self.autocast():
                    output = forward(model, batch)
                out.append(score(output, batch))
        return out

    @abstractmethod
    def step(self) -> float:
        """Clip, step the optimizer and scheduler, zero the grads; return the pre-clip grad norm."""

    def lr_factor(self) -> float:
        """Current scheduler multiplier on the base learning rate."""
        return float(self.scheduler.lr_lambdas[0](self.scheduler.last_epoch))

    # --- state ------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write model (trainable part), optimizer and scheduler state into ``ckpt_dir`` (all ranks call)."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Restore what ``save`` wrote (all ranks call)."""

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by name, gathered and on CPU (valid on the main rank)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by name, gathered and on CPU (valid on the main rank)."""
