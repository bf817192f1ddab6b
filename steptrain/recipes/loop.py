"""The optimizer-step loop every recipe shares: data position, normalisation, resume, logging, saving.

A recipe supplies a :class:`Task` (how rows become batches and a summed loss) and runs :func:`train`.
Per optimizer step:
  1. take the step's micro-batches from the epoch plan (this replica's share: every data_world-th one);
     any randomness in making one (RL rollouts) is seeded by its place in the plan;
  2. count the step's loss units over all replicas, N (label tokens for SFT, pairs for DPO);
  3. engine.forward_backward: for each micro-batch, loss = its summed loss / N, backward (gradients
     sync on the last one; a pipeline engine interleaves the micro-batches over its stages);
  4. clip, step, schedule; log; checkpoint; evaluate.
Dividing by the step's global count makes the update independent of how the units were split into
micro-batches, ranks, padding or packing. The data position is (epoch, micro-batch cursor) into a
deterministic plan, so a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from steptrain.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from steptrain.checkpoint.rng import batch_rng, seed_everything
from steptrain.config import ConfigError
from steptrain.data import plan_epoch, read_rows, to_device
from steptrain.engines.optim import param_groups
from steptrain.eval.lm import rank_share
from steptrain.inputs import RunInputs, resolve_inputs, with_resolved_template
from steptrain.logging import MetricsLogger
from steptrain.models.loader import load_tokenizer
from steptrain.models.lora import apply_lora, count_parameters
from steptrain.models.reward import model_loader

log = logging.getLogger("steptrain")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what survived."""


class Task(Protocol):
    """What a recipe trains on. ``lengths`` are per example (the epoch plan batches by them).

    The engine calls ``forward(model, batch)`` (``lm_logits`` unless the task sets another) and then
    ``score(output, batch)``; splitting the two lets a pipeline-parallel engine run the forward through
    its schedule and score on the last stage.
    """

    lengths: list[int]
    forward: Callable  # (model, batch) -> output (logits)

    def batch(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Collate one micro-batch (a list of rows; a row lists example indices, several when packed)."""

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        """This micro-batch's loss units (the step's loss is the sum over units / the global count)."""

    def score(self, output, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, stats vector to sum over micro-batches and ranks) of the model's output."""

    def summarize(self, totals: torch.Tensor, prefix: str = "") -> dict:
        """Step metrics (must include "loss") from the summed stats vector, keys prefixed."""

    def sources(self, rows: list[list[int]]) -> list[str]:
        """``file:line`` of the examples in ``rows`` (for error messages)."""

    # Optional: ``tokens(batch) -> int``, the real (non-padding) tokens of a collated batch, when they are
    # more than the examples' ``lengths`` (RL batches hold the generated completions too).
    # Optional: ``companions: dict[str, Engine]``, engines trained alongside (a PPO critic), saved and
    # resumed with every checkpoint; and ``after_step(batches) -> dict``, run after each optimizer step
    # (the companions' own updates), whose metrics join the step's.


