"""PPO with a learned critic (Step-Audio 2's and Step-Audio-R1's RL) on any engine, full or LoRA policy.

Per micro-batch of ``trainer.batch_size`` prompts (rows as for recipe=grpo):
  1. rollout: ``rollout.num_generations`` completions per prompt from the current policy, scored by the
     configured rewards (one score per completion, placed on its last token);
  2. the critic V(s_t) scores every completion token; with ``objective.kl_beta`` > 0 each token's reward
     also pays beta * (log pi_old - log pi_ref) (objectives/rl.py: token_rewards);
  3. GAE(gamma, lambda) advantages and returns per token (R1: gamma = lambda = 1, KL 0), whitened per
     micro-batch (the same micro-batches on any world size, so the same numbers);
  4. the policy takes the clipped-surrogate step (as GRPO, with token advantages); then the critic, a
     second engine of the same kind with its own optimizer, takes a step on the clipped value loss over
     the same micro-batches. ``optim.hold_steps=N`` keeps the policy still for N steps while the critic
     warms up (Step-Audio: 80 steps, docs/step_facts.md).
The critic is an ``AutoModelForTokenClassification`` (1 label) from ``objective.critic_path`` (a reward
model from recipe=reward loads its trained head) or the policy's ``model.path`` (a fresh head); it is
saved in every checkpoint under ``critic/`` and resumed with the policy.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from omegaconf import OmegaConf

from steptrain.data import to_device
from steptrain.engines import build_engine
from steptrain.engines.optim import param_groups
from steptrain.models.forward import eval_mode
from steptrain.models.loader import DTYPES
from steptrain.models.lora import apply_lora
from steptrain.objectives.rl import clipped_value_loss, gae, token_rewards, whiten
from steptrain.recipes.grpo import GRPOTask, setup
from steptrain.recipes.loop import build_model, train
from steptrain.recipes.reference import reference_logits
from steptrain.rollout import stop_ids

log = logging.getLogger("steptrain")

CRITIC_STATS = ("loss", "tokens", "values", "returns", "returns_sq", "residual", "residual_sq")


def critic_values(model, batch) -> torch.Tensor:
    """V(s_t) ``[B, T]`` at every position of a collated batch (position t scores the prefix up to t)."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch["position_ids"],
    ).logits[..., 0].float()


