"""Console, metrics.jsonl, TensorBoard, W&B and plots."""

from steptrain.logging.metrics import METRICS, MetricsLogger, format_metrics, truncate_metrics

__all__ = ["METRICS", "MetricsLogger", "format_metrics", "truncate_metrics"]
