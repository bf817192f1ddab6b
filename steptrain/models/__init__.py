"""Model builders and loaders."""

from steptrain.models.presets import PRESETS, build_preset

__all__ = ["PRESETS", "build_preset"]
