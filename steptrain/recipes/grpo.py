"""Online RL with group-relative advantages (GRPO; Dr. GRPO, RLOO, DAPO's clip-higher and overlong
masking as options) on any engine, full or LoRA, for text and speech prompts.

Per micro-batch of ``trainer.batch_size`` prompts (ms-swift GRPO rows: ``messages`` ending with the user
turn, extra fields such as ``solution`` passed on to the reward functions):
  1. rollout: G = ``rollout.num_generations`` completions per prompt, sampled by the current policy;
  2. rewards: the weighted sum of ``objective.rewards`` on the decoded completions (rollout/rewards.py);
  3. advantages within each prompt's group (objectives/rl.py: group_advantages);
  4. the clipped surrogate plus beta * KL per completion token (objectives/rl.py), weighted 1 per token
     (``loss_agg=token``) or 1/|o_i| (``sequence``) and divided by the step's global weight (loop.py):
     the same update on every engine and world size.
One update per rollout (on-policy, as Step-Audio-R1's PPO and TRL's default): the ratio is 1 in value
and the gradient is that of A * log pi. Sampling draws from a generator seeded per micro-batch
(loop.py, checkpoint/rng.py: batch_rng), so one process with accumulation, N data-parallel ranks and a
resumed run all sample the same completions.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from steptrain.data import Encoded, collate, read_rows, to_device
from steptrain.data.reader import validate_row
from steptrain.engines import build_engine
from steptrain.eval.lm import rank_share
from steptrain.models.forward import lm_forward
from steptrain.objectives.lm import IGNORE_INDEX, token_nll
from steptrain.objectives.rl import clipped_policy_loss, group_advantages
from steptrain.recipes.loop import build_model, split_eval, start_run, train
from steptrain.recipes.reference import reference_logits
from steptrain.rollout import Sampling, generate_ids, stop_ids
from steptrain.rollout.prompts import RLPrompt, load_prompts
from steptrain.rollout.rewards import Rewards, build_rewards

log = logging.getLogger("steptrain")

STATS = ("samples", "loss", "weight", "reward", "reward_sq", "completion_tokens", "truncated", "zero_std_groups",
         "groups", "kl", "clipped")


class GRPOTask:
    """Prompts -> sampled groups -> rewards and advantages (in ``batch``) -> clipped policy loss (``score``)."""

    def __init__(self, cfg, engine, prompts: list[RLPrompt], tokenizer, rewards: Rewards, ref_logits, features,
                 eos_ids: list[int]):
        self.cfg, self.engine, self.prompts, self.tokenizer, self.eos_ids = cfg, engine, prompts, tokenizer, eos_ids
        self.rewards, self.ref_logits, self.features = rewards, ref_logits, features
        self.lengths = [len(p.ids) for p in prompts]
        self.forward = lm_forward(cfg)  # logits, or hidden states for the chunked head (objective.head_chunk_tokens)
        r = cfg.rollout
        self.group = r.num_generations
        self.sampling = Sampling(r.temperature, r.top_p, r.top_k)

    def complete(self, prompts: list[RLPrompt], sampling: Sampling) -> list[list[int]]:
        """One completion per prompt (repeat a prompt for several), ids ending with EOS unless cut."""
        return generate_ids(
            self.engine.module, [p.ids for p in prompts], eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_token_id, max_new_tokens=self.cfg.rollout.max_new_tokens, sampling=sampling,
            batch_size=self.cfg.rollout.batch_size or len(prompts),
            audio=[[self.features(c) for c in p.clips] for p in prompts] if self.features else None,
            synced=self.engine.lockstep,
        )

    def decode(self, ids: list[int]) -> str:
        """What reward functions read: the completion's text without special tokens (as TRL passes it)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def batch(self, rows):
        batch = self.rollout(rows)
        batch["advantages"] = group_advantages(batch["reward_totals"], self.group, self.cfg.objective.advantage)
        if self.cfg.objective.kl_beta > 0:
            batch["ref_logps"] = self.logps(self.ref_logits, batch)
        return batch

    def rollout(self, rows) -> dict:
        """Sample a group per prompt, score it, collate prompt + completion rows (only completions trained)."""
        prompts = [self.prompts[i] for row in rows for i in row for _ in range(self.group)]
        completions = self.complete(prompts, self.sampling)
        scores = self.rewards([self.decode(c) for c in completions], [p.row for p in prompts])
        totals = torch.tensor([self.rewards.total(s) for s in scores], dtype=torch.float64)
        examples = [
            Encoded(p.ids + c, [IGNORE_INDEX] * len(p.ids) + c, p.row["_source"], audio=p.clips)
            for p, c in zip(prompts, completions, strict=True)
        ]
        batch = collate([[k] for k in range(len(examples))], examples, pad_id=self.tokenizer.pad_token_id,
                        packing=False, audio_features=self.features)
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).double()
        truncated = torch.tensor([float(not c or c[-1] not in self.eos_ids) for c in completions], dtype=torch.float64)
        weights = mask * (1 - truncated[:, None]) if self.cfg.objective.mask_truncated else mask
        if self.cfg.objective.loss_agg == "sequence":
            weights = weights / mask.sum(1, keepdim=True).clamp(min=1)
        grouped = totals.view(-1, self.group)
        batch |= {
            "loss_weights": weights,
            "completion_mask": mask,
            "rewards": torch.tensor(scores, dtype=torch.float64).view(len(prompts), -1),
            "reward_totals": totals,
            "truncated": truncated,
            "zero_std_groups": (grouped.max(1).values == grouped.min(1).values).double(),
        }
        return batch

    def logps(self, logits_fn, batch) -> torch.Tensor:
        """Per-token log-probs ``[B, T-1]`` of the batch's targets under ``logits_fn`` (no gradient), on CPU."""
        on_device = to_device(batch, self.engine.device)
        with torch.no_grad():
            logits = logits_fn(on_device)
            return -token_nll(logits[:, :-1], on_device["labels"][:, 1:]).cpu()

    def count(self, batch) -> float:
        return float(batch["loss_weights"].sum())

    def tokens(self, batch) -> int:
        """Prompt and completion tokens of a batch (throughput counts what was generated too)."""
        return int(batch["attention_mask"].sum())

    def score(self, logits, batch):
        o = self.cfg.objective
        logps = -token_nll(logits[:, :-1], batch["labels"][:, 1:])
        loss, parts = clipped_policy_loss(
            logps, batch["advantages"], clip_low=o.clip_eps, clip_high=o.clip_eps_high,
            ref_logps=batch.get("ref_logps"), kl_beta=o.kl_beta,
        )
        weights, mask = batch["loss_weights"].to(loss.dtype), batch["completion_mask"]
        loss_sum = (loss * weights).sum()
        r = batch["reward_totals"]
        stats = torch.stack([
            torch.tensor(float(len(r)), dtype=torch.float64), loss_sum.detach().double().cpu(),
            weights.sum().double().cpu(), r.sum().cpu(), (r * r).sum().cpu(), mask.sum().cpu(),
            batch["truncated"].sum().cpu(), batch["zero_std_groups"].sum().cpu(),
            torch.tensor(float(len(batch["zero_std_groups"])), dtype=torch.float64),
            (batch.get("token_kl", parts["kl"]).double() * mask).sum().cpu(),
            (parts["clipped"].double() * mask).sum().cpu(),
        ])
        return loss_sum, torch.cat([stats, batch["rewards"].sum(0).cpu()])

    def summarize(self, totals: torch.Tensor, prefix: str = "") -> dict:
        t = dict(zip(STATS, totals[: len(STATS)].tolist(), strict=True))
        n, tokens = max(t["samples"], 1.0), max(t["completion_tokens"], 1.0)
        mean = t["reward"] / n
        out = {
            f"{prefix}loss": t["loss"] / max(t["weight"], 1e-12),
            f"{prefix}reward": mean,
            f"{prefix}reward_std": max(t["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
            f"{prefix}completion_length": t["completion_tokens"] / n,
            f"{prefix}truncated": t["truncated"] / n,
            f"{prefix}frac_reward_zero_std": t["zero_std_groups"] / max(t["groups"], 1.0),
            f"{prefix}kl": t["kl"] / tokens,
            f"{prefix}clip_ratio": t["clipped"] / tokens,
        }
        for name, value in zip(self.rewards.names, totals[len(STATS) :].tolist(), strict=True):
            out[f"{prefix}rewards/{name}"] = value / n
        return out

    def sources(self, rows) -> list[str]:
        return [self.prompts[i].row["_source"] for row in rows for i in row]

    def evaluate(self, prompts: list[RLPrompt]) -> dict:
        """Greedy completions of held-out prompts: mean reward (and per function) and length, over ranks."""
        mine, counted = rank_share(self.engine, prompts, pad=self.engine.lockstep)
        sums = torch.zeros(3 + len(self.rewards.names), dtype=torch.float64)
        if mine:
            completions = self.complete(mine, Sampling())[:counted]
            scores = self.rewards([self.decode(c) for c in completions], [p.row for p in mine[:counted]])
            for c, s in zip(completions, scores, strict=True):
                sums += torch.tensor([1.0, self.rewards.total(s), float(len(c)), *s], dtype=torch.float64)
        self.engine.data_all_reduce(sums)
        n = max(float(sums[0]), 1.0)
        out = {"eval/reward": float(sums[1]) / n, "eval/completion_length": float(sums[2]) / n,
               "eval/prompts": int(sums[0])}
        out |= {f"eval/rewards/{name}": float(v) / n for name, v in zip(self.rewards.names, sums[3:].tolist(), strict=True)}
        return out


@dataclass
class RLSetup:
    cfg: object  # as resolved by start_run
    tokenizer: object
    prompts: list[RLPrompt]
    held_out: list[RLPrompt]
    rewards: Rewards
    features: object  # clip -> log-mel features for speech prompts, else None


def load_data(cfg, tokenizer, inputs) -> tuple[list[RLPrompt], list[RLPrompt], Counter]:
    """(train prompts, held-out prompts, rows left out by reason): what training and `steptrain inspect` read."""
    rows, skipped = read_rows(list(cfg.data.train_files), on_error=cfg.data.on_error,
                              check=lambda row: validate_row(row, need_reply=False))
    train_rows, eval_rows = split_eval(cfg, rows)
    prompts, left_out = load_prompts(train_rows, tokenizer, cfg, inputs)
    held_out, _ = load_prompts(eval_rows, tokenizer, cfg, inputs) if eval_rows else ([], None)
    if cfg.trainer.generate_eval:
        held_out = held_out[: cfg.trainer.generate_eval]
    return prompts, held_out, left_out + Counter(skipped)


def setup(cfg, engine) -> RLSetup:
    """The resolved run (start_run), train and held-out prompts, reward functions: what every online-RL
    recipe starts from."""
    cfg, tokenizer, inputs = start_run(cfg, engine)
    prompts, held_out, left_out = load_data(cfg, tokenizer, inputs)
    if engine.is_main:
        log.info("prompts: %d train (left out: %s), %d eval", len(prompts), dict(left_out), len(held_out))
    rewards = build_rewards(cfg, engine.device, tokenizer, inputs.template)
    return RLSetup(cfg, tokenizer, prompts, held_out, rewards, inputs.features)


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    try:
        s = setup(cfg, engine)
        cfg = s.cfg
        model = build_model(cfg, engine, s.tokenizer)
        ref = reference_logits(cfg, engine, s.tokenizer) if cfg.objective.kl_beta > 0 else None
        task = GRPOTask(cfg, engine, s.prompts, s.tokenizer, s.rewards, ref, s.features, stop_ids(model, s.tokenizer))
        return train(cfg, engine, task, model, lambda: task.evaluate(s.held_out) if s.held_out else {})
    finally:
        engine.close()
