"""engine=megatron for real on CPU (megatron-core on gloo through the CPU shim), under torchrun.

Tensor / pipeline / interleaved-pipeline parallel runs give the single-process loss curve; TP=2 logits equal
HF's; a checkpoint saved at TP=2 resumes at TP=1 and PP=2 with identical next losses; full and merged-LoRA
exports load with AutoModelForCausalLM and give the Megatron model's logits; layouts megatron cannot build
fail before launch.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from steptrain.cli import main
from steptrain.config import ConfigError, load_config
from steptrain.models import megatron_bridge as bridge
from steptrain.models.forward import lm_logits
from tests.conftest import ROOT, TORCHRUN, base_overrides, read_metrics, run_cli, train_losses

MG = ["engine=megatron", "engine.megatron_cpu=true"]
FOUR = [*TORCHRUN[:-1], "4"]


def _model(dst, tokenizer_dir, *, tied: bool, arch: str = "qwen2"):
    """A 4-layer Qwen2 or LLaMA (4 heads, 2 KV groups) with an odd vocabulary (padded under TP=2)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok) + (1 - len(tok) % 2)
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = config_cls(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("mg_models")
    return {tied: _model(root / f"tied{int(tied)}", assets["model"], tied=tied) for tied in (False, True)}


def _args(assets, model, out, *extra) -> list[str]:
    return base_overrides(assets, out, f"model.path={model}", f"data.eval_files=[{assets['eval']}]", "trainer.max_steps=4",
                          "trainer.eval_batches=2", *extra)


def _probe(out_file, *args, nproc: int = 2) -> dict:
    """Logits of the Megatron engine (tests/megatron_probe.py) on two fixed eval batches, padded and packed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*TORCHRUN[:-1], str(nproc), str(ROOT / "tests" / "megatron_probe.py"), str(out_file), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_file, weights_only=False)


def _max_logit_gap(probe: dict, hf_dir) -> float:
    """Largest |Megatron - HF| logit over the real (non-padding) tokens of the probe's batches."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    gap = 0.0
    for batch, logits in zip(probe["batches"], probe["logits"], strict=True):
        with torch.no_grad():
            ref = lm_logits(model, batch)
        assert logits.shape == ref.shape
        real = batch["attention_mask"].bool() if "attention_mask" in batch else batch["input_ids"] >= 0
        gap = max(gap, float((logits - ref)[real].abs().max()))
    return gap


def _same_curve(a, b, rel=1e-5):
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) and la
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=rel), (step, la, lb)


# --- no launch -----------------------------------------------------------------------------------------
def test_bridge_round_trips_hf_weights_and_tp_shards(models):
    hf = AutoModelForCausalLM.from_pretrained(models[False])
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    vocab = bridge.padded_vocab(hf.config, 2)
    full = bridge.to_megatron(state, hf.config, vocab)
    assert full["embedding.word_embeddings.weight"].shape[0] == vocab == hf.config.vocab_size + 1
    back = bridge.to_hf(full, hf.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    for name, t in full.items():
        pieces = [bridge.shard(name, t, r, 2) for r in range(2)]
        assert torch.equal(bridge.unshard(name, pieces), t)
    # rank 1's fc1 piece is [gate_1; up_1], not the second half of [gate; up]
    fc1 = bridge.shard("decoder.layers.0.mlp.linear_fc1.weight", full["decoder.layers.0.mlp.linear_fc1.weight"], 1, 2)
    gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate[64:], up[64:]]))


