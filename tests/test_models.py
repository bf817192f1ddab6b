"""Model loading, LoRA wiring, optimizer groups and numerics options."""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from steptrain.cli import main
from steptrain.config.schema import ModelConfig, OptimConfig, PeftConfig
from steptrain.engines.optim import lr_factor, param_groups
from steptrain.models.loader import load_model, load_tokenizer
from steptrain.models.lora import apply_lora
from tests.conftest import base_overrides, train_losses


def _model_cfg(path, **kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"path": str(path), **kw})


def test_param_groups_apply_lr_multipliers_and_skip_decay_on_norms(assets):
    cfg = _model_cfg(assets["model"])
    model, _ = load_model(cfg, load_tokenizer(cfg))
    optim = OmegaConf.merge(
        OmegaConf.structured(OptimConfig),
        {"lr": 1e-3, "weight_decay": 0.1, "lr_mult": {"embed_tokens": 5.0, "lm_head": 2.0}},
    )
    groups = {(g["lr_mult"], g["weight_decay"]): g for g in param_groups(model, optim)}
    assert groups[(5.0, 0.1)]["names"] == ["model.embed_tokens.weight"]
    assert groups[(5.0, 0.1)]["lr"] == pytest.approx(5e-3)
    assert groups[(2.0, 0.1)]["names"] == ["lm_head.weight"]
    assert all("norm" in n or n.endswith(".bias") for n in groups[(1.0, 0.0)]["names"])
    assert all(n.endswith(".weight") and "norm" not in n for n in groups[(1.0, 0.1)]["names"])
    assert sum(len(g["names"]) for g in groups.values()) == len(list(model.parameters()))


def test_lr_factor_shapes():
    kw = {"total_steps": 10, "warmup": 2, "min_ratio": 0.0}
    assert [lr_factor(s, kind="constant", **kw) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, kind="linear", **kw) == 1.0 and lr_factor(6, kind="linear", **kw) == 0.5
    assert lr_factor(6, kind="cosine", **kw) == pytest.approx(0.5)


def test_added_tokens_are_resized_and_trained_under_lora(assets, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(assets["model"], model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    old = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<tts_start>", "<tts_end>"]})
    tok.save_pretrained(model_dir)
    cfg = _model_cfg(model_dir)
    tokenizer = load_tokenizer(cfg)
    model, new_ids = load_model(cfg, tokenizer)
    assert new_ids == [old, old + 1]
    assert model.get_input_embeddings().weight.shape[0] == old + 2
    peft_cfg = OmegaConf.merge(OmegaConf.structured(PeftConfig), {"method": "lora", "r": 2})
    model = apply_lora(model, peft_cfg, new_ids)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trainable), trainable
    assert not any(n.endswith("embed_tokens.weight") for n in trainable)  # the old rows stay frozen


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    extra = ["trainer.max_steps=3", "trainer.save_every=0"]
    assert main(["train", *base_overrides(assets, tmp_path / "a", *extra)]) == 0
    assert main(["train", *base_overrides(assets, tmp_path / "b", *extra, "model.gradient_checkpointing=true")]) == 0
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_bf16_autocast_trains_on_cpu(assets, tmp_path):
    out = tmp_path / "bf16"
    assert main(["train", *base_overrides(assets, out, "trainer.precision=bf16", "trainer.max_steps=8")]) == 0
    losses = list(train_losses(out).values())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_error_rates_are_corpus_level():
    from steptrain.eval import error_rates

    rates = error_rates(["1 2 3", "4 5"], ["1 2 4", "4 5 6"])
    # chars: "1 2 3" vs "1 2 4": 1 substitution; "4 5" vs "4 5 6": 2 deletions; reference chars 5 + 5
    assert rates["cer"] == pytest.approx(3 / 10)
    assert rates["wer"] == pytest.approx(2 / 6)
    assert error_rates(["x"], [""]) == {}
