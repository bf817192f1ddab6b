"""load_audio / audio_duration: formats, mono mixing, resampling, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from steptrain.audio.io import AudioError, audio_duration, load_audio, resample


def _tone(sr: int, seconds: float, freq: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_stereo_resampled_to_mono_16k(tmp_path, fmt, ext):
    sr = 44100
    left, right = _tone(sr, 1.0, 440.0), _tone(sr, 1.0, 440.0, amp=0.25)
    path = tmp_path / f"a.{ext}"
    sf.write(path, np.stack([left, right], axis=1), sr, format=fmt)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 1
    assert np.abs(x).max() <= 1.0
    assert abs(_peak_hz(x, 16000) - 440.0) < 2.0
    assert abs(np.abs(x[2000:-2000]).max() - 0.375) < 0.02  # mean of the two channels
    assert audio_duration(path) == pytest.approx(1.0, abs=1e-3)


def test_wav_same_rate_exact(tmp_path):
    x = _tone(16000, 0.5, 1000.0)
    path = tmp_path / "a.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), x)
    y = load_audio(path, target_sr=8000)
    assert len(y) == 4000 and abs(_peak_hz(y, 8000) - 1000.0) < 4.0


def test_mp3(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("libsndfile without mp3")
    path = tmp_path / "a.mp3"
    sf.write(path, _tone(16000, 1.0, 440.0), 16000, format="MP3")
    x = load_audio(path)
    assert abs(len(x) - 16000) < 2000 and abs(_peak_hz(x, 16000) - 440.0) < 3.0


def test_mp3_unavailable_message(tmp_path, monkeypatch):
    path = tmp_path / "a.mp3"
    path.write_bytes(b"\xff\xfb" + bytes(100))
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV"})
    with pytest.raises(AudioError, match=r"a\.mp3: cannot decode mp3: .*libsndfile >= 1\.1"):
        load_audio(path)


def test_errors(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="file not found"):
        audio_duration(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" + bytes(range(256)))
    with pytest.raises(AudioError, match=r"bad\.wav: cannot decode audio") as ei:
        load_audio(bad)
    assert "\n" not in str(ei.value)
    with pytest.raises(AudioError, match=r"bad\.wav: cannot read audio header"):
        audio_duration(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: audio has zero samples"):
        load_audio(empty)
    assert audio_duration(empty) == 0.0
    assert isinstance(AudioError("x"), ValueError)


def test_resample_gcd_ratio():
    x = _tone(22050, 1.0, 300.0)
    y = resample(x, 22050, 16000)
    assert len(y) == 16000 and y.dtype == np.float32
    assert abs(_peak_hz(y, 16000) - 300.0) < 2.0
