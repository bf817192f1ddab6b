"""The synthetic speech corpus: determinism, ms-swift rows, WAV format, labels carried by the audio."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import speech_corpus as sc
from data_pipelines.demo_corpus import read_jsonl

N_TRAIN, N_EVAL = 40, 12
JSONL_NAMES = ("asr_train", "asr_eval", "chat_train", "chat_eval", "tts_train", "tts_eval")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return sc.write_speech_corpus(tmp_path_factory.mktemp("speech"), n_train=N_TRAIN, n_eval=N_EVAL, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(paths: dict[str, Path]) -> dict[str, str]:
    """audio path -> digit string, from the ASR files."""
    out = {}
    for name in ("asr_train", "asr_eval"):
        for row in read_jsonl(paths[name]):
            out[row["audios"][0]] = row["messages"][-1]["content"].replace(" ", "")
    return out


# ------------------------------------------------------------------------------------- DTMF decoding


def goertzel_power(x: np.ndarray, freq: float, sr: int) -> float:
    """Goertzel recurrence s[n] = x[n] + 2cos(w)s[n-1] - s[n-2]; returns the power at ``freq``."""
    coeff = 2.0 * np.cos(2.0 * np.pi * freq / sr)
    s1 = s2 = 0.0
    for v in x.tolist():
        s1, s2 = v + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def decode_dtmf(x: np.ndarray, sr: int) -> str:
    """Segment by 10 ms frame energy, then pick the strongest row and column tone of each segment."""
    hop = sr // 100
    frames = x[: len(x) // hop * hop].reshape(-1, hop)
    power = (frames.astype(np.float64) ** 2).mean(axis=1)
    active = power > 0.1 * power.max()
    segments, start = [], None
    for i, a in enumerate([*active.tolist(), False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            if i - start >= 5:  # >= 50 ms: a tone, not a noise blip
                segments.append((start * hop, i * hop))
            start = None
    by_freq = {f: d for d, f in sc.DTMF_FREQS.items()}
    out = []
    n = sr // 25  # 40 ms Hann windows: 25 Hz bins, so a 1% detune stays inside the main lobe while
    win = np.hanning(n)  # the nearest other DTMF tone (>= 73 Hz away) falls in the side lobes
    for a, b in segments:
        chunks = [x[i : i + n].astype(np.float64) * win for i in range(a, b - n + 1, n // 2)]

        def power(f: float, chunks=chunks) -> float:
            return sum(goertzel_power(c, f, sr) for c in chunks)

        rows = sorted(((power(f), f) for f in sc.DTMF_ROWS), reverse=True)
        cols = sorted(((power(f), f) for f in sc.DTMF_COLS), reverse=True)
        # clean tones: the winner dominates the runner-up in both groups
        assert rows[0][0] > 5 * rows[1][0] and cols[0][0] > 5 * cols[1][0]
        out.append(by_freq.get((rows[0][1], cols[0][1]), "?"))
    return "".join(out)


def test_goertzel_recovers_digits(corpus):
    labels = _labels(corpus)
    picked = sorted(labels)[:: max(1, len(labels) // 10)]  # ~10 utterances, train and eval
    assert any("eval" in p for p in picked) and any("train" in p for p in picked)
    root = corpus["asr_train"].parent
    for rel in picked:
        x, sr = sc.read_wav(root / rel)
        assert decode_dtmf(x, sr) == labels[rel], rel


def test_goertzel_every_digit_and_edge_lengths():
    for digits in ("0123456789", "888", "90210473"):
        for k in range(3):
            x = sc.synth_dtmf(digits, np.random.default_rng(k))
            assert decode_dtmf(x, sc.SAMPLE_RATE) == digits


# ----------------------------------------------------------------------------------------- the files


def test_deterministic_byte_identical(tmp_path, corpus):
    a = sc.write_speech_corpus(tmp_path / "a", n_train=N_TRAIN, n_eval=N_EVAL, seed=3)
    b = sc.write_speech_corpus(tmp_path / "b", n_train=N_TRAIN, n_eval=N_EVAL, seed=3)
    fa, fb = _files(a["meta"].parent), _files(b["meta"].parent)
    assert fa == fb and fa == _files(corpus["meta"].parent)
    assert sum(k.endswith(".wav") for k in fa) == N_TRAIN + N_EVAL + 4  # + ok/empty/garbage/too_long
    c = sc.write_speech_corpus(tmp_path / "c", n_train=N_TRAIN, n_eval=N_EVAL, seed=4, bad_rows=False)
    fc = _files(c["meta"].parent)
    assert fc["asr_train.jsonl"] != fa["asr_train.jsonl"]
    assert fc["audio/train_00000.wav"] != fa["audio/train_00000.wav"]


def test_eval_audio_independent_of_train_size(tmp_path, corpus):
    # the eval split is a function of (seed, n_eval) only: its digits and audio don't move with n_train
    other = sc.write_speech_corpus(tmp_path, n_train=5, n_eval=N_EVAL, seed=3, bad_rows=False)
    assert other["asr_eval"].read_bytes() == corpus["asr_eval"].read_bytes()
    for i in range(N_EVAL):
        rel = f"audio/eval_{i:05d}.wav"
        assert (tmp_path / rel).read_bytes() == (corpus["meta"].parent / rel).read_bytes()


def test_rows_are_valid_ms_swift(corpus):
    root = corpus["meta"].parent
    for name in JSONL_NAMES:
        rows = read_jsonl(corpus[name])
        assert rows, name
        for row in rows:
            assert set(row) == {"messages", "audios"}
            msgs = row["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in msgs)
            n_tags = sum(m["content"].count("<audio>") for m in msgs)
            assert n_tags == len(row["audios"]) >= 1
            for rel in row["audios"]:
                assert not Path(rel).is_absolute() and rel.startswith("audio/")
                assert (corpus[name].parent / rel).is_file()
                assert (root / rel).is_file()
    counts = {name: len(read_jsonl(corpus[name])) for name in JSONL_NAMES}
    assert counts == {
        "asr_train": N_TRAIN, "asr_eval": N_EVAL, "chat_train": N_TRAIN // 4,
        "chat_eval": N_EVAL, "tts_train": N_TRAIN, "tts_eval": N_EVAL,
    }  # fmt: skip


def test_task_contents(corpus):
    labels = _labels(corpus)
    for split in ("train", "eval"):
        for row in read_jsonl(corpus[f"asr_{split}"]):
            user, ans = row["messages"][0]["content"], row["messages"][1]["content"]
            assert user == "<audio>Transcribe the digits."
            assert row["audios"][0].startswith(f"audio/{split}_")
            assert ans.replace(" ", "").isdigit() and ans == " ".join(ans.replace(" ", ""))
            assert sc.MIN_DIGITS <= len(ans.split()) <= sc.MAX_DIGITS
        for row in read_jsonl(corpus[f"tts_{split}"]):
            user, ans = row["messages"][0]["content"], row["messages"][1]["content"]
            assert ans == "<audio>" and "<audio>" not in user
            assert user == "Say: " + " ".join(labels[row["audios"][0]])
    question_to_task = {q: t for t, q in sc.CHAT_QUESTIONS.items()}
    seen = set()
    for split in ("train", "eval"):
        for row in read_jsonl(corpus[f"chat_{split}"]):
            msgs, (a, b) = row["messages"], row["audios"]
            assert a != b and a.startswith(f"audio/{split}_") and b.startswith(f"audio/{split}_")
            assert all(msgs[i]["content"].startswith("<audio>") for i in (0, 2))
            t1 = question_to_task[msgs[0]["content"].removeprefix("<audio>")]
            t2 = question_to_task[msgs[2]["content"].removeprefix("<audio>")]
            assert t1 != "longer"
            assert msgs[1]["content"] == sc.answer_question(t1, labels[a])
            assert msgs[3]["content"] == sc.answer_question(t2, labels[b], labels[a])
            seen.update((t1, t2))
    assert seen == set(sc.CHAT_QUESTIONS)


def test_wavs_16k_mono_in_duration_range(corpus):
    labels = _labels(corpus)
    root = corpus["meta"].parent
    assert len(labels) == N_TRAIN + N_EVAL
    for rel, digits in labels.items():
        with wave.open(str(root / rel), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            seconds = w.getnframes() / w.getframerate()
        lo, hi = sc.duration_bounds(len(digits))
        assert lo <= seconds <= hi, (rel, seconds)
        assert 0.5 <= seconds <= 3.0
    x, _ = sc.read_wav(root / "audio/train_00000.wav")
    assert x.dtype == np.float32 and 0.05 < np.abs(x).max() < 1.0
    assert json.loads(corpus["meta"].read_text())["sample_rate"] == 16000


def test_eval_disjoint_from_train(corpus):
    train = [r["messages"][-1]["content"] for r in read_jsonl(corpus["asr_train"])]
    evals = [r["messages"][-1]["content"] for r in read_jsonl(corpus["asr_eval"])]
    assert len(set(evals)) == len(evals)
    assert not set(evals) & set(train)
    tr, ev = sc.draw_digit_strings(3000, 300, seed=0)
    assert len(set(ev)) == 300 and not set(ev) & set(tr)
    assert {len(s) for s in tr} == set(range(sc.MIN_DIGITS, sc.MAX_DIGITS + 1))


def test_bad_rows(corpus):
    root = corpus["bad_rows"].parent
    rows = read_jsonl(corpus["bad_rows"])
    expected = json.loads(corpus["bad_rows_expected"].read_text())
    assert sorted(expected, key=int) == [str(i) for i in range(1, len(rows) + 1)]
    assert set(expected.values()) == {"missing", "mismatch", "empty", "unreadable", "too long"}
    for i, row in enumerate(rows, start=1):
        reason, audios = expected[str(i)], row.get("audios", [])
        n_tags = sum(m["content"].count("<audio>") for m in row["messages"])
        if reason == "mismatch":
            assert n_tags != len(audios)
            assert all((root / p).is_file() for p in audios)
            continue
        assert n_tags == len(audios) == 1
        path = root / audios[0]
        if reason == "missing":
            assert not path.exists()
            continue
        if reason == "unreadable":
            with pytest.raises((wave.Error, EOFError)):
                wave.open(str(path), "rb")
            continue
        with wave.open(str(path), "rb") as w:
            seconds = w.getnframes() / w.getframerate()
        if reason == "empty":
            assert w.getnframes() == 0
        else:
            assert reason == "too long" and seconds > sc.MAX_AUDIO_SECONDS
    # the bad audio stays out of audio/, so globbing the good audio never picks it up
    assert not any("bad" in p.name for p in (root / "audio").iterdir())


def test_unknown_voice_and_missing_espeak(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown voice"):
        sc.write_speech_corpus(tmp_path, n_train=2, n_eval=1, voice="robot")
    monkeypatch.setattr(sc.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        sc.write_speech_corpus(tmp_path / "e", n_train=2, n_eval=1, voice="espeak")
    assert not (tmp_path / "e" / "audio").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_voice(tmp_path):
    paths = sc.write_speech_corpus(tmp_path, n_train=4, n_eval=2, seed=1, voice="espeak")
    meta = json.loads(paths["meta"].read_text())
    assert meta["voice"] == "espeak"
    if shutil.which("sox"):
        assert meta["sample_rate"] == 16000
    for row in read_jsonl(paths["asr_train"]) + sc.read_jsonl(paths["asr_eval"]):
        with wave.open(str(tmp_path / row["audios"][0]), "rb") as w:
            assert w.getnchannels() == 1 and w.getframerate() == meta["sample_rate"]
            assert w.getnframes() / w.getframerate() > 0.3
    again = sc.write_speech_corpus(tmp_path / "again", n_train=4, n_eval=2, seed=1, voice="espeak")
    assert again["asr_train"].read_bytes() == paths["asr_train"].read_bytes()
    assert (tmp_path / "again/audio/train_00000.wav").read_bytes() == (
        tmp_path / "audio/train_00000.wav"
    ).read_bytes()
