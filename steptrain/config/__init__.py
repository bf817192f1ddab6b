"""Config schemas, composition and validation."""

from steptrain.config.compose import load_config, load_saved_config
from steptrain.config.schema import TrainConfig
from steptrain.config.validate import ConfigError, validate

__all__ = ["ConfigError", "TrainConfig", "load_config", "load_saved_config", "validate"]
