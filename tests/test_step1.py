"""Step-1 (Step-Audio-Chat / Step-Audio-TTS-3B): slopes, logits against an independent implementation, packed
and shared-prompt rows, KV-cache generation, the released checkpoint layout in and out, presets, the
SentencePiece tokenizer, and a short SFT run (docs/released_layouts.md, "Step-1 (Step-Audio-Chat,
Step-Audio-TTS-3B)")."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import steptrain.models  # noqa: F401 - registers step1
from steptrain.models.step1 import (
    STEP1_PRESETS,
    Step1Config,
    Step1ForCausalLM,
    alibi_slopes,
    step1_preset_config,
)

TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_attention_groups=2,
            vocab_size=64, max_seq_len=256, rms_norm_eps=1e-5)


# ---------------------------------------------------------------- the independent reference ------------------


def paper_slopes(n_heads: int) -> list[float]:
    """The ALiBi slopes as the ALiBi paper's reference code writes them (ofirpress/attention_with_linear_biases)."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n_heads - closest]


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """One sequence through the published Step-1 block, written out in float64 with plain loops: pre-norm,
    RMSNorm, GQA attention with -slope * sqrt(i - j) and a causal mask, SwiGLU, final norm, untied head."""
    sd = {k: v.double() for k, v in sd.items()}
    n_heads, n_groups = cfg["num_attention_heads"], cfg["num_attention_groups"]
    d = cfg["hidden_size"] // n_heads
    eps = cfg["rms_norm_eps"]
    slopes = paper_slopes(n_heads)
    t = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(t, n_heads, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(t, n_groups, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(t, n_groups, d)
        heads = []
        for hd in range(n_heads):
            g = hd // (n_heads // n_groups)
            scores = torch.einsum("id,jd->ij", q[:, hd], k[:, g]) / math.sqrt(d)
            for i in range(t):
                for j in range(t):
                    scores[i, j] = scores[i, j] - slopes[hd] * math.sqrt(i - j) if j <= i else -math.inf
            heads.append(torch.softmax(scores, -1) @ v[:, g])
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def released_state_dict(cfg: dict, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """Random weights under the released tensor names (docs/released_layouts.md), built without steptrain."""
    g = torch.Generator().manual_seed(seed)
    hid, ffn, n_heads, n_groups = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg[
        "num_attention_groups"]
    kv = n_groups * hid // n_heads

    def w(*shape):
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": w(cfg["vocab_size"], hid) * 5, "model.norm.weight": 1 + w(hid),
          "lm_head.weight": w(cfg["vocab_size"], hid)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": w(hid, hid), p + "self_attn.k_proj.weight": w(kv, hid),
               p + "self_attn.v_proj.weight": w(kv, hid), p + "self_attn.o_proj.weight": w(hid, hid),
               p + "mlp.gate_proj.weight": w(ffn, hid), p + "mlp.up_proj.weight": w(ffn, hid),
               p + "mlp.down_proj.weight": w(hid, ffn), p + "input_layernorm.weight": 1 + w(hid),
               p + "post_attention_layernorm.weight": 1 + w(hid)}
    return sd


def released_config(**fields) -> dict:
    """A config.json with the released field names (and the remote-code pointer a released repo carries)."""
    return {"architectures": ["Step1ForCausalLM"], "model_type": "step1",
            "auto_map": {"AutoConfig": "configuration_step1.Step1Config",
                         "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"},
            "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0, "tie_word_embeddings": False,
            "torch_dtype": "float32", **fields}


def sp_model_bytes(sentences: list[str], vocab_size: int = 400) -> bytes:
    """A tiny SentencePiece unigram model with the Step special pieces at their released ids
    (<unk> 0, <s> 1, </s> 2, <|EOT|> 3, <|BOT|> 4), byte fallback, newline kept as a piece."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<|EOT|>", "<|BOT|>", "\n"],
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
    )
    return out.getvalue()


WORDS = "the quick brown fox jumps over lazy dog hello world speech audio sort copy reverse human assistant".split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS + list("0123456789")) for _ in range(8)) for _ in range(n)] + ["你好 世界 今天"] * 5


def write_released_dir(path: Path, cfg_fields: dict, *, seed: int = 0, tokenizer: bytes | None = None) -> Path:
    """A Step-1 checkpoint directory in the released layout, written with plain json / safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = released_config(**cfg_fields)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(released_state_dict(cfg, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    for name in ("configuration_step1.py", "modeling_step1.py"):  # stand-ins for the remote code
        (path / name).write_text(f"# {name}: the official remote code ships here\n")
    if tokenizer is not None:
        (path / "tokenization_step1.py").write_text("# the official remote tokenizer ships here\n")
        (path / "tokenizer.model").write_bytes(tokenizer)
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "Step1Tokenizer", "auto_map": {"AutoTokenizer": ["tokenization_step1.Step1Tokenizer", None]},
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A plain word-level fast tokenizer with the Step special ids, for tests that do not need SentencePiece."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"] + [f"w{i}" for i in range(vocab_size - 5)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "<|EOT|>", "unk_token": "<unk>",
        "pad_token": "<unk>"}))


def tiny_model(seed: int = 0, **overrides) -> tuple[Step1ForCausalLM, dict]:
    cfg = released_config(**{**TINY, **overrides})
    sd = released_state_dict(cfg, seed)
    model = Step1ForCausalLM(Step1Config(**cfg)).eval()
    model.load_state_dict(sd, strict=True)
    return model, sd


def keys_of(directory: Path) -> set[str]:
    keys = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    return keys


# ---------------------------------------------------------------- (a) slopes --------------------------------


@pytest.mark.parametrize("n_heads", [8, 6, 12, 48])
def test_slopes_match_the_published_formula(n_heads):
    expected = paper_slopes(n_heads)
    # and the Step-1 write-up of the same numbers: powers of 2^(-8/n), then odd powers of 2^(-4/n)
    n = 2 ** math.floor(math.log2(n_heads))
    by_hand = [2 ** (-8 / n * k) for k in range(1, n + 1)] + [2 ** (-4 / n * k) for k in range(1, 2 * (n_heads - n), 2)]
    torch.testing.assert_close(torch.tensor(expected), torch.tensor(by_hand), rtol=1e-12, atol=0, check_dtype=False)
    torch.testing.assert_close(alibi_slopes(n_heads), torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)
    if n_heads == 8:
        assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]


