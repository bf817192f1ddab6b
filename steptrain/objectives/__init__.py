"""Pure loss functions: tensors in, (loss, metrics) out. They import only torch.

``registry`` (names and properties of the losses and advantages, no torch) is importable on its own, so
the config can read it cheaply; the functions below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from steptrain.lazy import lazy_exports

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and editors
    from steptrain.objectives.lm import lm_loss_sum, stats_vector, summarize_stats
    from steptrain.objectives.preference import (
        LOSSES,
        audio_token_mask,
        gathered_logps,
        preference_loss,
        reward_model_loss,
        sequence_logps,
    )

_EXPORTS = {
    "LOSSES": "preference",
    "audio_token_mask": "preference",
    "gathered_logps": "preference",
    "preference_loss": "preference",
    "reward_model_loss": "preference",
    "sequence_logps": "preference",
    "lm_loss_sum": "lm",
    "stats_vector": "lm",
    "summarize_stats": "lm",
}

__all__ = [
    "LOSSES",
    "audio_token_mask",
    "gathered_logps",
    "lm_loss_sum",
    "preference_loss",
    "reward_model_loss",
    "sequence_logps",
    "stats_vector",
    "summarize_stats",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
