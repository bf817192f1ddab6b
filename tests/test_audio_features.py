"""Log-mel front end vs transformers.WhisperFeatureExtractor, frame counts, batching, chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrain.audio.features import chunk_audio, log_mel, log_mel_batch, num_frames

SR = 16000


@pytest.fixture(scope="module")
def extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


def _signal(n: int, seed: int = 0, freq: float = 440.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.1 * rng.standard_normal(n) + 0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


LENGTHS = [401, 1000, 16000, 16001, 16159, 37777, 80000, 480000 - 479]


@pytest.mark.parametrize("n", LENGTHS)
def test_log_mel_equals_whisper_30s_prefix(extractor, n):
    x = _signal(n, seed=n)
    ours = log_mel(x)
    ref = extractor(x, sampling_rate=SR, return_tensors="np").input_features[0]  # [128, 3000]
    assert ours.shape == (128, num_frames(n)) == (128, (n + 479) // 160)
    np.testing.assert_allclose(ours.numpy(), ref[:, : num_frames(n)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", LENGTHS)
def test_log_mel_equals_whisper_unpadded_on_zero_padded_audio(extractor, n):
    x = _signal(n, seed=n + 1, freq=1234.0)
    xp = np.concatenate([x, np.zeros(479, np.float32)])
    ref = extractor(xp, sampling_rate=SR, padding=False, return_tensors="np").input_features[0]
    np.testing.assert_allclose(log_mel(x).numpy(), ref, atol=1e-4, rtol=0)
    # padding=0 reproduces the extractor with padding disabled on the raw audio: n // 160 frames
    ref0 = extractor(x, sampling_rate=SR, padding=False, return_tensors="np").input_features[0]
    ours0 = log_mel(torch.from_numpy(x), padding=0)
    assert ours0.shape[1] == n // 160 == num_frames(n, padding=0)
    np.testing.assert_allclose(ours0.numpy(), ref0, atol=1e-4, rtol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=201, max_value=20000), padding=st.sampled_from([0, 479]))
def test_num_frames_matches_output(n, padding):
    if n + padding <= 200:
        return
    x = np.zeros(n, np.float32)
    assert log_mel(x, padding=padding).shape[1] == num_frames(n, padding)


def test_log_mel_batch_matches_single():
    xs = [_signal(n, seed=n) for n in (3000, 16000, 9001)]
    xs[2] *= 0.01  # a quiet item: its floor must come from its own max only
    feats, lengths = log_mel_batch(xs)
    assert lengths.tolist() == [num_frames(len(x)) for x in xs]
    assert feats.shape == (3, 128, max(lengths))
    for i, x in enumerate(xs):
        torch.testing.assert_close(feats[i, :, : lengths[i]], log_mel(x), atol=1e-5, rtol=0)


def test_chunk_audio():
    x = np.arange(int(SR * 60.5), dtype=np.float32)
    chunks = chunk_audio(x)
    assert [len(c) for c in chunks] == [400000, 400000, 168000]
    np.testing.assert_array_equal(np.concatenate(chunks), x)
    assert len(chunk_audio(x[:10])) == 1
    assert chunk_audio(np.zeros(0, np.float32)) == []


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        log_mel(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        log_mel(np.zeros((2, 100), np.float32))