def test_bias_is_minus_slope_sqrt_distance():
    from steptrain.models.step1.modeling import attention_layout, dense_bias

    pos = torch.arange(5)[None]
    q_pos, k_pos, allowed, extra = attention_layout(batch=1, q_len=5, past_len=0, position_ids=pos, attention_mask=None,
                                                    device=torch.device("cpu"))
    bias = dense_bias(alibi_slopes(6), q_pos, k_pos, allowed, extra, torch.float32)
    slopes = paper_slopes(6)
    for h in range(6):
        for i in range(5):
            for j in range(5):
                want = -slopes[h] * math.sqrt(i - j) if j <= i else -math.inf
                assert bias[0, h, i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- (b) logits vs the reference ---------------


@pytest.mark.parametrize("n_heads,n_groups", [(6, 2), (8, 4), (4, 1)])
def test_logits_match_independent_implementation(n_heads, n_groups):
    model, sd = tiny_model(hidden_size=8 * n_heads, num_attention_heads=n_heads, num_attention_groups=n_groups)
    ids = [1, 4, 17, 33, 5, 60, 2, 9, 41, 3, 12, 7]
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].double()
    want = reference_logits(sd, model.config.to_dict(), ids)
    assert want.abs().max() > 0.5  # the weights are large enough for attention to matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=torch.tensor([ids])).logits[0].double(), want, atol=1e-5, rtol=1e-5)


