"""`steptrain inspect`: what the model will see, before any compute is spent.

It resolves the run exactly as training does (``recipes.loop.resolve_run``: tokenizer, chat template,
audio glue) and reads the data through the recipe's own ``load_data``, but loads no model weights and
writes nothing. Per row: its ``file:line``, the token ids, the labels (aligned with the ids, HF
convention: -100 where no loss, the model shifts them) and a readable rendering with the trained spans
marked and audio spans summarised; then the data report.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TextIO

from steptrain.data import IGNORE_INDEX, Encoded, RunInputs
from steptrain.recipes import RECIPES
from steptrain.recipes.loop import resolve_run

TRAINED_OPEN, TRAINED_CLOSE = "\u00ab", "\u00bb"  # «trained text»


@dataclass
class Shown:
    """One model input as inspect shows it."""

    source: str
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)  # heard audio: [start, end) per chunk
    seconds: list[float] = field(default_factory=list)  # duration of each heard chunk
    extra: dict = field(default_factory=dict)  # e.g. the side of a preference pair, an RL reference

    @classmethod
    def of(cls, e: Encoded, sample_rate: int, **extra) -> Shown:
        return cls(e.source, list(e.input_ids), list(e.labels), list(e.audio_spans),
                   [c.length / sample_rate for c in e.audio], extra)

    def as_json(self) -> dict:
        return {"source": self.source, **self.extra, "input_ids": self.input_ids, "labels": self.labels,
                "audio_spans": [list(s) for s in self.spans], "audio_seconds": self.seconds}


def _rate(inputs: RunInputs) -> int:
    return inputs.audio.sample_rate if inputs.audio else 16000


def _sft(cfg, tokenizer, inputs) -> tuple[list[Shown], dict]:
    from steptrain.recipes.sft import load_data

    data, evalset, _ = load_data(cfg, tokenizer, inputs)
    shown = [Shown.of(e, _rate(inputs)) for e in data.examples]
    return shown, {**data.stats, "eval_rows": len(evalset.examples) if evalset else 0}


def _pairs(cfg, tokenizer, inputs) -> tuple[list[Shown], dict]:
    from steptrain.recipes.pairs import load_pairs

    data = load_pairs(cfg, tokenizer, inputs, log_stats=False)
    shown = [Shown.of(e, _rate(inputs), side=side)
             for chosen, rejected in data.train.pairs for side, e in (("chosen", chosen), ("rejected", rejected))]
    return shown, {**data.train.stats, "eval_pairs": len(data.eval.pairs) if data.eval else 0}


def _prompts(cfg, tokenizer, inputs) -> tuple[list[Shown], dict]:
    from steptrain.recipes.grpo import load_data

    prompts, held_out, left_out = load_data(cfg, tokenizer, inputs)
    shown = []
    for p in prompts:
        # A prompt has no labels: the trained tokens are the completions sampled during training.
        e = Encoded(p.ids, [IGNORE_INDEX] * len(p.ids), p.row["_source"], list(p.clips), list(p.spans))
        reference = p.row.get("solution")
        shown.append(Shown.of(e, _rate(inputs), **({"solution": reference} if reference is not None else {})))
    report = {"rows": len(prompts) + sum(left_out.values()), "prompts": len(prompts), "skipped": dict(left_out),
              "tokens": sum(len(p.ids) for p in prompts), "label_tokens": 0, "eval_prompts": len(held_out)}
    return shown, report


def _loader(recipe_name: str):
    recipe = RECIPES[recipe_name]
    return _pairs if recipe.pairs else _prompts if recipe.online_rl else _sft


def render(shown: Shown, tokenizer, inputs: RunInputs, *, color: bool = False) -> str:
    """The row as text: trained tokens inside «...» (green on a terminal), each heard chunk as
    ``<audio: N patches, S s>``, each run of discrete audio tokens as ``<N audio codes>``."""
    opened, closed = ("\x1b[32m", "\x1b[0m") if color else (TRAINED_OPEN, TRAINED_CLOSE)
    codes = inputs.audio_ids
    heard = dict((s, (e, sec)) for (s, e), sec in zip(shown.spans, shown.seconds, strict=True))
    pieces: list[tuple[bool, str]] = []  # (trained, text)
    run: list[int] = []
    run_trained = False

    def flush():
        if run:
            pieces.append((run_trained, tokenizer.decode(run, skip_special_tokens=False)))
            run.clear()

    i, ids, labels = 0, shown.input_ids, shown.labels
    while i < len(ids):
        trained = labels[i] != IGNORE_INDEX
        if i in heard:
            end, sec = heard[i]
            flush()
            pieces.append((False, f"<audio: {end - i - 2} patches, {sec:.2f} s>"))
            i = end
            continue
        if codes and codes[0] <= ids[i] <= codes[1]:
            j = i
            while j < len(ids) and codes[0] <= ids[j] <= codes[1] and (labels[j] != IGNORE_INDEX) == trained:
                j += 1
            flush()
            pieces.append((trained, f"<{j - i} audio codes>"))
            i = j
            continue
        if run and trained != run_trained:
            flush()
        run_trained = trained
        run.append(ids[i])
        i += 1
    flush()
    out, inside = [], False
    for trained, text in pieces:
        if trained != inside:
            out.append(opened if trained else closed)
            inside = trained
        out.append(text)
    if inside:
        out.append(closed)
    return "".join(out)


def inspect_data(overrides: list[str], *, rows: int = 3, as_json: bool = False, config_dir=None,
                 stream: TextIO | None = None) -> dict:
    """Print the first ``rows`` inputs (all with ``rows < 0``) and the data report; returns the report."""
    from steptrain.config import load_config

    stream = stream or sys.stdout
    cfg, tokenizer, inputs = resolve_run(load_config(overrides, config_dir))
    shown, report = _loader(cfg.recipe.name)(cfg, tokenizer, inputs)
    report = {"template": inputs.template.describe(), **report,
              "audio_seconds": round(sum(sum(s.seconds) for s in shown), 3)}
    chosen = shown if rows < 0 else shown[:rows]
    color = not as_json and stream.isatty()
    for n, s in enumerate(chosen, 1):
        if as_json:
            print(json.dumps(s.as_json(), ensure_ascii=False), file=stream)
            continue
        trained = sum(label != IGNORE_INDEX for label in s.labels)
        side = f" [{s.extra['side']}]" if "side" in s.extra else ""
        print(f"--- {n}: {s.source}{side}  ({len(s.input_ids)} tokens, {trained} trained)", file=stream)
        print(f"input_ids: {s.input_ids}", file=stream)
        print(f"labels:    {s.labels}", file=stream)
        print(render(s, tokenizer, inputs, color=color), file=stream)
        if "solution" in s.extra:
            print(f"solution: {s.extra['solution']}", file=stream)
    if as_json:
        print(json.dumps({"report": report}, ensure_ascii=False), file=stream)
    else:
        print("--- data: " + ", ".join(f"{k} {v}" for k, v in report.items()), file=stream)
    return report
