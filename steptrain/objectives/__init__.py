"""Pure loss functions: tensors in, (loss, metrics) out. They import only torch."""

from steptrain.objectives.lm import lm_loss_sum, stats_vector, summarize_stats
from steptrain.objectives.preference import (
    LOSSES,
    audio_token_mask,
    gathered_logps,
    preference_loss,
    reward_model_loss,
    sequence_logps,
)

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
