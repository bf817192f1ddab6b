"""Engines: single | ddp | deepspeed | megatron behind one interface (see base.py)."""

from __future__ import annotations

from steptrain.engines.base import Engine

ENGINES = ("single", "ddp", "deepspeed", "megatron")


def build_engine(engine_cfg, trainer_cfg, optim_cfg) -> Engine:
    if engine_cfg.name == "single":
        from steptrain.engines.single import SingleEngine

        return SingleEngine(engine_cfg, trainer_cfg)
    if engine_cfg.name == "ddp":
        from steptrain.engines.ddp import DDPEngine

        return DDPEngine(engine_cfg, trainer_cfg)
    if engine_cfg.name == "deepspeed":
        from steptrain.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(engine_cfg, trainer_cfg, optim_cfg)
    if engine_cfg.name == "megatron":
        from steptrain.engines.megatron_engine import MegatronEngine

        return MegatronEngine(engine_cfg, trainer_cfg, optim_cfg)
    raise ValueError(f"engine.name={engine_cfg.name!r} is not one of: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "build_engine"]
