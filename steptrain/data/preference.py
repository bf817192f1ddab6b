"""Preference pairs: ms-swift RLHF rows -> (chosen, rejected) conversations sharing one prompt.

Accepted rows (one JSON object per line)::

    {"messages": [..., {"role": "assistant", "content": CHOSEN}], "rejected_response": REJECTED}
    {"chosen": [...messages...], "rejected": [...messages...]}    # identical up to the last reply

Both conversations are encoded with loss (and so log-probabilities) on the last reply only. Speech: the
prompt's ``<audio>`` tags take ``audios`` as in SFT; a spoken reply (``<audio>`` in the last assistant
turn) takes its codes from ``audio_codes``, and the rejected conversation from ``rejected_audio_codes`` /
``rejected_audios`` when the row gives them (each the full list for that conversation), else the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from steptrain.data.audio_spans import AUDIO_TAG
from steptrain.data.batching import collate
from steptrain.data.dataset import encode_row
from steptrain.data.encode import IGNORE_INDEX, Encoded
from steptrain.data.errors import DataError
from steptrain.data.reader import read_rows, validate_row
from steptrain.data.run_inputs import RunInputs
from steptrain.data.templates import NOT_PREFIX_STABLE

REJECTED_KEYS = {"audio_codes": "rejected_audio_codes", "audios": "rejected_audios"}


def normalize_preference_row(row: object) -> dict:
    """The row as ``messages`` (ending in the chosen reply) + ``rejected_response``; DataError if unusable."""
    if not isinstance(row, dict):
        raise DataError("not an object", f"got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        for name, conv in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(conv, list) or not conv or not isinstance(conv[-1], dict):
                raise DataError(f"bad {name}", f"'{name}' must be a non-empty list of messages")
        if chosen[:-1] != rejected[:-1]:
            raise DataError("chosen and rejected differ before the last reply",
                            "a pair must share its prompt; only the last assistant reply may differ")
        row = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        row |= {"messages": chosen, "rejected_response": rejected[-1].get("content")}
    validate_row(row)
    last = row["messages"][-1]
    if last["role"] != "assistant":
        raise DataError("no final reply", "the last message must be the (chosen) assistant reply")
    if not isinstance(row.get("rejected_response"), str):
        raise DataError("missing rejected_response", "give 'rejected_response' (a string) or 'chosen'/'rejected' lists")
    same_audio = all(k2 not in row or row[k2] == row.get(k1) for k1, k2 in REJECTED_KEYS.items())
    if row["rejected_response"] == last["content"] and same_audio:
        raise DataError("chosen equals rejected", "the two replies are identical")
    return row


def deaf_negatives(rows: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Extra pairs that punish "deaf" answers: same prompt and audio, rejected = a reply written for
    another clip (fluent, on-topic, but ignoring what this audio says). Step-Audio-R1's reward data guards
    against this hacking. ``fraction`` of the rows with heard audio each get one such pair."""
    import random

    heard = [r for r in rows if r.get("audios") and any(
        AUDIO_TAG in m["content"] for m in r["messages"][:-1] if m["role"] != "assistant")]
    rng = random.Random(seed)
    out = []
    for row in rng.sample(heard, round(fraction * len(heard))):
        others = [o for o in heard if o["audios"] != row["audios"] and o["messages"][-1]["content"] != row["messages"][-1]["content"]]
        if others:
            other = rng.choice(others)
            out.append({**row, "rejected_response": other["messages"][-1]["content"], "negative": "deaf",
                        "_source": f"{row.get('_source', 'row')} (deaf negative)"})
    return out