def test_layouts_megatron_cannot_build_fail_before_launch(assets, tmp_path):
    base = ["model.preset=tiny", f"model.tokenizer_path={assets['model']}", f"data.train_files=[{assets['train']}]",
            f"output_dir={tmp_path}", *MG]
    cases = {
        "engine.tensor_parallel=3": r"engine\.tensor_parallel=3 must divide the model's attention heads \(4\)",
        "engine.tensor_parallel=4": r"KV groups \(num_key_value_heads=2\)",
        "engine.pipeline_parallel=4": r"engine\.pipeline_parallel=4 x virtual_pipeline=1 exceeds the model's 2 layers",
        "engine.zero_stage=3": r"engine=megatron cannot be combined with DeepSpeed ZeRO",
        "engine.virtual_pipeline=2": r"engine\.virtual_pipeline=2 needs engine\.pipeline_parallel >= 2",
        "trainer.generate_eval=4": r"trainer\.generate_eval is not supported on engine=megatron",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config([*base, override])
    with pytest.raises(ConfigError, match=r"objective\.reference=adapter_off is not supported on engine=megatron"):
        load_config([*base, "experiment=dpo", "peft=lora", "objective.reference=adapter_off"])
    with pytest.raises(ConfigError, match=r"engine=megatron runs recipe=sft\|dpo \(not reward\)"):
        load_config([*base, "experiment=reward_model"])
    load_config([*base, "engine.tensor_parallel=2", "engine.pipeline_parallel=2"])  # a valid layout passes
    odd = tmp_path / "odd"
    _model(odd, assets["model"], tied=False)
    cfg = (odd / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 129')
    (odd / "config.json").write_text(cfg)
    with pytest.raises(ConfigError, match=r"engine\.tensor_parallel=2 must divide the model's intermediate_size \(129\)"):
        load_config([*base[2:], f"model.path={odd}", "engine.tensor_parallel=2"])


# --- torchrun ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tp2_logits_equal_hf_logits(assets, models, tmp_path, arch):
    model = models[False] if arch == "qwen2" else _model(tmp_path / "llama", assets["model"], tied=False, arch=arch)
    probe = _probe(tmp_path / "p.pt", *_args(assets, model, tmp_path / "out", *MG, "engine.tensor_parallel=2"))
    assert probe["batches"][1]["position_ids"][0].tolist().count(0) == 2  # the packed row holds two sequences
    assert _max_logit_gap(probe, model) < 1e-4


@pytest.mark.slow
def test_pipeline_interleaved_pipeline_and_data_parallel_match_single_process(assets, models, tmp_path):
    common = ["trainer.grad_accum=2"]
    assert main(["train", *_args(assets, models[False], tmp_path / "single", *common)]) == 0
    run_cli(["train", *_args(assets, models[False], tmp_path / "dp2", *MG)], launcher=TORCHRUN)  # 2 replicas x 1
    run_cli(["train", *_args(assets, models[False], tmp_path / "pp2", *common, *MG, "engine.pipeline_parallel=2")],
            launcher=TORCHRUN)
    run_cli(["train", *_args(assets, models[False], tmp_path / "vpp", *common, *MG, "engine.pipeline_parallel=2",
                             "engine.virtual_pipeline=2")], launcher=TORCHRUN)
    _same_curve(tmp_path / "single", tmp_path / "pp2")
    _same_curve(tmp_path / "single", tmp_path / "vpp")
    _same_curve(tmp_path / "single", tmp_path / "dp2")
    losses = train_losses(tmp_path / "vpp")
    assert losses[4] < losses[1]
    evals = [[r["eval/loss"] for r in read_metrics(tmp_path / d) if "eval/loss" in r] for d in ("single", "pp2")]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)


@pytest.mark.slow
def test_tp2_pp2_on_four_ranks_trains_and_exports_to_hf(assets, models, tmp_path):
    """Tied embeddings across pipeline stages; the export's logits are the Megatron model's."""
    common = ["trainer.grad_accum=2"]
    assert main(["train", *_args(assets, models[True], tmp_path / "single", *common)]) == 0
    run_cli(["train", *_args(assets, models[True], tmp_path / "mg", *common, *MG, "engine.tensor_parallel=2",
                             "engine.pipeline_parallel=2")], launcher=FOUR)
    _same_curve(tmp_path / "single", tmp_path / "mg")
    ckpt = tmp_path / "mg" / "checkpoints" / "step_4"
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    base = AutoModelForCausalLM.from_pretrained(models[True])
    assert exported.config.tie_word_embeddings and exported.config.vocab_size == base.config.vocab_size  # unpadded
    probe = _probe(tmp_path / "p.pt", "--ckpt", str(ckpt), "engine.tensor_parallel=2", "engine.pipeline_parallel=1")
    assert _max_logit_gap(probe, tmp_path / "hf") < 1e-4
    assert _max_logit_gap(probe, models[True]) > 1e-2  # it trained: the export is not the base model


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_resumes_at_tp1_and_pp2_with_identical_losses(assets, models, tmp_path):
    common = ["trainer.max_steps=6", "trainer.save_every=4", *MG]
    run_cli(["train", *_args(assets, models[False], tmp_path / "tp2", *common, "engine.tensor_parallel=2")],
            launcher=TORCHRUN)
    reference = train_losses(tmp_path / "tp2")
    # tp1 too in a fresh process: the Megatron engine's parallel state and CPU shim are process-wide
    for name, launcher, layout in (("tp1", None, []), ("pp2", TORCHRUN, ["engine.pipeline_parallel=2"])):
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "tp2" / "checkpoints" / "step_4", out / "checkpoints" / "step_4")
        proc = run_cli(["train", *_args(assets, models[False], out, *common, *layout, "resume=auto")], launcher=launcher)
        assert "resumed from" in proc.stderr + proc.stdout
        resumed = train_losses(out)
        assert sorted(resumed) == [5, 6]  # step 6 also checks the optimizer moments came back
        for step in (5, 6):
            assert resumed[step] == pytest.approx(reference[step], rel=1e-6), (name, step)


