"""The preference data of a run (DPO, reward models): train and held-out pairs, with a speech model's
audio glue, read and encoded the same way by every preference recipe."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from steptrain.data import RunInputs
from steptrain.data.preference import (
    PreferenceData,
    deaf_negatives,
    load_preference_data,
    read_preference_rows,
)
from steptrain.recipes.loop import split_eval

log = logging.getLogger("steptrain")


@dataclass
class RunPairs:
    train: PreferenceData
    eval: PreferenceData | None


def load_pairs(cfg, tokenizer, inputs: RunInputs, *, log_stats: bool = True) -> RunPairs:
    """data.train_files (+ data.deaf_negatives) and data.eval_files or a data.eval_fraction split."""
    rows, skipped = read_preference_rows(list(cfg.data.train_files), on_error=cfg.data.on_error)
    if cfg.data.eval_files:
        train_rows, eval_rows = rows, read_preference_rows(list(cfg.data.eval_files), cfg.data.on_error)[0]
    else:
        train_rows, eval_rows = split_eval(cfg, rows)
    if cfg.data.deaf_negatives:
        train_rows = train_rows + deaf_negatives(train_rows, cfg.data.deaf_negatives, cfg.trainer.seed)
    train = load_preference_data(train_rows, tokenizer, cfg.data, inputs)
    train.stats["skipped"] = {**skipped, **train.stats["skipped"]}
    held = load_preference_data(eval_rows, tokenizer, cfg.data, inputs) if eval_rows else None
    if log_stats:
        log.info("preference data: %s%s", train.stats, f"; held out: {len(held.pairs)} pairs" if held else "")
    return RunPairs(train, held)


class PairTask:
    """What the preference recipes' Tasks share: micro-batches of pairs, counted (and averaged) per pair."""

    def __init__(self, batches, engine):
        self.batches, self.engine, self.lengths = batches, engine, batches.lengths

    def batch(self, rows):
        return self.batches.batch(rows)

    def count(self, batch) -> float:
        return float(len(batch["pair_ids"]))

    def sources(self, rows) -> list[str]:
        return [self.batches.pairs[i][0].source for row in rows for i in row]
