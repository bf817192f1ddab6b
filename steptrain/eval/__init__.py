"""Evaluation shared by recipes and `steptrain eval`: held-out loss and generation metrics."""

from steptrain.eval.asr import error_rates
from steptrain.eval.lm import evaluate_loss, generation_metrics

__all__ = ["error_rates", "evaluate_loss", "generation_metrics"]
