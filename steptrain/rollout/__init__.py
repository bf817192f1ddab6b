"""Generation behind one function so recipes (evaluation, RL rollouts) do not care how it runs.

``registry`` (the built-in reward names and properties, no torch) is importable on its own; the
generation functions below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and editors
    from steptrain.rollout.generate import Sampling, generate_greedy, generate_ids, stop_ids

__all__ = ["Sampling", "generate_greedy", "generate_ids", "stop_ids"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.generate"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
