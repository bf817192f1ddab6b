"""Shared fixtures: a tiny model + tokenizer + demo corpus made once per session, and a CLI runner."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: in-process training runs (and, under pytest-xdist, each worker) use one core, as the
# subprocess runs below do (OMP_NUM_THREADS=1); set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


# Process-wide state an in-process run can leave behind: the one-process engines set RANK / WORLD_SIZE /
# MASTER_PORT, DeepSpeed sets DS_ACCELERATOR, W&B its WANDB_* variables.
@pytest.fixture(autouse=True)
def _isolate_in_process_runs():
    """Each test starts from seeded global RNGs and one thread, and leaves no environment variable, root log
    handler, torch.distributed process group or Hydra global state to the next one (in-process runs included)."""
    import numpy as np
    import torch

    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = set(root.handlers), root.level
    threads = torch.get_num_threads()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    for h in root.handlers[:]:  # pytest's own capture handlers come and go with each test phase: keep them
        if h not in handlers and not type(h).__module__.startswith("_pytest"):
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A small demo bundle (corpus, tokenizer, tiny random model) from data_pipelines.make_demo."""
    from data_pipelines.make_demo import make_demo

    paths = make_demo(tmp_path_factory.mktemp("assets"), seed=0, n_train=2000, n_eval=64)
    return {k: Path(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """A small DTMF spoken-digit corpus (ASR rows with <audio> tags) from data_pipelines.speech_corpus."""
    from data_pipelines.speech_corpus import write_speech_corpus

    return write_speech_corpus(tmp_path_factory.mktemp("speech"), n_train=64, n_eval=8, seed=0)


def base_overrides(assets, out, *extra) -> list[str]:
    """A small, fast SFT run on the demo assets."""
    return [
        f"model.path={assets['model']}",
        f"data.train_files=[{assets['train']}]",
        f"output_dir={out}",
        "data.max_length=64",
        "trainer.batch_size=4",
        "trainer.max_steps=6",
        "optim.lr=3e-3",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        *extra,
    ]


def run_cli(args: list[str], *, launcher: list[str] | None = None, timeout: int = 600, check: bool = True):
    """Run `python -m steptrain ...` (or under torchrun) in a fresh process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    module = [] if launcher and launcher[-1] == "--module" else ["-m"]  # the deepspeed launcher takes --module
    cmd = (launcher or [sys.executable]) + [*module, "steptrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def kill_mid_run(args: list[str], out: Path, at_step: int, *, launcher: list[str] | None = None) -> None:
    """Start `steptrain ARGS`, SIGKILL its whole process group (launcher and ranks) once step ``at_step`` is logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = (launcher or [sys.executable]) + ["-m", "steptrain", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    metrics = Path(out) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for ln in metrics.read_text().splitlines() if '"loss"' in ln) >= at_step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise max_steps"
