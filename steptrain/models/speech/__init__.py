"""Speech LLM (Step-Audio 2 layout): Whisper-style encoder + adapter + any HF causal LM.

Importing this package registers ``steptrain_speech_lm`` (steptrain's own layout) and ``step_audio_2``
(the released Step-Audio 2 / Step-Audio-R1 layout, :mod:`steptrain.models.speech.released`) with the
transformers Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads either without remote
code. A transformers Whisper directory can serve as the encoder (:mod:`steptrain.models.speech.whisper`).
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
from steptrain.models.speech.released import STEP_AUDIO_2, StepAudio2Config, StepAudio2ForCausalLM


def _register() -> None:
    for model_type, cfg in (
        (AudioEncoderConfig.model_type, AudioEncoderConfig),
        (SpeechLMConfig.model_type, SpeechLMConfig),
        (StepAudio2Config.model_type, StepAudio2Config),
    ):
        try:
            AutoConfig.register(model_type, cfg)
        except ValueError:  # already registered (module reloaded)
            pass
    for cfg, model in ((SpeechLMConfig, SpeechLMForCausalLM), (StepAudio2Config, StepAudio2ForCausalLM)):
        try:
            AutoModelForCausalLM.register(cfg, model)
        except ValueError:
            pass


_register()

__all__ = [
    "SPEECH_PRESETS",
    "STEP_AUDIO_2",
    "StepAudio2Config",
    "StepAudio2ForCausalLM",
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
