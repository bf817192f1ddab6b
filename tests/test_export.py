"""Export: the HF directory and the PEFT adapter reload with the logits of the trained checkpoint."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from steptrain.cli import main
from steptrain.export import ExportError, export_checkpoint, rebuild_from_checkpoint
from tests.conftest import base_overrides


@pytest.fixture(scope="module")
def probe(assets):
    tok = AutoTokenizer.from_pretrained(assets["model"])
    text = "<s><|BOT|>human\nreverse: 1 2 3 4<|EOT|><|BOT|>assistant\n4 3"
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(assets, out, *extra):
    assert main(["train", *base_overrides(assets, out, "trainer.max_steps=4", *extra)]) == 0
    return out / "checkpoints" / "step_4"


def test_lora_adapter_and_merged_export(assets, tmp_path, probe):
    ckpt = _train(assets, tmp_path / "run", "peft=lora", "peft.r=4", "optim.lr=1e-2")
    trained, _, _ = rebuild_from_checkpoint(ckpt)
    expected = _logits(trained, probe)
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert not torch.allclose(_logits(base, probe), expected, atol=1e-4), "training changed nothing"

    adapter = export_checkpoint(ckpt, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and (adapter / "README.md").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), adapter).eval()
    assert torch.equal(_logits(reloaded, probe), expected)

    assert main(["export", str(ckpt), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, probe), expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == "<|EOT|>"
    assert (tmp_path / "merged" / "generation_config.json").exists()


def test_full_finetune_export_reload_is_identical(assets, tmp_path, probe):
    ckpt = _train(assets, tmp_path / "run")
    trained, _, _ = rebuild_from_checkpoint(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(trained.get_input_embeddings().weight, saved["model.embed_tokens.weight"])
    out = export_checkpoint(ckpt, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(reloaded, probe), _logits(trained, probe))
    card = (out / "README.md").read_text()
    assert "steptrain" in card and "max_steps: 4" in card


def test_export_refuses_incomplete_checkpoint(tmp_path):
    (tmp_path / "step_3").mkdir()
    with pytest.raises(ExportError, match="not a complete steptrain checkpoint"):
        export_checkpoint(tmp_path / "step_3", tmp_path / "out")


def test_preset_lora_export_rebuilds_the_trained_model(assets, tmp_path):
    """A preset's frozen base is random: export must rebuild exactly the weights that were trained on.

    The recipe's final eval loss was computed on the live model; the exported merged model must
    reproduce it on the same eval rows.
    """
    from steptrain.config import load_saved_config
    from steptrain.data import load_sft_data, read_rows
    from steptrain.engines.single import SingleEngine
    from steptrain.eval import evaluate_loss
    from steptrain.inputs import resolve_inputs
    from tests.conftest import read_metrics

    out = tmp_path / "run"
    args = base_overrides(assets, out, "model.path=null", "model.preset=tiny", f"model.tokenizer_path={assets['model']}",
                          "peft=lora", "peft.r=4", "optim.lr=1e-2", "trainer.max_steps=3", f"data.eval_files=[{assets['eval']}]")
    assert main(["train", *args]) == 0
    trained_eval = [r for r in read_metrics(out) if "eval/loss" in r][-1]["eval/loss"]

    merged = export_checkpoint(out / "checkpoints/step_3", tmp_path / "merged", merge_lora=True)
    cfg = load_saved_config(out / "config.yaml")
    tok = AutoTokenizer.from_pretrained(merged)
    engine = SingleEngine(cfg.engine, cfg.trainer)
    engine.module = AutoModelForCausalLM.from_pretrained(merged).eval()
    examples = load_sft_data(read_rows([str(assets["eval"])])[0], tok, cfg.data, resolve_inputs(cfg, tok)).examples
    metrics = evaluate_loss(engine, examples, batch_size=4, max_length=64, pad_id=tok.pad_token_id)
    assert metrics["eval/loss"] == pytest.approx(trained_eval, rel=1e-5)
