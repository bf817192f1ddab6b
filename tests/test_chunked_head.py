"""objective.head_chunk_tokens: the LM head's log-probs chunk by chunk (objectives/chunked_head.py) equal the
plain full-logits path in value and gradient, for the function itself, every objective, every model kind in
steptrain, and SFT / DPO / GRPO runs; and where it cannot run, the config says so."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from steptrain.cli import main
from steptrain.config import ConfigError, load_config
from steptrain.models.forward import chunkable_head, lm_forward, lm_head_input, lm_logits
from steptrain.objectives import gathered_logps, lm_loss_sum, sequence_logps
from steptrain.objectives.chunked_head import HeadInput, head_token_logps
from tests.conftest import base_overrides, train_losses

N, H, V = 23, 8, 37


def _problem(dtype, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 5, 6, 17]] = -100
    upstream = torch.randn(N, generator=g, dtype=dtype)  # a non-trivial d loss / d logp
    return hidden, weight, b, targets, upstream


def _plain(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    picked = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    hit = logits.argmax(-1) == targets
    return torch.where(targets != -100, picked, 0.0), hit & (targets != -100)


def _grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    logp, hit = fn(hidden, weight, bias, targets)
    grads = torch.autograd.grad((logp * upstream.to(logp.dtype)).sum(), leaves)
    return logp.detach(), hit, grads


@pytest.mark.parametrize("chunk", [1, 4, 5, 7, N - 4, N, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_plain_head_float64(chunk, bias):
    hidden, weight, b, targets, upstream = _problem(torch.float64, bias)
    def chunked(h, w, b_, t):
        return head_token_logps(HeadInput(h, w, b_, chunk), t)

    got, got_hit, got_grads = _grads(chunked, hidden, weight, b, targets, upstream)
    want, want_hit, want_grads = _grads(_plain, hidden, weight, b, targets, upstream)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.equal(got_hit, want_hit)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    assert torch.all(got_grads[0][targets == -100] == 0)  # ignored positions: exactly no gradient


@pytest.mark.parametrize("chunk", [3, 8, N])
def test_float32_close_to_the_plain_head(chunk):
    hidden, weight, b, targets, upstream = _problem(torch.float32, bias=True, seed=1)
    got, _, got_grads = _grads(lambda h, w, b_, t: head_token_logps(HeadInput(h, w, b_, chunk), t),
                               hidden, weight, b, targets, upstream)
    want, _, want_grads = _grads(_plain, hidden, weight, b, targets, upstream)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bf16_head_matmul_like_autocast_softmax_in_float32():
    hidden, weight, _, targets, _ = _problem(torch.float32, seed=2)
    got, _ = head_token_logps(HeadInput(hidden, weight, None, 4, torch.bfloat16), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    want = -F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got.sum(), [hidden, weight])
    g_want = torch.autograd.grad(want.sum(), [hidden, weight])
    for a, b in zip(g_got, g_want, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 matmuls in both, other rounding order


def test_all_targets_ignored_and_frozen_weight():
    hidden, weight, _, targets, _ = _problem(torch.float64)
    weight = weight.detach()  # a frozen head (LoRA elsewhere): only the hidden states get a gradient
    logp, hit = head_token_logps(HeadInput(hidden, weight, None, 4), torch.full_like(targets, -100))
    assert torch.all(logp == 0) and not hit.any()
    logp, _ = head_token_logps(HeadInput(hidden, weight, None, 4), targets)
    (g,) = torch.autograd.grad(logp.sum(), [hidden])
    (w,) = torch.autograd.grad(_plain(hidden, weight, None, targets)[0].sum(), [hidden])
    torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def _batch_problem(seed=0, B=3, T=9, vocab=V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = torch.randn(vocab, H, generator=g, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    return hidden, weight, labels


def test_lm_loss_sum_with_audio_weighting_matches_full_logits():
    hidden, weight, labels = _batch_problem()
    audio = (20, 30)
    head = HeadInput(hidden, weight, None, 5)
    (loss_c, m_c), (loss_p, m_p) = (lm_loss_sum(x, labels, audio, 0.3) for x in (head, F.linear(hidden, weight)))
    torch.testing.assert_close(loss_c, loss_p.to(loss_c.dtype), atol=1e-6, rtol=1e-6)
    for key in m_p:
        torch.testing.assert_close(m_c[key].double(), m_p[key].double(), atol=1e-5, rtol=1e-6)
    g_c = torch.autograd.grad(loss_c, [hidden, weight])
    g_p = torch.autograd.grad(loss_p, [hidden, weight])
    for a, b in zip(g_c, g_p, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-6, rtol=1e-6)


def test_sequence_and_gathered_logps_match_full_logits():
    hidden, weight, labels = _batch_problem(seed=3)
    head, logits = HeadInput(hidden, weight, None, 4), F.linear(hidden, weight)
    mask = labels % 3 != 0
    for a, b in ((sequence_logps(head, labels, mask), sequence_logps(logits, labels, mask)),):
        torch.testing.assert_close(a[0], b[0].to(a[0].dtype), atol=1e-6, rtol=1e-6)
        assert torch.equal(a[1], b[1])
    positions = torch.tensor([[2, 2, 5, 7], [1, 3, 3, 0], [8, 4, 2, 6]])
    targets = torch.tensor([[4, 9, -100, 1], [0, 2, 3, -100], [5, 6, 7, 8]])
    a, b = gathered_logps(head, positions, targets), gathered_logps(logits, positions, targets)
    torch.testing.assert_close(a[0], b[0].to(a[0].dtype), atol=1e-6, rtol=1e-6)
    ga = torch.autograd.grad(a[0].sum(), [hidden, weight])
    gb = torch.autograd.grad(b[0].sum(), [hidden, weight])
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y.to(x.dtype), atol=1e-6, rtol=1e-6)
    with pytest.raises(IndexError):
        head[..., :2]


# --- the models in steptrain ------------------------------------------------------------------------
def _models():
    from transformers import AutoModelForCausalLM

    from steptrain.models.presets import preset_config
    from steptrain.models.speech.modeling import SpeechLMForCausalLM
    from steptrain.models.speech.presets import speech_preset_config
    from steptrain.models.step1.modeling import Step1ForCausalLM
    from steptrain.models.step1.presets import step1_preset_config

    torch.manual_seed(0)
    qwen = AutoModelForCausalLM.from_config(preset_config("tiny", vocab_size=211))
    tied_cfg = preset_config("tiny", vocab_size=211)
    tied_cfg.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(tied_cfg)
    step1_cfg = step1_preset_config("step-audio-tts-3b", hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=6, num_attention_groups=2, vocab_size=211)
    step1 = Step1ForCausalLM(step1_cfg)
    speech = SpeechLMForCausalLM(speech_preset_config("tiny-speech", vocab_size=211))
    return {"qwen2": qwen, "qwen2-tied": tied, "step1": step1, "speech": speech}


@pytest.fixture(scope="module")
def models():
    return _models()


def _lm_batch(vocab=211, B=2, T=12):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 10:] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": torch.arange(T).expand(B, T).contiguous()}


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied", "step1", "speech"])
def test_every_model_kind_gives_the_same_loss_and_gradients(models, name):
    model = models[name]
    model.train()
    if name == "qwen2-tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = _lm_batch()
    assert chunkable_head(model) is None
    grads = []
    for forward in (lm_logits, functools.partial(lm_head_input, chunk_tokens=5)):
        model.zero_grad(set_to_none=True)
        out = forward(model, batch)
        assert isinstance(out, HeadInput) == (forward is not lm_logits)
        loss, m = lm_loss_sum(out, batch["labels"])
        loss.backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (plain, g_plain), (chunked, g_chunked) = grads
    assert chunked == pytest.approx(plain, rel=1e-6, abs=1e-6)
    assert g_plain.keys() == g_chunked.keys()
    for k in g_plain:
        torch.testing.assert_close(g_chunked[k], g_plain[k], atol=1e-5, rtol=1e-4, msg=k)
    head = lm_head_input(model, batch, chunk_tokens=5)
    torch.testing.assert_close(head.logits(), lm_logits(model, batch), atol=1e-6, rtol=1e-6)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head's own forward is back


def test_a_peft_wrapped_head_falls_back_to_full_logits(models):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(models["qwen2"]), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "not a plain Linear" in chunkable_head(model)
    out = lm_head_input(model, _lm_batch(), chunk_tokens=4)
    assert isinstance(out, torch.Tensor) and out.shape[-1] == 211
    lora = get_peft_model(copy.deepcopy(models["qwen2"]), LoraConfig(r=2, target_modules=["q_proj"]))
    assert chunkable_head(lora) is None and isinstance(lm_head_input(lora, _lm_batch()), HeadInput)
    capped = copy.deepcopy(models["qwen2"])
    capped.config.final_logit_softcapping = 30.0  # Gemma-2 style: a transform after the projection
    assert "final_logit_softcapping" in chunkable_head(capped)


# --- config ------------------------------------------------------------------------------------------
def test_switch_default_and_contradictions(assets, tmp_path):
    cfg = load_config(base_overrides(assets, tmp_path))
    assert cfg.objective.head_chunk_tokens == 0 and lm_forward(cfg) is lm_logits
    on = load_config(base_overrides(assets, tmp_path, "objective.head_chunk_tokens=256"))
    assert lm_forward(on).keywords == {"chunk_tokens": 256}
    for match, extra in (
        ("must be >= 0", ["objective.head_chunk_tokens=-1"]),
        ("trains a scalar head", ["experiment=reward_model", "objective.head_chunk_tokens=64"]),
        ("engine.zero_stage=3", ["engine=deepspeed", "engine.zero_stage=3", "objective.head_chunk_tokens=64"]),
        ("engine=megatron", ["engine=megatron", "objective.head_chunk_tokens=64"]),
        ("find_unused_parameters", ["engine=ddp", "engine.find_unused_parameters=true", "objective.head_chunk_tokens=8"]),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(base_overrides(assets, tmp_path, *extra))


# --- runs ---------------------------------------------------------------------------------------------
@pytest.fixture
def head_calls(monkeypatch):
    """How many times the objectives ran the chunked head."""
    import steptrain.objectives.lm as lm

    calls = []
    real = lm.head_token_logps

    def counted(head, targets):
        calls.append(head.chunk_tokens)
        return real(head, targets)

    monkeypatch.setattr(lm, "head_token_logps", counted)
    return calls


def test_sft_run_same_losses_with_the_chunked_head(assets, tmp_path, head_calls):
    losses = {}
    for chunk in (0, 7):
        out = tmp_path / f"c{chunk}"
        assert main(["train", *base_overrides(assets, out, "trainer.max_steps=2",
                                              f"objective.head_chunk_tokens={chunk}")]) == 0
        losses[chunk] = train_losses(out)
        assert bool(head_calls) == bool(chunk) and set(head_calls) <= {chunk}
    assert losses[0].keys() == losses[7].keys() == {1, 2}
    for step in losses[0]:
        assert losses[7][step] == pytest.approx(losses[0][step], rel=1e-6, abs=1e-6)


def test_dpo_run_same_losses_with_the_chunked_head(assets, tmp_path, head_calls):
    from data_pipelines.preference_corpus import write_preference_corpus
    from tests.test_dpo import dpo_args

    pref = write_preference_corpus(tmp_path / "pref", n_train=24, n_eval=8, seed=0)
    results = {}
    for chunk in (0, 5):
        out = tmp_path / f"c{chunk}"
        assert main(["train", *dpo_args(assets, pref, out, "trainer.max_steps=2",
                                        f"objective.head_chunk_tokens={chunk}")]) == 0
        results[chunk] = train_losses(out)
        assert bool(head_calls) == bool(chunk)  # the policy and the precomputed reference
    assert len(results[0]) == 2
    for step in results[0]:
        assert results[5][step] == pytest.approx(results[0][step], rel=1e-6, abs=1e-6)


def test_grpo_policy_log_probs_and_loss_agree(assets, tmp_path):
    from steptrain.engines.single import SingleEngine
    from steptrain.inputs import resolve_inputs
    from steptrain.models.loader import load_model, load_tokenizer
    from steptrain.recipes.grpo import GRPOTask
    from steptrain.rollout.prompts import load_prompts
    from steptrain.rollout.rewards import build_rewards
    from tests.test_grpo import _grpo

    cfg = load_config(_grpo(assets, tmp_path, "objective.head_chunk_tokens=3"))
    tok = load_tokenizer(cfg.model)
    engine = SingleEngine(cfg.engine, cfg.trainer)
    engine.module, _ = load_model(cfg.model, tok)
    rows = [{"_source": f"p:{i}", "messages": [{"role": "user", "content": f"copy: {i} {i}"}]} for i in range(2)]
    inputs = resolve_inputs(cfg, tok)
    prompts, _ = load_prompts(rows, tok, cfg, inputs)
    task = GRPOTask(cfg, engine, prompts, tok, build_rewards(cfg, engine.device, tok, inputs.template), None, None,
                    [tok.eos_token_id])
    assert task.forward is not lm_logits
    torch.manual_seed(0)
    batch = task.batch([[0], [1]])
    model = engine.module
    plain = task.logps(functools.partial(lm_logits, model), batch)
    chunked = task.logps(functools.partial(task.forward, model), batch)
    mask = batch["labels"][:, 1:] != -100
    assert mask.any()
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    assert torch.all(chunked[~mask] == 0)
    batch["ref_logps"] = plain + 0.01 * torch.randn_like(plain)  # a KL term too
    from omegaconf import OmegaConf

    OmegaConf.set_readonly(cfg, False)
    cfg.objective.kl_beta = 0.1
    out = []
    for forward in (lm_logits, task.forward):
        model.zero_grad(set_to_none=True)
        loss, stats = task.score(forward(model, batch), batch)
        loss.backward()
        out.append((loss.item(), stats, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-6, rtol=1e-6)
    for k in out[0][2]:
        torch.testing.assert_close(out[1][2][k], out[0][2][k], atol=1e-5, rtol=1e-4)  # float32 rounding


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["engine=ddp"], ["engine=deepspeed", "engine.zero_stage=2"]])
def test_data_parallel_runs_with_the_chunked_head_match_one_plain_process(assets, tmp_path, engine):
    from tests.conftest import TORCHRUN, run_cli

    common = ["trainer.max_steps=3", "trainer.batch_size=2", "peft=lora", "peft.r=4", "peft.dropout=0"]
    assert main(["train", *base_overrides(assets, tmp_path / "single", *common, "trainer.grad_accum=2")]) == 0
    proc = run_cli(["train", *base_overrides(assets, tmp_path / "dp", *common, *engine, "objective.head_chunk_tokens=16")],
                   launcher=TORCHRUN)
    assert "computing full logits" not in proc.stdout + proc.stderr  # the chunked head ran (no fallback)
    single, dp = train_losses(tmp_path / "single"), train_losses(tmp_path / "dp")
    assert sorted(dp) == [1, 2, 3]
    for step in single:
        assert dp[step] == pytest.approx(single[step], rel=1e-5), step
