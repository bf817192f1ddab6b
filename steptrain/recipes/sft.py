"""Supervised fine-tuning of a causal LM on chat data (full or LoRA), on any engine.

The loop, per optimizer step:
  1. take the step's micro-batches from the epoch plan (this rank's share: every world_size-th one);
  2. count the label tokens of the whole step over all ranks, N;
  3. for each micro-batch: loss = sum of token NLLs / N, backward (gradients sync on the last one);
  4. clip, step, schedule; log; checkpoint; evaluate.
Dividing by the step's global token count makes the update independent of how the tokens were split
into micro-batches, ranks, padding or packing. The data position is (epoch, micro-batch cursor) into
a deterministic plan, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from steptrain.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from steptrain.checkpoint.rng import seed_everything
from steptrain.config import ConfigError
from steptrain.data import build_template, collate, load_sft_data, plan_epoch, read_rows
from steptrain.engines import build_engine
from steptrain.engines.optim import param_groups
from steptrain.eval import evaluate_loss, generation_metrics
from steptrain.inputs import clip_features, reply_audio_spec, speech_audio_spec
from steptrain.logging import MetricsLogger
from steptrain.models.forward import lm_logits
from steptrain.models.loader import audio_code_ids, is_speech_config, load_model, load_tokenizer
from steptrain.models.lora import apply_lora, count_parameters
from steptrain.objectives import lm_loss_sum, stats_vector, summarize_stats

log = logging.getLogger("steptrain")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what survived."""


def split_eval(cfg, rows):
    """Held-out rows: data.eval_files, or a seeded data.eval_fraction of the train rows."""
    if cfg.data.eval_files:
        return rows, read_rows(list(cfg.data.eval_files), on_error=cfg.data.on_error)[0]
    if cfg.data.eval_fraction > 0:
        order = np.random.default_rng(cfg.trainer.seed).permutation(len(rows))
        n_eval = max(1, int(len(rows) * cfg.data.eval_fraction))
        held = set(order[:n_eval].tolist())
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
    return rows, []


class EpochPlans:
    """Deterministic micro-batch plans per epoch (cached), and how many optimizer steps each holds."""

    def __init__(self, cfg, examples, per_step: int):
        self.cfg, self.per_step = cfg, per_step
        self.lengths = [len(e.input_ids) for e in examples]
        self._cache: dict[int, list] = {}

    def plan(self, epoch: int) -> list:
        if epoch not in self._cache:
            self._cache = {
                epoch: plan_epoch(
                    self.lengths,
                    batch_size=self.cfg.trainer.batch_size,
                    max_length=self.cfg.data.max_length,
                    packing=self.cfg.data.packing,
                    group_by_length=self.cfg.data.group_by_length,
                    shuffle=self.cfg.data.shuffle,
                    seed=self.cfg.trainer.seed,
                    epoch=epoch,
                )
            }
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.per_step


def total_steps(cfg, plans: EpochPlans) -> int:
    if cfg.trainer.max_steps:
        return cfg.trainer.max_steps
    return sum(plans.steps_in(e) for e in range(cfg.trainer.epochs))


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    try:
        return _train(cfg, engine)
    finally:
        engine.close()


