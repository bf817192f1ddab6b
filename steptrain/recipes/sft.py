"""Supervised fine-tuning of a causal LM or speech LLM on chat data (full or LoRA), on any engine.

The loss of an optimizer step is the token mean over all label tokens of the step (see ``loop.py``):
loss = sum of token NLLs / N, N the step's global label-token count.
"""

from __future__ import annotations

import logging

import torch

from steptrain.data import SFTData, collate, load_sft_data, read_rows
from steptrain.engines import build_engine
from steptrain.eval import evaluate_loss, generation_metrics
from steptrain.models.forward import lm_forward
from steptrain.objectives import lm_loss_sum, stats_vector, summarize_stats
from steptrain.recipes.loop import TrainingError, build_model, split_eval, start_run, train

log = logging.getLogger("steptrain")

__all__ = ["TrainingError", "run"]


class SFTTask:
    """Next-token loss on the trained tokens of each example (audio tokens weighted per stream)."""

    def __init__(self, cfg, examples, pad_id: int, features, audio_ids, engine):
        self.cfg, self.examples, self.pad_id, self.features, self.audio_ids = cfg, examples, pad_id, features, audio_ids
        self.engine = engine
        self.lengths = [len(e.input_ids) for e in examples]
        self.forward = lm_forward(cfg)  # logits, or hidden states for the chunked head (objective.head_chunk_tokens)

    def batch(self, rows):
        return collate(rows, self.examples, pad_id=self.pad_id, packing=self.cfg.data.packing, audio_features=self.features)

    def count(self, batch) -> float:
        return float((batch["labels"][:, 1:] != -100).sum())

    def score(self, logits, batch):
        loss_sum, m = lm_loss_sum(logits, batch["labels"], self.audio_ids, self.cfg.objective.audio_loss_weight)
        return loss_sum, stats_vector(m)

    def summarize(self, totals: torch.Tensor, prefix: str = "") -> dict:
        return summarize_stats(totals, prefix)

    def sources(self, rows) -> list[str]:
        return [self.examples[i].source for row in rows for i in row]


def load_data(cfg, tokenizer, inputs) -> tuple[SFTData, SFTData | None, list[dict]]:
    """(train examples, held-out examples or None, held-out rows): what training and `steptrain inspect` read."""
    train_rows, skipped = read_rows(list(cfg.data.train_files), on_error=cfg.data.on_error)
    train_rows, eval_rows = split_eval(cfg, train_rows)
    data = load_sft_data(train_rows, tokenizer, cfg.data, inputs)
    data.stats["skipped"] = {**skipped, **data.stats["skipped"]}
    evalset = load_sft_data(eval_rows, tokenizer, cfg.data, inputs) if eval_rows else None
    return data, evalset, eval_rows


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    try:
        cfg, tokenizer, inputs = start_run(cfg, engine)
        data, evalset, eval_rows = load_data(cfg, tokenizer, inputs)
        if engine.is_main:
            log.info("train data: %s", data.stats)
            if evalset:
                log.info("eval data: %d rows", len(evalset.examples))
        task = SFTTask(cfg, data.examples, tokenizer.pad_token_id, inputs.features, inputs.audio_ids, engine)
        model = build_model(cfg, engine, tokenizer)

        def evaluate() -> dict:
            if evalset is None:
                return {}
            metrics = evaluate_loss(
                engine, evalset.examples, batch_size=cfg.trainer.batch_size, max_length=cfg.data.max_length,
                pad_id=tokenizer.pad_token_id, max_batches=cfg.trainer.eval_batches, audio_features=inputs.features,
                audio_ids=inputs.audio_ids,
            )
            if cfg.trainer.generate_eval:
                metrics |= generation_metrics(
                    engine, tokenizer, inputs, eval_rows[: cfg.trainer.generate_eval],
                    max_new_tokens=cfg.trainer.max_new_tokens,
                )
            return metrics

        return train(cfg, engine, task, model, evaluate, packing=cfg.data.packing)
    finally:
        engine.close()