def load_critic(cfg, engine):
    """The critic: a token classifier (1 label) from objective.critic_path or model.path, with LoRA when the
    policy has it. A value head that is not in the checkpoint starts at zero (V = 0), the same on every
    engine and world size."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    path = cfg.objective.critic_path or cfg.model.path
    config = AutoConfig.from_pretrained(path, num_labels=1, trust_remote_code=cfg.model.trust_remote_code)
    config.classifier_dropout = 0.0  # a regression target: transformers' default 0.1 would add noise to V
    with engine.init_context(cfg.model):
        critic, info = AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=DTYPES[cfg.model.dtype], attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code, output_loading_info=True,
        )
    head = critic.score
    if any(key.startswith("score.") for key in info["missing_keys"]):
        params = [p for p in (head.weight, head.bias) if p is not None]
        gathered = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):  # partitioned by ZeRO-3: edit the whole tensor on rank 0
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        with gathered, torch.no_grad():
            for p in params:
                p.zero_()
    critic.config.use_cache = False
    if cfg.peft.method == "lora":  # as the policy: LoRA on the trunk, the value head fully trained
        critic = apply_lora(critic, cfg.peft, [])
    return critic


class PPOTask(GRPOTask):
    """GRPO's rollout, with per-token advantages from a critic that trains alongside (``after_step``)."""

    def __init__(self, *args, critic_engine, critic_lr: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic, self.critic_lr = critic_engine, critic_lr
        self.companions = {"critic": critic_engine}

    def batch(self, rows):
        o = self.cfg.objective
        batch = self.rollout(rows)
        mask = batch["completion_mask"]
        values = self.rollout_values(batch) * mask
        kl = None
        if o.kl_beta > 0:
            kl = self.logps(self.policy_logits, batch) - self.logps(self.ref_logits, batch)
            batch["token_kl"] = kl * mask
        rewards = token_rewards(batch["reward_totals"], mask, kl, o.kl_beta)
        advantages, returns = gae(rewards, values, mask, o.gamma, o.lam)
        batch |= {
            "advantages": whiten(advantages, mask) if o.whiten_advantages else advantages,
            "returns": returns,
            "old_values": values,
        }
        return batch

    def policy_logits(self, batch):
        """The policy that sampled (eval mode, no dropout): pi_old of the KL penalty."""
        with eval_mode(self.engine.module) as model, self.engine.autocast():
            return self.forward(model, batch)

    def rollout_values(self, batch) -> torch.Tensor:
        """The critic's values of the completion tokens ``[B, T-1]`` at rollout time (eval mode, no gradient)."""
        on_device = to_device(batch, self.critic.device)
        with eval_mode(self.critic.module) as model, torch.no_grad(), self.critic.autocast():
            return critic_values(model, on_device)[:, :-1].double().cpu()

    def value_score(self, values, batch):
        mask = batch["completion_mask"]
        v = values[:, :-1]
        old, returns = batch["old_values"].to(v.dtype), batch["returns"].to(v.dtype)
        loss_sum = (clipped_value_loss(v, old, returns, self.cfg.objective.value_clip) * mask).sum()
        residual = (returns - v.detach()) * mask
        stats = torch.stack([
            loss_sum.detach(), mask.sum(), (v.detach() * mask).sum(), (returns * mask).sum(),
            (returns * returns * mask).sum(), residual.sum(), (residual * residual).sum(),
        ]).double().cpu()
        return loss_sum, stats

    def after_step(self, batches) -> dict:
        """The critic's step on the same micro-batches: the token mean of the clipped value loss."""
        n = self.critic.data_all_reduce(torch.tensor([float(sum(b["completion_mask"].sum() for b in batches))],
                                                     dtype=torch.float64))
        n = max(float(n[0]), 1.0)
        totals = self.critic.forward_backward(batches, self.value_score, 1.0 / n, critic_values)
        self.critic.data_all_reduce(totals)
        grad_norm = self.critic.step()
        t = dict(zip(CRITIC_STATS, totals.tolist(), strict=True))
        tokens = max(t["tokens"], 1.0)
        var_returns = t["returns_sq"] / tokens - (t["returns"] / tokens) ** 2
        var_residual = t["residual_sq"] / tokens - (t["residual"] / tokens) ** 2
        return {
            "critic/loss": t["loss"] / tokens,
            "critic/values": t["values"] / tokens,
            "critic/returns": t["returns"] / tokens,
            # 1 - Var(G - V) / Var(G): how much of the return the critic predicts (1 is perfect)
            "critic/explained_variance": 1.0 - var_residual / var_returns if var_returns > 1e-12 else 0.0,
            "critic/grad_norm": grad_norm,
            "critic/lr": float(self.critic_lr) * self.critic.lr_factor(),
        }


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    critic_optim = OmegaConf.merge(cfg.optim, {"hold_steps": 0, "lr": cfg.objective.critic_lr or cfg.optim.lr})
    critic_engine = build_engine(cfg.engine, cfg.trainer, critic_optim)
    try:
        s = setup(cfg, engine)
        cfg = s.cfg
        model = build_model(cfg, engine, s.tokenizer)
        critic = load_critic(cfg, critic_engine)
        ref = reference_logits(cfg, engine, s.tokenizer) if cfg.objective.kl_beta > 0 else None
        task = PPOTask(cfg, engine, s.prompts, s.tokenizer, s.rewards, ref, s.features, stop_ids(model, s.tokenizer),
                       critic_engine=critic_engine, critic_lr=critic_optim.lr)

        def on_prepared(_model, steps) -> None:
            critic_engine.prepare(critic, param_groups(critic, critic_optim), critic_optim, steps)
            critic.train()

        return train(cfg, engine, task, model, lambda: task.evaluate(s.held_out) if s.held_out else {},
                     on_prepared=on_prepared)
    finally:
        critic_engine.close()
        engine.close()

