"""Engines: single | ddp | deepspeed | megatron behind one interface (see base.py).

``ENGINES`` names every engine with what the config and validation need to know about it; it is plain
data, so importing this package is cheap (the engine classes, and torch, load when one is built).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steptrain.engines.base import Engine


@dataclass(frozen=True)
class EngineSpec:
    target: str  # "module:Class" of the engine
    # The engine builds its own optimizer and schedule from optim.* at construction (DeepSpeed, Megatron);
    # the others get them from the recipe's model.
    takes_optim: bool = False
    # The recipes it runs; None: every recipe.
    recipes: tuple[str, ...] | None = None


ENGINES: dict[str, EngineSpec] = {
    "single": EngineSpec("steptrain.engines.single:SingleEngine"),
    "ddp": EngineSpec("steptrain.engines.ddp:DDPEngine"),
    "deepspeed": EngineSpec("steptrain.engines.deepspeed_engine:DeepSpeedEngine", takes_optim=True),
    "megatron": EngineSpec("steptrain.engines.megatron_engine:MegatronEngine", takes_optim=True,
                           recipes=("sft", "dpo")),
}


def build_engine(engine_cfg, trainer_cfg, optim_cfg) -> Engine:
    spec = ENGINES.get(engine_cfg.name)
    if spec is None:
        raise ValueError(f"engine.name={engine_cfg.name!r} is not one of: {', '.join(ENGINES)}")
    module, _, cls = spec.target.partition(":")
    engine_cls = getattr(importlib.import_module(module), cls)
    return engine_cls(engine_cfg, trainer_cfg, optim_cfg) if spec.takes_optim else engine_cls(engine_cfg, trainer_cfg)


def __getattr__(name: str):
    if name == "Engine":  # the interface, imported on first use (it needs torch)
        from steptrain.engines.base import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENGINES", "Engine", "EngineSpec", "build_engine"]
