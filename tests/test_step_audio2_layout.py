"""The released Step-Audio 2 layout, natively: official patch arithmetic and encoder behaviour, then
load -> train -> export -> reload of a tiny checkpoint written by hand in that layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from steptrain.audio.features import num_frames
from steptrain.config import load_config, load_saved_config
from steptrain.data import collate, load_sft_data
from steptrain.export import export_checkpoint, rebuild_from_checkpoint
from steptrain.inputs import clip_features, resolve_inputs
from steptrain.models.forward import lm_logits
from steptrain.models.loader import is_speech_config, load_tokenizer, speech_front_end
from steptrain.models.speech import STEP_AUDIO_2, SpeechLMForCausalLM, num_patches
from tests.conftest import read_metrics

D, HEADS, LAYERS, CTX = 64, 2, 2, 1500  # encoder
HID, FFN, LLM_LAYERS, LLM_HEADS, KV = 128, 256, 2, 4, 2  # Qwen2
ADAPTER = 2048  # hard-coded in the released Adaptor
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|BOT|>", "<|EOT|>", "<audio_start>", "<audio_end>", "<audio_patch>",
            "<tts_start>", "<tts_end>"]


def official_token_num(T: int) -> int:
    """compute_token_num of the official Step-Audio 2 code (docs/released_layouts.md)."""
    L = T - 2
    enc = (L + 1) // 2 // 2
    return (enc + 2 * 1 - 3) // 2 + 1


# --- the tiny released checkpoint, written by hand ------------------------------------------------


def write_tokenizer(out, texts):
    """A Qwen2 byte-level BPE tokenizer (no BOS) with the Step-Audio 2 specials as added special tokens."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    raw = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])._tokenizer  # Qwen2's pre-tokenizer
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(texts, trainer=trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(raw.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=raw.get_vocab(), merges=merges, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.eos_token = "<|EOT|>"
    tok.save_pretrained(out)
    return tok


def released_config(vocab: int, eos: int) -> dict:
    return {
        "architectures": ["StepAudio2ForCausalLM"],
        "model_type": "step_audio_2",
        "auto_map": {"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
                     "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"},
        "audio_encoder_config": {"model_type": "step_audio_2_encoder", "n_mels": 128, "n_audio_ctx": CTX,
                                 "n_audio_state": D, "n_audio_head": HEADS, "n_audio_layer": LAYERS,
                                 "n_codebook_size": 4096, "llm_dim": HID, "kernel_size": 3, "adapter_stride": 2},
        "text_config": {"model_type": "step_audio_2_text", "vocab_size": vocab, "hidden_size": HID,
                        "intermediate_size": FFN, "num_hidden_layers": LLM_LAYERS, "num_attention_heads": LLM_HEADS,
                        "num_attention_groups": KV, "num_key_value_heads": KV, "hidden_act": "silu",
                        "max_position_embeddings": 512, "max_seq_len": 512, "initializer_range": 0.02,
                        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "eos_token_id": eos},
        "use_sliding_window": False,
        "sliding_window": 2048,
        "max_window_layers": 28,
        "torch_dtype": "float32",
    }


def released_tensors(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the released names (encoder.*, adapter.*, model.*, lm_head.weight)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, n, bias=True):
        t = {f"{prefix}.weight": 1 + r(n)}
        return {**t, f"{prefix}.bias": r(n)} if bias else t

    t = {"encoder.conv1.weight": r(D, 128, 3), "encoder.conv1.bias": r(D), "encoder.conv2.weight": r(D, D, 3),
         "encoder.conv2.bias": r(D), "encoder.positional_embedding.weight": r(CTX, D, std=1.0)}
    for i in range(LAYERS):
        b = f"encoder.blocks.{i}"
        t |= {f"{b}.attn.query.weight": r(D, D), f"{b}.attn.query.bias": r(D), f"{b}.attn.key.weight": r(D, D),
              f"{b}.attn.value.weight": r(D, D), f"{b}.attn.value.bias": r(D), f"{b}.attn.out.weight": r(D, D),
              f"{b}.attn.out.bias": r(D), f"{b}.mlp.0.weight": r(4 * D, D), f"{b}.mlp.0.bias": r(4 * D),
              f"{b}.mlp.2.weight": r(D, 4 * D), f"{b}.mlp.2.bias": r(D)}
        t |= norm(f"{b}.attn_ln", D) | norm(f"{b}.mlp_ln", D)
    t |= norm("encoder.after_norm", D)
    t |= {"adapter.conv.weight": r(D, D, 3), "adapter.conv.bias": r(D), "adapter.linear1.weight": r(ADAPTER, D),
          "adapter.linear1.bias": r(ADAPTER), "adapter.linear2.weight": r(HID, ADAPTER, std=0.02),
          "adapter.linear2.bias": r(HID)}
    hd = HID // LLM_HEADS
    t["model.embed_tokens.weight"] = r(vocab, HID, std=0.02)
    for i in range(LLM_LAYERS):
        b = f"model.layers.{i}"
        t |= {f"{b}.self_attn.q_proj.weight": r(LLM_HEADS * hd, HID, std=0.02), f"{b}.self_attn.q_proj.bias": r(LLM_HEADS * hd),
              f"{b}.self_attn.k_proj.weight": r(KV * hd, HID, std=0.02), f"{b}.self_attn.k_proj.bias": r(KV * hd),
              f"{b}.self_attn.v_proj.weight": r(KV * hd, HID, std=0.02), f"{b}.self_attn.v_proj.bias": r(KV * hd),
              f"{b}.self_attn.o_proj.weight": r(HID, HID, std=0.02), f"{b}.mlp.gate_proj.weight": r(FFN, HID, std=0.02),
              f"{b}.mlp.up_proj.weight": r(FFN, HID, std=0.02), f"{b}.mlp.down_proj.weight": r(HID, FFN, std=0.02)}
        t |= norm(f"{b}.input_layernorm", HID, bias=False) | norm(f"{b}.post_attention_layernorm", HID, bias=False)
    t |= norm("model.norm", HID, bias=False)
    t["lm_head.weight"] = r(vocab, HID, std=0.02)
    return t


@pytest.fixture(scope="module")
def released(tmp_path_factory, speech):
    """A released-layout directory: config.json, model.safetensors, Qwen2 tokenizer, a remote-code stub."""
    d = tmp_path_factory.mktemp("step_audio_2")
    texts = [json.loads(line)["messages"][-1]["content"] for line in speech["asr_train"].read_text().splitlines()]
    tok = write_tokenizer(d, texts * 4 + ["Transcribe the digits.", "human", "assistant", "system"] * 20)
    vocab = 64 * (len(tok) // 64 + 1)  # padded past the tokenizer, as the released 158720 is
    (d / "config.json").write_text(json.dumps(released_config(vocab, tok.convert_tokens_to_ids("<|EOT|>")), indent=2))
    tensors = released_tensors(vocab)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "modeling_step_audio_2.py").write_text("# remote code of the released checkpoint (not used by steptrain)\n")
    return {"dir": d, "tensors": tensors, "tokenizer": tok}


# --- arithmetic and encoder behaviour -------------------------------------------------------------


def test_patch_count_follows_official_arithmetic_for_all_lengths():
    assert num_frames(25 * 16000) == 2502 and official_token_num(2502) == 313
    assert num_patches(2502, "step_audio_2") == 313 == num_patches(2502)
    assert num_patches(num_frames(16000), "step_audio_2") == 13
    for T in range(0, 3001):
        assert num_patches(T, "step_audio_2") == max(official_token_num(T), 0), T
    for n in range(1, 25 * 16000 + 1, 37):  # every chunk length (in samples) through the real front end
        assert num_patches(num_frames(n), "step_audio_2") == official_token_num(num_frames(n)), n
    # steptrain's own rule (= StepFun's vLLM arithmetic) gives one more patch for T = 3, 4 (mod 8)
    differ = {T % 8 for T in range(5, 3001) if num_patches(T) != official_token_num(T)}
    assert differ == {3, 4}


def official_encode(t: dict[str, torch.Tensor], mel: torch.Tensor) -> torch.Tensor:
    """The released encoder + adapter forward on one clip [128, T], written from the official code's
    description (docs/released_layouts.md): length T - 2, key bias -1e10, q and k scaled by hd**-0.25."""
    T = mel.shape[-1]
    x = F.gelu(F.conv1d(mel[None], t["encoder.conv1.weight"], t["encoder.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, t["encoder.conv2.weight"], t["encoder.conv2.bias"], stride=2, padding=1)).transpose(1, 2)
    x_len = T - 2
    key_ok = (torch.arange(T) < x_len)[(T + 1) % 2 :: 2]
    bias = torch.where(key_ok, 0.0, -1e10)
    x = x + t["encoder.positional_embedding.weight"][: x.shape[1]]
    hd = D // HEADS
    for i in range(LAYERS):
        b = f"encoder.blocks.{i}"
        h = F.layer_norm(x, (D,), t[f"{b}.attn_ln.weight"], t[f"{b}.attn_ln.bias"])
        q = F.linear(h, t[f"{b}.attn.query.weight"], t[f"{b}.attn.query.bias"])
        k = F.linear(h, t[f"{b}.attn.key.weight"])
        v = F.linear(h, t[f"{b}.attn.value.weight"], t[f"{b}.attn.value.bias"])
        q, k, v = (y.view(1, -1, HEADS, hd).transpose(1, 2) for y in (q, k, v))
        w = (q * hd**-0.25) @ (k * hd**-0.25).transpose(-1, -2) + bias
        a = (w.float().softmax(-1) @ v).transpose(1, 2).reshape(1, -1, D)
        x = x + F.linear(a, t[f"{b}.attn.out.weight"], t[f"{b}.attn.out.bias"])
        h = F.layer_norm(x, (D,), t[f"{b}.mlp_ln.weight"], t[f"{b}.mlp_ln.bias"])
        x = x + F.linear(F.gelu(F.linear(h, t[f"{b}.mlp.0.weight"], t[f"{b}.mlp.0.bias"])), t[f"{b}.mlp.2.weight"],
                         t[f"{b}.mlp.2.bias"])
    x = F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2)
    x = F.layer_norm(x, (D,), t["encoder.after_norm.weight"], t["encoder.after_norm.bias"])
    enc_len = (x_len + 1) // 2 // 2
    y = F.gelu(F.conv1d(x.transpose(1, 2), t["adapter.conv.weight"], t["adapter.conv.bias"], stride=2, padding=1))
    y = F.linear(F.relu(F.linear(y.transpose(1, 2), t["adapter.linear1.weight"], t["adapter.linear1.bias"])),
                 t["adapter.linear2.weight"], t["adapter.linear2.bias"])
    return y[0, : (enc_len - 1) // 2 + 1]


def test_encoder_reproduces_the_released_forward(released):
    model = AutoModelForCausalLM.from_pretrained(released["dir"]).eval()  # no remote code
    assert isinstance(model, SpeechLMForCausalLM) and model.config.encoder_config.length_rule == "step_audio_2"
    lengths = [37, 40, 51, 52, 64, 99, 100, 203, 204]  # every T mod 8 class, odd and even
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(lengths), 128, max(lengths), generator=g)
    with torch.no_grad():
        batched, counts = model.encode_audio(feats, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            ref = official_encode(released["tensors"], feats[i, :, :n])
            assert int(counts[i]) == ref.shape[0] == official_token_num(n), n
            torch.testing.assert_close(batched[i, : ref.shape[0]], ref, atol=1e-5, rtol=1e-5)


def test_config_and_keys_convert_both_ways(released):
    cfg = json.loads((released["dir"] / "config.json").read_text())
    speech_cfg = STEP_AUDIO_2.to_speech_config(cfg)
    assert speech_cfg.llm_config.model_type == "qwen2" and not speech_cfg.llm_config.tie_word_embeddings
    assert speech_cfg.llm_config.rope_parameters["rope_theta"] == 1e6 and speech_cfg.llm_config.num_key_value_heads == KV
    names = STEP_AUDIO_2.to_steptrain_keys(released["tensors"])
    assert "audio_encoder.embed_positions" in names and "llm.lm_head.weight" in names
    assert STEP_AUDIO_2.to_released_keys(names).keys() == released["tensors"].keys()
    with pytest.raises(ValueError, match="unexpected tensors"):
        STEP_AUDIO_2.to_steptrain_keys({"encoder.blocks.0.attn.bogus.weight": torch.zeros(1)})
    # the LLM part is a plain Qwen2 with the model.* / lm_head tensors
    from transformers import Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(speech_cfg.llm_config).eval()
    qwen.load_state_dict({k: v for k, v in released["tensors"].items() if k.startswith(("model.", "lm_head."))})
    ours = AutoModelForCausalLM.from_pretrained(released["dir"]).eval()
    ids = torch.randint(0, 280, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, qwen(input_ids=ids).logits)


# --- load -> train -> export -> reload ------------------------------------------------------------


def run_args(released, speech, out, *extra):
    return [
        f"model.path={released['dir']}", f"data.train_files=[{speech['asr_train']}]", f"output_dir={out}",
        "data.max_length=128", "trainer.batch_size=8", "trainer.max_steps=5", "optim.lr=2e-3",
        "trainer.generate_eval=0", "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
        *extra,
    ]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_train_export_reload_in_released_layout(released, speech, tmp_path, peft):
    from steptrain.recipes.sft import run

    out = tmp_path / "run"
    cfg = load_config(run_args(released, speech, out, f"peft={peft}"))
    assert is_speech_config(cfg.model) and speech_front_end(cfg.model).length_rule == "step_audio_2"
    run(cfg)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 5 and losses[-1] < losses[0]

    ckpt = out / "checkpoints" / "step_5"
    trained, tok, _ = rebuild_from_checkpoint(ckpt)
    saved = load_saved_config(ckpt / "config.yaml")
    data = load_sft_data([str(speech["asr_eval"])], tok, saved.data, resolve_inputs(saved, tok))
    ex = data.examples[0]
    # the official prompt: no BOS, <|BOT|>human\n <audio_start> N x <audio_patch> <audio_end> ...
    assert tok.bos_token_id is None and ex.input_ids[0] == tok.convert_tokens_to_ids("<|BOT|>")
    patch = tok.convert_tokens_to_ids("<audio_patch>")
    n_patch = sum(1 for i in ex.input_ids if i == patch)
    assert len(ex.audio) == 1 and n_patch == official_token_num(num_frames(ex.audio[0].length))
    assert ex.input_ids[ex.input_ids.index(patch) - 1] == tok.convert_tokens_to_ids("<audio_start>")
    assert ex.input_ids[ex.input_ids.index(patch) + n_patch] == tok.convert_tokens_to_ids("<audio_end>")

    batch = collate([[0], [1], [2]], data.examples, pad_id=tok.pad_token_id, packing=False, audio_features=clip_features)
    with torch.no_grad():
        expected = lm_logits(trained, batch)
    exported = export_checkpoint(ckpt, tmp_path / "export", merge_lora=True)

    src_cfg = json.loads((released["dir"] / "config.json").read_text())
    exp_cfg = json.loads((exported / "config.json").read_text())
    assert exp_cfg["model_type"] == "step_audio_2" and exp_cfg["architectures"] == ["StepAudio2ForCausalLM"]
    assert exp_cfg == src_cfg  # same fields and values (vocabulary and dtype unchanged by this run)
    assert (exported / "modeling_step_audio_2.py").exists()  # the remote code travels with it
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(released["tensors"])
        assert all(f.get_slice(k).get_shape() == list(released["tensors"][k].shape) for k in keys)
        new_adapter, new_enc = f.get_tensor("adapter.linear1.weight"), f.get_tensor("encoder.blocks.0.attn.query.weight")
    assert not torch.equal(new_adapter, released["tensors"]["adapter.linear1.weight"])  # trained
    assert torch.equal(new_enc, released["tensors"]["encoder.blocks.0.attn.query.weight"])  # frozen encoder

    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()  # no remote code
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(reloaded, batch), expected, atol=1e-6, rtol=1e-6)
    # and the export is again a training starting point, through the normal loader
    again, _ = load_model_from(exported, speech)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(again, batch), expected, atol=1e-6, rtol=1e-6)
    if peft == "none":  # `steptrain eval` scores and generates from the export
        from steptrain.cli import main

        assert main(["eval", str(exported), str(speech["asr_eval"]), "--limit", "2", "--max-new-tokens", "4"]) == 0


def load_model_from(path, speech):
    from steptrain.models.loader import load_model

    cfg = load_config([f"model.path={path}", f"output_dir={path}/unused", f"data.train_files=[{speech['asr_train']}]"])
    tok = load_tokenizer(cfg.model)
    model, new_ids = load_model(cfg.model, tok)
    assert new_ids == []
    return model.eval(), tok


@pytest.mark.parametrize("recipe", ["dpo", "grpo"])
def test_preference_and_rl_recipes_run_on_the_released_layout(released, speech, tmp_path, recipe):
    import importlib

    common = [f"model.path={released['dir']}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2",
              "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]
    if recipe == "dpo":
        rows = [json.loads(line) for line in speech["asr_train"].read_text().splitlines()][:16]
        pairs = speech["asr_train"].parent / "pairs_step_audio_2.jsonl"  # audio paths are relative to the JSONL
        pairs.write_text("".join(json.dumps({**r, "rejected_response": "0 0 0"}) + "\n" for r in rows))
        args = ["experiment=dpo", f"data.train_files=[{pairs}]", "trainer.batch_size=4", "optim.lr=1e-3", *common]
    else:
        args = ["experiment=grpo", f"data.train_files=[{speech['asr_train']}]", "objective.rewards={cer:1.0}",
                "rollout.num_generations=2", "rollout.max_new_tokens=4", "trainer.batch_size=2",
                "trainer.generate_eval=0", *common]
    result = importlib.import_module(f"steptrain.recipes.{recipe}").run(load_config(args))
    assert torch.isfinite(torch.tensor(result["train"]["loss"]))
    trained, _, _ = rebuild_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_2")
    assert trained.config.checkpoint_layout == "step_audio_2"


def test_ppo_refuses_the_released_speech_model_before_loading(released, speech, tmp_path):
    from steptrain.config import ConfigError

    with pytest.raises(ConfigError, match="recipe=ppo trains text LLMs"):
        load_config(["experiment=ppo", f"model.path={released['dir']}", f"data.train_files=[{speech['asr_train']}]",
                     f"output_dir={tmp_path}"])


def test_sharded_save_and_load_keep_the_layout(released, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(released["dir"]).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")  # released layout, in shards
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(released["tensors"]) and len(set(index["weight_map"].values())) > 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert model.config.audio_patch_id == released["tokenizer"].convert_tokens_to_ids("<audio_patch>")  # its tokenizer's
    assert again.config.audio_patch_id == 151690  # no tokenizer in the directory: the published ids