@pytest.mark.slow
def test_lora_tp2_matches_single_and_merged_export_equals_megatron_logits(assets, models, tmp_path):
    lora = ["peft=lora", "peft.dropout=0", "peft.train_new_tokens=false", "peft.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj]"]
    assert main(["train", *_args(assets, models[False], tmp_path / "single", *lora)]) == 0
    run_cli(["train", *_args(assets, models[False], tmp_path / "mg", *lora, *MG, "engine.tensor_parallel=2")],
            launcher=TORCHRUN)
    _same_curve(tmp_path / "single", tmp_path / "mg")
    ckpt = tmp_path / "mg" / "checkpoints" / "step_4"
    assert main(["export", str(ckpt), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    probe = _probe(tmp_path / "p.pt", "--ckpt", str(ckpt))
    assert _max_logit_gap(probe, tmp_path / "merged") < 1e-4
    assert _max_logit_gap(probe, models[False]) > 1e-3


@pytest.mark.slow
def test_dpo_runs_unchanged_on_a_pipeline(assets, models, tmp_path):
    from data_pipelines.preference_corpus import write_preference_corpus

    pref = write_preference_corpus(tmp_path / "pref", n_train=96, n_eval=16, seed=0)
    args = ["experiment=dpo", f"model.path={models[False]}", f"data.train_files=[{pref['train']}]",
            f"data.eval_files=[{pref['eval']}]", "data.max_length=64", "trainer.batch_size=4", "trainer.grad_accum=2",
            "optim.lr=2e-3", "optim.warmup_ratio=0", "trainer.max_steps=3", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.plot=false"]
    assert main(["train", *args, f"output_dir={tmp_path / 'single'}"]) == 0
    run_cli(["train", *args, f"output_dir={tmp_path / 'pp2'}", *MG, "engine.pipeline_parallel=2"], launcher=TORCHRUN)
    _same_curve(tmp_path / "single", tmp_path / "pp2")
    accuracy = [[r["eval/rewards/accuracy"] for r in read_metrics(tmp_path / d) if "eval/rewards/accuracy" in r]
                for d in ("single", "pp2")]
    assert accuracy[0] == accuracy[1]


def test_megatron_without_cuda_needs_the_explicit_cpu_switch(assets, models, tmp_path, capsys):
    assert main(["train", *_args(assets, models[False], tmp_path / "x", "engine=megatron")]) == 2
    assert "engine=megatron needs CUDA; on a machine without it set engine.megatron_cpu=true" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_speech_llm_on_a_pipeline_keeps_encoder_and_adapter_on_the_first_stage(assets, tmp_path):
    from safetensors.torch import load_file

    from data_pipelines.speech_corpus import write_speech_corpus

    speech = write_speech_corpus(tmp_path / "speech", n_train=32, n_eval=8, seed=0)
    args = ["model.preset=tiny-speech", f"model.tokenizer_path={assets['model']}",
            f"data.train_files=[{speech['asr_train']}]", f"data.eval_files=[{speech['asr_eval']}]",
            "data.max_length=128", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.max_steps=3",
            "optim.lr=2e-3", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]
    assert main(["train", *args, f"output_dir={tmp_path / 'single'}"]) == 0
    run_cli(["train", *args, f"output_dir={tmp_path / 'pp2'}", *MG, "engine.pipeline_parallel=2"], launcher=TORCHRUN)
    _same_curve(tmp_path / "single", tmp_path / "pp2")
    single = load_file(tmp_path / "single" / "checkpoints" / "step_3" / "model.safetensors")
    mg = load_file(tmp_path / "pp2" / "checkpoints" / "step_3" / "model.safetensors")
    assert mg.keys() == single.keys() and any(k.startswith("audio_adapter.") for k in mg)
    for k in single:
        torch.testing.assert_close(mg[k], single[k], rtol=1e-4, atol=1e-4)  # Adam: lr 2e-3 steps
    assert main(["export", str(tmp_path / "pp2" / "checkpoints" / "step_3"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
