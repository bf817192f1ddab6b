"""Offline preference optimisation (DPO, IPO, cDPO, robust DPO, SimPO, ORPO) on any engine, full or LoRA.

Chosen and rejected answers of a micro-batch's pairs go through the model in ONE forward (2B rows), and
their summed log-probabilities of the last reply (optionally without discrete audio tokens, as
Step-Audio-AQAA does) enter the loss of ``steptrain/objectives/preference.py``. The loss of a step is the
mean over all pairs of the step (summed per micro-batch, divided by the global pair count, see loop.py).

Reference log-probs (``objective.reference``):
- ``precompute``: computed once with the initial model before the first update, over the train and eval
  pairs, and cached in ``<output_dir>/reference_logps.safetensors`` (keyed by a fingerprint of the data and
  model settings). A resumed run reuses the cache: recomputing would use the trained policy, not the reference.
- ``adapter_off``: the LoRA policy with its adapter disabled, per micro-batch (no second model in memory).
- ``model``: a separate frozen model from ``objective.ref_model_path``.
The reference-free losses (SimPO, ORPO: ``reference_free`` in objectives/registry.py) use none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steptrain.data import to_device
from steptrain.data.preference import (
    PairBatches,
    SharedPromptBatches,
)
from steptrain.engines import build_engine
from steptrain.eval.lm import rank_share
from steptrain.models.forward import lm_forward, lm_logits
from steptrain.objectives import audio_token_mask, gathered_logps, preference_loss, sequence_logps
from steptrain.objectives.registry import PREFERENCE_LOSSES
from steptrain.recipes.loop import build_model, evaluate_task, start_run, train
from steptrain.recipes.pairs import PairTask, load_pairs
from steptrain.recipes.reference import reference_logits

log = logging.getLogger("steptrain")

CACHE = "reference_logps.safetensors"
STATS = ("pairs", "loss", "chosen_rewards", "rejected_rewards", "correct", "chosen_logps", "rejected_logps")


def reply_logps(model, batch, engine, audio_ids, forward=lm_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, counted tokens) of the trained replies, chosen ones first then rejected ones,
    optionally without audio tokens; for two-row (PairBatches) and shared-prompt batches alike."""
    with engine.autocast():
        logits = forward(model, batch)
    return logits_reply_logps(logits, batch, audio_ids)


def logits_reply_logps(logits, batch, audio_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """``reply_logps`` from the logits of the batch (or the chunked head's input, a ``HeadInput``)."""
    if "chosen_positions" not in batch:
        return sequence_logps(logits, batch["labels"], audio_token_mask(batch["labels"], audio_ids))
    sides = [
        gathered_logps(logits, batch[f"{side}_positions"], batch[f"{side}_targets"],
                       audio_token_mask(batch[f"{side}_targets"], audio_ids))
        for side in ("chosen", "rejected")
    ]
    return torch.cat([sides[0][0], sides[1][0]]), torch.cat([sides[0][1], sides[1][1]])


class PrecomputedReference:
    """Reference log-probs of every pair, computed once by the initial model and cached on disk."""

    def __init__(self, tables: dict[str, torch.Tensor], split: str):
        self.chosen, self.rejected = tables[f"{split}_chosen"], tables[f"{split}_rejected"]

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["pair_ids"].cpu()
        return self.chosen[ids].to(batch["input_ids"].device), self.rejected[ids].to(batch["input_ids"].device)


def compute_reference(engine, batches: PairBatches, batch_size: int, audio_ids,
                      forward=lm_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-prob sums of every pair under the current model, on every rank."""
    n = len(batches.pairs)
    out = torch.zeros(2, n, dtype=torch.float64)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    mine, counted = rank_share(engine, chunks)
    inputs = [to_device(batches.batch([[i] for i in c]), engine.device) for c in mine]
    results = engine.forward_only(inputs, lambda logits, batch: logits_reply_logps(logits, batch, audio_ids)[0], forward)
    for chunk, logps in zip(mine[:counted], results[:counted], strict=True):
        out[0, chunk] = logps[: len(chunk)].double().cpu()
        out[1, chunk] = logps[len(chunk) :].double().cpu()
    engine.data_all_reduce(out)  # every pair was filled by exactly one replica
    return out[0].float(), out[1].float()


def _weight_files(cfg) -> list[list]:
    """(path, size, mtime) of every file of the model directories: a changed model changes the cache key."""
    dirs = [d for d in (cfg.model.path, cfg.model.llm_path, cfg.model.encoder_path) if d]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for d in dirs for f in sorted(Path(d).rglob("*")) if f.is_file()]


def fingerprint(cfg, splits: dict[str, PairBatches]) -> str:
    """Identifies what a cache was computed from: every pair's token ids, the model settings and files."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": str(cfg.model), "peft": str(cfg.peft), "mask_audio": cfg.objective.mask_audio,
                         "files": _weight_files(cfg)}).encode())
    for name, batches in splits.items():
        h.update(name.encode())
        for pair in batches.pairs:
            h.update(json.dumps([[e.input_ids, e.labels] for e in pair]).encode())
    return h.hexdigest()


