"""Epoch planning (which examples go into which micro-batch row) and collation into tensors.

The plan is a pure function of its arguments, seeded from (seed, epoch) and never from global RNG
state, so a resumed run can rebuild the exact epoch and skip the micro-batches it already consumed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from steptrain.data.audio_spans import AudioClip
from steptrain.data.encode import IGNORE_INDEX, Encoded

MEGA_BATCH = 64  # group_by_length sorts windows of MEGA_BATCH * batch_size examples
PACK_WINDOW = 1024  # packing sorts windows of this many examples: dense bins, yet varied per epoch


def plan_epoch(
    lengths: list[int],
    *,
    batch_size: int,
    max_length: int,
    packing: bool,
    group_by_length: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> list[list[list[int]]]:
    """Micro-batches of `batch_size` rows (the last may be shorter); a row is a list of example indices.

    Every example appears exactly once. ``shuffle=False`` keeps dataset order, so ``group_by_length``
    is ignored then and packing fills rows with consecutive examples. With packing, ``group_by_length``
    is ignored too: packed rows are already of similar length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lens = np.asarray(lengths, dtype=np.int64)
    if packing and len(lens) and lens.max() > max_length:
        raise ValueError(f"example {int(lens.argmax())} has {lens.max()} tokens > max_length {max_length}")
    # SeedSequence needs non-negative entries; the mask keeps negative seeds usable and distinct.
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch])
    order = rng.permutation(len(lens)) if shuffle else np.arange(len(lens))
    if packing:
        rows = (
            _pack_sorted(order, lens, max_length, rng) if shuffle else _pack_in_order(order, lens, max_length)
        )
    elif group_by_length and shuffle:
        return _group_by_length(order, lens, batch_size, rng)
    else:
        rows = [[int(i)] for i in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def _group_by_length(order: np.ndarray, lens: np.ndarray, batch_size: int, rng) -> list[list[list[int]]]:
    """Sort shuffled mega-batches by length, then shuffle the resulting batches.

    The batch with the longest example is moved to the front so that an out-of-memory error shows up
    in the first step, not hours in; the short remainder batch stays last.
    """
    mega = MEGA_BATCH * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lens[batches[b]].max())
        batches.insert(0, batches.pop(longest))
    return [[[i] for i in batch] for batch in batches + tail]


def _pack_sorted(order: np.ndarray, lens: np.ndarray, max_length: int, rng) -> list[list[int]]:
    """Best-fit decreasing inside windows of the shuffled order, then shuffle the rows."""
    rows: list[list[int]] = []
    for start in range(0, len(order), PACK_WINDOW):
        chunk = order[start : start + PACK_WINDOW]
        window: list[list[int]] = []
        free: list[tuple[int, int]] = []  # sorted (free space, row index in window)
        for i in chunk[np.argsort(-lens[chunk], kind="stable")].tolist():
            k = bisect.bisect_left(free, (int(lens[i]), -1))  # the fullest row that still fits
            if k == len(free):
                window.append([i])
                bisect.insort(free, (max_length - int(lens[i]), len(window) - 1))
            else:
                space, r = free.pop(k)
                window[r].append(i)
                bisect.insort(free, (space - int(lens[i]), r))
        rows += window
    return [rows[i] for i in rng.permutation(len(rows))]


def _pack_in_order(order: np.ndarray, lens: np.ndarray, max_length: int) -> list[list[int]]:
    """Next-fit: consecutive examples share a row until the next one does not fit."""
    rows: list[list[int]] = []
    used = max_length
    for i in order.tolist():
        if used + lens[i] > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += int(lens[i])
    return rows


def pad_clip_features(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n_mels, T_max] zero-padded features and [n] frame counts, in the given order."""
    lengths = torch.tensor([f.shape[-1] for f in feats], dtype=torch.long)
    out = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()), dtype=feats[0].dtype)
    for k, f in enumerate(feats):
        out[k, :, : f.shape[-1]] = f
    return out, lengths


def collate(
    rows: list[list[int]],
    examples: list[Encoded],
    *,
    pad_id: int,
    packing: bool,
    audio_features: Callable[[AudioClip], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Right-padded [B, T] tensors, T = the longest row of this micro-batch.

    Clips of the batch's examples come as ``audio_features`` [n_clips, n_mels, frames] (zero-padded)
    and ``audio_lengths`` [n_clips], in the reading order of their placeholder spans over the batch,
    which is the order in which the speech model fills them.

    Packed rows get no attention mask: position_ids restart at 0 for every example and for the padding
    tail, and transformers (>= 5) turns such restarts into a block-diagonal causal mask, so no token
    attends across examples and each example sees exactly what it would see alone.
    """
    if not packing and any(len(row) != 1 for row in rows):
        raise ValueError("unpacked rows must hold exactly one example each")
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = None if packing else torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[b, pos : pos + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, pos : pos + n] = torch.tensor(ex.labels, dtype=torch.long)
            position_ids[b, pos : pos + n] = torch.arange(n)
            pos += n
        if attention_mask is not None:
            attention_mask[b, :pos] = 1
        else:
            position_ids[b, pos:] = torch.arange(width - pos)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }
    clips = [clip for row in rows for i in row for clip in examples[i].audio]
    if clips:
        if audio_features is None:
            raise ValueError("the batch has audio clips but collate got no audio_features function")
        out, lengths = pad_clip_features([audio_features(clip) for clip in clips])
        batch |= {"audio_features": out, "audio_lengths": lengths}
    return batch


def to_device(batch: dict, device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``; keys that ``collate`` left as None are dropped."""
    return {key: value.to(device) for key, value in batch.items() if value is not None}
