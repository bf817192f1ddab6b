"""Deterministic synthetic preference pairs over the demo digit tasks (reverse / sort / copy).

The chosen reply is the correct answer (``demo_corpus.solve``); the rejected reply is wrong in one of two
ways, drawn per pair among ``negatives``:

- ``"digits"``: the same number of digits, but drawn at random (none of the prompt's digits kept in
  place), so preferring the chosen reply means using the prompt's digits;
- ``"order"``: the prompt's digits in a wrong order (the answer of another task, or shuffled), so
  preferring the chosen reply means knowing the task;
- ``"foreign"`` (not drawn by default): the same number of digits, all absent from the prompt: the
  cleanest signal (the chosen reply uses only the prompt's digits, the rejected one none of them), for
  tests that need a tiny model to learn the preference reliably in a few hundred steps.

Rows are ms-swift preference JSONL::

    {"messages": [{"role": "user", "content": "reverse: 3 9 1 7"},
                  {"role": "assistant", "content": "7 1 9 3"}], "rejected_response": "5 0 2 8"}

Held-out prompts never occur in the train split.

    python -m data_pipelines.preference_corpus OUT_DIR [--n-train 2000] [--n-eval 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data_pipelines.demo_corpus import TASKS, solve, write_jsonl

DIGITS = "0123456789"


def _wrong_digits(rng: random.Random, answer: list[str]) -> list[str]:
    return [rng.choice([d for d in DIGITS if d != a]) for a in answer]


def _foreign_digits(rng: random.Random, prompt_digits: list[str], answer: list[str]) -> list[str]:
    others = [d for d in DIGITS if d not in prompt_digits]  # prompts have at most 7 digits: never empty
    return [rng.choice(others) for _ in answer]


def _wrong_order(rng: random.Random, task: str, digits: list[str], answer: list[str]) -> list[str]:
    options = [solve(t, digits).split() for t in TASKS if t != task]
    options = [o for o in options if o != answer]
    if options and rng.random() < 0.5:
        return rng.choice(options)
    shuffled = answer[:]
    for _ in range(20):
        rng.shuffle(shuffled)
        if shuffled != answer:
            return shuffled
    return _wrong_digits(rng, answer)  # all digits equal: no other order exists


NEGATIVES = ("digits", "order")  # the default mix; "foreign" is the third kind
KINDS = (*NEGATIVES, "foreign")


def make_pair(rng: random.Random, prompt_digits: list[str], task: str, negatives=NEGATIVES) -> dict:
    answer = solve(task, prompt_digits).split()
    kind = rng.choice(negatives)
    if kind not in KINDS:
        raise ValueError(f"negative kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "digits":
        rejected = _wrong_digits(rng, answer)
    elif kind == "foreign":
        rejected = _foreign_digits(rng, prompt_digits, answer)
    else:
        rejected = _wrong_order(rng, task, prompt_digits, answer)
    return {
        "messages": [
            {"role": "user", "content": f"{task}: {' '.join(prompt_digits)}"},
            {"role": "assistant", "content": " ".join(answer)},
        ],
        "rejected_response": " ".join(rejected),
        "negative": kind,
    }


def generate_pairs(n_train: int, n_eval: int, seed: int = 0, min_digits: int = 4, max_digits: int = 7,
                   negatives=NEGATIVES):
    """(train pairs, eval pairs); eval prompts are distinct from each other and from every train prompt."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw() -> tuple[str, list[str]]:
        while True:
            task = rng.choice(TASKS)
            digits = [rng.choice(DIGITS) for _ in range(rng.randint(min_digits, max_digits))]
            key = f"{task} {''.join(digits)}"
            if key not in seen:
                seen.add(key)
                return task, digits

    evals = [make_pair(rng, d, t, negatives) for t, d in (draw() for _ in range(n_eval))]
    train = [make_pair(rng, d, t, negatives) for t, d in (draw() for _ in range(n_train))]
    return train, evals


def write_preference_corpus(
    out_dir: str | Path, n_train: int = 2000, n_eval: int = 128, seed: int = 0, negatives=NEGATIVES
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate_pairs(n_train, n_eval, seed, negatives=tuple(negatives))
    paths = {"train": out / "pref_train.jsonl", "eval": out / "pref_eval.jsonl"}
    write_jsonl(train, paths["train"])
    write_jsonl(evals, paths["eval"])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", default=",".join(NEGATIVES), help="kinds of rejected replies, comma-separated")
    args = ap.parse_args(argv)
    negatives = args.negatives.split(",")
    for name, path in write_preference_corpus(args.out_dir, args.n_train, args.n_eval, args.seed, negatives).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