def test_rmsnorm_forms_the_product_in_the_input_dtype():
    from steptrain.models.step1.modeling import Step1RMSNorm

    norm = Step1RMSNorm(16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    var = x.float().pow(2).mean(-1, keepdim=True)
    want = (x * torch.rsqrt(var + 1e-5).to(torch.bfloat16)) * norm.weight.to(torch.bfloat16)
    assert torch.equal(norm.to(torch.bfloat16)(x), want)


# ---------------------------------------------------------------- (c) packed and shared-prompt rows ---------


def test_packed_row_equals_each_sequence_alone():
    model, _ = tiny_model()
    a, b = [1, 4, 20, 21, 22], [1, 4, 30, 31, 32, 33, 34]
    with torch.no_grad():
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
        pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
        packed = model(input_ids=torch.tensor([a + b]), position_ids=pos).logits[0]
        # the batch layout steptrain's collate writes: no mask, positions restart, padding tail restarts too
        row2 = b + a + [0, 0]
        pos2 = torch.tensor([list(range(len(b))) + list(range(len(a))) + [0, 1]])
        row1, pos1 = a + b + [0, 0], torch.cat([pos, torch.tensor([[0, 1]])], 1)
        both = model(input_ids=torch.tensor([row1, row2]), position_ids=torch.cat([pos1, pos2])).logits
    torch.testing.assert_close(packed[: len(a)], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0, : len(a) + len(b)], packed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, : len(b)], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, len(b): len(b) + len(a)], alone_a, atol=1e-5, rtol=1e-5)
    # and the row-index bias would not be exact: positions, not indices, decide
    with torch.no_grad():
        wrong = model(input_ids=torch.tensor([a + b]), position_ids=torch.arange(len(a) + len(b))[None]).logits[0]
    assert not torch.allclose(wrong[len(a):], alone_b, atol=1e-3)


