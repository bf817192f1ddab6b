"""Audio file reading: any file -> float32 mono at a target sample rate, with one-line errors.

Decoding is done by libsndfile through ``soundfile`` (wav, flac, ogg/vorbis/opus, and mp3 with
libsndfile >= 1.1); resampling by ``scipy.signal.resample_poly`` with the gcd-reduced ratio.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["AudioError", "audio_duration", "load_audio", "resample", "to_mono"]


class AudioError(ValueError):
    """An audio file cannot be used; the message names the path and the reason on one line."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    if p.suffix.lower() == ".mp3":
        import soundfile as sf

        if "MP3" not in sf.available_formats():
            raise AudioError(
                f"{p}: cannot decode mp3: this libsndfile ({sf.__libsndfile_version__}) has no MP3 support "
                "(needs libsndfile >= 1.1 built with mpg123/lame; upgrade the soundfile wheel or convert to wav/flac)"
            )
    return p


def to_mono(audio: np.ndarray) -> np.ndarray:
    """[samples] or [samples, channels] -> [samples] by averaging channels."""
    audio = np.asarray(audio)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {audio.shape}")
    return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly, ratio reduced by the gcd); float32 out."""
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, target_sr)
    return resample_poly(audio, target_sr // g, orig_sr // g, axis=0).astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, target_sr: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``target_sr`` Hz.

    Raises AudioError (a ValueError) for a missing, unreadable/corrupt, empty or non-finite file.
    """
    import soundfile as sf

    p = _check_path(path)
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{p}: cannot decode audio: {_one_line(e)}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{p}: audio has zero samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{p}: audio contains NaN or infinite samples")
    audio = resample(to_mono(data), sr, target_sr)
    if audio.shape[0] == 0:
        raise AudioError(f"{p}: audio is empty after resampling {sr} -> {target_sr} Hz")
    return np.clip(audio, -1.0, 1.0)


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding)."""
    import soundfile as sf

    p = _check_path(path)
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{p}: cannot read audio header: {_one_line(e)}") from e
    if info.samplerate <= 0:
        raise AudioError(f"{p}: header has invalid sample rate {info.samplerate}")
    return float(info.frames) / float(info.samplerate)
