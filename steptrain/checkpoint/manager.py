"""Atomic checkpoints under ``<output_dir>/checkpoints/step_<N>/`` with keep-last-K retention.

A checkpoint is written into ``.tmp_step_<N>``, marked ``COMPLETE`` and renamed, so a crash, a SIGKILL
or a full disk in the middle of a save never touches the last good checkpoint. Older checkpoints are
deleted only after the new one is in place.

Layout: model.safetensors (trainable weights), optimizer.pt, scheduler.pt (engine-specific parts),
rng_rank<R>.{safetensors,json}, trainer_state.json (step, data position, counters), config.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from steptrain.checkpoint.rng import load_rng, save_rng

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and what survived."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / COMPLETE).exists()]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` -> newest complete one (or None), ``none``, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"resume={resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(engine, fn) -> Exception | None:
    """Run ``fn`` on this rank; return the first failure seen on any rank (also acts as a barrier)."""
    error = None
    try:
        fn()
    except Exception as exc:  # disk full shows up as OSError, RuntimeError (torch.save) or SafetensorError
        error = exc
    ok = engine.all_reduce(torch.tensor([0.0 if error else 1.0]), op="min")
    if error is None and not bool(ok.item()):
        error = RuntimeError("failed on another rank")
    return error


def save_checkpoint(engine, output_dir, step: int, trainer_state: dict, cfg, keep_last: int,
                    companions: dict | None = None) -> Path:
    """Write step_<step> atomically; every rank calls this and writes its own part. ``companions`` are
    further engines trained alongside (a PPO critic), each saved in a subdirectory of its name."""
    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"

    def make_tmp():
        if engine.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def write():
        engine.save(tmp)
        for name, companion in (companions or {}).items():
            (tmp / name).mkdir(exist_ok=True)
            companion.save(tmp / name)
        save_rng(tmp, engine.rank)
        if engine.is_main:
            (tmp / STATE).write_text(json.dumps(trainer_state, indent=1))
            OmegaConf.save(cfg, tmp / "config.yaml")
            (tmp / COMPLETE).write_text(str(step))
            _fsync_dir(tmp)

    error = _all_ok(engine, make_tmp) or _all_ok(engine, write)
    if error is not None:
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(output_dir)
        kept = last[-1].name if last else "none yet"
        raise CheckpointError(
            f"could not write checkpoint {final}: {error}; the last good checkpoint ({kept}) is intact"
        ) from error
    if engine.is_main:
        if final.exists():  # the same step saved again (e.g. resumed from an older checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def load_checkpoint(engine, ckpt: Path, companions: dict | None = None) -> dict:
    """Restore engine state (and the companions' from their subdirectories) and this rank's RNG from
    ``ckpt``; returns the trainer state."""
    engine.load(ckpt)
    for name, companion in (companions or {}).items():
        if not (ckpt / name).is_dir():
            raise CheckpointError(f"{ckpt} has no {name}/ state to resume the {name} from")
        companion.load(ckpt / name)
    if not load_rng(ckpt, engine.rank):
        log.warning("%s has no RNG state for rank %d: continuing with fresh generators", ckpt, engine.rank)
    return json.loads((ckpt / STATE).read_text())


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written ``.tmp_step_*`` folders left by a killed run."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)
