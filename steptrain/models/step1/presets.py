"""Step-1 presets: the published sizes of Step-Audio-TTS-3B and Step-Audio-Chat, and a tiny one for tests.

Sizes and their sources: docs/released_layouts.md, "Step-1 (Step-Audio-Chat, Step-Audio-TTS-3B)".

- ``step-audio-tts-3b``: hidden 3072, FFN 8192, 32 layers, 48 heads, 4 KV groups, vocab 74,752. These are the
  sizes of the shipped Step-Audio-EditX config (same 3B Step-1 family); the TTS-3B config.json itself was
  not found. ``max_seq_len`` 32768 as in that config.
- ``step-audio-chat``: hidden 12288, FFN 31232, 88 layers, 96 heads, 8 KV groups, vocab 70,656
  (65,536 text + 5,120 audio tokens); the layer sizes are not verified against the released config.
  About 130B parameters: build it from random initialisation only on purpose.
- ``step1-tiny``: hidden 96, FFN 256, 2 layers, 6 heads (not a power of two: the odd-power slope tail is
  used), 2 KV groups, vocab = the tokenizer's.

A published preset takes the larger of its own vocabulary and the tokenizer's; ``step1-tiny`` takes the
tokenizer's. Seed with ``torch.manual_seed`` before :func:`build_step1_preset`.
"""

from __future__ import annotations

import copy
from typing import Any

STEP1_PRESETS: dict[str, dict[str, Any]] = {
    "step-audio-tts-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 48,
        "num_attention_groups": 4,
        "vocab_size": 74752,
        "max_seq_len": 32768,
        "rms_norm_eps": 1e-5,
    },
    "step-audio-chat": {
        "hidden_size": 12288,
        "intermediate_size": 31232,
        "num_hidden_layers": 88,
        "num_attention_heads": 96,
        "num_attention_groups": 8,
        "vocab_size": 70656,
        "max_seq_len": 4096,
        "rms_norm_eps": 1e-5,
    },
    "step1-tiny": {
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_attention_groups": 2,
        "vocab_size": None,
        "max_seq_len": 512,
        "rms_norm_eps": 1e-5,
    },
}


def step1_preset_config(name: str, tokenizer=None, **overrides):
    """The :class:`Step1Config` of preset ``name``, sized to ``tokenizer`` if given (vocab and token ids)."""
    from steptrain.models.step1.configuration import Step1Config

    if name not in STEP1_PRESETS:
        raise ValueError(f"unknown Step-1 preset {name!r}; valid presets: {', '.join(sorted(STEP1_PRESETS))}")
    fields = copy.deepcopy(STEP1_PRESETS[name])
    if tokenizer is not None:
        fields["vocab_size"] = max(fields["vocab_size"] or 0, len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                fields[key] = getattr(tokenizer, key)
    if fields["vocab_size"] is None:
        raise ValueError(f"preset {name!r} takes its vocabulary size from a tokenizer")
    return Step1Config(**{**fields, **overrides}, architectures=["Step1ForCausalLM"])


def build_step1_preset(name: str, tokenizer):
    """A randomly initialised :class:`Step1ForCausalLM` of preset ``name`` sized to ``tokenizer``."""
    from steptrain.models.step1.modeling import Step1ForCausalLM

    model = Step1ForCausalLM(step1_preset_config(name, tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(model.config, key))
    return model
