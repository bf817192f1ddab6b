"""Step-Audio 2 / Whisper log-mel front end, in torch.

Recipe (Step-Audio 2 code = Whisper's ``log_mel_spectrogram(audio, n_mels=128, padding=479)``):
16 kHz audio, append ``padding`` zeros (479 by default), centred STFT (reflect padding n_fft // 2 at both
ends) with n_fft 400, hop 160, periodic Hann window; drop the last STFT frame; power spectrum; Slaney
mel filters (128 bins, 0..8 kHz, Slaney area norm, as WhisperFeatureExtractor builds them); log10 clamped
at 1e-10; floor at (max over the utterance) - 8; then (x + 4) / 4.

Frame alignment with ``transformers.WhisperFeatureExtractor`` (verified in tests/test_audio_features.py):
- ``num_frames(n) = (n + padding) // 160``: 479 padding gives ``(n + 479) // 160`` frames, i.e. about
  3 more than the ``n // 160`` that the extractor returns with padding disabled (``padding=False``).
- ``log_mel(x)`` (padding 479) is equal to the FIRST ``num_frames(len(x))`` frames of the extractor's
  default output (zero-padded to 30 s = 3000 frames), for len(x) <= 480000 - 479. The 479 zeros make the
  last frames see zeros (not a reflection of the audio) to the right, exactly as with the 30 s padding,
  and the all-zero frames the extractor adds afterwards (log10 = -10) never change the max.
- ``log_mel(x)`` equals the extractor with ``padding=False`` applied to ``x`` followed by 479 zeros.
- ``log_mel(x, padding=0)`` equals the extractor with ``padding=False`` applied to ``x`` (n // 160
  frames); only the last ~2 frames differ from the padded versions (reflection vs zeros).
Audio longer than 30 s must be cut first (``chunk_audio``: 25 s spans, as Step-Audio 2 does).

``num_frames(n)`` is the official Step-Audio 2 frame count T of a chunk (2502 for 25 s), from which the
official patch count follows (docs/released_layouts.md, "Front end and prompt arithmetic"). ``n_mels`` is
a parameter everywhere; a run computes as many bins as its encoder takes (128 for Step-Audio 2 and Whisper
large-v3, 80 for earlier Whisper; ``steptrain.models.loader.speech_front_end``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = [
    "HOP_LENGTH",
    "N_FFT",
    "PADDING",
    "SAMPLE_RATE",
    "chunk_audio",
    "log_mel",
    "log_mel_batch",
    "mel_filters",
    "num_frames",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
PADDING = 479


@functools.lru_cache(maxsize=8)
def _mel_filters_np(n_mels: int) -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return np.ascontiguousarray(fb.T, dtype=np.float32)  # [n_mels, n_freq]


def mel_filters(n_mels: int = 128, device: torch.device | str | None = None) -> torch.Tensor:
    """Slaney mel filter bank [n_mels, 201] (float32), identical to WhisperFeatureExtractor's."""
    return torch.from_numpy(_mel_filters_np(int(n_mels))).to(device)


def num_frames(n_samples: int, padding: int = PADDING) -> int:
    """Exact number of frames ``log_mel`` returns for ``n_samples`` samples of 16 kHz audio."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    return (int(n_samples) + int(padding)) // HOP_LENGTH


def _as_tensor(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(audio, torch.Tensor):
        return audio.to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


def _power_mel(x: torch.Tensor, n_mels: int) -> torch.Tensor:
    """x: [..., samples] (already padded) -> log10 mel [..., n_mels, frames] before the floor."""
    if x.shape[-1] <= N_FFT // 2:
        # torch.stft's reflect padding needs more than n_fft // 2 samples; zeros to the right change
        # nothing about the frames we keep except through the reflection, so fail loudly instead.
        raise ValueError(
            f"audio too short for the STFT: {x.shape[-1]} samples after padding (need > {N_FFT // 2})"
        )
    window = torch.hann_window(N_FFT, device=x.device)
    spec = torch.stft(
        x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    power = (spec[..., :-1].abs() ** 2).contiguous()
    mel = mel_filters(n_mels, x.device) @ power
    return torch.clamp(mel, min=1e-10).log10()


def log_mel(audio: np.ndarray | torch.Tensor, n_mels: int = 128, padding: int = PADDING) -> torch.Tensor:
    """16 kHz mono audio [samples] -> normalised log-mel [n_mels, num_frames(samples, padding)]."""
    x = _as_tensor(audio)
    if x.ndim != 1:
        raise ValueError(
            f"log_mel expects 1-D audio [samples], got shape {tuple(x.shape)}; use log_mel_batch"
        )
    if x.shape[0] == 0:
        raise ValueError("log_mel got empty audio")
    if padding > 0:
        x = torch.nn.functional.pad(x, (0, padding))
    log_spec = _power_mel(x, n_mels)
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_batch(
    audios: list[np.ndarray | torch.Tensor], n_mels: int = 128, padding: int = PADDING
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``log_mel``: returns (features [B, n_mels, T_max], lengths [B]).

    ``features[i, :, :lengths[i]]`` equals ``log_mel(audios[i])``; the max-8 floor uses only each item's own
    frames. Frames past an item's length are those of zero audio (as Whisper's 30 s padding would give).
    """
    if not audios:
        raise ValueError("log_mel_batch got an empty list")
    xs = [_as_tensor(a) for a in audios]
    for i, x in enumerate(xs):
        if x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(
                f"log_mel_batch item {i}: expected non-empty 1-D audio, got shape {tuple(x.shape)}"
            )
    lengths = torch.tensor([num_frames(x.shape[0], padding) for x in xs], dtype=torch.long)
    total = max(x.shape[0] for x in xs) + padding
    batch = torch.zeros(len(xs), total, dtype=torch.float32, device=xs[0].device)
    for i, x in enumerate(xs):
        batch[i, : x.shape[0]] = x
    log_spec = _power_mel(batch, n_mels)  # [B, n_mels, T]
    T = log_spec.shape[-1]
    valid = torch.arange(T, device=log_spec.device)[None, :] < lengths.to(log_spec.device)[:, None]  # [B, T]
    masked = log_spec.masked_fill(~valid[:, None, :], float("-inf"))
    max_val = masked.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, max_val - 8.0)
    return (log_spec + 4.0) / 4.0, lengths


def chunk_audio(audio: np.ndarray, sr: int = SAMPLE_RATE, seconds: float = 25.0) -> list[np.ndarray]:
    """Cut audio into consecutive spans of ``seconds`` (the last one may be shorter); [] for empty audio."""
    span = int(round(seconds * sr))
    if span <= 0:
        raise ValueError(f"chunk length must be positive, got {seconds} s at {sr} Hz")
    return [audio[i : i + span] for i in range(0, len(audio), span)]
