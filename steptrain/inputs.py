"""How a run's audio inputs and outputs are assembled from its config (used by recipes and `steptrain eval`).

Heard audio: glue between audio files, the data layer and a speech model.
The number of ``<audio_patch>`` tokens for a clip must equal what the model's encoder + adapter emit
for its log-mel frames, so it is computed from the model's own ``num_patches`` applied to the front
end's ``num_frames``; the features the model receives come from the same front end.
"""

from __future__ import annotations

import torch

from steptrain.audio.features import log_mel, num_frames
from steptrain.audio.io import load_audio
from steptrain.data import AudioClip, AudioSpec, ReplyAudioSpec
from steptrain.models.loader import audio_code_ids


def clip_features(clip: AudioClip) -> torch.Tensor:
    """128-bin log-mel [n_mels, frames] of one chunk."""
    return log_mel(load_audio(clip.path)[clip.start : clip.start + clip.length])


def speech_audio_spec(tokenizer, data_cfg) -> AudioSpec:
    from steptrain.models.speech import num_patches

    return AudioSpec.from_tokenizer(
        tokenizer,
        patches=lambda n_samples: num_patches(num_frames(n_samples)),
        load=load_audio,
        max_seconds=data_cfg.max_audio_seconds,
    )


def reply_audio_spec(tokenizer, model_cfg, data_cfg) -> ReplyAudioSpec | None:
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

    return ReplyAudioSpec(
        first_id=ids[0],
        n_codes=model_cfg.audio_codes,
        start_id=tokenizer.convert_tokens_to_ids("<tts_start>"),
        end_id=tokenizer.convert_tokens_to_ids("<tts_end>"),
        encode=encode,
        interleave=tuple(int(x) for x in data_cfg.reply_interleave.split(":")) if data_cfg.reply_interleave else None,
    )
