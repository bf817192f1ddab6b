"""A transformers Whisper directory as the audio encoder of a speech LLM (``model.encoder_path``).

Accepted: a directory written by ``save_pretrained`` of ``WhisperForConditionalGeneration`` (keys
``model.encoder.*``), ``WhisperModel`` (``encoder.*``) or ``WhisperEncoder`` (no prefix); it is recognised
by ``model_type == "whisper"`` in its config.json. Only the encoder is read; the decoder is ignored.

Mapping onto :class:`~steptrain.models.speech.modeling.WhisperStyleEncoder` (same module names as
transformers' ``WhisperEncoder``): every encoder tensor keeps its name, except the position table
``embed_positions.weight`` (an ``nn.Embedding``) which becomes the ``embed_positions`` buffer. Whisper's
final ``layer_norm`` becomes the norm after Step's average pool, as in Qwen2-Audio (blocks -> AvgPool1d(2)
-> layer_norm); the encoder output before the pool equals Whisper's last block output. The adapter is
new (randomly initialised, trained), the LLM comes from ``model.llm_path``.

Mel bins: the encoder's conv1 takes ``num_mel_bins`` inputs (128 for large-v3, 80 up to large-v2); the run
computes its log-mel features with that many bins (:func:`steptrain.models.loader.speech_front_end`, read
by ``steptrain.inputs.resolve_inputs``; see docs/released_layouts.md, "Whisper encoders").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from steptrain.models.speech.configuration import AudioEncoderConfig

# Whisper config fields -> AudioEncoderConfig fields
_CONFIG_MAP = {
    "num_mel_bins": "n_mels",
    "d_model": "d_model",
    "encoder_attention_heads": "n_heads",
    "encoder_layers": "n_layers",
    "max_source_positions": "max_source_positions",
    "encoder_ffn_dim": "ffn_dim",
}
_PREFIXES = ("model.encoder.", "encoder.", "")
DEFAULT_ADAPTER_HIDDEN = 2048  # Step-Audio 2's adapter width (docs/released_layouts.md)


def read_config(directory: str | os.PathLike) -> dict | None:
    """The config.json of ``directory`` as a dict, or None when there is none."""
    path = Path(directory) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_whisper_dir(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds a transformers Whisper checkpoint (config.json model_type "whisper")."""
    if not directory:
        return False
    cfg = read_config(directory)
    return cfg is not None and cfg.get("model_type") == "whisper"


def whisper_encoder_config(whisper_cfg: dict, adapter_hidden: int = DEFAULT_ADAPTER_HIDDEN) -> AudioEncoderConfig:
    """The :class:`AudioEncoderConfig` of a Whisper config.json (refuses what the encoder cannot run)."""
    act = whisper_cfg.get("activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"Whisper encoder with activation_function={act!r}: steptrain's encoder runs exact GELU only")
    missing = [k for k in _CONFIG_MAP if k not in whisper_cfg and k != "encoder_ffn_dim"]
    if missing:
        raise ValueError(f"Whisper config.json lacks {missing}")
    fields = {ours: whisper_cfg[theirs] for theirs, ours in _CONFIG_MAP.items() if theirs in whisper_cfg}
    return AudioEncoderConfig(**fields, adapter_hidden=adapter_hidden, layer_norm_eps=1e-5)


def whisper_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whisper checkpoint tensors -> a ``WhisperStyleEncoder`` state dict (decoder and heads dropped)."""
    for prefix in _PREFIXES:
        if f"{prefix}conv1.weight" in state:
            break
    else:
        raise ValueError("not a Whisper encoder checkpoint: no conv1.weight under model.encoder., encoder. or the root")
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if prefix == "" and name.split(".")[0] not in {"conv1", "conv2", "embed_positions", "layers", "layer_norm"}:
            continue
        out["embed_positions" if name == "embed_positions.weight" else name] = value
    return out


def load_whisper_encoder(directory: str | os.PathLike, adapter_hidden: int = DEFAULT_ADAPTER_HIDDEN):
    """(AudioEncoderConfig, encoder state dict) of the Whisper checkpoint in ``directory``."""
    from steptrain.models.speech.released import read_state_dict

    cfg = read_config(directory)
    if cfg is None or cfg.get("model_type") != "whisper":
        raise ValueError(f"{directory}: not a Whisper directory (config.json model_type must be 'whisper')")
    return whisper_encoder_config(cfg, adapter_hidden), whisper_encoder_state(read_state_dict(directory))


__all__ = ["is_whisper_dir", "load_whisper_encoder", "whisper_encoder_config", "whisper_encoder_state"]
