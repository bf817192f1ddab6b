"""recipe=reward: a Bradley-Terry reward model learns a synthetic preference and exports as an HF classifier."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.preference_corpus import write_preference_corpus
from steptrain.cli import main
from steptrain.config import load_config
from steptrain.recipes import reward
from tests.conftest import TORCHRUN, read_metrics, run_cli


@pytest.fixture(scope="module")
def digits_pref(tmp_path_factory):
    """Rejected replies have the right length but only digits the prompt lacks: learnable by a tiny model in
    seconds."""
    return write_preference_corpus(tmp_path_factory.mktemp("rm"), n_train=1000, n_eval=64, seed=1,
                                   negatives=("foreign",))


def rm_args(assets, pref, out, *extra) -> list[str]:
    return [
        "experiment=reward_model", f"model.path={assets['model']}", f"data.train_files=[{pref['train']}]",
        f"data.eval_files=[{pref['eval']}]", f"output_dir={out}", "data.max_length=64", "trainer.batch_size=8",
        "optim.lr=2e-3", "optim.warmup_ratio=0", "logging.progress_bar=false", "logging.tensorboard=false",
        "logging.plot=false", *extra,
    ]


def test_reward_model_reaches_high_pairwise_accuracy(assets, digits_pref, tmp_path):
    # Held-out accuracy over trainer seeds 1-9 and 42: 0.81-1.0 (margins 4.1-6.9); at step 0, 0.41-0.63. With
    # random-digit negatives and lr 2e-3 it was 0.67-0.92 (and collapsed on some seeds).
    result = reward.run(load_config(rm_args(assets, digits_pref, tmp_path, "trainer.max_steps=200", "optim.lr=1e-3")))
    first = next(r for r in read_metrics(tmp_path) if "eval/accuracy" in r)
    assert first["step"] == 0 and 0.2 < first["eval/accuracy"] < 0.8  # an untrained head is near chance
    assert result["eval"]["eval/accuracy"] >= 0.7  # 64 held-out pairs: 0.7 is 3 sigma above chance
    assert result["eval"]["eval/scores/margins"] > 1.0


def test_lora_reward_model_exports_as_a_sequence_classifier_with_equal_scores(assets, digits_pref, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = rm_args(assets, digits_pref, tmp_path / "run", "trainer.max_steps=3", "peft=lora", "peft.r=4",
                   "peft.dropout=0")
    reward.run(load_config(args))
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    assert main(["export", str(ckpt), str(tmp_path / "adapter")]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "merged"), "--merge-lora"]) == 0

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    ids = tok(["copy: 1 2 3", "sort: 9 3 7 1"], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=1,
                                                              pad_token_id=tok.pad_token_id)
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        a, m = adapter(**ids).logits, merged(**ids).logits
    assert a.shape == (2, 1)
    torch.testing.assert_close(m, a, rtol=0, atol=1e-5)
    saved = adapter.base_model.model.score.modules_to_save["default"].weight
    assert saved.abs().sum() > 0  # the trained head travelled with the adapter


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(assets, digits_pref, tmp_path):
    common = ["trainer.max_steps=3", "trainer.batch_size=4"]
    reward.run(load_config(rm_args(assets, digits_pref, tmp_path / "single", *common, "trainer.grad_accum=2")))
    run_cli(["train", *rm_args(assets, digits_pref, tmp_path / "zero3", *common, "engine=deepspeed")], launcher=TORCHRUN)
    single, zero3 = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "zero3")
    assert [r["step"] for r in zero3] == [r["step"] for r in single]  # eval at 0, steps 1-3, eval at 3
    for a, b in zip(single, zero3, strict=True):
        key = "loss" if "loss" in a else "eval/loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5)
