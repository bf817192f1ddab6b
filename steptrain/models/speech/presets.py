"""Speech-LLM presets: a tiny one for tests and the real Step-Audio 2 mini sizes (config only).

``tiny-speech``: encoder d_model 64, 2 layers, 2 heads, adapter 128, LLM = steptrain's ``tiny`` Qwen2.
``step-audio-2-mini``: encoder 1280 / 20 heads / 32 layers (Whisper-large-v3 style), adapter 2048,
Qwen2 hidden 3584, 28 layers, 28 heads, 4 KV heads, vocab 158720 (never instantiate it in tests).
The Step-Audio 2 mini LLM fields beyond those published (docs/step_facts.md, docs/released_layouts.md) (FFN 18944, rope theta 1e6,
rms eps 1e-6, untied head, 32k positions) are the Qwen2-7B values and are an assumption.
"""

from __future__ import annotations

import copy
from typing import Any

from steptrain.models.presets import preset_config
from steptrain.models.speech.configuration import AudioEncoderConfig, SpeechLMConfig

_TINY_SPEECH: dict[str, Any] = {
    "encoder": {
        "n_mels": 128,
        "d_model": 64,
        "n_heads": 2,
        "n_layers": 2,
        "max_source_positions": 1500,
        "adapter_hidden": 128,
    },
    "llm_preset": "tiny",
}

SPEECH_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-speech": _TINY_SPEECH,
    # The speech demo's encoder (data_pipelines/pretrain_audio_encoder.py, then asr_demo.yaml): tiny-speech
    # with a larger initialisation of the encoder + adapter Linear/Conv1d weights (std 0.1 instead of
    # 0.02; the LLM keeps its own 0.02). At std 0.02 the conv front end's output is ~1% of the sinusoidal
    # position table it is added to, so a random encoder's output barely depends on the audio and its
    # 200-step CTC pre-training stays at all-blank (CER 1.0); at 0.1 it is ~35% and CTC reaches CER 0.
    "demo-speech": {**_TINY_SPEECH, "encoder": {**_TINY_SPEECH["encoder"], "initializer_range": 0.1}},
    "step-audio-2-mini": {
        "encoder": {
            "n_mels": 128,
            "d_model": 1280,
            "n_heads": 20,
            "n_layers": 32,
            "max_source_positions": 1500,
            "adapter_hidden": 2048,
        },
        "llm": {
            "model_type": "qwen2",
            "vocab_size": 158720,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
            "hidden_act": "silu",
        },
        # <audio_start> = 151688 is published; the next ids follow in an unpublished order.
        "ids": {"audio_start_id": 151688},
    },
}


def speech_preset_config(name: str, vocab_size: int | None = None, **ids: int | None) -> SpeechLMConfig:
    """The :class:`SpeechLMConfig` of preset ``name`` (vocab from ``vocab_size`` when given)."""
    if name not in SPEECH_PRESETS:
        raise ValueError(
            f"unknown speech preset {name!r}; valid presets: {', '.join(sorted(SPEECH_PRESETS))}"
        )
    spec = copy.deepcopy(SPEECH_PRESETS[name])
    token_ids = {k: ids.pop(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids}
    if "llm_preset" in spec:
        if vocab_size is None:
            raise ValueError(f"preset {name!r} needs a vocab_size")
        llm_cfg = preset_config(spec["llm_preset"], vocab_size=vocab_size, **token_ids)
    else:
        from transformers import AutoConfig

        llm = spec["llm"]
        if vocab_size is not None:
            llm["vocab_size"] = vocab_size
        llm_cfg = AutoConfig.for_model(llm.pop("model_type"), **llm, **token_ids)
    return SpeechLMConfig(
        encoder_config=AudioEncoderConfig(**spec["encoder"]),
        llm_config=llm_cfg,
        **{**spec.get("ids", {}), **ids},
    )


def build_speech_preset(name: str, tokenizer, **ids: int | None):
    """A randomly initialised SpeechLMForCausalLM of preset ``name`` sized to ``tokenizer``.

    ``ids``: audio_start_id / audio_end_id / audio_patch_id / tts_start_id / tts_end_id (and any
    other SpeechLMConfig field such as freeze_encoder). Seed with ``torch.manual_seed`` first.
    """
    from steptrain.models.speech.modeling import SpeechLMForCausalLM

    config = speech_preset_config(
        name,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    model = SpeechLMForCausalLM(config)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, attr, getattr(tokenizer, attr))
    return model
