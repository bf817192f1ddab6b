"""SIGKILL in the middle of training, resume=auto, and the loss curve is bit-identical to an uninterrupted run."""

from __future__ import annotations

import pytest

from steptrain.cli import main
from tests.conftest import base_overrides, kill_mid_run, read_metrics, train_losses

STEPS = 30


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
    assert main(["train", *base_overrides(assets, ref, *common)]) == 0  # in-process; the killed run is a fresh one

    args = base_overrides(assets, broken, *common)
    kill_mid_run(["train", *args], broken, at_step=11)
    survivors = sorted(p.name for p in (broken / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert survivors, "no checkpoint survived the kill"
    assert main(["train", *args, "resume=auto"]) == 0

    expected, got = train_losses(ref), train_losses(broken)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical, step for step
    assert [r["step"] for r in read_metrics(broken)] == [r["step"] for r in read_metrics(ref)]
