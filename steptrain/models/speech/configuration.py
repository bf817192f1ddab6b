"""Configuration of the speech LLM: Whisper-style audio encoder + adapter + any HF causal LM.

The layout follows Step-Audio 2 (see /work/shared/STEP_FACTS.md): a Whisper-large-v3 style encoder
(128 mels, 25 Hz output), an adapter down to 12.5 Hz projecting into the LLM's hidden size, and a
Qwen2 backbone. The LLM part is a nested HF config: serialised as a plain dict inside config.json
and rebuilt with ``AutoConfig.for_model(model_type, ...)`` on load, so any registered causal LM works.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class AudioEncoderConfig(PreTrainedConfig):
    """Sizes of the Whisper-style encoder and of the adapter that follows it.

    ``max_source_positions`` counts positions after the stride-2 conv (Whisper: 1500 = 30 s at 50 Hz),
    so the longest accepted input is ``2 * max_source_positions`` mel frames at 100 Hz.
    """

    model_type = "steptrain_audio_encoder"

    n_mels: int = 128
    d_model: int = 1280
    n_heads: int = 20
    n_layers: int = 32
    max_source_positions: int = 1500
    adapter_hidden: int = 2048
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02


class SpeechLMConfig(PreTrainedConfig):
    """Config of :class:`~steptrain.models.speech.modeling.SpeechLMForCausalLM`.

    Fields:
        encoder_config: an :class:`AudioEncoderConfig` (or its dict).
        llm_config: the config (or dict with ``model_type``) of any causal LM; Qwen2 by default.
        audio_start_id / audio_end_id / audio_patch_id: special token ids; each audio chunk is
            ``<audio_start> + N x <audio_patch> + <audio_end>`` and the adapter outputs replace the
            embeddings of the N patch positions.
        tts_start_id / tts_end_id: optional ids for spoken replies (unused by the forward pass).
        freeze_encoder: encoder parameters get ``requires_grad=False`` at construction (default True,
            as in all Step-Audio 2 training stages).
        run_encoder_on_dummy: in training mode, run the encoder+adapter on a zero input when a batch
            has no audio (see ``SpeechLMForCausalLM.forward``; needed under ZeRO-3 / FSDP).
    """

    model_type = "steptrain_speech_lm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AudioEncoderConfig),
        "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    audio_start_id: int | None = None
    audio_end_id: int | None = None
    audio_patch_id: int | None = None
    tts_start_id: int | None = None
    tts_end_id: int | None = None
    freeze_encoder: bool = True
    run_encoder_on_dummy: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Mirror the LLM's tying so the top-level model reports it consistently.
        self.tie_word_embeddings = bool(getattr(self.llm_config, "tie_word_embeddings", False))

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The LLM's config: it is both the text input and the text output side of this model."""
        return self.llm_config


def llm_config_from_dict(d: dict[str, Any]) -> PreTrainedConfig:
    """Rebuild a causal-LM config from its dict (``model_type`` defaults to qwen2)."""
    d = dict(d)
    model_type = d.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type, **d)
