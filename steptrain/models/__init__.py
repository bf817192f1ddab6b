"""Model builders and loaders.

Importing this package registers steptrain's native Step-1 (``model_type: step1``, Step-Audio-Chat and
Step-Audio-TTS-3B) with the transformers Auto classes (:mod:`steptrain.models.step1`).
"""

import steptrain.models.step1  # noqa: F401 - registers step1 with AutoConfig / AutoModelForCausalLM / AutoTokenizer
from steptrain.models.presets import PRESETS, build_preset

__all__ = ["PRESETS", "build_preset"]