def test_padded_batch_and_shared_prompt_row():
    from steptrain.data.encode import IGNORE_INDEX, Encoded
    from steptrain.data.preference import SharedPromptBatches

    model, _ = tiny_model()
    prompt, chosen, rejected = [1, 4, 10, 11, 12], [40, 41, 42], [50, 51, 52, 53]
    with torch.no_grad():
        alone_c = model(input_ids=torch.tensor([prompt + chosen])).logits[0]
        alone_r = model(input_ids=torch.tensor([prompt + rejected])).logits[0]
        # right padding with a 2D mask
        ids = torch.tensor([prompt + chosen + [0], prompt + rejected])
        mask = torch.tensor([[1] * 8 + [0], [1] * 9])
        pos = torch.tensor([list(range(9)), list(range(9))])
        padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(padded[0, :8], alone_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone_r, atol=1e-5, rtol=1e-5)

    def enc(ids):
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        return Encoded(input_ids=ids, labels=labels, source="test")

    batch = SharedPromptBatches([(enc(prompt + chosen), enc(prompt + rejected))], pad_id=0).batch([[0]])
    assert batch["attention_mask"].dim() == 4
    with torch.no_grad():
        shared = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
    n_c = len(prompt) + len(chosen)
    torch.testing.assert_close(shared[:n_c], alone_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[n_c: n_c + len(rejected)], alone_r[len(prompt):], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- (d) KV-cache generation ------------------


def test_generation_with_cache_equals_without():
    model, _ = tiny_model(seed=1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([[1, 4, 20, 21, 22, 23], [0, 0, 1, 4, 30, 31]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        alone = model.generate(prompt[1:, 2:], use_cache=True, max_new_tokens=6, do_sample=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, 2:], alone[0])  # left padding changes nothing
    # step by step with an explicit cache: the last logits equal a fresh full forward
    with torch.no_grad():
        ids = torch.tensor([[1, 4, 20, 21, 22]])
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, cache=out.cache, use_cache=True).logits[:, -1]
        full = model(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- (e) released layout in and out ----------


def test_released_directory_loads_and_saves_in_the_same_layout(tmp_path):
    from steptrain.config import load_config
    from steptrain.models.loader import load_model, load_tokenizer

    fields = dict(TINY)
    src = write_released_dir(tmp_path / "released", fields)
    write_word_tokenizer(src, fields["vocab_size"])  # the SentencePiece one is tested below
    released_cfg = json.loads((src / "config.json").read_text())
    released_keys = keys_of(src)
    assert len(released_keys) == 2 * 9 + 3

    ids = torch.tensor([[1, 4, 7, 8, 9, 10, 3]])
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(model) is Step1ForCausalLM and isinstance(AutoConfig.from_pretrained(src), Step1Config)
    sd = released_state_dict(released_config(**fields))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits[0].double(), reference_logits(sd, model.config.to_dict(), ids[0].tolist()),
                               atol=1e-5, rtol=1e-5)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied

    (tmp_path / "x.jsonl").write_text("")
    cfg = load_config([f"model.path={src}", f"data.train_files=[{tmp_path / 'x.jsonl'}]", f"output_dir={tmp_path / 'o'}"])
    tok = load_tokenizer(cfg.model)
    assert len(tok) == fields["vocab_size"]
    loaded, new_ids = load_model(cfg.model, tok)
    assert new_ids == [] and type(loaded) is Step1ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, logits, atol=0, rtol=0)

    out = tmp_path / "saved"
    model.save_pretrained(out)
    saved_cfg = json.loads((out / "config.json").read_text())
    for key, value in released_cfg.items():
        assert saved_cfg.get(key) == value, key
    assert "num_key_value_heads" not in saved_cfg and "max_position_embeddings" not in saved_cfg
    assert keys_of(out) == released_keys
    assert (out / "modeling_step1.py").exists() and (out / "configuration_step1.py").exists()  # auto_map still resolves
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


# ---------------------------------------------------------------- (f) presets ------------------------------


def test_published_presets_have_the_published_sizes():
    tts = step1_preset_config("step-audio-tts-3b")
    assert (tts.hidden_size, tts.intermediate_size, tts.num_hidden_layers, tts.num_attention_heads,
            tts.num_attention_groups, tts.vocab_size) == (3072, 8192, 32, 48, 4, 74752)
    chat = step1_preset_config("step-audio-chat")
    assert (chat.hidden_size, chat.intermediate_size, chat.num_hidden_layers, chat.num_attention_heads,
            chat.num_attention_groups, chat.vocab_size) == (12288, 31232, 88, 96, 8, 65536 + 5120)
    for c in (tts, chat):
        assert c.model_type == "step1" and c.tie_word_embeddings is False and c.rms_norm_eps == 1e-5
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 3, 0)
        assert c.num_key_value_heads == c.num_attention_groups and c.max_position_embeddings == c.max_seq_len
    # 130B: the parameter count from the sizes alone (nothing is built)
    h, f, n, v = chat.hidden_size, chat.intermediate_size, chat.num_hidden_layers, chat.vocab_size
    kv = chat.num_attention_groups * h // chat.num_attention_heads
    params = n * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + 2 * v * h + h
    assert 125e9 < params < 140e9
    assert set(STEP1_PRESETS) >= {"step-audio-tts-3b", "step-audio-chat", "step1-tiny"}
    with pytest.raises(ValueError, match="valid presets"):
        step1_preset_config("step-audio-7b")


def test_tiny_preset_builds_through_build_preset(tmp_path):
    pytest.importorskip("sentencepiece")
    from steptrain.models import build_preset

    src = write_released_dir(tmp_path / "released", TINY, tokenizer=sp_model_bytes(corpus()))
    tok = AutoTokenizer.from_pretrained(src)
    model = build_preset("step1-tiny", tok)
    assert type(model) is Step1ForCausalLM and model.config.vocab_size == len(tok)
    assert (model.config.num_attention_heads, model.config.num_attention_groups) == (6, 2)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.generation_config.eos_token_id) == (1, 3, 3)


# ---------------------------------------------------------------- (g) tokenizer ----------------------------


