"""Deterministic synthetic corpus for the demo / quickstart: small digit-string tasks in ms-swift JSONL.

Each user turn is a task word plus 4-8 space-separated digits; the assistant answers with digits only:

    reverse: 3 9 1 7 2  ->  2 7 1 9 3
    sort: 3 9 1 7       ->  1 3 7 9
    copy: 5 0 5 2 8     ->  5 0 5 2 8

The answer of every turn is a pure function of its prompt (see :func:`solve`), so held-out accuracy is
plain exact match against the last assistant message. Some rows start with a system message and some
have two exchanges, so chat templates and assistant-only loss masking are exercised. A ~0.5M-parameter
Qwen2 (preset "tiny") trained from scratch learns the mix to high exact-match accuracy in a few minutes
on 2 CPU cores.

Row format (one JSON object per line, ``ensure_ascii=False``)::

    {"messages": [{"role": "user", "content": "sort: 3 9 1 7"}, {"role": "assistant", "content": "1 3 7 9"}]}
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

TASKS: tuple[str, ...] = ("reverse", "sort", "copy")

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a careful digit puzzle solver.",
    "Answer with digits only.",
    "Solve the task exactly.",
)


def solve(task: str, digits: list[str]) -> str:
    """The reference answer for ``task`` applied to ``digits`` (single-character strings)."""
    if task == "reverse":
        out = digits[::-1]
    elif task == "sort":
        out = sorted(digits)
    elif task == "copy":
        out = list(digits)
    else:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return " ".join(out)


def parse_prompt(content: str) -> tuple[str, list[str]]:
    """Split a user content ``"task: d d d"`` into ``(task, [d, d, d])``."""
    task, _, rest = content.partition(":")
    return task.strip(), rest.split()


def _make_turn(rng: random.Random, min_digits: int, max_digits: int) -> tuple[str, str]:
    task = rng.choice(TASKS)
    n = rng.randint(min_digits, max_digits)
    digits = [str(rng.randrange(10)) for _ in range(n)]
    return f"{task}: {' '.join(digits)}", solve(task, digits)


def _make_row(
    rng: random.Random, min_digits: int, max_digits: int, p_system: float, p_multi_turn: float
) -> dict:
    messages: list[dict[str, str]] = []
    if rng.random() < p_system:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = 2 if rng.random() < p_multi_turn else 1
    for _ in range(n_turns):
        prompt, answer = _make_turn(rng, min_digits, max_digits)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _user_contents(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "user"]


def generate_rows(
    n_train: int = 20000,
    n_eval: int = 256,
    seed: int = 0,
    min_digits: int = 4,
    max_digits: int = 8,
    p_system: float = 0.2,
    p_multi_turn: float = 0.2,
) -> tuple[list[dict], list[dict]]:
    """Build ``(train_rows, eval_rows)`` deterministically from ``seed``.

    Eval rows have pairwise distinct prompts, and no user prompt of any eval row occurs anywhere in
    the training rows (train rows that would collide are redrawn).
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(f"steptrain-demo-corpus/{seed}")
    eval_rows: list[dict] = []
    eval_prompts: set[str] = set()
    attempts = 0
    while len(eval_rows) < n_eval:
        attempts += 1
        if attempts > 100 * max(n_eval, 1):
            raise RuntimeError("could not draw enough distinct eval prompts; widen the digit range")
        row = _make_row(rng, min_digits, max_digits, p_system, p_multi_turn)
        prompts = _user_contents(row)
        if len(set(prompts)) != len(prompts) or eval_prompts.intersection(prompts):
            continue
        eval_prompts.update(prompts)
        eval_rows.append(row)
    train_rows: list[dict] = []
    while len(train_rows) < n_train:
        row = _make_row(rng, min_digits, max_digits, p_system, p_multi_turn)
        if eval_prompts.intersection(_user_contents(row)):
            continue
        train_rows.append(row)
    return train_rows, eval_rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_demo_corpus(
    out_dir: str | Path,
    n_train: int = 20000,
    n_eval: int = 256,
    seed: int = 0,
    min_digits: int = 4,
    max_digits: int = 8,
) -> dict[str, Path]:
    """Write ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; return ``{"train": path, "eval": path}``.

    Same arguments -> byte-identical files. The reference for an eval row is the content of its last
    assistant message; the prompt is every message before it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = generate_rows(
        n_train=n_train, n_eval=n_eval, seed=seed, min_digits=min_digits, max_digits=max_digits
    )
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    write_jsonl(train_rows, paths["train"])
    write_jsonl(eval_rows, paths["eval"])
    return paths


def iter_tokenizer_texts(rows: Iterable[dict]) -> Iterator[str]:
    """Texts to train the demo tokenizer on: each message as ``"{step_role}\\n{content}"``."""
    role_map = {"user": "human", "assistant": "assistant", "system": "system", "tool": "input"}
    for row in rows:
        for m in row["messages"]:
            yield f"{role_map.get(m['role'], m['role'])}\n{m['content']}"
