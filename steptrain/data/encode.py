"""Tokenize rendered segments into model inputs and loss labels.

Each segment is tokenized on its own (``add_special_tokens=False``, as ms-swift does), so the label
boundaries are exact by construction instead of being recovered from character offsets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from steptrain.data.audio_spans import AudioClip, ReplyAudioSpec, split_on_audio
from steptrain.data.templates import Segment

IGNORE_INDEX = -100  # HF convention: labels with this value carry no loss
TRUNCATION = ("right", "left", "drop")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # == input_ids where trained, else IGNORE_INDEX; the model shifts them
    source: str  # "path:line" of the row, for error messages and debugging
    audio: list[AudioClip] = field(default_factory=list)  # clips in the order their spans appear
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token span per clip


# Per <audio> tag: [(ids, clip)] with one entry per 25 s chunk of a heard clip, or [(ids, None)] for a
# spoken reply's discrete audio tokens.
AudioTokens = Iterator[list[tuple[list[int], AudioClip | None]]]


def tokenize_segments(
    segments: Sequence[Segment], tokenizer, audio: AudioTokens | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation, before any truncation.

    With ``audio``, every ``<audio>`` tag is replaced by its ids: a heard clip's placeholder span is
    never trained (the model hears it), a spoken reply's audio tokens are trained like the text of
    their turn. ``tokenize_with_audio`` also returns the heard clips and their spans.
    """
    input_ids, labels, _, _ = tokenize_with_audio(segments, tokenizer, audio)
    return input_ids, labels


def tokenize_with_audio(
    segments: Sequence[Segment], tokenizer, audio: AudioTokens | None = None, reply: ReplyAudioSpec | None = None
):
    """(input_ids, labels, clips, spans); see ``tokenize_segments``.

    With ``reply.interleave``, a spoken reply's block absorbs the text just before its tag in the same
    turn (its transcript): ``<tts_start>`` text and audio chunks alternating ``<tts_end>``.
    """
    interleave = reply is not None and reply.interleave is not None
    pieces = [split_on_audio(s.text) if audio is not None else [s.text] for s in segments]
    texts = [t for parts in pieces for t in parts]
    batch = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])  # HF rejects []
    input_ids: list[int] = []
    labels: list[int] = []
    clips: list[AudioClip] = []
    spans: list[tuple[int, int]] = []
    for seg, parts in zip(segments, pieces, strict=True):
        ids: list[int] = []
        for k in range(len(parts)):
            if k:  # an <audio> tag stood between parts[k - 1] and parts[k]
                for span_ids, clip in next(audio):
                    if clip is None and interleave:  # parts[k - 1] (just appended as ``ids``) is the transcript
                        del input_ids[len(input_ids) - len(ids) :], labels[len(labels) - len(ids) :]
                        span_ids = reply.with_transcript(span_ids, ids)
                    if clip is not None:
                        spans.append((len(input_ids), len(input_ids) + len(span_ids)))
                        clips.append(clip)
                    input_ids += span_ids
                    labels += span_ids if clip is None and seg.train else [IGNORE_INDEX] * len(span_ids)
            ids = next(batch)
            input_ids += ids
            labels += ids if seg.train else [IGNORE_INDEX] * len(ids)
    return input_ids, labels, clips, spans


def fit_length(
    input_ids: list[int],
    labels: list[int],
    *,
    max_length: int,
    truncation: str,
    source: str = "",
    clips: Sequence[AudioClip] = (),
    spans: Sequence[tuple[int, int]] = (),
) -> Encoded | None:
    """Apply the truncation policy; None when the row is dropped or no trained token is left.

    A cut never splits an audio span (the model needs every patch of a clip): it moves to the span's
    edge, and clips outside the kept window are dropped with their spans.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    start, end = 0, len(input_ids)
    if end > max_length:
        if truncation == "drop":
            return None
        if truncation == "right":
            end = max_length
            end = min([s for s, e in spans if s < end < e], default=end)
        else:
            start = end - max_length
            start = max([e for s, e in spans if s < start < e], default=start)
    input_ids, labels = input_ids[start:end], labels[start:end]
    kept = [(c, (s - start, e - start)) for c, (s, e) in zip(clips, spans, strict=True) if s >= start and e <= end]
    if not input_ids:
        return None
    # The first token has no preceding context inside the example. Never making it a target means an
    # example contributes the same loss terms whether it starts a row or sits inside a packed row.
    labels = [IGNORE_INDEX, *labels[1:]]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(input_ids, labels, source, [c for c, _ in kept], [sp for _, sp in kept])


def encode_segments(
    segments: Sequence[Segment], tokenizer, *, max_length: int, truncation: str, source: str = ""
) -> Encoded | None:
    input_ids, labels = tokenize_segments(segments, tokenizer)
    return fit_length(input_ids, labels, max_length=max_length, truncation=truncation, source=source)
