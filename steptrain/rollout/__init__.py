"""Generation behind one function so recipes (evaluation, RL rollouts) do not care how it runs.

``registry`` (the built-in reward names and properties, no torch) is importable on its own; the
generation functions below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from steptrain.lazy import lazy_exports

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and editors
    from steptrain.rollout.generate import Sampling, generate_greedy, generate_ids, stop_ids

__all__ = ["Sampling", "generate_greedy", "generate_ids", "stop_ids"]


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "generate"))
