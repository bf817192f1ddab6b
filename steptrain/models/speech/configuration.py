"""Configuration of the speech LLM: Whisper-style audio encoder + adapter + any HF causal LM.

The layout follows Step-Audio 2 (see docs/released_layouts.md): a Whisper-large-v3 style encoder
(128 mels, 25 Hz output), an adapter down to 12.5 Hz projecting into the LLM's hidden size, and a
Qwen2 backbone. The LLM part is a nested HF config: serialised as a plain dict inside config.json
and rebuilt with ``AutoConfig.for_model(model_type, ...)`` on load, so any registered causal LM works.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

LENGTH_RULES = ("steptrain", "step_audio_2")


class AudioEncoderConfig(PreTrainedConfig):
    """Sizes of the Whisper-style encoder and of the adapter that follows it.

    ``max_source_positions`` counts positions after the stride-2 conv (Whisper: 1500 = 30 s at 50 Hz),
    so the longest accepted input is ``2 * max_source_positions`` mel frames at 100 Hz.

    ``ffn_dim``: width of each block's MLP (None: ``4 * d_model``, as in Whisper large and Step-Audio 2;
    a Whisper checkpoint brings its own ``encoder_ffn_dim``).

    ``length_rule``: how many 12.5 Hz patches a clip of T mel frames gets and which encoder frames are
    attention keys (see :func:`steptrain.models.speech.modeling.num_patches`):

    - ``"steptrain"`` (default, also StepFun's vLLM serving arithmetic): every conv2 output frame of the
      clip is a key; patches = conv(pool(conv2(T))) lengths, 313 for a 25 s chunk.
    - ``"step_audio_2"``: the official Step-Audio 2 HF code, which passes ``T - 2`` as the clip length:
      the last conv2 frame is not a key and patches = ``((T - 2 + 1) // 2 // 2 - 1) // 2 + 1``
      (also 313 for 25 s, one fewer for about a quarter of the other lengths). Used for checkpoints in the
      released layout (docs/released_layouts.md, "Step-Audio 2 / Step-Audio-R1").
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
    ffn_dim: int | None = None
    length_rule: str = "steptrain"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.length_rule not in LENGTH_RULES:
            raise ValueError(f"length_rule={self.length_rule!r} is not one of {', '.join(LENGTH_RULES)}")


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
        checkpoint_layout: None for steptrain's own layout; ``"step_audio_2"`` for a model loaded from the
            released Step-Audio 2 layout, which export writes back in that layout
            (:mod:`steptrain.models.speech.released`).
        layout_config: the released config.json this model was loaded from (written back on export, with
            the fields training changed updated).
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
    checkpoint_layout: str | None = None
    layout_config: dict | None = None

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
