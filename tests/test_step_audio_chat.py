"""experiment=step_audio_chat_lora on a Step-1 checkpoint written in the released layout by the test: ms-swift's
`step_audio` template (<s><|BOT|>...), literal <audio_k> strings as single tokens at 65536 + k, loss on the
replies only, and a held-out loss that falls."""

from __future__ import annotations

import json
import random

import pytest

from steptrain.cli import main
from tests.conftest import read_metrics
from tests.test_step1 import TINY, write_released_dir

TEXT_VOCAB = 65536  # the released Step-1 text vocabulary; the audio codes follow it
WORDS = [f"w{i}" for i in range(10, 50)]
ROLE_WORDS = ["system", "human", "assistant"]  # ids 5, 6, 7


def write_tokenizer(directory, vocab_size: int) -> None:
    """A word-level tokenizer with the released Step-1 special ids (<unk> 0, <s> 1, </s> 2, <|EOT|> 3, <|BOT|> 4)
    and 65,536 text ids; it lacks the audio tokens, which the run adds at 65536 + k."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    names = ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>", *ROLE_WORDS]
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names[:5]])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "<|EOT|>", "unk_token": "<unk>",
        "pad_token": "<unk>"}))


def _codes(rng: random.Random, n: int) -> list[int]:
    """k values of an interleaved v1 stream: 2 linguistic (0..1023) then 3 semantic (1024..5119) per group."""
    out = []
    for _ in range(n):
        out += [rng.randrange(1024) for _ in range(2)] + [1024 + rng.randrange(4096) for _ in range(3)]
    return out


def _rows(n: int, seed: int) -> list[dict]:
    """Spoken-question rows as ms-swift's template writes them: audio codes as literal <audio_k> strings in the
    user turn; the reply copies two words (half the rows answer in audio codes, as a TTS reply)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 2)
        heard = "".join(f"<audio_{k}>" for k in _codes(rng, 2))
        if i % 2:
            reply = " ".join(words)
        else:
            reply = "".join(f"<audio_{k}>" for k in [int(w[1:]) for w in words])
        rows.append({"messages": [{"role": "system", "content": "w8 w9"},
                                  {"role": "user", "content": f"{heard} {' '.join(words)}"},
                                  {"role": "assistant", "content": reply}]})
    return rows


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("step_audio_chat")
    model = write_released_dir(root / "Step-Audio-Chat", {**TINY, "vocab_size": TEXT_VOCAB})
    write_tokenizer(model, TEXT_VOCAB)
    train, held = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(64, 0)))
    held.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, 1)))
    return {"model": model, "train": train, "eval": held}


def test_inspect_shows_the_step_audio_template_and_audio_ids(chat, capsys, tmp_path):
    args = ["experiment=step_audio_chat_lora", f"model.path={chat['model']}", f"data.train_files=[{chat['train']}]",
            f"output_dir={tmp_path}"]
    capsys.readouterr()
    assert main(["inspect", *args, "--json", "--rows", "4"]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    shown, report = lines[:-1], lines[-1]["report"]
    assert report["template"] == "step template, <s> in front" and report["rows"] == 64
    rows = _rows(64, 0)
    for s, row in zip(shown, rows, strict=False):
        ids, labels = s["input_ids"], s["labels"]
        assert ids[:5] == [1, 4, 5, 8, 9]  # <s><|BOT|>system\nw8 w9: one BOS, then the system turn
        heard = [int(t[len("<audio_"):]) for t in row["messages"][1]["content"].split(" ")[0].split(">") if t]
        audio_in_prompt = [i - TEXT_VOCAB for i, lab in zip(ids, labels, strict=True) if i >= TEXT_VOCAB and lab == -100]
        assert audio_in_prompt == heard  # each literal <audio_k> is the single id 65536 + k
        trained = [(i, lab) for i, lab in zip(ids, labels, strict=True) if lab != -100]
        assert all(i == lab for i, lab in trained) and trained[-1][0] == 3  # the reply, ending in <|EOT|>
        reply = row["messages"][2]["content"]
        n_reply = len(reply.split()) if " " in reply else reply.count("<audio_")
        assert len(trained) == n_reply + 1
        start = next(n for n, lab in enumerate(labels) if lab != -100)
        assert ids[start - 3 : start] == [3, 4, 7]  # ...<|EOT|><|BOT|>assistant, then the reply
        if " " not in reply:  # a spoken reply: its codes are trained as ids 65536 + k
            assert [i - TEXT_VOCAB for i, _ in trained[:-1]] == [int(t[7:]) for t in reply.split(">") if t]


def test_lora_sft_lowers_the_held_out_loss(chat, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "experiment=step_audio_chat_lora", f"model.path={chat['model']}",
                 f"data.train_files=[{chat['train']}]", f"data.eval_files=[{chat['eval']}]", f"output_dir={out}",
                 "trainer.batch_size=8", "trainer.grad_accum=1", "trainer.max_steps=24", "optim.lr=1e-2",
                 "optim.warmup_ratio=0", "logging.progress_bar=false", "logging.tensorboard=false",
                 "logging.plot=false"]) == 0
    evals = [r["eval/loss"] for r in read_metrics(out) if "eval/loss" in r]
    # from ~ln(70,656) = 11.2 nats: 1.81-1.90 nats lower after 24 steps over trainer.seed 0-3
    assert len(evals) == 2 and evals[-1] < evals[0] - 1.0, evals
    saved = (out / "config.yaml").read_text()
    assert "template: step" in saved and "bos: true" in saved and "audio_codes: 5120" in saved
