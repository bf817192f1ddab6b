"""The three-argument contract on checkpoints shaped like the user's: `data.template=auto` renders rows
exactly as the tokenizer's own `apply_chat_template` does (or the plain template for a base model), and
sft_lora / dpo / grpo / asr_sft train with only model.path (or llm_path), data.train_files and output_dir."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from steptrain.cli import main
from tests.conftest import train_losses
from tests.user_world import (
    REPLY_END,
    REPLY_START,
    STYLES,
    build_checkpoint,
    build_whisper,
    rows,
    write_jsonl,
)

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]
SHORT = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.save_every=0", *QUIET]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_world")
    data = write_jsonl(root / "sft.jsonl", rows())
    pairs = write_jsonl(root / "pairs.jsonl", [{**r, "messages": r["messages"][:2], "rejected_response": "0 0"}
                                               for r in rows(8)])
    prompts = write_jsonl(root / "prompts.jsonl", [{"messages": r["messages"][:1],
                                                    "solution": r["messages"][1]["content"]} for r in rows(8)])
    return {"root": root, "sft": data, "pairs": pairs, "prompts": prompts,
            **{style: build_checkpoint(style, root / style) for style in STYLES}}


def _inspect(capsys, *args) -> tuple[list[dict], dict]:
    capsys.readouterr()
    assert main(["inspect", *args, "--json", "--rows", "-1"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    return [ln for ln in lines if "source" in ln], lines[-1]["report"]


def _runs(labels: list[int]) -> list[list[int]]:
    """The trained spans: maximal runs of labels that are not -100."""
    out, cur = [], []
    for label in [*labels, -100]:
        if label == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(label)
    return out


def _chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _plain_text(messages, eos: str) -> str:
    """The documented plain template, written out by hand."""
    text = ""
    for m in messages:
        text += f"User: {m['content']}\n" if m["role"] == "user" else f"Assistant: {m['content']}{eos}\n"
    return text


@pytest.mark.parametrize("style", list(STYLES))
def test_inspect_matches_the_tokenizers_own_rendering(world, capsys, style, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world[style])
    shown, report = _inspect(capsys, "experiment=sft_lora", f"model.path={world[style]}",
                             f"data.train_files=[{world['sft']}]", f"output_dir={tmp_path}")
    expected_rows = rows()
    assert [s["source"] for s in shown] == [f"{world['sft']}:{i}" for i in range(1, len(expected_rows) + 1)]
    assert report["rows"] == len(expected_rows) and report["skipped"] == {}
    for s, row in zip(shown, expected_rows, strict=True):
        messages = row["messages"]
        if STYLES[style][4] is None:  # base model: the plain template, no BOS (the tokenizer adds none)
            assert report["template"] == "plain template, no BOS"
            want = tok(_plain_text(messages, tok.eos_token), add_special_tokens=False)["input_ids"]
        else:
            assert report["template"].startswith("jinja")
            want = _chat_ids(tok, messages)
        assert s["input_ids"] == want
        assert len(s["labels"]) == len(s["input_ids"])
        # labels hold the ids themselves where trained (HF convention: the model shifts them)
        assert all(lab in (-100, i) for lab, i in zip(s["labels"], s["input_ids"], strict=True))
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(r) for r in _runs(s["labels"])] == [REPLY_START[style] + r + REPLY_END[style] for r in replies]
    if STYLES[style][1] is not None:  # a template that writes its own BOS gets exactly one
        assert shown[0]["input_ids"][:2].count(tok.bos_token_id) == 1


def test_a_template_that_raises_names_the_row(world, capsys, tmp_path):
    bad = write_jsonl(tmp_path / "sys.jsonl", [rows(1)[0], {"system": "Be brief.", **rows(1)[0]}])
    assert main(["inspect", "experiment=sft_lora", f"model.path={world['inst']}", f"data.train_files=[{bad}]",
                 f"output_dir={tmp_path / 'o'}"]) == 2
    assert capsys.readouterr().err.strip() == f"steptrain: error: {bad}:2: chat template error: System role not supported"


@pytest.mark.parametrize("recipe", ["sft_lora", "dpo", "reward_model", "grpo", "ppo"])
@pytest.mark.parametrize("style", list(STYLES))
def test_three_arguments_train(world, style, recipe, tmp_path):
    data = {"sft_lora": world["sft"], "dpo": world["pairs"], "reward_model": world["pairs"], "grpo": world["prompts"],
            "ppo": world["prompts"]}[recipe]
    extra = ["rollout.num_generations=2", "rollout.max_new_tokens=6"] if recipe in ("grpo", "ppo") else []
    out = tmp_path / "run"
    assert main(["train", f"experiment={recipe}", f"model.path={world[style]}", f"data.train_files=[{data}]",
                 f"output_dir={out}", *SHORT, *extra]) == 0
    assert sorted(train_losses(out)) == [1, 2]
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.data.template == ("plain" if style == "base" else "jinja")  # what auto resolved to
    assert saved.data.bos is (False if style == "base" else None)


@pytest.mark.parametrize("style", list(STYLES))
def test_inspect_shows_preference_pairs_and_rl_prompts_as_training_reads_them(world, capsys, style, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world[style])
    base = [f"model.path={world[style]}", f"output_dir={tmp_path}"]
    shown, report = _inspect(capsys, "experiment=dpo", f"data.train_files=[{world['pairs']}]", *base)
    assert [s["side"] for s in shown[:4]] == ["chosen", "rejected"] * 2 and report["rows"] == 8
    for chosen, rejected in zip(shown[::2], shown[1::2], strict=True):
        assert chosen["source"] == rejected["source"]
        (c,), (r,) = _runs(chosen["labels"]), _runs(rejected["labels"])
        assert tok.decode(r) == REPLY_START[style] + "0 0" + REPLY_END[style]
        # both sides share the prompt: everything before the trained reply
        n = chosen["labels"].index(c[0])
        assert chosen["input_ids"][:n] == rejected["input_ids"][:n] and rejected["labels"].index(r[0]) == n

    shown, report = _inspect(capsys, "experiment=grpo", f"data.train_files=[{world['prompts']}]", *base)
    assert report["prompts"] == 8 and report["label_tokens"] == 0
    for s, row in zip(shown, rows(8), strict=True):
        assert s["solution"] == row["messages"][1]["content"] and set(s["labels"]) == {-100}
        prompt = row["messages"][:1]
        if STYLES[style][4] is None:
            want = tok(f"User: {prompt[0]['content']}\nAssistant:", add_special_tokens=False)["input_ids"]
        else:
            want = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
            want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert s["input_ids"] == want


def test_inspect_renders_trained_spans_and_summarises_heard_audio(assets, speech, capsys, tmp_path):
    from steptrain.audio.features import num_frames
    from steptrain.models.speech import num_patches

    args = ["experiment=asr_sft", "model.preset=tiny-speech", f"model.tokenizer_path={assets['model']}",
            f"data.train_files=[{speech['asr_eval']}]", f"output_dir={tmp_path}"]
    shown, report = _inspect(capsys, *args)
    row = json.loads(speech["asr_eval"].read_text().splitlines()[0])
    first = shown[0]
    (start, end), seconds = first["audio_spans"][0], first["audio_seconds"][0]
    assert end - start - 2 == num_patches(num_frames(round(seconds * 16000)))  # <audio_start> N x patch <audio_end>
    assert first["input_ids"][start + 1 : end - 1] == [first["input_ids"][start + 1]] * (end - start - 2)
    assert report["audio_seconds"] == pytest.approx(sum(sum(s["audio_seconds"]) for s in shown), abs=1e-3)
    assert report["audio_seconds"] > 0.5 * len(shown)  # every clip is a few spoken digits
    assert main(["inspect", *args, "--rows", "1"]) == 0
    text = capsys.readouterr().out
    reply = row["messages"][1]["content"]
    assert f"<audio: {end - start - 2} patches, {seconds:.2f} s>Transcribe the digits." in text
    assert f"\u00ab{reply}<|EOT|>\u00bb" in text  # the trained reply, marked
    assert text.splitlines()[-1].startswith("--- data: template jinja template")
    # the same clip as an RL prompt: the same placeholder span, from <audio_start> to <audio_end>
    rl, _ = _inspect(capsys, "experiment=grpo", *args[1:])
    (rl_start, rl_end), = rl[0]["audio_spans"]
    ids = rl[0]["input_ids"]
    assert rl_end - rl_start == end - start and ids[rl_start] == first["input_ids"][start]
    assert ids[rl_end - 1] == first["input_ids"][end - 1] and rl[0]["audio_seconds"] == [seconds]


@pytest.mark.parametrize("style", list(STYLES))
def test_asr_from_a_whisper_encoder_with_three_arguments(world, speech, style, capsys, tmp_path):
    """asr_sft on the user's LLM (any of the four tokenizers) + an HF Whisper encoder: the audio specials are
    added to the tokenizer, the template is the LLM's own, and the heard clip sits in the user turn."""
    whisper = world["root"] / "whisper"
    if not whisper.exists():
        build_whisper(whisper)
    args = ["experiment=asr_sft", f"model.llm_path={world[style]}", f"model.encoder_path={whisper}",
            f"data.train_files=[{speech['asr_train']}]", f"output_dir={tmp_path / 'run'}"]
    shown, report = _inspect(capsys, *args)
    assert report["skipped"] == {} and report["audio_seconds"] > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world[style])
    lines = speech["asr_train"].read_text().splitlines()
    for s in shown:
        line = lines[int(s["source"].rsplit(":", 1)[1]) - 1]
        (start, end), = s["audio_spans"]
        assert all(lab == -100 for lab in s["labels"][:end])  # the prompt and the heard clip carry no loss
        reply = json.loads(line)["messages"][1]["content"]
        assert [tok.decode(r) for r in _runs(s["labels"])] == [REPLY_START[style] + reply + REPLY_END[style]]
    assert main(["train", *args, *SHORT]) == 0
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
