"""Console, metrics.jsonl, TensorBoard, W&B and plots."""

from steptrain.logging.metrics import METRICS, MetricsLogger, truncate_metrics

__all__ = ["METRICS", "MetricsLogger", "truncate_metrics"]
