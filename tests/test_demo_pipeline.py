"""Demo data pipeline: synthetic corpus, Step tokenizer and chat template, tiny presets, make_demo."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipelines.demo_corpus import (
    TASKS,
    generate_rows,
    iter_tokenizer_texts,
    parse_prompt,
    read_jsonl,
    write_demo_corpus,
)
from data_pipelines.demo_tokenizer import STEP_SPECIAL_TOKENS, train_demo_tokenizer
from data_pipelines.make_demo import main as make_demo_main
from data_pipelines.make_demo import make_demo
from steptrain.models.presets import PRESETS, build_preset


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    train_rows, _ = generate_rows(n_train=400, n_eval=20, seed=0)
    return train_demo_tokenizer(iter_tokenizer_texts(train_rows), tmp_path_factory.mktemp("tok"))


def _expected(task: str, digits: list[str]) -> str:
    # written independently of demo_corpus.solve
    if task == "reverse":
        return " ".join(reversed(digits))
    if task == "sort":
        return " ".join(str(d) for d in sorted(int(x) for x in digits))
    assert task == "copy"
    return " ".join(digits)


# ---------------------------------------------------------------- corpus


def test_corpus_is_deterministic(tmp_path):
    a = write_demo_corpus(tmp_path / "a", n_train=300, n_eval=30, seed=0)
    b = write_demo_corpus(tmp_path / "b", n_train=300, n_eval=30, seed=0)
    c = write_demo_corpus(tmp_path / "c", n_train=300, n_eval=30, seed=1)
    for split in ("train", "eval"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    assert len(read_jsonl(a["train"])) == 300
    assert len(read_jsonl(a["eval"])) == 30


def test_eval_prompts_are_held_out(tmp_path):
    paths = write_demo_corpus(tmp_path, n_train=3000, n_eval=200, seed=0, min_digits=4, max_digits=5)
    train_prompts = {
        m["content"] for r in read_jsonl(paths["train"]) for m in r["messages"] if m["role"] == "user"
    }
    eval_prompts = [
        m["content"] for r in read_jsonl(paths["eval"]) for m in r["messages"] if m["role"] == "user"
    ]
    assert len(eval_prompts) == len(set(eval_prompts))
    assert not train_prompts.intersection(eval_prompts)


def test_rows_are_well_formed_and_answers_correct(tmp_path):
    paths = write_demo_corpus(tmp_path, n_train=500, n_eval=100, seed=3)
    raw = paths["train"].read_text(encoding="utf-8").splitlines()
    assert all(set(json.loads(line)) == {"messages"} for line in raw)
    rows = read_jsonl(paths["train"]) + read_jsonl(paths["eval"])
    n_system = n_multi = 0
    seen_tasks = set()
    for row in rows:
        msgs = row["messages"]
        if msgs[0]["role"] == "system":
            n_system += 1
            msgs = msgs[1:]
        assert len(msgs) in (2, 4)
        n_multi += len(msgs) == 4
        for user, assistant in zip(msgs[::2], msgs[1::2], strict=True):
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            task, digits = parse_prompt(user["content"])
            seen_tasks.add(task)
            assert 4 <= len(digits) <= 8 and all(d in "0123456789" for d in digits)
            assert user["content"] == f"{task}: {' '.join(digits)}"
            assert assistant["content"] == _expected(task, digits)
    assert seen_tasks == set(TASKS)
    assert 0.1 * len(rows) < n_system < 0.3 * len(rows)
    assert 0.1 * len(rows) < n_multi < 0.3 * len(rows)


# ---------------------------------------------------------------- tokenizer


def test_special_token_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in STEP_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert STEP_SPECIAL_TOKENS == ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"]
    assert tokenizer.unk_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 3
    # specials are atomic inside text, and plain encoding adds nothing
    ids = tokenizer("<|BOT|>human\n1 2<|EOT|>")["input_ids"]
    assert ids[0] == 4 and ids[-1] == 3
    assert tokenizer("1 2")["input_ids"][0] not in (0, 1, 2, 3, 4)


def test_chat_template_renders_step_format(tokenizer):
    messages = [
        {"role": "system", "content": "Answer with digits only."},
        {"role": "user", "content": "reverse: 3 9 1 7"},
        {"role": "assistant", "content": "7 1 9 3"},
        {"role": "user", "content": "sort: 3 9 1 7"},
        {"role": "assistant", "content": "1 3 7 9"},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == (
        "<s><|BOT|>system\nAnswer with digits only.<|EOT|>"
        "<|BOT|>human\nreverse: 3 9 1 7<|EOT|>"
        "<|BOT|>assistant\n7 1 9 3<|EOT|>"
        "<|BOT|>human\nsort: 3 9 1 7<|EOT|>"
        "<|BOT|>assistant\n1 3 7 9<|EOT|>"
    )
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|BOT|>system\nAnswer with digits only.<|EOT|>"
        "<|BOT|>human\nreverse: 3 9 1 7<|EOT|>"
        "<|BOT|>assistant\n7 1 9 3<|EOT|>"
        "<|BOT|>human\nsort: 3 9 1 7<|EOT|>"
        "<|BOT|>assistant\n"
    )
    assert full.startswith(prompt)
    no_bos = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_bos=False)
    assert no_bos == "<|BOT|>human\nreverse: 3 9 1 7<|EOT|>"
    tool = tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    assert tool == "<s><|BOT|>input\n42<|EOT|>"
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "copy: 1"}, {"type": "text", "text": " 2"}]}
    ]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == "<s><|BOT|>human\ncopy: 1 2<|EOT|>"
    # tokenising the rendered text gives the special ids in place
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [1, 4] and ids[-3] == 4 and tokenizer.decode(ids) == prompt


@pytest.mark.parametrize("text", ["2 7 1 9 3", "0 0 0 0", "9 8 7 6 5 4 3 2", "1 3 7 9"])
def test_digit_strings_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())  # one token per digit
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    with_specials = [1, 4, *ids, 3]
    assert tokenizer.decode(with_specials, skip_special_tokens=True) == text


def test_arbitrary_text_round_trips(tokenizer):
    text = "浙江的省会在哪? 12345\n  tabs\tok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text


# ---------------------------------------------------------------- presets


def test_tiny_preset_builds_and_runs(tokenizer):
    torch.manual_seed(0)
    model = build_preset("tiny", tokenizer)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 384, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 512)
    assert cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 3, 0)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 394_368 + 256 * len(tokenizer)
    assert 400_000 < n_params < 1_000_000
    ids = torch.tensor([[1, 4, 5, 6, 7, 3]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 6, len(tokenizer))
    assert torch.isfinite(out.loss)


def test_small_20m_parameter_count():
    from transformers import Qwen2ForCausalLM

    from steptrain.models.presets import preset_config

    with torch.device("meta"):
        model = Qwen2ForCausalLM(preset_config("small-20m", vocab_size=8000))
    assert sum(p.numel() for p in model.parameters()) == 20_013_696


def test_unknown_preset_lists_valid_names(tokenizer):
    with pytest.raises(ValueError) as err:
        build_preset("no-such-preset", tokenizer)
    for name in PRESETS:
        assert name in str(err.value)


# ---------------------------------------------------------------- make_demo


def test_make_demo_bundle_loads_and_is_idempotent(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "demo"
    paths = make_demo_main(["--out", str(out), "--n-train", "300", "--n-eval", "20"])
    stdout = capsys.readouterr().out  # other libraries may log to stdout first (deepspeed does)
    printed = json.loads(stdout[stdout.index("\n{") + 1 :] if not stdout.startswith("{") else stdout)
    assert printed == paths
    for key in ("train", "eval", "tokenizer", "model", "manifest"):
        assert (out / paths[key].removeprefix(str(out) + "/")).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["seed"], manifest["preset"]) == (0, "tiny")

    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert model.config.vocab_size == len(tok) == manifest["vocab_size"]
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|EOT|>") == 3
    assert tok.apply_chat_template([{"role": "user", "content": "copy: 1 2"}], tokenize=False) == (
        "<s><|BOT|>human\ncopy: 1 2<|EOT|>"
    )
    assert AutoTokenizer.from_pretrained(paths["tokenizer"]).get_vocab() == tok.get_vocab()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 4, 5]])).logits
    assert logits.shape[-1] == len(tok)

    # second run with the same settings: nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert make_demo(out, n_train=300, n_eval=20) == paths
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps

    # a new preset only rebuilds the model; a new seed rebuilds the data
    train_bytes = (out / "data" / "train.jsonl").read_bytes()
    make_demo(out, n_train=300, n_eval=20, preset="small-20m")
    assert (out / "data" / "train.jsonl").stat().st_mtime_ns == stamps[out / "data" / "train.jsonl"]
    assert AutoModelForCausalLM.from_pretrained(paths["model"]).config.hidden_size == 384
    make_demo(out, n_train=300, n_eval=20, seed=1)
    assert (out / "data" / "train.jsonl").read_bytes() != train_bytes
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def test_make_demo_rejects_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        make_demo(tmp_path, n_train=10, n_eval=2, preset="huge")
