"""SIGKILL in the middle of training, resume=auto, and the loss curve is bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, base_overrides, read_metrics, run_cli, train_losses

STEPS = 30


def _kill_mid_run(args: list[str], out, at_step: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "steptrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for ln in metrics.read_text().splitlines() if '"loss"' in ln) >= at_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise STEPS"


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["peft=lora", "peft.dropout=0.1", "peft.r=4"],  # dropout: the RNG state must be restored too
        ["data.packing=true", "trainer.grad_accum=2"],  # full fine-tuning, packed rows, accumulation
    ],
    ids=["lora-dropout", "full-packed-accum"],
)
def test_sigkill_and_resume_matches_uninterrupted(assets, tmp_path, extra):
    common = [f"trainer.max_steps={STEPS}", "trainer.save_every=4", "trainer.keep_last=2", *extra]
    ref, broken = tmp_path / "ref", tmp_path / "broken"
    run_cli(["train", *base_overrides(assets, ref, *common)])

    args = base_overrides(assets, broken, *common)
    _kill_mid_run(["train", *args], broken, at_step=11)
    survivors = sorted(p.name for p in (broken / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert survivors, "no checkpoint survived the kill"
    run_cli(["train", *args, "resume=auto"])

    expected, got = train_losses(ref), train_losses(broken)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical, step for step
    assert [r["step"] for r in read_metrics(broken)] == [r["step"] for r in read_metrics(ref)]
