"""Reward model training (Bradley-Terry) on preference pairs, on any engine, full or LoRA.

A scalar head on the LM scores chosen and rejected conversations in one forward (2B rows); the loss of
a pair is -log sigmoid(r_chosen - r_rejected - margin) (``objectives/preference.py``), the step loss the
mean over the step's pairs. Held-out pairwise accuracy (r_chosen > r_rejected) is the headline metric.
With ``data.deaf_negatives`` (speech data) extra pairs teach the model to punish answers that ignore
the audio.
"""

from __future__ import annotations

import logging

import torch

from steptrain.data.preference import PairBatches, PreferenceData
from steptrain.engines import build_engine
from steptrain.models.reward import sequence_scores
from steptrain.objectives import reward_model_loss
from steptrain.recipes.loop import build_model, evaluate_task, start_run, train
from steptrain.recipes.pairs import PairTask, load_pairs

log = logging.getLogger("steptrain")

STATS = ("pairs", "loss", "correct", "chosen_scores", "rejected_scores")


class RewardTask(PairTask):
    """Scores of chosen and rejected in one forward -> Bradley-Terry loss; stats summed per pair."""

    forward = staticmethod(sequence_scores)

    def score(self, scores, batch):
        b = len(batch["pair_ids"])
        chosen, rejected = scores[:b], scores[b:]
        losses = reward_model_loss(chosen, rejected, batch["margin"].to(scores.dtype))
        stats = torch.stack([
            torch.tensor(float(b), dtype=torch.float64), losses.detach().sum().double().cpu(),
            (chosen > rejected).sum().double().cpu(), chosen.detach().sum().double().cpu(),
            rejected.detach().sum().double().cpu(),
        ])
        return losses.sum(), stats

    def summarize(self, totals: torch.Tensor, prefix: str = "") -> dict:
        t = dict(zip(STATS, totals.tolist(), strict=True))
        n = max(t["pairs"], 1.0)
        return {
            f"{prefix}loss": t["loss"] / n,
            f"{prefix}accuracy": t["correct"] / n,
            f"{prefix}scores/chosen": t["chosen_scores"] / n,
            f"{prefix}scores/rejected": t["rejected_scores"] / n,
            f"{prefix}scores/margins": (t["chosen_scores"] - t["rejected_scores"]) / n,
            f"{prefix}pairs": int(t["pairs"]),
        }


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    try:
        cfg, tokenizer, inputs = start_run(cfg, engine)
        data = load_pairs(cfg, tokenizer, inputs, log_stats=engine.is_main)

        def task_of(pairs: PreferenceData) -> RewardTask:
            return RewardTask(PairBatches(pairs.pairs, tokenizer.pad_token_id, inputs.features, pairs.margins), engine)

        task = task_of(data.train)
        evaluate = dict
        if data.eval is not None:
            eval_task = task_of(data.eval)

            def evaluate() -> dict:
                return evaluate_task(engine, eval_task, cfg.trainer.batch_size)

        model = build_model(cfg, engine, tokenizer)
        return train(cfg, engine, task, model, evaluate)
    finally:
        engine.close()
