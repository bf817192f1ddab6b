"""Speech LLM (Step-Audio 2 layout): Whisper-style encoder + adapter + any HF causal LM.

Importing this package registers ``steptrain_speech_lm`` with the transformers Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a saved model without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from steptrain.models.speech.configuration import AudioEncoderConfig, SpeechLMConfig
from steptrain.models.speech.modeling import (
    AudioAdapter,
    SpeechLMForCausalLM,
    WhisperStyleEncoder,
    encoder_length,
    num_patches,
    num_patches_tensor,
)
from steptrain.models.speech.presets import SPEECH_PRESETS, build_speech_preset, speech_preset_config


def _register() -> None:
    for model_type, cfg in (
        (AudioEncoderConfig.model_type, AudioEncoderConfig),
        (SpeechLMConfig.model_type, SpeechLMConfig),
    ):
        try:
            AutoConfig.register(model_type, cfg)
        except ValueError:  # already registered (module reloaded)
            pass
    try:
        AutoModelForCausalLM.register(SpeechLMConfig, SpeechLMForCausalLM)
    except ValueError:
        pass


_register()

__all__ = [
    "SPEECH_PRESETS",
    "AudioAdapter",
    "AudioEncoderConfig",
    "SpeechLMConfig",
    "SpeechLMForCausalLM",
    "WhisperStyleEncoder",
    "build_speech_preset",
    "encoder_length",
    "num_patches",
    "num_patches_tensor",
    "speech_preset_config",
]
