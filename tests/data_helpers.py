"""Shared test fixtures for the data layer: a tiny word-level tokenizer with Step special tokens.

Word-level (one id per word, punctuation split off, whitespace dropped) so that expected token ids can
be written out by hand from VOCAB.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from steptrain.config.schema import DataConfig
from steptrain.data import RunInputs, resolve_template

SPECIALS = ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"]
WORDS = (
    "system human assistant input you are a helpful bot hi hello how is the weather sunny today thanks "
    "welcome . ? , ! call tool result ok good"
).split()
VOCAB = {
    token: i for i, token in enumerate(SPECIALS + WORDS)
}  # <unk>=0 <s>=1 </s>=2 <|EOT|>=3 <|BOT|>=4 system=5 ...

# The Step-Audio chat format as a Jinja template (what a Step tokenizer_config.json would carry).
STEP_JINJA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set r = 'human' %}{% elif m['role'] == 'tool' %}{% set r = 'input' %}"
    "{% else %}{% set r = m['role'] %}{% endif %}"
    "<|BOT|>{{ r }}\n{{ m['content'] }}<|EOT|>{% endfor %}"
    "{% if add_generation_prompt %}<|BOT|>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = STEP_JINJA) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|EOT|>",
        pad_token="<unk>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def ids(text: str) -> list[int]:
    """Hand-checkable ids: VOCAB lookup of space-separated tokens."""
    return [VOCAB[t] for t in text.split()]


def write_jsonl(path: Path, lines: list[dict | str]) -> str:
    """Write rows (dicts are JSON-encoded, strings written verbatim) one per line; returns the path."""
    path.write_text(
        "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8"
    )
    return str(path)


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def chat(*turns: tuple[str, str], **extra) -> dict:
    """A row from (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in turns], **extra}


def run_inputs(tok, cfg, **audio):
    """The RunInputs a run would resolve for ``cfg`` (a DataConfig) and ``tok``; ``audio``: audio=, reply=."""
    template = resolve_template(cfg.template, tok, bos=cfg.bos, default_system=cfg.system)
    return RunInputs(template, **audio)
