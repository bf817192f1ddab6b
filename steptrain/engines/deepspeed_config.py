"""The DeepSpeed JSON, generated from steptrain's own settings (one source of truth).

steptrain owns batch size, accumulation, clipping, precision, the optimizer and the schedule. A user's
DeepSpeed file (``engine.config_file``) may add anything else (bucket sizes, overlap_comm, persistence
thresholds, comms logging, ...); a value it gives for a setting steptrain owns must be ``"auto"`` or
equal to steptrain's, otherwise the run stops before anything is loaded, naming the file, the DeepSpeed
key and the steptrain key that disagree. Optimizer and scheduler sections are refused: two schedules
silently fighting over the learning rate is the failure this rule exists to prevent.
"""

from __future__ import annotations

import json
from pathlib import Path

from steptrain.config import ConfigError

# Never print DeepSpeed's own per-step lines: steptrain logs every step itself.
_QUIET_STEPS = 2**31 - 1


def _offload(device: str, on_gpu: bool) -> dict:
    return {"device": device, "pin_memory": on_gpu} if device != "none" else {"device": "none"}


def derived_config(engine_cfg, trainer_cfg, optim_cfg, *, world_size: int, precision: str, on_gpu: bool) -> dict:
    """The settings steptrain owns, as DeepSpeed keys."""
    zero: dict = {
        "stage": engine_cfg.zero_stage,
        "offload_optimizer": _offload(engine_cfg.offload_optimizer, on_gpu),
    }
    if engine_cfg.zero_stage == 3:
        zero["offload_param"] = _offload(engine_cfg.offload_param, on_gpu)
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # the engine gathers what it saves
    return {
        "train_micro_batch_size_per_gpu": trainer_cfg.batch_size,
        "gradient_accumulation_steps": trainer_cfg.grad_accum,
        "train_batch_size": trainer_cfg.batch_size * trainer_cfg.grad_accum * world_size,
        "gradient_clipping": float(optim_cfg.max_grad_norm),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        # steptrain passes a torch AdamW (or DeepSpeedCPUAdam with engine.ds_cpu_adam) it built itself.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": bool(engine_cfg.ds_cpu_adam),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


# DeepSpeed key path -> the steptrain setting it mirrors (for error messages).
OWNED = {
    "train_micro_batch_size_per_gpu": "trainer.batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "train_batch_size": "trainer.batch_size x trainer.grad_accum x world size",
    "gradient_clipping": "optim.max_grad_norm",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.offload_optimizer.device": "engine.offload_optimizer",
    "zero_optimization.offload_param.device": "engine.offload_param",
    "zero_force_ds_cpu_optimizer": "engine.ds_cpu_adam",
}
REFUSED = {"optimizer": "optim.* (lr, betas, eps, weight_decay)", "scheduler": "optim.scheduler / warmup_* / min_lr_ratio"}


def _merge(user: dict, ours: dict, path: str, source: str) -> dict:
    """``user`` with ``ours`` filled in; a concrete user value for an owned key must equal ours."""
    merged = dict(user)
    for key, value in ours.items():
        dotted = f"{path}{key}"
        given = user.get(key, "auto")
        if isinstance(value, dict):
            if given == "auto":
                given = {}
            if not isinstance(given, dict):
                raise ConfigError(f"{source}: {dotted} must be an object, got {given!r}")
            merged[key] = _merge(given, value, f"{dotted}.", source)
        elif given == "auto" or dotted not in OWNED:
            merged[key] = value if given == "auto" else given
        elif given != value:
            raise ConfigError(
                f"{source}: {dotted}={given!r} contradicts {OWNED[dotted]} (which gives {value!r}); "
                f"set it to \"auto\" or remove it, and change {OWNED[dotted]} instead"
            )
    return merged


def deepspeed_config(engine_cfg, trainer_cfg, optim_cfg, *, world_size: int, precision: str, on_gpu: bool) -> dict:
    """The complete DeepSpeed config: ``engine.config_file`` (if any) merged with steptrain's settings."""
    ours = derived_config(engine_cfg, trainer_cfg, optim_cfg, world_size=world_size, precision=precision, on_gpu=on_gpu)
    if not engine_cfg.config_file:
        return ours
    source = str(engine_cfg.config_file)
    try:
        user = json.loads(Path(source).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    if not isinstance(user, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object")
    for key, instead in REFUSED.items():
        if key in user:
            raise ConfigError(f"{source}: remove the {key!r} section; steptrain builds it from {instead}")
    return _merge(user, ours, "", source)
