"""Capture and restore every random-number generator a run touches (per rank)."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_rng(ckpt_dir: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    save_file(tensors, str(ckpt_dir / f"rng_rank{rank}.safetensors"))
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    (ckpt_dir / f"rng_rank{rank}.json").write_text(json.dumps(meta))


def load_rng(ckpt_dir: Path, rank: int) -> bool:
    """Restore this rank's generators; False if the checkpoint has none for it (other world size)."""
    path = ckpt_dir / f"rng_rank{rank}.safetensors"
    if not path.exists():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    meta = json.loads((ckpt_dir / f"rng_rank{rank}.json").read_text())
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def batch_rng(seed: int, epoch: int, index: int, device: torch.device):
    """Torch's generators seeded from (run seed, epoch, micro-batch index in the epoch plan) inside the
    block, and restored after it.

    Randomness spent making a batch (RL rollouts sample here) then depends only on which micro-batch it
    is: the same on one process with accumulation as on N data-parallel ranks, and after a resume; and
    the training stream (dropout) does not see how many numbers a rollout drew.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)
        yield