def precomputed_reference(cfg, engine, splits: dict[str, PairBatches], audio_ids) -> dict[str, torch.Tensor]:
    """Load the cache if it matches this data and model; else compute it (initial model) and save it."""
    path = Path(cfg.output_dir) / CACHE
    key = fingerprint(cfg, splits)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == key:
                if engine.is_main:
                    log.info("reference log-probs: reusing %s", path)
                return load_file(str(path))
        if engine.is_main:
            log.warning("%s was computed from other data or model settings: recomputing", path)
    tables = {}
    for name, batches in splits.items():
        tables[f"{name}_chosen"], tables[f"{name}_rejected"] = compute_reference(
            engine, batches, cfg.trainer.batch_size, audio_ids, lm_forward(cfg)
        )
    if engine.is_main:
        tmp = path.with_suffix(".tmp")
        save_file(tables, str(tmp), metadata={"fingerprint": key})
        tmp.replace(path)
        log.info("reference log-probs of %s pairs cached in %s", {k: len(v.pairs) for k, v in splits.items()}, path)
    engine.barrier()
    return tables


class DPOTask(PairTask):
    """Pairs -> one forward -> preference loss; stats summed per pair."""

    def __init__(self, cfg, batches: PairBatches, engine, audio_ids, reference):
        super().__init__(batches, engine)
        self.cfg, self.audio_ids, self.reference = cfg, audio_ids, reference
        self.forward = lm_forward(cfg)  # logits, or hidden states for the chunked head (objective.head_chunk_tokens)

    def score(self, logits, batch):
        o = self.cfg.objective
        b = len(batch["pair_ids"])
        logps, counts = logits_reply_logps(logits, batch, self.audio_ids)
        ref = self.reference(batch) if self.reference is not None else (None, None)
        chosen_n, rejected_n = counts[:b], counts[b:]
        pc, pr, rc, rr = logps[:b], logps[b:], *ref
        if o.length_normalize and not PREFERENCE_LOSSES[o.loss].length_normalized:
            pc, pr = pc / chosen_n.clamp(min=1), pr / rejected_n.clamp(min=1)
            rc, rr = rc / chosen_n.clamp(min=1), rr / rejected_n.clamp(min=1)
        out = preference_loss(
            pc, pr, rc, rr, loss=o.loss, beta=o.beta, label_smoothing=o.label_smoothing,
            chosen_tokens=chosen_n, rejected_tokens=rejected_n, simpo_gamma=o.simpo_gamma,
        )
        cr, rj = out["chosen_rewards"], out["rejected_rewards"]
        stats = torch.stack([
            torch.tensor(float(b), dtype=torch.float64), out["loss"].detach().sum().double().cpu(),
            cr.sum().double().cpu(), rj.sum().double().cpu(), (cr > rj).sum().double().cpu(),
            logps[:b].detach().sum().double().cpu(), logps[b:].detach().sum().double().cpu(),
        ])
        return out["loss"].sum(), stats

    def summarize(self, totals: torch.Tensor, prefix: str = "") -> dict:
        t = dict(zip(STATS, totals.tolist(), strict=True))
        n = max(t["pairs"], 1.0)
        return {
            f"{prefix}loss": t["loss"] / n,
            f"{prefix}rewards/chosen": t["chosen_rewards"] / n,
            f"{prefix}rewards/rejected": t["rejected_rewards"] / n,
            f"{prefix}rewards/margins": (t["chosen_rewards"] - t["rejected_rewards"]) / n,
            f"{prefix}rewards/accuracy": t["correct"] / n,
            f"{prefix}logps/chosen": t["chosen_logps"] / n,
            f"{prefix}logps/rejected": t["rejected_logps"] / n,
            f"{prefix}pairs": int(t["pairs"]),
        }


def pair_reference(ref_logits, audio_ids):
    """(chosen, rejected) reference log-prob sums of a micro-batch's pairs."""

    def ref(batch):
        logps, _ = logits_reply_logps(ref_logits(batch), batch, audio_ids)
        b = len(batch["pair_ids"])
        return logps[:b], logps[b:]

    return ref


def run(cfg) -> dict:
    """Train according to ``cfg``; returns the last train and eval metrics."""
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    try:
        cfg, tokenizer, inputs = start_run(cfg, engine)
        data = load_pairs(cfg, tokenizer, inputs, log_stats=engine.is_main)
        audio_ids = inputs.audio_ids if cfg.objective.mask_audio else None

        def batches(pairs):
            if cfg.objective.share_prompt and inputs.features is None:
                return SharedPromptBatches(pairs, tokenizer.pad_token_id)
            return PairBatches(pairs, tokenizer.pad_token_id, inputs.features)

        splits = {"train": batches(data.train.pairs)}
        if data.eval is not None:
            splits["eval"] = batches(data.eval.pairs)
        model = build_model(cfg, engine, tokenizer)
        o = cfg.objective
        if o.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        needs_reference = not PREFERENCE_LOSSES[o.loss].reference_free
        references: dict = {name: None for name in splits}
        if needs_reference:
            if o.reference in ("adapter_off", "model"):
                ref = pair_reference(reference_logits(cfg, engine, tokenizer), audio_ids)
                references = {name: ref for name in splits}
        tasks = {name: DPOTask(cfg, b, engine, audio_ids, references[name]) for name, b in splits.items()}

        def on_prepared(_model, _steps) -> None:  # before any update and before a resume loads trained weights
            if needs_reference and o.reference == "precompute":
                tables = precomputed_reference(cfg, engine, splits, audio_ids)
                for name, task in tasks.items():
                    task.reference = PrecomputedReference(tables, name)

        def evaluate() -> dict:
            return evaluate_task(engine, tasks["eval"], cfg.trainer.batch_size) if "eval" in tasks else {}

        return train(cfg, engine, tasks["train"], model, evaluate, on_prepared=on_prepared)
    finally:
        engine.close()