def test_sentencepiece_tokenizer_loads_without_remote_code(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from steptrain.models.step1 import convert_step1_tokenizer

    proto = sp_model_bytes(corpus())
    sp = spm.SentencePieceProcessor(model_proto=proto)
    src = write_released_dir(tmp_path / "released", {**TINY, "vocab_size": sp.get_piece_size()}, tokenizer=proto)
    converted = convert_step1_tokenizer(src, tmp_path / "converted")
    assert json.loads((converted / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    texts = ["hello world", "sort: 7 2 0 9\nspeech audio", "  two  spaces", "你好世界 xyzé!", "reverse 1 2 3"]
    for tok in (AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(converted)):
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>")}
        assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|EOT|>": 3, "<|BOT|>": 4}
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 3, 0, sp.get_piece_size())
        for text in texts:
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        turn = tok.encode("<|BOT|>human\nhello<|EOT|>", add_special_tokens=False)
        assert turn[0] == 4 and turn[-1] == 3 and turn[1:-1] == sp.encode("human\nhello")
        assert tok.decode(turn, skip_special_tokens=True) == "human\nhello"


# ---------------------------------------------------------------- (h) SFT through the recipe ----------------


def test_sft_trains_a_released_step1_and_exports_the_released_layout(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from steptrain.config import load_config
    from steptrain.export import export_checkpoint, rebuild_from_checkpoint
    from steptrain.recipes import sft

    proto = sp_model_bytes(corpus())
    n_vocab = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    src = write_released_dir(tmp_path / "released", {**TINY, "vocab_size": n_vocab}, tokenizer=proto)
    rng = random.Random(0)
    rows = []
    for _ in range(16):
        digits = " ".join(rng.choice("0123456789") for _ in range(4))
        rows.append({"messages": [{"role": "user", "content": f"copy: {digits}"},
                                  {"role": "assistant", "content": digits}]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = load_config([f"model.path={src}", f"data.train_files=[{data}]", f"output_dir={out}", "data.max_length=64",
                       "trainer.batch_size=4", "trainer.max_steps=2", "optim.lr=1e-2", "logging.progress_bar=false",
                       "logging.tensorboard=false", "logging.plot=false", "data.packing=true"])
    sft.run(cfg)
    yaml_text = (out / "checkpoints" / "step_2" / "config.yaml").read_text()
    assert "template: step" in yaml_text and "bos: true" in yaml_text  # data.template=auto: Step template, <s> first
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)

    export = export_checkpoint(out / "checkpoints" / "step_2", tmp_path / "export")
    assert keys_of(export) == keys_of(src)
    released_cfg, export_cfg = json.loads((src / "config.json").read_text()), json.loads((export / "config.json").read_text())
    for key, value in released_cfg.items():
        assert export_cfg.get(key) == value, key
    exported = AutoModelForCausalLM.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    assert not torch.equal(exported.lm_head.weight, base.lm_head.weight), "training changed nothing"
    trained, _, _ = rebuild_from_checkpoint(out / "checkpoints" / "step_2")
    probe = torch.tensor([[1, 4, 7, 8, 9, 3, 4, 10, 11]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=probe).logits, trained(input_ids=probe).logits)
    assert AutoTokenizer.from_pretrained(export).eos_token_id == 3
    for name in ("modeling_step1.py", "configuration_step1.py", "tokenization_step1.py", "tokenizer.model"):
        assert (export / name).read_bytes() == (src / name).read_bytes(), name


# ---------------------------------------------------------------- GPU: the fused path -----------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention path is checked on CUDA")
def test_flex_attention_matches_the_dense_bias_on_gpu(tmp_path):
    src = write_released_dir(tmp_path / "released", TINY)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="flex_attention").cuda().eval()
    assert model.config._attn_implementation == "flex_attention"
    a, b = [1, 4, 20, 21, 22], [1, 4, 30, 31, 32, 33, 34]
    ids = torch.tensor([a + b], device="cuda")
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device="cuda")
    prompt = torch.tensor([[1, 4, 20, 21, 22, 23], [0, 0, 1, 4, 30, 31]], device="cuda")
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]], device="cuda")
    model.generation_config.eos_token_id = None
    gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        flex = model(input_ids=ids, position_ids=pos).logits
        flex_gen = model.generate(prompt, **gen)
        model.config._attn_implementation = "eager"
        dense = model(input_ids=ids, position_ids=pos).logits
        dense_gen = model.generate(prompt, **gen)
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(flex_gen, dense_gen)
