"""Dual-codebook interleaving, audio id maps, text/audio interleaving: exact arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrain.audio.codes import (
    STEP_AUDIO_2,
    STEP_AUDIO_V1,
    AudioIdMap,
    deinterleave_dual,
    interleave_dual,
    interleave_text_audio,
    split_text_audio,
)


def test_interleave_dual_exact():
    vq02 = [5, 7, 1023, 0, 9]  # 5 -> 2 full groups
    vq06 = [10, 11, 12, 4095, 0, 1, 99]  # 7 -> 2 full groups
    codes = interleave_dual(vq02, vq06)
    assert codes == [5, 7, 1034, 1035, 1036, 1023, 0, 5119, 1024, 1025]
    assert deinterleave_dual(codes) == ([5, 7, 1023, 0], [10, 11, 12, 4095, 0, 1])


def test_interleave_dual_drops_incomplete_group():
    assert interleave_dual([1], [2, 3, 4]) == []
    assert interleave_dual([1, 2, 3, 4], [5, 6, 7]) == [1, 2, 1029, 1030, 1031]


def test_dual_errors():
    with pytest.raises(ValueError, match=r"vq02\[1\] = 1024 is out of range \[0, 1023\]"):
        interleave_dual([0, 1024], [0, 0, 0])
    with pytest.raises(ValueError, match=r"vq06\[0\] = -1"):
        interleave_dual([0, 0], [-1, 0, 0])
    with pytest.raises(ValueError, match="multiple of 5"):
        deinterleave_dual([1, 2, 1030])
    with pytest.raises(ValueError, match=r"codes\[1\] = 1024: expected a linguistic"):
        deinterleave_dual([0, 1024, 1024, 1024, 1024])


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 12).flatmap(
        lambda g: st.tuples(
            st.lists(st.integers(0, 1023), min_size=2 * g, max_size=2 * g),
            st.lists(st.integers(0, 4095), min_size=3 * g, max_size=3 * g),
        )
    )
)
def test_dual_roundtrip(pair):
    vq02, vq06 = pair
    codes = interleave_dual(vq02, vq06)
    assert len(codes) == 5 * (len(vq02) // 2)
    assert deinterleave_dual(codes) == (vq02, vq06)
    assert STEP_AUDIO_V1.from_ids(STEP_AUDIO_V1.to_ids(codes)) == codes


def test_id_maps():
    assert STEP_AUDIO_V1.id_range == (65536, 70655)
    assert STEP_AUDIO_V1.to_ids([0, 1023, 1024, 5119]) == [65536, 66559, 66560, 70655]
    assert STEP_AUDIO_V1.token_text(1030) == "<audio_1030>"
    assert len(STEP_AUDIO_V1.token_texts()) == 5120
    assert STEP_AUDIO_2.id_range == (151696, 158257)
    assert STEP_AUDIO_2.pad_id == 158257
    assert STEP_AUDIO_2.to_ids([0, 6560, 6561]) == [151696, 158256, 158257]
    assert STEP_AUDIO_2.from_ids([158257, 151700]) == [6561, 4]
    assert STEP_AUDIO_2.token_texts()[-1] == "<audio_6561>"


def test_id_map_errors():
    with pytest.raises(ValueError, match=r"audio code \[1\] = 5120 is out of range \[0, 5119\]"):
        STEP_AUDIO_V1.to_ids([0, 5120])
    with pytest.raises(
        ValueError, match=r"token id \[0\] = 65535 is not an audio id; valid range \[65536, 70655\]"
    ):
        STEP_AUDIO_V1.from_ids([65535])
    with pytest.raises(ValueError, match="out of range"):
        STEP_AUDIO_2.token_text(6562)
    with pytest.raises(ValueError):
        AudioIdMap(offset=10, n_codes=5, pad_code=7)


def test_is_audio_mask():
    ids = [1, 65535, 65536, 70655, 70656, 3]
    np.testing.assert_array_equal(STEP_AUDIO_V1.is_audio(ids), [False, False, True, True, False, False])
    m = STEP_AUDIO_V1.is_audio(torch.tensor([[65536, 2], [70000, 70656]]))
    assert m.dtype == torch.bool and m.tolist() == [[True, False], [True, False]]


def test_interleave_text_audio_exact():
    text = [1, 2, 3, 4, 5]
    audio = [101, 102, 103, 104]
    assert interleave_text_audio(text, audio, ratio=(2, 3)) == [1, 2, 101, 102, 103, 3, 4, 104, 5]
    # default 10:15, text runs out first: the rest of the audio follows
    t = list(range(12))
    a = list(range(1000, 1040))
    out = interleave_text_audio(t, a)
    assert out == t[:10] + a[:15] + t[10:] + a[15:30] + a[30:]
    assert interleave_text_audio([], [7, 8]) == [7, 8]
    assert interleave_text_audio([7, 8], []) == [7, 8]
    with pytest.raises(ValueError, match="positive"):
        interleave_text_audio([1], [2], ratio=(0, 3))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 65535), max_size=40),
    st.lists(st.integers(0, 5119), max_size=60),
    st.tuples(st.integers(1, 12), st.integers(1, 16)),
)
def test_split_inverts_interleave(text, codes, ratio):
    audio = STEP_AUDIO_V1.to_ids(codes)
    mixed = interleave_text_audio(text, audio, ratio)
    assert len(mixed) == len(text) + len(audio)
    assert split_text_audio(mixed, STEP_AUDIO_V1) == (text, audio)


# ---- audio tokenizers (steptrain.audio.tokenizer) ----

SR = 16000
FREQS = (250.0, 700.0, 1800.0, 4500.0)


def _tone(
    freq: float, seconds: float = 1.0, amp: float = 0.5, phase: float = 0.0, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t + phase) + 0.003 * rng.standard_normal(t.size)).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def fitted():
    from steptrain.audio.tokenizer import KMeansAudioTokenizer

    audios = [_tone(f, seed=i) for i, f in enumerate(FREQS)]
    return KMeansAudioTokenizer(n_codes=4, seed=0).fit(audios, SR)


def test_kmeans_tokenizer_codes(fitted):
    from steptrain.audio.tokenizer import AudioTokenizer

    assert isinstance(fitted, AudioTokenizer)
    assert fitted.rate_hz == 25.0
    per_tone = []
    for i, f in enumerate(FREQS):
        # a fresh tone (other phase, amplitude and noise), 2 s: one code per 40 ms
        codes = fitted.encode(_tone(f, seconds=2.0, amp=0.3, phase=1.0, seed=100 + i), SR)
        assert len(codes) == 50 == fitted.num_codes(2 * SR)
        assert len(set(codes)) == 1, (f, codes)
        per_tone.append(codes[0])
    assert sorted(per_tone) == [0, 1, 2, 3]
    # input at another sample rate is resampled first
    from steptrain.audio.io import resample

    codes = fitted.encode(resample(_tone(FREQS[1], seconds=1.0, seed=7), SR, 22050), 22050)
    assert set(codes) == {per_tone[1]}


def test_kmeans_tokenizer_save_load(fitted, tmp_path):
    from steptrain.audio.tokenizer import KMeansAudioTokenizer, load_audio_tokenizer

    fitted.save(tmp_path / "tok")
    loaded = load_audio_tokenizer(f"kmeans:{tmp_path / 'tok'}")
    assert isinstance(loaded, KMeansAudioTokenizer)
    x = np.concatenate([_tone(f, seconds=0.5, seed=50 + i) for i, f in enumerate(FREQS)])
    assert loaded.encode(x, SR) == fitted.encode(x, SR)
    assert torch.equal(loaded.centroids, fitted.centroids)
    with pytest.raises(NotImplementedError, match="cannot decode"):
        loaded.decode([0, 1])


def test_kmeans_deterministic():
    from steptrain.audio.tokenizer import kmeans

    g = torch.Generator().manual_seed(3)
    x = torch.cat(
        [
            torch.randn(50, 2, generator=g) * 0.1 + c
            for c in (torch.tensor([0.0, 0.0]), torch.tensor([5.0, 5.0]))
        ]
    )
    c1, c2 = kmeans(x, 2, seed=1), kmeans(x, 2, seed=1)
    assert torch.equal(c1, c2)
    assert sorted(c1.round().sum(1).tolist()) == [0.0, 10.0]
    with pytest.raises(ValueError, match="at least k=200"):
        kmeans(x, 200)


def test_tokenizer_spec_errors(tmp_path):
    from steptrain.audio.tokenizer import AudioTokenizerError, load_audio_tokenizer

    with pytest.raises(AudioTokenizerError, match="not a k-means audio tokenizer directory"):
        load_audio_tokenizer(f"kmeans:{tmp_path}")
    with pytest.raises(AudioTokenizerError, match="bad audio tokenizer spec 'wav2vec:x'"):
        load_audio_tokenizer("wav2vec:x")
    with pytest.raises(AudioTokenizerError, match="bad audio tokenizer spec"):
        load_audio_tokenizer("kmeans")


def test_codec_adapters_missing(tmp_path, monkeypatch):
    import importlib.util

    from steptrain.audio.tokenizer import AudioTokenizerError, load_audio_tokenizer

    if importlib.util.find_spec("onnxruntime") is None:
        with pytest.raises(
            AudioTokenizerError, match="cosyvoice2 audio tokenizer needs the Python package 'onnxruntime'"
        ):
            load_audio_tokenizer(f"cosyvoice2:{tmp_path}")
    else:
        with pytest.raises(AudioTokenizerError, match=r"weights .*speech_tokenizer_v2\.onnx not found"):
            load_audio_tokenizer(f"cosyvoice2:{tmp_path}")
    monkeypatch.setattr(
        "steptrain.audio.tokenizer.StepAudioTokenizer.MODULE", "stepaudio_tokenizer_absent_pkg"
    )
    with pytest.raises(
        AudioTokenizerError,
        match="stepaudio audio tokenizer needs the Python package 'stepaudio_tokenizer_absent_pkg'",
    ):
        load_audio_tokenizer(f"stepaudio:{tmp_path}")


def test_stepaudio_adapter_wiring(tmp_path, monkeypatch):
    """A stand-in for Step-Audio's tokenizer module: wav2token -> (tokens, vq02, vq06)."""
    import sys
    import types

    from steptrain.audio.tokenizer import AudioTokenizerError, StepAudioTokenizer, load_audio_tokenizer

    calls = {}

    class FakeStepAudioTokenizer:
        def __init__(self, path):
            calls["path"] = path

        def wav2token(self, wav, sr):
            calls["shape"], calls["sr"] = tuple(wav.shape), sr
            return "<audio_...>", [1, 2, 3, 4], [5, 6, 7, 8, 9, 10]

    fake = types.ModuleType("fake_stepaudio_tokenizer")
    fake.StepAudioTokenizer = FakeStepAudioTokenizer
    monkeypatch.setitem(sys.modules, "fake_stepaudio_tokenizer", fake)
    monkeypatch.setattr(StepAudioTokenizer, "MODULE", "fake_stepaudio_tokenizer")
    for name in StepAudioTokenizer.REQUIRED_FILES:  # an (empty) Step-Audio-Tokenizer weights layout
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    tok = load_audio_tokenizer(f"stepaudio:{tmp_path}")
    assert tok.encode(np.zeros(1600, np.float32), 16000) == [1, 2, 1029, 1030, 1031, 3, 4, 1032, 1033, 1034]
    assert calls == {"path": str(tmp_path), "shape": (1, 1600), "sr": 16000}
    with pytest.raises(AudioTokenizerError, match="weights directory .*missing not found"):
        load_audio_tokenizer(f"stepaudio:{tmp_path / 'missing'}")
