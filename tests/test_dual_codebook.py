"""Step-Audio v1 dual-codebook audio: interleaving properties (round trip, trailing groups), exact stream
rates, the id layout, the reference DualCodebookTokenizer (fit / encode / save / load / CLI) and the
Step-Audio-Tokenizer adapter's errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrain.audio.codes import N_VQ02, N_VQ06, STEP_AUDIO_V1, deinterleave_dual, interleave_dual
from steptrain.audio.dual import (
    GROUP_SAMPLES,
    DualCodebookTokenizer,
    DualStreamTokenizer,
    num_groups,
    stream_lengths,
)
from steptrain.audio.io import load_audio, resample
from steptrain.audio.tokenizer import (
    AudioTokenizer,
    AudioTokenizerError,
    KMeansAudioTokenizer,
    StepAudioTokenizer,
    load_audio_tokenizer,
)

SR = 16000
N_LING, N_SEM = 16, 32  # fitted codebook sizes for the tests; the id layout stays 1024 / 4096


def _clip(n_samples: int, seed: int = 0) -> np.ndarray:
    """Two tones with a seeded onset and noise: something with structure at any length."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / SR
    f1, f2 = rng.uniform(300, 1000), rng.uniform(1200, 3000)
    x = 0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t) * (t > rng.uniform(0, 0.5))
    return (x + 0.01 * rng.standard_normal(n_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def audios(speech):
    files = sorted(speech["audio_dir"].glob("train_*.wav"))
    return [load_audio(f) for f in files]


@pytest.fixture(scope="module")
def fitted(audios):
    return DualCodebookTokenizer(N_LING, N_SEM, seed=0).fit(audios, SR)


# ---- interleaving: round trip and the trailing group rule ----

@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 20).flatmap(
        lambda g: st.tuples(
            st.lists(st.integers(0, N_VQ02 - 1), min_size=2 * g, max_size=2 * g),
            st.lists(st.integers(0, N_VQ06 - 1), min_size=3 * g, max_size=3 * g),
        )
    )
)
def test_roundtrip_streams_in_2_to_3(pair):
    vq02, vq06 = pair
    codes = interleave_dual(vq02, vq06)
    assert len(codes) == 5 * len(vq02) // 2 == 5 * len(vq06) // 3
    assert DualCodebookTokenizer().decode_streams(codes) == (vq02, vq06)
    for g in range(len(codes) // 5):  # every group: 2 linguistic slots, then 3 semantic slots
        assert all(c < N_VQ02 for c in codes[5 * g : 5 * g + 2])
        assert all(N_VQ02 <= c < N_VQ02 + N_VQ06 for c in codes[5 * g + 2 : 5 * g + 5])
    ids = STEP_AUDIO_V1.to_ids(codes)
    assert all(65536 <= i < 65536 + 5120 for i in ids)
    assert STEP_AUDIO_V1.from_ids(ids) == codes


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, N_VQ02 - 1), max_size=25),
    st.lists(st.integers(0, N_VQ06 - 1), max_size=40),
)
def test_trailing_group_rule(vq02, vq06):
    """Any lengths: min(n02 // 2, n06 // 3) whole groups are kept, the rest of both streams is dropped."""
    groups = min(len(vq02) // 2, len(vq06) // 3)
    codes = interleave_dual(vq02, vq06)
    assert len(codes) == 5 * groups
    assert codes == interleave_dual(vq02[: 2 * groups], vq06[: 3 * groups])
    assert deinterleave_dual(codes) == (vq02[: 2 * groups], vq06[: 3 * groups])
    # one code more in either stream alone never adds a group
    assert len(interleave_dual(vq02[: 2 * groups] + [0], vq06[: 3 * groups] + [0, 0])) == 5 * groups


def test_trailing_group_examples():
    assert interleave_dual([1], [2, 3, 4]) == []  # a group needs 2 + 3
    assert interleave_dual([1, 2], [3, 4]) == []
    assert interleave_dual([1, 2, 3], [4, 5, 6, 7, 8]) == [1, 2, 1028, 1029, 1030]
    with pytest.raises(ValueError, match="multiple of 5"):
        DualCodebookTokenizer().decode_streams([1, 2, 1028, 1029])


# ---- rates ----

@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60 * SR))
def test_stream_lengths_follow_the_rates(n):
    n02, n06 = stream_lengths(n)
    assert n02 == int(n / SR * 50 / 3 + 1e-9) == n // 960  # 16.7 Hz: one code per 60 ms
    assert n06 == int(n / SR * 25 + 1e-9) == n // 640  # 25 Hz: one code per 40 ms
    assert num_groups(n) == min(n02 // 2, n06 // 3) == n // GROUP_SAMPLES  # whole 120 ms groups
    assert DualCodebookTokenizer().num_codes(n) == 5 * (n // GROUP_SAMPLES)


@pytest.mark.parametrize(
    ("seconds", "n02", "n06", "n_codes"),
    [(0.0, 0, 0, 0), (0.03, 0, 0, 0), (0.05, 0, 1, 0), (0.119, 1, 2, 0), (0.12, 2, 3, 5), (1.0, 16, 25, 40),
     (1.2, 20, 30, 50), (3.05, 50, 76, 125)],
)
def test_encode_counts_per_duration(fitted, seconds, n02, n06, n_codes):
    x = _clip(round(seconds * SR), seed=1)
    vq02, vq06 = fitted.encode_streams(x, SR)
    assert (len(vq02), len(vq06)) == (n02, n06)
    assert len(fitted.encode(x, SR)) == n_codes == fitted.num_codes(x.size)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 4 * SR), st.integers(0, 2**16))
