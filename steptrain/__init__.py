"""steptrain: training and fine-tuning for StepFun-style speech and video foundation models."""

__version__ = "0.1.0"
