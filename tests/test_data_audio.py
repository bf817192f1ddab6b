"""Audio rows: <audio> tags become exact placeholder spans, clips travel to collate, bad audio is named."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from steptrain.audio.features import log_mel
from steptrain.audio.io import load_audio
from steptrain.data import AudioSpec, DataError, collate, load_sft_data
from steptrain.data.encode import IGNORE_INDEX
from tests.data_helpers import data_cfg, ids, run_inputs, tiny_tokenizer, write_jsonl

SR = 16000
AUDIO_TOKENS = ["<audio_start>", "<audio_patch>", "<audio_end>"]


def write_wav(path: Path, seconds: float, freq: float = 440.0) -> str:
    n = int(round(seconds * SR))
    samples = (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SR) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.tobytes())
    return path.name


def patches(n_samples: int) -> int:
    """A stand-in for the model's arithmetic: one patch per 80 ms (12.5 Hz), rounded up."""
    return -(-n_samples // 1280)


@pytest.fixture()
def tok():
    t = tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": AUDIO_TOKENS})
    return t


@pytest.fixture()
def spec(tok):
    return AudioSpec.from_tokenizer(tok, patches=patches, load=load_audio, max_seconds=30.0)


def audio_row(*contents: tuple[str, str], audios: list[str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in contents], "audios": audios}


def test_two_clips_become_exact_placeholder_spans(tmp_path, tok, spec):
    a, b = write_wav(tmp_path / "a.wav", 1.0), write_wav(tmp_path / "b.wav", 0.5, 660.0)
    row = audio_row(("user", "<audio> hi <audio>"), ("assistant", "hello"), audios=[a, b])
    c = data_cfg()
    data = load_sft_data([write_jsonl(tmp_path / "d.jsonl", [row])], tok, c, run_inputs(tok, c, audio=spec))
    (ex,) = data.examples
    start, patch, end = (tok.convert_tokens_to_ids(t) for t in AUDIO_TOKENS)
    span_a, span_b = [start, *[patch] * 13, end], [start, *[patch] * 7, end]  # 16000 / 1280 -> 13; 8000 -> 7
    expected = [*ids("<s> <|BOT|> human"), *span_a, *ids("hi"), *span_b, *ids("<|EOT|> <|BOT|> assistant"),
                *ids("hello <|EOT|>")]
    assert ex.input_ids == expected
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert trained == ids("hello <|EOT|>")
    assert [(c.path.endswith(n), c.start, c.length) for c, n in zip(ex.audio, [a, b], strict=True)] == [
        (True, 0, 16000), (True, 0, 8000)]
    assert [ex.input_ids[s] for s, _ in ex.audio_spans] == [start, start]
    assert [ex.input_ids[e - 1] for _, e in ex.audio_spans] == [end, end]
    assert data.stats["audio_clips"] == 2


def test_long_audio_is_cut_into_25_second_chunks(tmp_path, tok, spec):
    long = write_wav(tmp_path / "long.wav", 27.0)
    row = audio_row(("user", "<audio>"), ("assistant", "ok"), audios=[long])
    c = data_cfg(max_length=2048)
    (ex,) = load_sft_data([write_jsonl(tmp_path / "d.jsonl", [row])], tok, c, run_inputs(tok, c, audio=spec)).examples
    assert [(c.start, c.length) for c in ex.audio] == [(0, 400000), (400000, 32000)]
    assert [e - s for s, e in ex.audio_spans] == [patches(400000) + 2, patches(32000) + 2]


def test_right_truncation_never_splits_a_clip(tmp_path, tok, spec):
    a, b = write_wav(tmp_path / "a.wav", 1.0), write_wav(tmp_path / "b.wav", 1.0)
    row = audio_row(("user", "hi"), ("assistant", "hello"), ("user", "<audio> <audio>"), ("assistant", "ok"),
                    audios=[a, b])
    c = data_cfg(max_length=4096)
    full = load_sft_data([write_jsonl(tmp_path / "d.jsonl", [row])], tok, c, run_inputs(tok, c, audio=spec))
    s2, _ = full.examples[0].audio_spans[1]
    c = data_cfg(max_length=s2 + 3)
    cut = load_sft_data([write_jsonl(tmp_path / "e.jsonl", [row])], tok, c, run_inputs(tok, c, audio=spec))
    (ex,) = cut.examples
    assert len(ex.input_ids) == s2  # moved back to the start of the second clip's span
    assert len(ex.audio) == 1 and ex.audio_spans == full.examples[0].audio_spans[:1]


@pytest.mark.parametrize(
    ("make", "tags", "reason"),
    [
        (lambda d: ["missing.wav"], 1, "missing audio"),
        (lambda d: [write_wav(d / "z.wav", 0.0)], 1, "empty audio"),
        (lambda d: [(d / "g.wav").write_bytes(b"RIFF garbage") and "g.wav"], 1, "unreadable audio"),
        (lambda d: [write_wav(d / "l.wav", 31.0)], 1, "audio too long"),
        (lambda d: [write_wav(d / "a.wav", 0.2)], 2, "audio count mismatch: 2 <audio> tags but 1 audios"),
    ],
    ids=["missing", "empty", "unreadable", "too-long", "count"],
)
def test_bad_audio_names_file_line_and_reason(tmp_path, tok, spec, make, tags, reason):
    good = audio_row(("user", "<audio>"), ("assistant", "ok"), audios=[write_wav(tmp_path / "ok.wav", 0.3)])
    bad = audio_row(("user", "<audio>" * tags), ("assistant", "ok"), audios=make(tmp_path))
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    c = data_cfg()
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        load_sft_data([path], tok, c, run_inputs(tok, c, audio=spec))
    c = data_cfg(on_error="skip")
    skipped = load_sft_data([path], tok, c, run_inputs(tok, c, audio=spec))
    assert len(skipped.examples) == 1 and sum(skipped.stats["skipped"].values()) == 1


def test_audio_row_in_a_text_only_run_is_refused(tmp_path, tok):
    row = audio_row(("user", "<audio>"), ("assistant", "ok"), audios=[write_wav(tmp_path / "a.wav", 0.3)])
    c = data_cfg()
    with pytest.raises(DataError, match="audio in a text-only run"):
        load_sft_data([write_jsonl(tmp_path / "d.jsonl", [row])], tok, c, run_inputs(tok, c))


def test_collate_mixes_audio_and_text_rows(tmp_path, tok, spec):
    rows = [
        audio_row(("user", "<audio>"), ("assistant", "ok"), audios=[write_wav(tmp_path / "a.wav", 0.64)]),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        audio_row(("user", "<audio>"), ("assistant", "good"), audios=[write_wav(tmp_path / "b.wav", 0.32)]),
    ]
    c = data_cfg()
    data = load_sft_data([write_jsonl(tmp_path / "d.jsonl", rows)], tok, c, run_inputs(tok, c, audio=spec))

    def features(clip):
        wave_ = load_audio(clip.path)[clip.start : clip.start + clip.length]
        return log_mel(wave_)

    for packing, plan in ((False, [[0], [1], [2]]), (True, [[0, 1, 2]])):
        batch = collate(plan, data.examples, pad_id=0, packing=packing, audio_features=features)
        assert batch["audio_features"].shape[:2] == (2, 128)
        assert batch["audio_lengths"].tolist() == [features(c).shape[-1] for e in data.examples for c in e.audio]
        assert torch.equal(batch["audio_features"][1, :, : batch["audio_lengths"][1]], features(data.examples[2].audio[0]))
    text_only = collate([[1]], data.examples, pad_id=0, packing=False)
    assert "audio_features" not in text_only


def test_audio_in_last_turn_only_uses_transcripts_for_earlier_turns(tmp_path, tok, spec):
    a, b = write_wav(tmp_path / "a.wav", 0.64), write_wav(tmp_path / "b.wav", 0.32)
    row = audio_row(("user", "<audio>"), ("assistant", "hi"), ("user", "<audio>"), ("assistant", "good"),
                    audios=[a, b])
    row["transcripts"] = ["hello", "thanks"]
    cfg = data_cfg(audio_last_turn_only=True, loss_on="last_assistant")
    (ex,) = load_sft_data([write_jsonl(tmp_path / "d.jsonl", [row])], tok, cfg, run_inputs(tok, cfg, audio=spec)).examples
    start, patch, end = (tok.convert_tokens_to_ids(t) for t in AUDIO_TOKENS)
    assert ex.input_ids[: 4] == ids("<s> <|BOT|> human hello")  # the first clip became its transcript
    assert [c.path.endswith("b.wav") for c in ex.audio] == [True] and ex.input_ids.count(start) == 1
    assert ex.input_ids.count(patch) == patches(5120)
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]
    assert trained == ids("good <|EOT|>")
    del row["transcripts"]
    with pytest.raises(DataError, match="missing transcripts"):
        load_sft_data([write_jsonl(tmp_path / "e.jsonl", [row])], tok, cfg, run_inputs(tok, cfg, audio=spec))