def evaluate_task(engine, task: Task, batch_size: int) -> dict:
    """Held-out metrics of ``task`` over all its examples (unpacked), summed over ranks ("eval/" keys).

    Every rank runs the same number of batches (a short share repeats a batch that is not counted), so
    this is safe on lockstep engines and gives every rank a stats vector to reduce.
    """
    n = len(task.lengths)
    chunks = [[[i] for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    mine, counted = rank_share(engine, chunks, pad=True)
    batches = [to_device(task.batch(rows), engine.device) for rows in mine]
    results = engine.forward_only(batches, task.score, task.forward)
    totals = sum((stats for _, stats in results[:counted]), torch.zeros_like(results[0][1]))
    engine.data_all_reduce(totals)
    return task.summarize(totals, prefix="eval/")


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

    def __init__(self, cfg, lengths: list[int], per_step: int, packing: bool):
        self.cfg, self.per_step, self.lengths, self.packing = cfg, per_step, lengths, packing
        self._cache: dict[int, list] = {}

    def plan(self, epoch: int) -> list:
        if epoch not in self._cache:
            self._cache = {
                epoch: plan_epoch(
                    self.lengths,
                    batch_size=self.cfg.trainer.batch_size,
                    max_length=self.cfg.data.max_length,
                    packing=self.packing,
                    group_by_length=self.cfg.data.group_by_length,
                    shuffle=self.cfg.data.shuffle,
                    seed=self.cfg.trainer.seed,
                    epoch=epoch,
                )
            }
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        return len(self.plan(epoch)) // self.per_step


@dataclass
class Run:
    """What every recipe starts from: the config with its choices resolved, the tokenizer, the inputs."""

    cfg: DictConfig  # data.template / data.bos as resolved (what config.yaml and checkpoints record)
    tokenizer: object
    inputs: RunInputs

    def __iter__(self):  # cfg, tokenizer, inputs = start_run(cfg, engine)
        return iter((self.cfg, self.tokenizer, self.inputs))


def resolve_run(cfg) -> Run:
    """Load the tokenizer and resolve the run's inputs: no model weights, nothing written."""
    tokenizer = load_tokenizer(cfg.model)
    inputs = resolve_inputs(cfg, tokenizer)
    return Run(with_resolved_template(cfg, inputs.template), tokenizer, inputs)


def start_run(cfg, engine) -> Run:
    """:func:`resolve_run`, then the output directory, created with the resolved config and without
    half-written checkpoints."""
    cfg, tokenizer, inputs = resolve_run(cfg)
    out = Path(cfg.output_dir)
    if engine.is_main:
        log.info("chat template: %s", inputs.template.describe())
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        OmegaConf.save(cfg, out / "config.yaml")
    return Run(cfg, tokenizer, inputs)


def build_model(cfg, engine, tokenizer):
    """The (LoRA-wrapped) model, seeded identically on every rank and every engine."""
    seed_everything(cfg.trainer.seed)  # export re-seeds the same way to rebuild a preset's random base
    with engine.init_context(cfg.model):
        model, new_ids = model_loader(cfg.recipe.name)(cfg.model, tokenizer)
    if cfg.peft.method == "lora":
        model = apply_lora(model, cfg.peft, new_ids)
    trainable, total = count_parameters(model)
    if engine.is_main:
        log.info("parameters: %d trainable of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def train(cfg, engine, task: Task, model, evaluate, *, packing: bool = False, on_prepared=None) -> dict:
    """Run the optimizer-step loop; ``evaluate()`` returns held-out metrics (all ranks call it).

    ``on_prepared(model, total_steps)`` runs once the engine holds the model and before a resume loads
    trained weights: the place for work that needs the initial model (e.g. reference log-probs) or the
    run's length (a companion engine's schedule).
    """
    out = Path(cfg.output_dir)
    per_step = cfg.trainer.grad_accum * engine.data_world
    plans = EpochPlans(cfg, task.lengths, per_step, packing)
    if plans.steps_in(0) == 0:
        raise ConfigError(
            f"{len(task.lengths)} training examples make {len(plans.plan(0))} micro-batches, fewer than one optimizer "
            f"step needs (trainer.grad_accum x world size = {per_step}); lower trainer.batch_size or grad_accum"
        )
    steps = cfg.trainer.max_steps or sum(plans.steps_in(e) for e in range(cfg.trainer.epochs))
    model, _, _ = engine.prepare(model, param_groups(model, cfg.optim), cfg.optim, steps)
    if on_prepared is not None:
        on_prepared(model, steps)
    model.train()
    seed_everything(cfg.trainer.seed + engine.rank)  # same init everywhere, independent dropout per rank

    companions = getattr(task, "companions", {})
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens_seen": 0, "world_size": engine.data_world}
    ckpt = resolve_resume(cfg.resume, out)
    if ckpt is not None:
        state = load_checkpoint(engine, ckpt, companions)
        if state["world_size"] != engine.data_world and engine.is_main:
            log.warning("resuming with %d data-parallel replicas from %d: data order continues, bit-exactness does not",
                        engine.data_world, state["world_size"])
        if engine.is_main:
            log.info("resumed from %s at step %d", ckpt, state["step"])

    logger = MetricsLogger(out, cfg.logging, cfg, enabled=engine.is_main, total_steps=steps, start_step=state["step"])
    done = {"saved": state["step"] if ckpt is not None else -1, "evaluated": -1}

    def checkpoint() -> None:
        save_checkpoint(engine, out, state["step"], state, cfg, cfg.trainer.keep_last, companions)
        done["saved"] = state["step"]

    def evaluate_now() -> dict:
        done["evaluated"] = state["step"]
        metrics = evaluate()
        if metrics:
            logger.log({"step": state["step"], **metrics})
        return metrics

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
            indices = [state["cursor"] + j * engine.data_world + engine.data_rank for j in range(cfg.trainer.grad_accum)]
            mine = [plan[i] for i in indices]
            batches = []
            for i in indices:  # RL tasks sample their rollouts here, with a generator seeded per micro-batch
                with batch_rng(cfg.trainer.seed, state["epoch"], i, engine.device):
                    batches.append(task.batch(plan[i]))
            n_global = engine.data_all_reduce(torch.tensor([sum(task.count(b) for b in batches)], dtype=torch.float64))
            n_global = float(n_global[0])
            batches = [to_device(b, engine.device) for b in batches]
            totals = engine.forward_backward(batches, task.score, 1.0 / n_global, task.forward)
            engine.data_all_reduce(totals)
            if hasattr(task, "tokens"):  # a task whose batches hold more than its examples (RL completions)
                real_tokens = sum(task.tokens(b) for b in batches)
            else:
                real_tokens = sum(task.lengths[j] for rows in mine for row in rows for j in row)  # not padding
            real_tokens = int(engine.data_all_reduce(torch.tensor([float(real_tokens)]))[0].item())
            step_metrics = task.summarize(totals)
            loss = step_metrics["loss"]
            if not math.isfinite(loss):
                good = list_checkpoints(out)
                raise TrainingError(
                    f"non-finite loss ({loss}) at step {state['step'] + 1}, epoch {state['epoch']}, "
                    f"rows {[s for rows in mine for s in task.sources(rows)][:3]}...; no update was applied; "
                    f"last good checkpoint: {good[-1] if good else 'none'} "
                    "(lower optim.lr, check trainer.precision or the data)"
                )
            lr = float(cfg.optim.lr) * engine.lr_factor()  # the lr this step applies
            grad_norm = engine.step()
            step_metrics |= task.after_step(batches) if hasattr(task, "after_step") else {}
            state["step"] += 1
            state["cursor"] += per_step
            state["tokens_seen"] += real_tokens
            dt = time.perf_counter() - t0
            mem_now, mem_peak = engine.all_reduce(torch.tensor(engine.memory_gb()), op="max").tolist()
            mem_peak_min = float(engine.all_reduce(torch.tensor([engine.memory_gb()[1]]), op="min")[0])
            last_train = {
                "step": state["step"],
                "epoch": state["epoch"],
                **step_metrics,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": real_tokens,
                "tokens_per_s": real_tokens / dt,
                "step_time": dt,
                "mem_gb": mem_now,  # the largest rank's, after the step
                "peak_mem_gb": mem_peak,  # the largest rank's peak so far
                "peak_mem_gb_min": mem_peak_min,  # the smallest rank's (ranks differ under pipeline parallelism)
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
