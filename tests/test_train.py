"""End-to-end SFT runs through the CLI: outputs, learning, retention, and failures that lose nothing."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch

import steptrain.engines.torch_engine as torch_engine
from steptrain.checkpoint import CheckpointError, list_checkpoints
from steptrain.cli import main
from steptrain.config import load_config
from steptrain.recipes import sft
from tests.conftest import base_overrides, read_metrics, train_losses


def test_run_writes_config_metrics_checkpoints_and_plot(assets, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(
        assets, out, "trainer.max_steps=12", "trainer.save_every=4", "trainer.keep_last=2",
        f"data.eval_files=[{assets['eval']}]", "trainer.eval_every=6", "trainer.eval_batches=4",
        "logging.tensorboard=true", "logging.plot=true",
    )
    assert main(["train", *args]) == 0
    assert load_config(args).trainer.max_steps == 12
    assert "max_steps: 12" in (out / "config.yaml").read_text()
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "label_tokens", "grad_norm", "tokens_per_s"} <= train[0].keys()
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.5, "eval loss should fall clearly"
    assert [p.name for p in list_checkpoints(out)] == ["step_8", "step_12"]  # keep_last=2
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert (out / "train.log").exists()


def test_lr_schedule_warmup_then_cosine(assets, tmp_path):
    out = tmp_path / "run"
    args = base_overrides(assets, out, "trainer.max_steps=10", "optim.warmup_steps=4", "optim.lr=1e-3",
                          "optim.min_lr_ratio=0.1")
    assert main(["train", *args]) == 0
    lrs = [r["lr"] for r in read_metrics(out) if "lr" in r]
    # the lr each step applied: linear warmup 1/4..4/4, then cosine towards 10% of the peak.
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6))))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(base_overrides(assets, out, "trainer.max_steps=8", "trainer.save_every=2"))
    real = sft.lm_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels, *args):  # the model emits NaN logits in the third step
        calls["n"] += 1
        return real(logits * float("nan") if calls["n"] == 3 else logits, labels, *args)

    monkeypatch.setattr(sft, "lm_loss_sum", poisoned)
    with pytest.raises(sft.TrainingError, match=r"non-finite loss \(nan\) at step 3.*step_2"):
        sft.run(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["step_2"]
    assert json.loads((out / "checkpoints/step_2/trainer_state.json").read_text())["step"] == 2


def test_disk_full_during_checkpoint_keeps_last_good_one(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(base_overrides(assets, out, "trainer.max_steps=6", "trainer.save_every=2"))
    real = torch_engine.save_file
    saves = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(torch_engine, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*last good checkpoint \(step_2\) is intact"):
        sft.run(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["step_2"]
    assert not list((out / "checkpoints").glob(".tmp_*"))
    state = torch.load(out / "checkpoints/step_2/optimizer.pt", weights_only=True)
    assert state["state"], "the surviving checkpoint has its optimizer state"


def test_malformed_jsonl_reported_with_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = assets["train"].read_text().splitlines()[:3]
    bad.write_text("\n".join([*good, '{"messages": [oops', *good]) + "\n")
    args = base_overrides(assets, tmp_path / "run")
    args[1] = f"data.train_files=[{bad}]"
    assert main(["train", *args]) == 2
    assert f"{bad}:4: invalid JSON" in capsys.readouterr().err


def test_loss_falls_with_full_finetuning(assets, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *base_overrides(assets, out, "trainer.max_steps=30", "trainer.batch_size=8")]) == 0
    losses = train_losses(out)
    assert sum(list(losses.values())[-5:]) / 5 < 0.6 * sum(list(losses.values())[:5]) / 5


def test_epochs_mode_and_wandb_offline(assets, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rows = [ln for ln in assets["train"].read_text().splitlines()][:40]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = base_overrides(assets, out, "trainer.max_steps=0", "trainer.epochs=2", "trainer.batch_size=8",
                          "logging.wandb=offline")
    args[1] = f"data.train_files=[{small}]"
    assert main(["train", *args]) == 0
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["epoch"] for r in train] == [0] * 5 + [1] * 5  # 40 rows / 8 per step, two passes
    assert list((out / "wandb").glob("offline-run-*")), "W&B should log offline into output_dir"


def test_quickstart_experiment_and_demo_report(assets, tmp_path):
    out = tmp_path / "qs"
    args = ["experiment=quickstart", f"model.path={assets['model']}", f"data.train_files=[{assets['train']}]",
            f"data.eval_files=[{assets['eval']}]", f"output_dir={out}", "trainer.max_steps=4", "optim.warmup_steps=1",
            "trainer.generate_eval=8", "logging.tensorboard=false"]
    assert main(["train", *args]) == 0
    assert main(["export", str(out / "checkpoints" / "step_4"), str(tmp_path / "export")]) == 0
    from data_pipelines.demo_report import report

    text = report(out, tmp_path / "export")
    assert "held-out exact match: 0.0% (step 0) ->" in text and "on 8 prompts" in text
    assert str((tmp_path / "export").resolve()) in text
