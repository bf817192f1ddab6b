"""Tokenize rendered segments into model inputs and loss labels.

Each segment is tokenized on its own (``add_special_tokens=False``, as ms-swift does), so the label
boundaries are exact by construction instead of being recovered from character offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steptrain.data.templates import Segment

IGNORE_INDEX = -100  # HF convention: labels with this value carry no loss
TRUNCATION = ("right", "left", "drop")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # == input_ids where trained, else IGNORE_INDEX; the model shifts them
    source: str  # "path:line" of the row, for error messages and debugging


def tokenize_segments(segments: Sequence[Segment], tokenizer) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation, before any truncation."""
    input_ids: list[int] = []
    labels: list[int] = []
    texts = [s.text for s in segments]
    batch = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # HF rejects []
    for seg, ids in zip(segments, batch, strict=True):
        input_ids += ids
        labels += ids if seg.train else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def fit_length(
    input_ids: list[int], labels: list[int], *, max_length: int, truncation: str, source: str = ""
) -> Encoded | None:
    """Apply the truncation policy; None when the row is dropped or no trained token is left."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    if len(input_ids) > max_length:
        if truncation == "drop":
            return None
        cut = slice(None, max_length) if truncation == "right" else slice(len(input_ids) - max_length, None)
        input_ids, labels = input_ids[cut], labels[cut]
    if not input_ids:
        return None
    # The first token has no preceding context inside the example. Never making it a target means an
    # example contributes the same loss terms whether it starts a row or sits inside a packed row.
    labels = [IGNORE_INDEX, *labels[1:]]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Encoded(input_ids, labels, source)


def encode_segments(
    segments: Sequence[Segment], tokenizer, *, max_length: int, truncation: str, source: str = ""
) -> Encoded | None:
    input_ids, labels = tokenize_segments(segments, tokenizer)
    return fit_length(input_ids, labels, max_length=max_length, truncation=truncation, source=source)