def rejected_conversation(row: dict) -> dict:
    """The row with its last reply replaced by the rejected one (and its audio lists, when given)."""
    out = {**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": row["rejected_response"]}]}
    for key, rejected_key in REJECTED_KEYS.items():
        if rejected_key in row:
            out[key] = row[rejected_key]
    return out


@dataclass
class PreferenceData:
    pairs: list[tuple[Encoded, Encoded]]  # (chosen, rejected), each with labels on its last reply only
    stats: dict = field(default_factory=dict)
    margins: list[float] = field(default_factory=list)  # the rows' "margin" (reward models), 0 when absent


def read_preference_rows(files: list[str], on_error: str = "error") -> tuple[list[dict], dict[str, int]]:
    """Valid preference rows of ``files`` (normalised), and skipped rows by reason."""
    return read_rows(files, on_error=on_error, check=normalize_preference_row)


def load_preference_data(files: list[str] | list[dict], tokenizer, data_cfg, inputs: RunInputs) -> PreferenceData:
    """Read and encode preference pairs; a pair is dropped (and counted) when either side is."""
    if files and isinstance(files[0], dict):
        rows, skipped = list(files), Counter()
    else:
        rows, read_skipped = read_preference_rows(list(files), on_error=data_cfg.on_error)
        skipped = Counter(read_skipped)
    pairs: list[tuple[Encoded, Encoded]] = []
    margins: list[float] = []
    stats = Counter()
    for n, row in enumerate(rows, 1):
        source = row.get("_source", f"row {n}")
        try:
            row = normalize_preference_row({**row, "_source": source})
            margin = row.get("margin", 0.0)
            if isinstance(margin, bool) or not isinstance(margin, int | float):
                raise DataError("bad margin", f"'margin' must be a number, got {margin!r}")
            sides = [encode_row(r, inputs.template, tokenizer, data_cfg, inputs.audio, inputs.reply, loss_on="last_assistant")
                     for r in (row, rejected_conversation(row))]
        except DataError as e:
            if data_cfg.on_error == "error" or e.reason == NOT_PREFIX_STABLE:
                raise e.at(source) from None
            skipped[e.reason] += 1
            continue
        (chosen, long_c), (rejected, long_r) = sides
        if chosen is None or rejected is None:
            stats["dropped_too_long" if (long_c or long_r) and data_cfg.truncation == "drop" else "dropped_no_labels"] += 1
            continue
        stats["truncated"] += long_c or long_r
        pairs.append((chosen, rejected))
        margins.append(float(margin))
    keys = ("truncated", "dropped_too_long", "dropped_no_labels")
    stats = {"rows": len(rows), "pairs": len(pairs), "skipped": dict(skipped), **{k: stats[k] for k in keys}}
    return PreferenceData(pairs, stats, margins)


class PairBatches:
    """Micro-batches of pairs as one padded batch: rows 0..B-1 chosen, B..2B-1 rejected."""

    def __init__(self, pairs, pad_id: int, features, margins: list[float] | None = None):
        self.pairs, self.pad_id, self.features = pairs, pad_id, features
        self.margins = torch.tensor(margins if margins is not None else [0.0] * len(pairs))
        self.flat = [e for pair in pairs for e in pair]  # chosen of pair i at 2i, rejected at 2i + 1
        self.lengths = [len(c.input_ids) + len(r.input_ids) for c, r in pairs]

    def batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = [i for row in rows for i in row]
        batch = collate([[2 * i] for i in ids] + [[2 * i + 1] for i in ids], self.flat, pad_id=self.pad_id,
                        packing=False, audio_features=self.features)
        return {**batch, "pair_ids": torch.tensor(ids), "margin": self.margins[ids]}


def shared_prefix(chosen: Encoded, rejected: Encoded) -> int:
    """Length of the untrained prefix both sides share (the prompt): scored once in a shared-prompt row."""
    first_c = next(t for t, lab in enumerate(chosen.labels) if lab != IGNORE_INDEX)
    first_r = next(t for t, lab in enumerate(rejected.labels) if lab != IGNORE_INDEX)
    common = next((t for t, (a, b) in enumerate(zip(chosen.input_ids, rejected.input_ids, strict=False)) if a != b),
                  min(len(chosen.input_ids), len(rejected.input_ids)))
    return min(first_c, first_r, common)


class SharedPromptBatches:
    """One row per pair: prompt, chosen reply, rejected reply; the prompt is computed once.

    Positions restart after the prompt for each reply, and a 4D attention mask lets the rejected reply see
    the prompt but not the chosen one, so every reply token is scored exactly as in its own sequence
    (causal attention), with the prompt's compute shared. The log-prob of a reply token at index t of its
    own sequence is read from the row position that holds its index t - 1 (the prompt's last position
    predicts the first token of both replies). Text-only pairs (heard audio uses ``PairBatches``).
    """

    def __init__(self, pairs, pad_id: int, margins: list[float] | None = None):
        self.pairs, self.pad_id = pairs, pad_id
        self.margins = torch.tensor(margins if margins is not None else [0.0] * len(pairs))
        self.prefix = [shared_prefix(c, r) for c, r in pairs]
        self.lengths = [len(c.input_ids) + len(r.input_ids) - p for (c, r), p in zip(pairs, self.prefix, strict=True)]

    def _targets(self, e: Encoded, p: int, tail_start: int) -> tuple[list[int], list[int]]:
        """(row positions, target ids) of a side's trained tokens; its tail sits at row index tail_start."""
        pos, tgt = [], []
        for t in range(1, len(e.input_ids)):
            if e.labels[t] != IGNORE_INDEX:
                pos.append(t - 1 if t - 1 < p else tail_start + (t - 1 - p))
                tgt.append(e.labels[t])
        return pos, tgt

    def batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = [i for row in rows for i in row]
        width = max(self.lengths[i] for i in ids)
        b = len(ids)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
        sides: dict[str, list] = {"chosen": [], "rejected": []}
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for k, i in enumerate(ids):
            c, r = self.pairs[i]
            p, n_c = self.prefix[i], len(c.input_ids)
            row = c.input_ids + r.input_ids[p:]
            input_ids[k, : len(row)] = torch.tensor(row)
            position_ids[k, : len(row)] = torch.tensor(list(range(n_c)) + list(range(p, len(r.input_ids))))
            m = causal.clone()
            m[n_c : len(row), p:n_c] = False  # the rejected reply never sees the chosen one
            m[len(row) :] = torch.eye(width, dtype=torch.bool)[len(row) :]  # padding attends to itself only
            mask[k, 0] = m
            sides["chosen"].append(self._targets(c, p, p))
            sides["rejected"].append(self._targets(r, p, n_c))
        out = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
               "pair_ids": torch.tensor(ids), "margin": self.margins[ids]}
        for side, items in sides.items():
            n = max(len(pos) for pos, _ in items)
            pos_t = torch.zeros((b, n), dtype=torch.long)
            tgt_t = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
            for k, (pos, tgt) in enumerate(items):
                pos_t[k, : len(pos)] = torch.tensor(pos)
                tgt_t[k, : len(tgt)] = torch.tensor(tgt)
            out[f"{side}_positions"], out[f"{side}_targets"] = pos_t, tgt_t
        return out
