"""Pure loss functions: tensors in, (loss, metrics) out. They import only torch."""

from steptrain.objectives.lm import lm_loss_sum, stats_vector, summarize_stats

__all__ = ["lm_loss_sum", "stats_vector", "summarize_stats"]
