"""Speech LLM (encoder + adapter + Qwen2): lengths, patch placement, save/load, freezing, generation."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from steptrain.models.presets import preset_config
from steptrain.models.speech import (
    SPEECH_PRESETS,
    SpeechLMConfig,
    SpeechLMForCausalLM,
    num_patches,
    num_patches_tensor,
)
from steptrain.models.speech.presets import speech_preset_config

V = 300
BOS, EOS, PAD = 1, 2, 0
A_START, A_END, A_PATCH = 297, 298, 299
IDS = {"audio_start_id": A_START, "audio_end_id": A_END, "audio_patch_id": A_PATCH}


def tiny_config(**kw) -> SpeechLMConfig:
    return speech_preset_config(
        "tiny-speech", vocab_size=V, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **{**IDS, **kw}
    )


@functools.cache
def _tiny_model() -> SpeechLMForCausalLM:
    torch.manual_seed(0)
    return SpeechLMForCausalLM(tiny_config()).eval()


@pytest.fixture
def model() -> SpeechLMForCausalLM:
    return _tiny_model()


def audio_row(n_frames: int, prefix=(5,), suffix=(7, 8)) -> list[int]:
    return [*prefix, A_START, *([A_PATCH] * num_patches(n_frames)), A_END, *suffix]


def make_batch(lengths=(50, 31), t_max=None, seed=1):
    """Two audio rows (clips of different lengths, right-padded) and one text-only row."""
    g = torch.Generator().manual_seed(seed)
    t_max = t_max or max(lengths)
    feats = torch.randn(len(lengths), 128, t_max, generator=g)
    rows = [
        audio_row(lengths[0]),
        audio_row(lengths[1], prefix=(9, 10, 11), suffix=(12,)),
        list(range(20, 30)),
    ]
    width = max(map(len, rows))
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, feats, torch.tensor(lengths)


# --- length arithmetic ----------------------------------------------------------------------------


def test_num_patches_known_values():
    assert num_patches(1) == 0 and num_patches(2) == 0
    assert num_patches(3) == 1 and num_patches(4) == 1
    assert num_patches(2500) == 313  # 25 s chunk: 1250 -> 625 -> 313
    assert num_patches(3000) == 375
    lens = torch.arange(0, 3001)
    assert num_patches_tensor(lens).tolist() == [num_patches(int(n)) for n in lens]


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=3, max_value=3000))
def test_num_patches_matches_encoder_output(n):
    torch.manual_seed(0)
    out, counts = _tiny_model().encode_audio(torch.randn(1, 128, n), torch.tensor([n]))
    assert out.shape[1] == num_patches(n) == int(counts[0])


def test_batched_clips_equal_single_clips(model):
    lengths = [37, 120, 64]
    feats = torch.randn(3, 128, 120)
    with torch.no_grad():
        out, counts = model.encode_audio(feats, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            alone, _ = model.encode_audio(feats[i : i + 1, :, :n], torch.tensor([n]))
            assert int(counts[i]) == alone.shape[1] == num_patches(n)
            torch.testing.assert_close(out[i, : int(counts[i])], alone[0], rtol=1e-5, atol=1e-5)


# --- placement, save/load -------------------------------------------------------------------------


def test_audio_changes_only_logits_at_and_after_patches(model):
    ids, mask, feats, lens = make_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens).logits
        b = model(input_ids=ids, attention_mask=mask, audio_features=feats * 2, audio_lengths=lens).logits
    first = int((ids[0] == A_PATCH).nonzero()[0])
    torch.testing.assert_close(a[0, :first], b[0, :first])
    assert not torch.allclose(a[0, first:], b[0, first:])
    torch.testing.assert_close(a[2], b[2])  # text-only row untouched


def test_save_and_auto_load_identical_logits(model, tmp_path):
    ids, mask, feats, lens = make_batch()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SpeechLMForCausalLM)
    assert isinstance(loaded.llm, Qwen2ForCausalLM)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens).logits
        b = loaded(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens).logits
    assert torch.equal(a, b)
    assert torch.equal(model.audio_encoder.embed_positions, loaded.audio_encoder.embed_positions)


def test_patch_count_mismatch_raises_clear_error(model):
    ids, mask, feats, lens = make_batch()
    bad = ids.clone()
    bad[0, 2] = 5  # drop one patch of clip 0
    with pytest.raises(ValueError, match=r"lengths \[6, 4\].*lengths \[5, 4\]"):
        model(input_ids=bad, attention_mask=mask, audio_features=feats, audio_lengths=lens)
    with pytest.raises(ValueError, match="no audio_features"):
        model(input_ids=ids, attention_mask=mask)


def test_loss_is_shifted_mean(model):
    ids, mask, feats, lens = make_batch()
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == A_PATCH, -100)
    out = model(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens, labels=labels)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, ref)


# --- training paths -------------------------------------------------------------------------------


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def test_freeze_encoder_grads():
    torch.manual_seed(0)
    m = SpeechLMForCausalLM(tiny_config()).train()
    assert not any(p.requires_grad for p in m.audio_encoder.parameters())
    ids, mask, feats, lens = make_batch()
    m(
        input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens, labels=ids
    ).loss.backward()
    g = _grads(m)
    assert all(v is None for k, v in g.items() if k.startswith("audio_encoder."))
    assert all(v is not None and v.abs().sum() > 0 for k, v in g.items() if k.startswith("audio_adapter."))
    assert g["llm.model.embed_tokens.weight"] is not None and g["llm.lm_head.weight"] is not None


def test_dummy_encoder_path_reaches_params_and_keeps_logits():
    torch.manual_seed(0)
    m = SpeechLMForCausalLM(tiny_config(freeze_encoder=False))
    ids = torch.randint(3, 290, (2, 9))
    m.eval()
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    m.train()
    out = m(input_ids=ids, labels=ids)
    assert torch.equal(out.logits.detach(), ref)
    out.loss.backward()
    for name, p in m.named_parameters():
        if name.startswith(("audio_encoder.", "audio_adapter.")):
            assert p.grad is not None, name  # in the graph (zero-valued)
            assert torch.count_nonzero(p.grad) == 0, name
    # switched off: the encoder is not in the graph
    m.zero_grad(set_to_none=True)
    m.config.run_encoder_on_dummy = False
    m(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in m.audio_encoder.parameters())


def test_gradient_checkpointing_runs():
    torch.manual_seed(0)
    m = SpeechLMForCausalLM(tiny_config(freeze_encoder=False)).train()
    kwargs = {"use_reentrant": False}
    if hasattr(m, "activation_checkpointing_enable"):  # transformers 5.x name
        m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert m.audio_encoder.gradient_checkpointing
    ids, mask, feats, lens = make_batch()
    m(
        input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens, labels=ids
    ).loss.backward()
    assert m.audio_encoder.conv1.weight.grad is not None


# --- generation ----------------------------------------------------------------------------------


def test_generate_with_audio_equals_manual_greedy(model):
    ids, mask, feats, lens = make_batch()
    # batch of the two audio rows, each alone (no padding ambiguity) and together with right-aligned
    # prompts is left to the caller; here: one prompt per clip.
    for i in range(2):
        n = int(mask[i].sum())
        prompt = ids[i : i + 1, :n]
        f, ln = feats[i : i + 1, :, : int(lens[i])], lens[i : i + 1]
        with torch.no_grad():
            gen = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                audio_features=f,
                audio_lengths=ln,
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD,
            )
            seq = prompt
            for _ in range(6):  # no cache: every step re-encodes the audio over the full sequence
                logits = model(input_ids=seq, audio_features=f, audio_lengths=ln, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(gen, seq)


def test_generate_batched_left_padded(model):
    """Two prompts of different lengths with audio, left-padded, match their single-row generations."""
    ids, mask, feats, lens = make_batch()
    rows = [ids[i, : int(mask[i].sum())] for i in range(2)]
    width = max(len(r) for r in rows)
    batch = torch.full((2, width), PAD)
    am = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        am[i, width - len(r) :] = 1
    with torch.no_grad():
        gen = model.generate(
            batch,
            attention_mask=am,
            audio_features=feats,
            audio_lengths=lens,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD,
        )
        for i, r in enumerate(rows):
            single = model.generate(
                r[None],
                attention_mask=torch.ones(1, len(r), dtype=torch.long),
                audio_features=feats[i : i + 1, :, : int(lens[i])],
                audio_lengths=lens[i : i + 1],
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD,
            )
            assert torch.equal(gen[i, width:], single[0, len(r) :])


# --- assembly -------------------------------------------------------------------------------------


def test_from_parts_with_saved_qwen2_and_encoder(model, tmp_path):
    torch.manual_seed(3)
    llm = Qwen2ForCausalLM(preset_config("tiny", vocab_size=V, eos_token_id=EOS, pad_token_id=PAD)).eval()
    llm.save_pretrained(tmp_path / "llm")
    enc_cfg = model.config.encoder_config.to_dict()
    fresh = SpeechLMForCausalLM.from_parts(str(tmp_path / "llm"), None, encoder_config=enc_cfg, **IDS).eval()
    assert fresh.config.encoder_config.d_model == 64
    ids, mask, feats, lens = make_batch()
    text = torch.randint(3, 290, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=text).logits, llm(input_ids=text).logits)
        fresh(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens)
    assert not any(p.requires_grad for p in fresh.audio_encoder.parameters())

    model.save_encoder(tmp_path / "enc")
    assembled = SpeechLMForCausalLM.from_parts(str(tmp_path / "llm"), str(tmp_path / "enc"), **IDS).eval()
    with torch.no_grad():
        a, _ = model.encode_audio(feats, lens)
        b, _ = assembled.encode_audio(feats, lens)
    assert torch.equal(a, b)
    assembled.save_pretrained(tmp_path / "full")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        x = assembled(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens).logits
        y = again(input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lens).logits
    assert torch.equal(x, y)


def test_resize_token_embeddings_delegates():
    torch.manual_seed(0)
    m = SpeechLMForCausalLM(tiny_config())
    m.resize_token_embeddings(V + 8)
    assert m.get_input_embeddings().weight.shape[0] == V + 8
    assert m.llm.lm_head.weight.shape[0] == V + 8
    assert m.config.llm_config.vocab_size == V + 8


def _analytic_counts(enc, llm_hidden: int) -> tuple[int, int]:
    d, h = enc.d_model, enc.adapter_hidden
    layer = (4 * d * d + 3 * d) + (8 * d * d + 5 * d) + 4 * d  # attention (k without bias), MLP 4x, 2 LNs
    encoder = (enc.n_mels * d * 3 + d) + (d * d * 3 + d) + enc.n_layers * layer + 2 * d
    adapter = (d * d * 3 + d) + (d * h + h) + (h * llm_hidden + llm_hidden)
    return encoder, adapter


def test_step_audio_2_mini_config_param_count(model):
    enc_tiny, ada_tiny = _analytic_counts(model.config.encoder_config, model.config.llm_config.hidden_size)
    assert enc_tiny == sum(p.numel() for p in model.audio_encoder.parameters())
    assert ada_tiny == sum(p.numel() for p in model.audio_adapter.parameters())

    cfg = speech_preset_config("step-audio-2-mini")
    enc, llm = cfg.encoder_config, cfg.llm_config
    assert (enc.d_model, enc.n_heads, enc.n_layers, enc.adapter_hidden) == (1280, 20, 32, 2048)
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert llm.vocab_size == 158720 and cfg.audio_start_id == 151688
    encoder, adapter = _analytic_counts(enc, llm.hidden_size)
    assert encoder == 635_048_960  # Whisper-large-v3 encoder size
    assert adapter == 14_883_584
    assert {"tiny-speech", "step-audio-2-mini"} <= set(SPEECH_PRESETS)


class _FakeTokenizer:
    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __len__(self) -> int:
        return V


def test_build_speech_preset_and_uncached_generate():
    from steptrain.models.speech import build_speech_preset

    torch.manual_seed(0)
    m = build_speech_preset("tiny-speech", _FakeTokenizer(), **IDS).eval()
    assert m.config.llm_config.vocab_size == V and m.config.audio_patch_id == A_PATCH
    assert m.generation_config.eos_token_id == EOS
    with pytest.raises(ValueError, match="valid presets"):
        build_speech_preset("nope", _FakeTokenizer())
    ids = torch.tensor([audio_row(40)])
    f = torch.randn(1, 128, 40)
    kw = {"max_new_tokens": 3, "do_sample": False, "eos_token_id": None, "pad_token_id": PAD}
    with torch.no_grad():
        cached = m.generate(ids, audio_features=f, **kw)
        uncached = m.generate(ids, audio_features=f, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
