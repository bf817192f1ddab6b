"""A 2-rank DDP run (torchrun, gloo) follows the single-process loss curve on the same global batches."""

from __future__ import annotations

import pytest

from steptrain.cli import main
from tests.conftest import TORCHRUN, base_overrides, run_cli, train_losses


@pytest.mark.slow
def test_ddp_two_ranks_matches_single_process(assets, tmp_path):
    common = ["trainer.max_steps=5", "trainer.batch_size=2", "peft=lora", "peft.r=4", "peft.dropout=0"]
    # single: 2 micro-batches per step; ddp: 1 micro-batch on each of 2 ranks -> the same global batches.
    assert main(["train", *base_overrides(assets, tmp_path / "single", *common, "trainer.grad_accum=2")]) == 0
    run_cli(["train", *base_overrides(assets, tmp_path / "ddp", *common, "engine=ddp")], launcher=TORCHRUN)
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(ddp) == [1, 2, 3, 4, 5]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5), step
    assert (tmp_path / "ddp" / "checkpoints" / "step_5" / "rng_rank1.safetensors").exists()


def test_ddp_without_launcher_says_how_to_launch(assets, tmp_path, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # as `steptrain train` started by hand sees it
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):  # `steptrain` exits with it (status 1)
        main(["train", *base_overrides(assets, tmp_path / "x", "engine=ddp")])