def _train(cfg, engine) -> dict:
    out = Path(cfg.output_dir)
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        OmegaConf.save(cfg, out / "config.yaml")

    # --- data ----------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model)
    train_rows, skipped = read_rows(list(cfg.data.train_files), on_error=cfg.data.on_error)
    train_rows, eval_rows = split_eval(cfg, train_rows)
    audio = speech_audio_spec(tokenizer, cfg.data) if is_speech_config(cfg.model) else None
    features = clip_features if audio else None
    reply = reply_audio_spec(tokenizer, cfg.model, cfg.data)  # spoken replies as discrete audio tokens
    audio_ids = audio_code_ids(tokenizer, cfg.model.audio_codes)
    train = load_sft_data(train_rows, tokenizer, cfg.data, audio=audio, reply=reply)
    train.stats["skipped"] = {**skipped, **train.stats["skipped"]}
    evalset = load_sft_data(eval_rows, tokenizer, cfg.data, audio=audio, reply=reply) if eval_rows else None
    if engine.is_main:
        log.info("train data: %s", train.stats)
        if evalset:
            log.info("eval data: %d rows", len(evalset.examples))
    per_step = cfg.trainer.grad_accum * engine.world_size
    plans = EpochPlans(cfg, train.examples, per_step)
    if plans.steps_in(0) == 0:
        raise ConfigError(
            f"{len(train.examples)} training rows make {len(plans.plan(0))} micro-batches, fewer than one optimizer "
            f"step needs (trainer.grad_accum x world size = {per_step}); lower trainer.batch_size or grad_accum"
        )
    steps = total_steps(cfg, plans)

    # --- model, optimizer, engine --------------------------------------------------------------------
    seed_everything(cfg.trainer.seed)  # export re-seeds the same way to rebuild a preset's random base
    with engine.init_context(cfg.model):
        model, new_ids = load_model(cfg.model, tokenizer)
    if cfg.peft.method == "lora":
        model = apply_lora(model, cfg.peft, new_ids)
    trainable, total = count_parameters(model)
    if engine.is_main:
        log.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    model, _, _ = engine.prepare(model, param_groups(model, cfg.optim), cfg.optim, steps)
    model.train()
    seed_everything(cfg.trainer.seed + engine.rank)  # same init everywhere, independent dropout per rank

    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens_seen": 0, "world_size": engine.world_size}
    ckpt = resolve_resume(cfg.resume, out)
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt)
        if state["world_size"] != engine.world_size and engine.is_main:
            log.warning("resuming at world size %d from %d: data order continues, bit-exactness does not",
                        engine.world_size, state["world_size"])
        if engine.is_main:
            log.info("resumed from %s at step %d", ckpt, state["step"])

    logger = MetricsLogger(out, cfg.logging, cfg, enabled=engine.is_main, total_steps=steps, start_step=state["step"])
    template = build_template(cfg.data.template, tokenizer, bos=cfg.data.step_bos, default_system=cfg.data.system)
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict:
        if evalset is None:
            return {}
        metrics = evaluate_loss(
            engine, evalset.examples, batch_size=cfg.trainer.batch_size, max_length=cfg.data.max_length,
            pad_id=pad_id, max_batches=cfg.trainer.eval_batches, audio_features=features, audio_ids=audio_ids,
        )
        if cfg.trainer.generate_eval:
            metrics |= generation_metrics(
                engine, tokenizer, template, eval_rows[: cfg.trainer.generate_eval],
                max_new_tokens=cfg.trainer.max_new_tokens, audio=audio, audio_features=features,
            )
        logger.log({"step": state["step"], **metrics})
        return metrics

    done = {"saved": state["step"] if ckpt is not None else -1, "evaluated": -1}

    def checkpoint() -> None:
        save_checkpoint(engine, out, state["step"], state, cfg, cfg.trainer.keep_last)
        done["saved"] = state["step"]

    def evaluate_now() -> dict:
        done["evaluated"] = state["step"]
        return evaluate()

    last_eval = evaluate_now() if state["step"] == 0 else {}
    last_train: dict = {}
    t_start = time.perf_counter()
    try:
        while state["step"] < steps:
            if state["cursor"] // per_step >= plans.steps_in(state["epoch"]):
                state["epoch"] += 1
                state["cursor"] = 0
                continue
            t0 = time.perf_counter()
            plan = plans.plan(state["epoch"])
            mine = [plan[state["cursor"] + j * engine.world_size + engine.rank] for j in range(cfg.trainer.grad_accum)]
            batches = [
                collate(rows, train.examples, pad_id=pad_id, packing=cfg.data.packing, audio_features=features)
                for rows in mine
            ]
            n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            n_global = engine.all_reduce(torch.tensor([float(n_local)]))[0].item()
            totals, real_tokens = stats_vector({}), 0
            for i, (rows, batch) in enumerate(zip(mine, batches, strict=True)):
                batch = {k: v.to(engine.device) for k, v in batch.items() if v is not None}
                with engine.accumulate(last=i == len(batches) - 1):
                    with engine.autocast():
                        logits = lm_logits(model, batch)
                    loss_sum, m = lm_loss_sum(logits, batch["labels"], audio_ids, cfg.objective.audio_loss_weight)
                    engine.backward(loss_sum / n_global)
                totals += stats_vector(m)
                real_tokens += sum(len(train.examples[j].input_ids) for row in rows for j in row)  # not padding
            engine.all_reduce(totals)
            real_tokens = int(engine.all_reduce(torch.tensor([float(real_tokens)]))[0].item())
            step_metrics = summarize_stats(totals)
            loss = step_metrics["loss"]
            if not math.isfinite(loss):
                sources = [train.examples[i].source for rows in mine for row in rows for i in row][:3]
                good = list_checkpoints(out)
                raise TrainingError(
                    f"non-finite loss ({loss}) at step {state['step'] + 1}, epoch {state['epoch']}, rows {sources}...; "
                    f"no update was applied; last good checkpoint: {good[-1] if good else 'none'} "
                    "(lower optim.lr, check trainer.precision or the data)"
                )
            lr = float(cfg.optim.lr) * engine.lr_factor()  # the lr this step applies
            grad_norm = engine.step()
            state["step"] += 1
            state["cursor"] += per_step
            state["tokens_seen"] += real_tokens
            dt = time.perf_counter() - t0
            peak_mem = engine.all_reduce(torch.tensor([engine.peak_memory_gb()]), op="max")[0].item()
            last_train = {
                "step": state["step"],
                "epoch": state["epoch"],
                **step_metrics,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": real_tokens,
                "label_tokens": int(n_global),
                "tokens_per_s": real_tokens / dt,
                "step_time": dt,
                "peak_mem_gb": peak_mem,  # the largest rank's
            }
            logger.log(last_train)
            if cfg.trainer.eval_every and state["step"] % cfg.trainer.eval_every == 0:
                last_eval = evaluate_now()
            if cfg.trainer.save_every and state["step"] % cfg.trainer.save_every == 0:
                checkpoint()
        if done["evaluated"] != state["step"]:
            last_eval = evaluate_now()
        if done["saved"] != state["step"]:
            checkpoint()
    finally:
        logger.close()
    if engine.is_main:
        log.info("done: %d steps in %.1fs; outputs in %s", state["step"], time.perf_counter() - t_start, out)
    return {"train": last_train, "eval": last_eval, "checkpoint": str(list_checkpoints(out)[-1])}
