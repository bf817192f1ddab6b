"""DeepSpeed ZeRO-1/2/3 (optionally offloaded) behind the engine interface.

- The DeepSpeed JSON is generated from steptrain's settings (see ``deepspeed_config.py``).
- Pretrained models are built already partitioned under ZeRO-3 (``HfDeepSpeedConfig`` alive while
  ``from_pretrained`` runs, so transformers wraps construction in ``zero.Init``); random-init presets are
  built whole from the seed and partitioned by ``deepspeed.initialize``, so every engine and the exporter
  start from the same weights.
- Loss scaling: the recipe's loss is already divided by the global token count of the step. DeepSpeed
  averages gradients over ranks and (by default) divides by the accumulation steps, so ``backward``
  multiplies by the world size and turns the accumulation division off: the same update as one process.
- Checkpoints: DeepSpeed's own sharded files (every rank writes its optimizer partition) go into
  ``<ckpt>/deepspeed/``; with ``engine.consolidate_on_save`` the gathered fp32 trainable weights also go
  to ``model.safetensors`` (a LoRA adapter is never saved as empty ZeRO-3 shards: they are gathered and
  checked). ``steptrain export`` consolidates the shards when that file is absent.
- Launch: torchrun or the ``deepspeed`` launcher (both set RANK/LOCAL_RANK/WORLD_SIZE); without one, a
  one-process group is created (ZeRO offload on a single GPU). On CPU: gloo, and DeepSpeed's
  shared-memory collective op (a gcc build training never uses) is not compiled.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from steptrain.engines.base import Engine
from steptrain.engines.deepspeed_config import deepspeed_config
from steptrain.engines.optim import build_optimizer, build_scheduler, optimizer_groups
from steptrain.engines.process_group import ProcessGroupCollectives, one_process_env
from steptrain.engines.single import resolve_device
from steptrain.engines.torch_engine import SCHEDULER, WEIGHTS

log = logging.getLogger(__name__)

TAG = "deepspeed"  # sub-directory of a steptrain checkpoint holding DeepSpeed's files


def _import_deepspeed(on_gpu: bool):
    """Import deepspeed for this device (CPU accelerator on CPU; no shared-memory op build)."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed calls torch.distributed functions torch has renamed: one warning per call, every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - the module whose build_shm_op is replaced below

    if not on_gpu:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


class DeepSpeedEngine(ProcessGroupCollectives, Engine):
    name = "deepspeed"

    def __init__(self, engine_cfg, trainer_cfg, optim_cfg):
        super().__init__(engine_cfg, trainer_cfg)
        one_process_env()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._device = resolve_device(engine_cfg.device, self.local_rank)
        on_gpu = self._device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(self._device)
        self.ds = _import_deepspeed(on_gpu)
        backend = engine_cfg.backend if engine_cfg.backend != "auto" else ("nccl" if on_gpu else "gloo")
        self.ds.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=30))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage = int(engine_cfg.zero_stage)
        self.lockstep = self.stage == 3  # every rank joins every forward (parameter all-gathers)
        self.ds_config = deepspeed_config(
            engine_cfg, trainer_cfg, optim_cfg, world_size=self.world_size, precision=self.precision(), on_gpu=on_gpu
        )
        self._last = True
        self._frozen = False

    @property
    def device(self) -> torch.device:
        return self._device

    # --- model construction -----------------------------------------------------------------------
    def init_context(self, model_cfg):
        """Under ZeRO-3 (engine.zero_init), pretrained weights load straight into partitions."""
        if self.stage != 3 or not self.cfg.zero_init or model_cfg.preset:
            return contextlib.nullcontext()
        from transformers.integrations import HfDeepSpeedConfig

        @contextlib.contextmanager
        def partitioned():
            hf_config = HfDeepSpeedConfig(self.ds_config)  # transformers holds only a weak reference
            try:
                yield hf_config
            finally:
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()

        return partitioned()

    # --- training ---------------------------------------------------------------------------------
    def prepare(self, model, param_groups, optim_cfg, total_steps):
        if self.cfg.ds_cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            base = DeepSpeedCPUAdam(
                optimizer_groups(param_groups), lr=float(optim_cfg.lr), betas=tuple(optim_cfg.betas),
                eps=float(optim_cfg.eps), adamw_mode=True,
            )
        else:
            base = build_optimizer(param_groups, optim_cfg)
        # The schedule drives the base optimizer's groups, which the ZeRO wrapper keeps (same dicts).
        self.scheduler = build_scheduler(base, optim_cfg, total_steps)
        self._frozen = any(not p.requires_grad for p in model.parameters())
        self.model, self.optimizer, _, _ = self.ds.initialize(model=model, optimizer=base, config=self.ds_config)
        self.module = self.model.module
        return self.model, self.optimizer, self.scheduler

    def accumulate(self, last: bool):
        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.world_size, scale_wrt_gas=False)
        if not self._last:
            self.model.step()  # DeepSpeed counts micro-steps in step(); off the boundary it only counts

    def step(self) -> float:
        self.model.step()
        self.scheduler.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # --- state ------------------------------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        # Frozen weights (a LoRA base) come from the base model again on resume: never copied per save.
        self.model.save_checkpoint(
            str(ckpt_dir), tag=TAG, client_state={}, save_latest=False, exclude_frozen_parameters=self._frozen
        )
        weights = self.trainable_state_dict() if self.cfg.consolidate_on_save else None
        if self.is_main:
            torch.save(self.scheduler.state_dict(), ckpt_dir / SCHEDULER)
            if weights is not None:
                save_file(weights, str(ckpt_dir / WEIGHTS))

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(ckpt_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
            load_module_strict=not self._frozen,
        )
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir / TAG}: no DeepSpeed checkpoint to resume from")
        self.scheduler.load_state_dict(torch.load(ckpt_dir / SCHEDULER, weights_only=True, map_location="cpu"))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master copies of the trainable weights, gathered from every rank's partition (all ranks call)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)  # a collective under ZeRO
                if self.is_main:
                    out[name] = full.detach().to("cpu").contiguous()
        _refuse_empty(out)
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter (gathered) and buffer; trainable ones as fp32 master copies (all ranks call)."""
        out = self.trainable_state_dict()
        frozen = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
        for name, p in frozen:
            with self.ds.zero.GatheredParameters([p], modifier_rank=None):  # no-op below ZeRO-3
                if self.is_main:
                    out[name] = p.detach().to("cpu").clone()
        if self.is_main:  # persistent buffers (and tied aliases, filled from the weight they alias)
            params = dict(self.module.named_parameters())
            for key, value in self.module.state_dict().items():
                if key not in out:
                    alias = next((n for n, p in params.items() if p is value), None)
                    out[key] = out[alias] if alias else value.detach().to("cpu").clone()
        _refuse_empty(out)
        return out


def _refuse_empty(state: dict[str, torch.Tensor]) -> None:
    """The ZeRO-3 empty-shard failure (shape-(0,) tensors written as if they were weights) stops here."""
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"gathered weights with zero elements: {empty[:3]} (a ZeRO-3 partition was not gathered)")


def consolidate_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
    """fp32 weights rebuilt from the ZeRO shards of a steptrain checkpoint (None: not a DeepSpeed one).

    One process, no launcher: used by ``steptrain export`` when the run did not write model.safetensors
    (``engine.consolidate_on_save=false``). Holds the full trainable model in host memory.
    """
    if not (Path(ckpt_dir) / TAG).is_dir():
        return None
    _import_deepspeed(on_gpu=torch.cuda.is_available())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
    _refuse_empty(state)
    return state
