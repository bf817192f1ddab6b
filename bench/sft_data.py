"""Benchmark data for bench/sft.py: long-tailed chat rows written to exact token budgets, the tokenizer,
the model every contender starts from, and a check that TRL tokenizes the rows exactly as steptrain does."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path

from common import repo_on_path

PRESET = "small-20m"
VOCAB_SIZE = 8000

TRL_CHAT_TEMPLATE = (
    "{%- set role_map = {'user': 'human', 'assistant': 'assistant', 'system': 'system', 'tool': 'input'} -%}"
    "{%- if add_bos is not defined or add_bos -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|BOT|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|EOT|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|BOT|>' + role_map.get(message['role'], message['role']) + '\\n' + message['content'] + '<|EOT|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|BOT|>assistant\\n' -}}{%- endif -%}"
)


def _lexicon(rng: random.Random, size: int) -> list[str]:
    onsets = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl", "br", "kr"]
    vowels = [*"aeiou", "ai", "ou", "ea", "io"]
    codas = ["", "", "", "n", "r", "s", "l", "m", "t", "nd", "st"]
    words: set[str] = set()
    while len(words) < size:
        n = rng.choices([1, 2, 3, 4], weights=[3, 5, 3, 1])[0]
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)))
    return sorted(words)


class _Writer:
    """Zipf-distributed pseudo-words in sentences, written to a budget of tokens once their costs are known.

    Without ``costs`` every word counts as one token (the first pass, which only feeds tokenizer training);
    with ``costs`` (tokens of " word" under the trained tokenizer) a budget is met to within one word.
    """

    def __init__(self, seed: int, rng: random.Random | None = None, costs: dict[str, int] | None = None):
        self.rng = rng or random.Random(seed)
        self.words = _lexicon(random.Random(seed), 6000)  # the lexicon and its ranks depend on seed alone
        random.Random(seed + 1).shuffle(self.words)
        weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(self.words))]
        total, acc = sum(weights), 0.0
        self.cum = []
        for w in weights:
            acc += w / total
            self.cum.append(acc)
        self.costs = costs

    def text(self, budget: int) -> str:
        rng, out, used = self.rng, [], 0
        left = rng.randint(4, 14)  # words to the end of the sentence
        while not out or used < budget:
            w = rng.choices(self.words, cum_weights=self.cum)[0]
            used += self.costs[w] if self.costs else 1
            left -= 1
            if left == 0:
                w += "." if rng.random() < 0.8 else ","
                used += 1
                left = rng.randint(4, 14)
            out.append(w)
        if out[-1][-1] not in ".,":
            out[-1] += "."
        return " ".join(out).rstrip(",")


def make_rows(n: int, max_length: int, seed: int, costs: dict[str, int] | None = None) -> list[dict]:
    """ms-swift rows whose token lengths follow a clipped log-normal (median max_length/5, long right tail)."""
    rng = random.Random(f"{seed}:{'tokens' if costs else 'words'}")  # the two passes draw different rows
    writer = _Writer(seed, rng, costs)
    rows = []
    for _ in range(n):
        budget = int(min(max(rng.lognormvariate(math.log(max_length / 5), 0.8), 16), max_length - 8))
        turns = 2 if budget >= 96 and rng.random() < 0.15 else 1
        messages = []
        for _ in range(turns):
            per_turn = max(4, budget // turns - 8)  # ~8 tokens of headers and end-of-turn markers per exchange
            n_user = max(2, int(per_turn * rng.uniform(0.15, 0.6)))
            messages += [
                {"role": "user", "content": writer.text(n_user)},
                {"role": "assistant", "content": writer.text(max(2, per_turn - n_user))},
            ]
        rows.append({"messages": messages})
    return rows


def word_costs(tokenizer, seed: int) -> dict[str, int]:
    words = _Writer(seed).words
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return {w: len(i) for w, i in zip(words, ids, strict=True)}


def _encode(template, tokenizer, messages):
    from steptrain.data.encode import tokenize_segments

    return tokenize_segments(template.segments(messages, loss_on="all_assistant"), tokenizer)


def fit_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """Encode the rows (steptrain's Step template); shorten the last reply of the rare row over max_length and
    drop a row that cannot be shortened, so that no contender ever truncates (they truncate differently)."""
    from steptrain.data import resolve_template

    template = resolve_template("step", tokenizer, bos=True)
    out_rows, ids_all, labels_all = [], [], []
    for row in rows:
        ids, labels = _encode(template, tokenizer, row["messages"])
        for _ in range(8):
            if len(ids) <= max_length:
                break
            reply = row["messages"][-1]["content"].split(" ")
            keep = max(1, len(reply) - (len(ids) - max_length) - 1)  # every word is at least one token
            row["messages"][-1]["content"] = " ".join(reply[:keep]).rstrip(".,") + "."
            ids, labels = _encode(template, tokenizer, row["messages"])
        if len(ids) > max_length:
            continue
        out_rows.append(row)
        ids_all.append(ids)
        labels_all.append([-100, *labels[1:]])  # steptrain never trains the first token of an example
    return out_rows, ids_all, labels_all


def trl_tokenization_mismatches(rows, tokenizer, ids_all, labels_all) -> int:
    """Rows where TRL's apply_chat_template(+assistant mask) differs from steptrain's input ids or loss mask."""
    bad = 0
    for row, ids, labels in zip(rows, ids_all, labels_all, strict=True):
        out = tokenizer.apply_chat_template(
            row["messages"], chat_template=TRL_CHAT_TEMPLATE, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        trained = [bool(m) for m in out["assistant_masks"]]
        trained[0] = False
        if list(out["input_ids"]) != ids or trained != [label != -100 for label in labels]:
            bad += 1
    return bad


def _quantiles(xs: list[int]) -> dict:
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"min": s[0], "p10": q(0.1), "p50": q(0.5), "mean": round(statistics.fmean(s), 1), "p90": q(0.9),
            "p99": q(0.99), "max": s[-1]}


def prepare(work: Path, rows_n: int, max_length: int, seed: int) -> dict:
    """Data file, tokenizer + model directory, and the facts about them that the summary needs."""
    repo_on_path()
    import torch

    from data_pipelines.demo_tokenizer import train_demo_tokenizer
    from steptrain.data import plan_epoch
    from steptrain.models.presets import build_preset

    t0 = time.perf_counter()
    # Pass 1 (word budgets) only trains the tokenizer; pass 2 writes the rows to token budgets.
    texts = [m["content"] for r in make_rows(rows_n, max_length, seed) for m in r["messages"]]
    model_dir = work / "model"
    tokenizer = train_demo_tokenizer(texts, model_dir, vocab_size=VOCAB_SIZE)
    rows = make_rows(rows_n, max_length, seed, costs=word_costs(tokenizer, seed))
    tokenizer.model_max_length = max(2048, max_length)  # rows are cut to max_length before training
    tokenizer.save_pretrained(str(model_dir))
    rows, ids_all, labels_all = fit_rows(rows, tokenizer, max_length)
    data_file = work / "train.jsonl"
    with data_file.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    mismatches = trl_tokenization_mismatches(rows, tokenizer, ids_all, labels_all)

    torch.manual_seed(seed)
    model = build_preset(PRESET, tokenizer)
    model.save_pretrained(str(model_dir))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))

    lengths = [len(ids) for ids in ids_all]
    n_bins = len(plan_epoch(lengths, batch_size=1, max_length=max_length, packing=True, group_by_length=False,
                            shuffle=True, seed=seed, epoch=0))
    return {
        "data_file": str(data_file),
        "model_dir": str(model_dir),
        "prepare_s": round(time.perf_counter() - t0, 1),
        "data": {
            "rows": len(rows),
            "rows_generated": rows_n,
            "multi_turn_rows": sum(len(r["messages"]) > 2 for r in rows),
            "tokens": sum(lengths),
            "label_tokens": sum(sum(label != -100 for label in labels) for labels in labels_all),
            "length_tokens": _quantiles(lengths),
            "pack_fill": sum(lengths) / (n_bins * max_length),  # steptrain's bins, epoch 0
            "trl_tokenization_mismatches": mismatches,
        },
        "model": {
            "preset": PRESET,
            "vocab_size": len(tokenizer),
            "n_params": n_params,
            "n_matmul_params": n_matmul,
            "n_layers": cfg.num_hidden_layers,
            "d_attn": cfg.num_attention_heads * head_dim,
            "hidden_size": cfg.hidden_size,
            "attn_implementation": "sdpa",
            "dtype": "float32",
        },
    }
