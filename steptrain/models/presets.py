"""Tiny Qwen2 architectures for demos, tests and benchmarks, built from random initialisation.

Presets are plain dicts of Qwen2Config fields (``rope_theta`` is turned into ``rope_parameters``).
Parameter counts (embeddings and the untied lm_head included):

- ``tiny``: hidden 128, FFN 384, 2 layers, 4 heads, 2 KV heads -> 394,368 + 256 * V parameters
  (V = vocab size; 483,712 at the demo tokenizer's V = 349, 2,442,368 at V = 8000).
- ``small-20m``: hidden 384, FFN 1664, 6 layers, 6 heads, 2 KV heads -> 13,869,696 + 768 * V
  parameters, i.e. 20,013,696 at V = 8000.

Step-1 presets (``step1-tiny``, ``step-audio-tts-3b``, ``step-audio-chat``) live in
:mod:`steptrain.models.step1.presets`; :func:`build_preset` builds them too.

The caller seeds the random initialisation (``torch.manual_seed``) before :func:`build_preset`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "use_cache": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
    "small-20m": {
        **_COMMON,
        "hidden_size": 384,
        "intermediate_size": 1664,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    },
}


def preset_config(name: str, vocab_size: int, **token_ids: int | None) -> Qwen2Config:
    """The Qwen2Config of preset ``name`` at ``vocab_size`` (token ids: bos/eos/pad_token_id)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    fields = copy.deepcopy(PRESETS[name])
    rope_theta = fields.pop("rope_theta")
    return Qwen2Config(
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **fields,
        **token_ids,
    )


def build_preset(name: str, tokenizer) -> PreTrainedModel:
    """A randomly initialised Qwen2ForCausalLM of preset ``name`` sized to ``tokenizer``.

    vocab_size = len(tokenizer); bos/eos/pad token ids are taken from the tokenizer (eos is the
    end-of-turn token for Step tokenizers). Seed with ``torch.manual_seed`` before calling.
    Raises ValueError listing the valid names for an unknown ``name``. A Step-1 preset
    (:data:`steptrain.models.step1.presets.STEP1_PRESETS`) gives a ``Step1ForCausalLM`` instead.
    """
    from steptrain.models.step1.presets import STEP1_PRESETS, build_step1_preset

    if name in STEP1_PRESETS:
        return build_step1_preset(name, tokenizer)
    config = preset_config(
        name,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