def test_encode_rates_and_ids_random_clips(fitted, n, seed):
    x = _clip(n, seed)
    vq02, vq06 = fitted.encode_streams(x, SR)
    assert (len(vq02), len(vq06)) == stream_lengths(n)
    assert all(0 <= v < N_LING for v in vq02) and all(0 <= v < N_SEM for v in vq06)
    codes = fitted.encode(x, SR)
    assert codes == interleave_dual(vq02, vq06)  # one trailing-group rule: interleave_dual's
    assert len(codes) == 5 * (n // GROUP_SAMPLES)
    ids = fitted.id_map.to_ids(codes)
    assert all(65536 <= i < 65536 + 5120 for i in ids)
    # fitted codebooks are smaller than the layout: only the first slots of each stream are used
    assert all(i - 65536 < N_LING or N_VQ02 <= i - 65536 < N_VQ02 + N_SEM for i in ids)
    assert fitted.encode(x, SR) == codes  # deterministic


def test_resampled_input(fitted):
    x16 = _clip(2 * SR, seed=3)
    x22 = resample(x16, SR, 22050)
    vq02, vq06 = fitted.encode_streams(x22, 22050)
    n = resample(x22, 22050, SR).size  # the rates apply to the 16 kHz signal
    assert (len(vq02), len(vq06)) == stream_lengths(n) == (33, 50)
    assert len(fitted.encode(x22, 22050)) == 5 * (n // GROUP_SAMPLES)


# ---- the reference tokenizer ----

def test_protocol_and_constants(fitted):
    assert isinstance(fitted, AudioTokenizer) and isinstance(fitted, DualStreamTokenizer)
    assert fitted.n_codes == 5120 and fitted.id_map is STEP_AUDIO_V1
    assert fitted.rate_hz == pytest.approx(125 / 3)
    assert fitted.linguistic_rate_hz == pytest.approx(16.6667, abs=1e-4) and fitted.semantic_rate_hz == 25.0
    assert tuple(fitted.linguistic.shape) == (N_LING, 80) and tuple(fitted.semantic.shape) == (N_SEM, 128)
    with pytest.raises(NotImplementedError, match="cannot decode"):
        fitted.decode([0, 1, 1024, 1025, 1026])
    with pytest.raises(RuntimeError, match="not fitted"):
        DualCodebookTokenizer(4, 4).encode(np.zeros(SR, np.float32), SR)
    with pytest.raises(ValueError, match=r"linguistic_codes must be in \[1, 1024\]"):
        DualCodebookTokenizer(1025, 8)
    with pytest.raises(ValueError, match=r"semantic_codes must be in \[1, 4096\]"):
        DualCodebookTokenizer(8, 0)


def test_codes_carry_the_audio(fitted, audios):
    """On the DTMF corpus both codebooks are used broadly, and different utterances get different codes."""
    vq02, vq06 = [], []
    for a in audios[:16]:
        s02, s06 = fitted.encode_streams(a, SR)
        vq02 += s02
        vq06 += s06
    assert len(set(vq02)) >= N_LING // 2 and len(set(vq06)) >= N_SEM // 2
    assert fitted.encode(audios[0], SR) != fitted.encode(audios[1], SR)


def test_fit_is_deterministic(audios, fitted):
    again = DualCodebookTokenizer(N_LING, N_SEM, seed=0).fit(audios, SR)
    assert torch.equal(again.linguistic, fitted.linguistic) and torch.equal(again.semantic, fitted.semantic)
    other = DualCodebookTokenizer(N_LING, N_SEM, seed=1).fit(audios, SR)
    assert not torch.equal(other.semantic, fitted.semantic)


def test_fit_needs_enough_frames():
    with pytest.raises(ValueError, match=r"semantic codebook of 4096 codes needs at least 4096 feature frames "
                                         r"\(163\.8 s of audio\), got 25"):
        DualCodebookTokenizer(8, 4096).fit([_clip(SR)], SR)


def test_save_load_encodes_identically(fitted, audios, tmp_path):
    out = fitted.save(tmp_path / "dual")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["type"] == "dual" and cfg["layout"] == {"n_vq02": 1024, "n_vq06": 4096, "id_offset": 65536}
    assert cfg["linguistic"]["codes"] == N_LING and cfg["semantic"]["codes"] == N_SEM
    assert (cfg["linguistic"]["hop_samples"], cfg["semantic"]["hop_samples"]) == (960, 640)
    loaded = load_audio_tokenizer(f"dual:{out}")
    assert isinstance(loaded, DualCodebookTokenizer)
    assert torch.equal(loaded.linguistic, fitted.linguistic) and torch.equal(loaded.semantic, fitted.semantic)
    for a in audios[:8]:
        assert loaded.encode(a, SR) == fitted.encode(a, SR)
        assert loaded.encode_streams(a, SR) == fitted.encode_streams(a, SR)


def test_spec_errors(fitted, tmp_path):
    with pytest.raises(AudioTokenizerError, match="not a dual-codebook audio tokenizer directory"):
        load_audio_tokenizer(f"dual:{tmp_path}")
    dual_dir = fitted.save(tmp_path / "dual")
    with pytest.raises(AudioTokenizerError, match="type is 'dual', expected 'kmeans'"):
        load_audio_tokenizer(f"kmeans:{dual_dir}")
    km = KMeansAudioTokenizer(n_codes=2).fit([_clip(SR)], SR).save(tmp_path / "km")
    assert isinstance(load_audio_tokenizer(f"kmeans:{km}"), KMeansAudioTokenizer)  # still works
    with pytest.raises(AudioTokenizerError, match="type is 'kmeans', expected 'dual'"):
        load_audio_tokenizer(f"dual:{km}")
    cfg = json.loads((dual_dir / "config.json").read_text())
    cfg["layout"]["n_vq02"] = 512
    (dual_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AudioTokenizerError, match="id layout"):
        load_audio_tokenizer(f"dual:{dual_dir}")
    with pytest.raises(AudioTokenizerError, match=r"expected one of \['cosyvoice2', 'dual', 'kmeans', "):
        load_audio_tokenizer("dual")


def test_cli_fits_from_a_folder(speech, fitted, tmp_path, capsys):
    from data_pipelines.fit_audio_tokenizer import main

    main([str(speech["audio_dir"]), str(tmp_path / "cli"), "--dual", "--linguistic", str(N_LING),
          "--semantic", str(N_SEM), "--max-files", "1000"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    tok = load_audio_tokenizer(f"dual:{tmp_path / 'cli'}")
    # the folder also holds the eval clips, so the codebooks differ from the fixture's, but not the layout
    assert (tok.linguistic_codes, tok.semantic_codes) == (N_LING, N_SEM)
    x = _clip(SR, seed=9)
    assert len(tok.encode(x, SR)) == len(fitted.encode(x, SR)) == 40
    with pytest.raises(SystemExit, match="linguistic codebook of 1024 codes needs at least 1024 feature frames"):
        main([str(speech["audio_dir"]), str(tmp_path / "big"), "--dual", "--max-files", "2"])
    with pytest.raises(SystemExit, match="no .wav files"):
        main([str(tmp_path), str(tmp_path / "none"), "--dual"])


# ---- the real Step-Audio-Tokenizer behind the same protocol ----

def _fake_step_module(monkeypatch, name="fake_step_audio_tokenizer"):
    calls = []

    class FakeStepAudioTokenizer:
        def __init__(self, path):
            self.path = path

        def wav2token(self, wav, sr, enable_trim=True, energy_norm=True):
            calls.append((tuple(wav.shape), sr, enable_trim, energy_norm))
            vq02, vq06 = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8]  # 2 whole groups, trailing codes dropped
            return [], vq02, vq06

    mod = types.ModuleType(name)
    mod.StepAudioTokenizer = FakeStepAudioTokenizer
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(StepAudioTokenizer, "MODULE", name)
    return calls


def _weights_dir(path):
    for name in StepAudioTokenizer.REQUIRED_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).touch()
    return path


def test_stepaudio_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(StepAudioTokenizer, "MODULE", "no_such_step_audio_tokenizer")
    with pytest.raises(AudioTokenizerError, match="needs the Python package 'no_such_step_audio_tokenizer', "
                                                  "which is not installed .*Step-Audio"):
        load_audio_tokenizer(f"stepaudio:{_weights_dir(tmp_path)}")


def test_stepaudio_missing_dependency(tmp_path, monkeypatch):
    """Step's tokenizer.py exists but one of its imports (here 'whisper') does not."""
    pkg = tmp_path / "src"
    pkg.mkdir()
    (pkg / "fake_step_tok_with_deps.py").write_text("import whisper_absent_for_test\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(StepAudioTokenizer, "MODULE", "fake_step_tok_with_deps")
    with pytest.raises(AudioTokenizerError, match="importing 'fake_step_tok_with_deps' failed, its dependency "
                                                  "'whisper_absent_for_test' is not installed"):
        load_audio_tokenizer(f"stepaudio:{_weights_dir(tmp_path / 'w')}")


def test_stepaudio_missing_weights(tmp_path, monkeypatch):
    _fake_step_module(monkeypatch)
    with pytest.raises(AudioTokenizerError, match="weights directory .*nowhere not found"):
        load_audio_tokenizer(f"stepaudio:{tmp_path / 'nowhere'}")
    (tmp_path / "linguistic_tokenizer.npy").touch()
    with pytest.raises(AudioTokenizerError, match="not a Step-Audio-Tokenizer weights directory, missing "
                                                  "speech_tokenizer_v1.onnx, dengcunqin/speech_paraformer"):
        load_audio_tokenizer(f"stepaudio:{tmp_path}")


def test_stepaudio_same_protocol(tmp_path, monkeypatch):
    calls = _fake_step_module(monkeypatch)
    tok = load_audio_tokenizer(f"stepaudio:{_weights_dir(tmp_path)}")
    assert isinstance(tok, DualStreamTokenizer) and tok.n_codes == 5120 and tok.id_map is STEP_AUDIO_V1
    assert tok.rate_hz == pytest.approx(DualCodebookTokenizer.rate_hz)
    x = np.zeros(SR, np.float32)
    assert tok.encode_streams(x, SR) == ([3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8])
    codes = tok.encode(x, SR)
    assert codes == [3, 1, 1033, 1026, 1030, 4, 1, 1029, 1027, 1029]
    assert tok.decode_streams(codes) == ([3, 1, 4, 1], [9, 2, 6, 5, 3, 5])
    assert calls[-1] == ((1, SR), SR, True, True)  # Step's wav2token defaults unless asked otherwise
    tok = StepAudioTokenizer(tmp_path, trim_silence=False)
    tok.encode(x, SR)
    assert calls[-1] == ((1, SR), SR, False, True)
