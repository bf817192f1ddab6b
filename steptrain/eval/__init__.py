"""Evaluation shared by recipes and `steptrain eval`: held-out loss and generation metrics."""

from steptrain.eval.lm import evaluate_loss, exact_match

__all__ = ["evaluate_loss", "exact_match"]
