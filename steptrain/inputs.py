"""A run's inputs resolved once from its config and tokenizer: the chat template and the audio glue.

Heard audio: the number of ``<audio_patch>`` tokens for a clip must equal what the model's encoder +
adapter emit for its log-mel frames, so it is computed from the model's own ``num_patches`` applied to
the front end's ``num_frames``; the features the model receives come from the same front end.

The checkpoint family (config.json ``model_type``) is read without loading any weights, so the
template is known before a model is built (see ``steptrain.data.templates``).
"""

from __future__ import annotations

import copy
import functools

import torch
from omegaconf import DictConfig, OmegaConf

from steptrain.audio.features import log_mel
from steptrain.audio.io import load_audio
from steptrain.data import AudioClip, AudioSpec, ReplyAudioSpec
from steptrain.data.run_inputs import RunInputs
from steptrain.data.templates import ChatTemplate, resolve_template
from steptrain.models.loader import (
    audio_code_ids,
    is_speech_config,
    is_step1_config,
    model_family,
    speech_front_end,
)

__all__ = ["RunInputs", "clip_features", "resolve_inputs", "with_resolved_template"]


def clip_features(clip: AudioClip, n_mels: int = 128) -> torch.Tensor:
    """Log-mel [n_mels, frames] of one chunk (128 bins: Step-Audio 2 / Whisper large-v3; 80: earlier Whisper)."""
    return log_mel(load_audio(clip.path)[clip.start : clip.start + clip.length], n_mels=n_mels)


def _speech_audio_spec(tokenizer, data_cfg, front) -> AudioSpec:
    """Patch counts follow the model's front end (``steptrain.models.loader.speech_front_end``: e.g. the
    official arithmetic for a released Step-Audio 2 checkpoint)."""
    return AudioSpec.from_tokenizer(
        tokenizer,
        patches=front.patches,
        load=load_audio,
        max_seconds=data_cfg.max_audio_seconds,
    )


def _reply_audio_spec(tokenizer, model_cfg, data_cfg) -> ReplyAudioSpec | None:
    """Discrete audio output tokens (``model.audio_codes``), and the tokenizer for spoken replies."""
    ids = audio_code_ids(tokenizer, model_cfg.audio_codes)
    if ids is None:
        return None
    encode = None
    if data_cfg.audio_tokenizer:
        from steptrain.audio.tokenizer import load_audio_tokenizer

        codec = load_audio_tokenizer(data_cfg.audio_tokenizer)
        if codec.n_codes > model_cfg.audio_codes:
            raise ValueError(f"{data_cfg.audio_tokenizer} has {codec.n_codes} codes > model.audio_codes={model_cfg.audio_codes}")

        def encode(path: str) -> list[int]:
            return [int(k) for k in codec.encode(load_audio(path), 16000)]

    bare = is_step1_config(model_cfg)  # Step-Audio v1 speaks bare <audio_k> tokens, Step-Audio 2 wraps them
    return ReplyAudioSpec(
        first_id=ids[0],
        n_codes=model_cfg.audio_codes,
        start_id=None if bare else tokenizer.convert_tokens_to_ids("<tts_start>"),
        end_id=None if bare else tokenizer.convert_tokens_to_ids("<tts_end>"),
        encode=encode,
        interleave=tuple(int(x) for x in data_cfg.reply_interleave.split(":")) if data_cfg.reply_interleave else None,
    )


def resolve_inputs(cfg, tokenizer) -> RunInputs:
    """The run's :class:`RunInputs`: template (``data.template``, ``auto`` resolved), heard audio for a
    speech model, spoken-reply tokens for ``model.audio_codes``."""
    template = resolve_template(cfg.data.template, tokenizer, family=model_family(cfg.model), bos=cfg.data.bos,
                                default_system=cfg.data.system)
    audio = features = None
    if is_speech_config(cfg.model):
        front = speech_front_end(cfg.model)  # the encoder's mel bins and patch arithmetic, read from its files
        audio = _speech_audio_spec(tokenizer, cfg.data, front)
        features = clip_features if front.n_mels == 128 else functools.partial(clip_features, n_mels=front.n_mels)
    return RunInputs(
        template=template,
        audio=audio,
        reply=_reply_audio_spec(tokenizer, cfg.model, cfg.data),
        features=features,
        audio_ids=audio_code_ids(tokenizer, cfg.model.audio_codes),
    )


def with_resolved_template(cfg: DictConfig, template: ChatTemplate) -> DictConfig:
    """``cfg`` with ``data.template`` / ``data.bos`` set to what was resolved (what config.yaml records, so
    a checkpoint's eval, export and resume render rows the same way)."""
    out, readonly = copy.deepcopy(cfg), OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(out, False)
    out.data.template = template.name
    out.data.bos = None if template.name == "jinja" else template.bos is not None
    OmegaConf.set_readonly(out, bool(readonly))
    return out
