"""`steptrain merge`: exact tensor math (linear, task arithmetic, TIES) and the model-level plumbing."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from steptrain.cli import main
from steptrain.export import rebuild_from_checkpoint
from steptrain.export.merge import (
    MergeError,
    keep_count,
    merge_models,
    merge_tensors,
    task_arithmetic_merge,
    ties_merge,
    trim_by_magnitude,
)
from steptrain.models.presets import build_preset, preset_config
from tests.conftest import base_overrides

LOG = "steptrain.export.merge"


def _state(directory):
    return load_file(str(directory / "model.safetensors"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory):
    """Two tiny random Qwen2 models (seeds 1 and 2); A holds the demo tokenizer, B none."""
    root = tmp_path_factory.mktemp("merge_models")
    tok = AutoTokenizer.from_pretrained(assets["model"])
    paths = {"root": root, "tokenizer": tok}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        build_preset("tiny", tok).save_pretrained(root / name)
        paths[name] = root / name
    tok.save_pretrained(paths["a"])
    return paths


# ------------------------------------------------------------------ tensor math against hand-computed values


def test_linear_merge_tensors():
    a, b = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 2.0, 0.0])
    assert torch.equal(merge_tensors([a, b], [0.25, 0.75]), torch.tensor([2.5, 1.0, 1.0]))
    assert merge_tensors([a.bfloat16(), b.bfloat16()], [0.5, 0.5]).dtype == torch.bfloat16


def test_task_arithmetic_by_hand():
    base = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    t1 = torch.tensor([[2.0, 0.0], [1.0, 2.0]])  # τ1 = [[1, -1], [1, 0]]
    t2 = torch.tensor([[1.0, 3.0], [-2.0, 6.0]])  # τ2 = [[0, 2], [-2, 4]]
    # θ = base + 0.5 τ1 + 0.25 τ2 = [[1 + .5 + 0, 1 - .5 + .5], [0 + .5 - .5, 2 + 0 + 1]]
    expected = torch.tensor([[1.5, 1.0], [0.0, 3.0]])
    assert torch.equal(task_arithmetic_merge([t1, t2], [0.5, 0.25], base), expected.double())
    assert torch.equal(merge_tensors([t1, t2], [0.5, 0.25], "task_arithmetic", base=base), expected)


def test_trim_keeps_the_top_density_fraction_by_magnitude():
    tau = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1, 0.0])
    assert torch.equal(trim_by_magnitude(tau, 0.5), torch.tensor([0.0, -3.0, 1.0, 2.0, 0.0, 0.0]))  # k = 3
    assert torch.equal(trim_by_magnitude(tau, 0.3), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0, 0.0]))  # ⌈1.8⌉ = 2
    assert torch.equal(trim_by_magnitude(tau, 0.1), torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0, 0.0]))  # ⌈0.6⌉ = 1
    assert torch.equal(trim_by_magnitude(tau, 1.0), tau)
    # per tensor, over all elements of a matrix
    m = torch.tensor([[3.0, 0.1], [0.2, -4.0]])
    assert torch.equal(trim_by_magnitude(m, 0.5), torch.tensor([[3.0, 0.0], [0.0, -4.0]]))
    # equal magnitudes at the threshold: exactly k survive, lower flat index first
    assert torch.equal(trim_by_magnitude(torch.tensor([1.0, -1.0, 1.0, 2.0]), 0.5), torch.tensor([1.0, 0.0, 0.0, 2.0]))
    assert [keep_count(10, 0.1), keep_count(10, 0.3), keep_count(5, 0.5), keep_count(100, 0.57)] == [1, 3, 3, 57]


def test_ties_by_hand():
    base = torch.ones(6)
    tau1 = torch.tensor([4.0, -1.0, 2.0, 0.5, -3.0, 0.0])  # trimmed (k=3): [4, 0, 2, 0, -3, 0]
    tau2 = torch.tensor([-2.0, -5.0, 1.0, 0.25, 3.5, 1.5])  # trimmed: [-2, -5, 0, 0, 3.5, 0]
    tau3 = torch.tensor([6.0, 2.0, -4.0, 1.0, 0.125, -8.0])  # trimmed: [6, 0, -4, 0, 0, -8]
    weights = [1.0, 1.0, 0.5]
    # v = w·trimmed: v1 = [4, 0, 2, 0, -3, 0], v2 = [-2, -5, 0, 0, 3.5, 0], v3 = [3, 0, -2, 0, 0, -4]
    # Σv = [5, -5, 0, 0, 0.5, -4] -> elected sign γ = [+, -, 0, 0, +, -]
    # disjoint mean over agreeing nonzero v_i:
    #   e0: v1=4, v3=3 agree (v2=-2 does not) -> 3.5;  e1: v2 -> -5;  e2: γ = 0 -> 0;  e3: all trimmed -> 0
    #   e4: v2=3.5 (v1=-3 disagrees) -> 3.5;  e5: v3 -> -4 (τ2's 1.5 was trimmed away)
    expected = base + torch.tensor([3.5, -5.0, 0.0, 0.0, 3.5, -4.0])
    thetas = [base + t for t in (tau1, tau2, tau3)]
    got = ties_merge(thetas, weights, base, density=0.5)
    for i in range(6):
        assert got[i].item() == expected[i].item(), f"element {i}: {got[i].item()} != {expected[i].item()}"
    assert torch.equal(merge_tensors(thetas, weights, "ties", base=base, density=0.5), expected)
    # a zero-weight model never counts in the mean: ties with weights [1, 0] at density 1 gives model 1
    assert torch.equal(merge_tensors(thetas[:2], [1.0, 0.0], "ties", base=base, density=1.0), thetas[0])


def test_tensor_level_misuse():
    t = torch.zeros(2)
    with pytest.raises(MergeError, match="1 weights for 2 tensors"):
        merge_tensors([t, t], [1.0])
    with pytest.raises(MergeError, match="needs a base"):
        merge_tensors([t, t], [0.5, 0.5], "ties")


# ------------------------------------------------------------------ models


def test_linear_average_is_exact(models, tmp_path):
    out = merge_models([models["b"], models["a"]], tmp_path / "avg", weights=[0.5, 0.5])
    sa, sb, merged = _state(models["a"]), _state(models["b"]), _state(out)
    assert merged.keys() == sa.keys()
    for k in sa:
        assert torch.equal(merged[k], (sa[k] + sb[k]) / 2), k
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(out).eos_token == models["tokenizer"].eos_token  # from A, the 2nd input
    card = (out / "README.md").read_text()
    assert "Method `linear`" in card and f"| 1 | `{models['b']}` | HF model | 0.5 |" in card
    assert f"| 2 | `{models['a']}` | HF model | 0.5 |" in card
    assert not list(tmp_path.glob(".*.tmp"))


def test_weights_one_zero_give_model_a(models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG):
        out = merge_models([models["a"], models["b"]], tmp_path / "a_only", weights=[1, 0])
    assert "sum to" not in caplog.text
    ids = models["tokenizer"]("reverse: 1 2 3 4", return_tensors="pt")["input_ids"]
    a = AutoModelForCausalLM.from_pretrained(models["a"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(merged, ids), _logits(a, ids))


def test_linear_weights_not_summing_to_one_are_kept_and_logged(models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOG):
        out = merge_models([models["a"], models["b"]], tmp_path / "scaled", weights=[0.75, 0.75])
    assert "sum to 1.5, not 1" in caplog.text
    sa, sb, merged = _state(models["a"]), _state(models["b"]), _state(out)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[k], (0.75 * sa[k].double() + 0.75 * sb[k].double()).float())


def _random_lora(model_dir, out_dir, seed=3):
    """A saved PEFT adapter on ``model_dir`` with nonzero (random) B matrices."""
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _peft_merged_state(model_dir, adapter):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_adapter_input_equals_peft_merge_and_unload(models, tmp_path):
    adapter = _random_lora(models["a"], tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(models["a"])
    expected = _peft_merged_state(models["a"], adapter)
    assert not torch.equal(expected["model.layers.0.mlp.up_proj.weight"],
                           _state(models["a"])["model.layers.0.mlp.up_proj.weight"]), "the adapter changes nothing"
    out = merge_models([adapter], tmp_path / "merged", weights=[1.0])
    merged = _state(out)
    assert merged.keys() == expected.keys()
    for k in merged:
        assert torch.equal(merged[k], expected[k]), k
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()  # the base's tokenizer

    # --base replaces the adapter's own base: the adapter is applied to B
    out_b = merge_models([adapter], tmp_path / "merged_on_b", weights=[1.0], base=models["b"])
    expected_b, merged_b = _peft_merged_state(models["b"], adapter), _state(out_b)
    for k in merged_b:
        assert torch.equal(merged_b[k], expected_b[k]), k


def _save(model, directory):
    model.save_pretrained(directory)
    return directory


def test_incompatible_inputs_name_path_and_tensor(models, tmp_path):
    tok = models["tokenizer"]
    torch.manual_seed(0)
    bigger = _save(Qwen2ForCausalLM(preset_config("tiny", vocab_size=len(tok) + 8)), tmp_path / "bigger_vocab")
    with pytest.raises(MergeError, match=re.escape(f"{bigger}: tensor model.embed_tokens.weight has shape ({len(tok) + 8}, 128)")):
        merge_models([models["a"], bigger], tmp_path / "out", weights=[0.5, 0.5])

    cfg = preset_config("tiny", vocab_size=len(tok)).to_dict() | {"num_hidden_layers": 1, "layer_types": None}
    shallow = _save(Qwen2ForCausalLM(Qwen2Config(**cfg)), tmp_path / "one_layer")
    with pytest.raises(MergeError, match=re.escape(f"{shallow}: parameter names differ from {models['a']}: lacks ['model.layers.1.")):
        merge_models([models["a"], shallow], tmp_path / "out", weights=[0.5, 0.5])

    llama = _save(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1)), tmp_path / "llama")
    with pytest.raises(MergeError, match=re.escape(f"{llama}: architecture LlamaForCausalLM (llama) differs from "
                                                   f"Qwen2ForCausalLM (qwen2) of {models['a']}")):
        merge_models([models["a"], llama], tmp_path / "out", weights=[0.5, 0.5])
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_argument_errors(models, tmp_path):
    a, b, out = models["a"], models["b"], tmp_path / "out"
    with pytest.raises(MergeError, match=re.escape(f"1 weights for 2 inputs ({a}, {b})")):
        merge_models([a, b], out, weights=[1.0])
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(MergeError, match=f"method {method} needs --base"):
            merge_models([a, b], out, weights=[0.5, 0.5], method=method)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match=re.escape(f"{tmp_path / 'empty'}: not an HF model directory (config.json), "
                                                   "a PEFT adapter directory (adapter_config.json) or a steptrain checkpoint")):
        merge_models([a, tmp_path / "empty"], out, weights=[0.5, 0.5])
    with pytest.raises(MergeError, match="no such directory"):
        merge_models([a, tmp_path / "missing"], out, weights=[0.5, 0.5])
    with pytest.raises(MergeError, match=r"--density must be in \(0, 1\]"):
        merge_models([a, b], out, weights=[0.5, 0.5], method="ties", base=a, density=1.5)
    with pytest.raises(MergeError, match="the output directory is also an input"):
        merge_models([a, b], b, weights=[0.5, 0.5])
    assert not out.exists()


def test_cli_error_is_one_line(models, tmp_path, capsys):
    assert main(["merge", str(models["a"]), str(models["b"]), str(tmp_path / "out"), "--method", "ties",
                 "--weights", "0.5", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["steptrain: error: method ties needs --base (the model the task vectors θ_i − θ_base start from)"]


def test_cli_end_to_end_ties_with_a_lora_checkpoint(assets, models, tmp_path, capsys):
    """`steptrain merge CKPT B OUT --method ties --base BASE --density 0.5` (the CLI's main, in-process)."""
    run = tmp_path / "run"
    assert main(["train", *base_overrides(assets, run, "peft=lora", "peft.r=4", "optim.lr=1e-2", "trainer.max_steps=2")]) == 0
    ckpt = run / "checkpoints" / "step_2"
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(ckpt), str(models["b"]), str(out), "--weights", "0.7", "0.3",
                 "--method", "ties", "--base", str(assets["model"]), "--density", "0.5"]) == 0
    assert f"merged: {out}" in capsys.readouterr().out

    trained, _, _ = rebuild_from_checkpoint(ckpt)
    sc = trained.merge_and_unload().state_dict()
    sb, base, merged = _state(models["b"]), _state(assets["model"]), _state(out)
    assert not torch.equal(sc["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert merged.keys() == sb.keys()
    for k in merged:
        assert torch.equal(merged[k], merge_tensors([sc[k], sb[k]], [0.7, 0.3], "ties", base=base[k], density=0.5)), k
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|EOT|>"  # the checkpoint's tokenizer
    card = (out / "README.md").read_text()
    assert "Method `ties`, density 0.5" in card and f"| 1 | `{ckpt}` | steptrain checkpoint | 0.7 |" in card
    assert f"Base (θ_base): `{assets['model']}`" in card
    AutoModelForCausalLM.from_pretrained(out)  # loads
