"""Reward functions for RL: rule-based (verifiable) rewards, a learned reward model, or user code.

A reward function scores a batch: ``fn(completions, rows) -> list[float]``, where ``completions`` are
the decoded generated texts and ``rows`` the prompts' JSONL rows (extra fields such as ``solution``
reach the function untouched, as in ms-swift and TRL). ``objective.rewards`` maps names to weights;
the reward of a completion is the weighted sum (a weight of 0 turns a reward off). Other names map to
user code in ``objective.reward_functions`` (name -> "module:function", importable from the working
directory).

Built-ins (named in ``registry.REWARDS``; Step-Audio 2 and Step-Audio-R1, sources in docs/step_facts.md):
- ``accuracy``: 1 if the answer (the text after ``</think>``, the last ``\\boxed{}`` if any) equals the
  reference (``solution``, or the row's final assistant turn), after normalising case, spaces and a
  final full stop; numbers compare by value. Else 0.
- ``reasoning``: 1 if a non-empty thinking block precedes the answer.
- ``mgrd``: Step-Audio-R1's RLVR reward: R = 0.8 * accuracy + 0.2 * reasoning for a row with audio, and
  R = accuracy for a text row.
- ``think_length``: Step-Audio 2's first PPO stage: 1 if the thinking is neither empty nor longer than
  ``objective.think_max_words`` words.
- ``cer``: max(0, 1 - CER(answer, reference)): a dense reward for ASR-style tasks.
- ``reward_model``: the score of a sequence-classification model from ``objective.reward_model_path``
  (e.g. exported by recipe=reward); built by the recipe, which owns the device and the tokenizer.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from steptrain.data.errors import DataError
from steptrain.data.prompts import split_reply
from steptrain.eval.asr import error_rates
from steptrain.rollout.registry import REWARDS

RewardFn = Callable[[list[str], list[dict]], list[float]]
NEEDS_REFERENCE = tuple(name for name, reward in REWARDS.items() if reward.needs_reference)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def split_thinking(text: str) -> tuple[str | None, str]:
    """(thinking or None, answer). Handles completions that start inside ``<think>`` (R1's generation
    prompt already opens it) as well as ones that open it themselves."""
    if "</think>" not in text:
        return None, text.strip()
    thinking, answer = text.split("</think>", 1)
    return thinking.replace("<think>", "").strip(), answer.strip()


def extract_answer(text: str) -> str:
    """The final answer of a completion: after the thinking, the last ``\\boxed{...}`` when present."""
    _, answer = split_thinking(text)
    boxed = _BOXED.findall(answer)
    return boxed[-1] if boxed else answer


def normalise(answer: str) -> str:
    return " ".join(answer.strip().rstrip(".。").lower().split())


def same_answer(answer: str, reference: str) -> bool:
    a, r = normalise(answer), normalise(reference)
    try:
        return abs(float(a) - float(r)) <= 1e-6 * max(1.0, abs(float(r)))
    except ValueError:
        return a == r


def reference_answer(row: dict) -> str:
    """The row's ``solution``, else its final assistant turn; a DataError naming the row if neither."""
    solution = row.get("solution")
    if solution is None:
        solution = split_reply(row)[1]
    if solution is None:
        raise DataError("no solution", "a reward needs the reference answer: add a 'solution' field "
                        "or end the row with the assistant's answer").at(row.get("_source", "row"))
    return extract_answer(str(solution))


def accuracy(completions: list[str], rows: list[dict]) -> list[float]:
    return [float(same_answer(extract_answer(c), reference_answer(r))) for c, r in zip(completions, rows, strict=True)]


def reasoning(completions: list[str], rows: list[dict]) -> list[float]:
    return [float(bool(split_thinking(c)[0])) for c in completions]


def mgrd(completions: list[str], rows: list[dict]) -> list[float]:
    correct, reasoned = accuracy(completions, rows), reasoning(completions, rows)
    return [0.8 * c + 0.2 * t if row.get("audios") else c for c, t, row in zip(correct, reasoned, rows, strict=True)]


def think_length(max_words: int) -> RewardFn:
    def reward(completions: list[str], rows: list[dict]) -> list[float]:
        out = []
        for c in completions:
            thinking = split_thinking(c)[0]
            out.append(float(bool(thinking) and len(thinking.split()) <= max_words))
        return out

    return reward


def cer(completions: list[str], rows: list[dict]) -> list[float]:
    out = []
    for c, r in zip(completions, rows, strict=True):
        ref = reference_answer(r)
        out.append(max(0.0, 1.0 - error_rates([extract_answer(c)], [ref])["cer"]) if ref.strip() else 0.0)
    return out


# The rule-based built-ins: objective config -> reward function. With the model-scored ones
# (registry: needs_model, built by build_rewards) they are exactly the registry's names.
RULES: dict[str, Callable[..., RewardFn]] = {
    "accuracy": lambda o: accuracy,
    "reasoning": lambda o: reasoning,
    "mgrd": lambda o: mgrd,
    "think_length": lambda o: think_length(o.think_max_words),
    "cer": lambda o: cer,
}
_MODEL_SCORED = {name for name, reward in REWARDS.items() if reward.needs_model}
if RULES.keys() | _MODEL_SCORED != REWARDS.keys() or RULES.keys() & _MODEL_SCORED:
    raise ImportError(f"built-in rewards without an implementation or a registry entry: "
                      f"{sorted((RULES.keys() | _MODEL_SCORED) ^ REWARDS.keys())}")


def resolve_reward(name: str, objective_cfg) -> RewardFn:
    """The function behind a reward name: a rule-based built-in, or ``objective.reward_functions[name]``
    ("module:function"). ``reward_model`` is built by the recipe, which owns the device."""
    if name in RULES:
        return RULES[name](objective_cfg)
    target = objective_cfg.reward_functions.get(name)
    if target is None:
        raise ValueError(f"objective.rewards: unknown reward {name!r}; built-ins: {', '.join(REWARDS)}, "
                         "or map it to 'module:function' in objective.reward_functions")
    module, _, attr = str(target).partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"objective.reward_functions.{name}={target!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise ValueError(f"objective.reward_functions.{name}={target!r} is not callable")
    return fn


class Rewards:
    """The configured reward functions and their weights; ``__call__`` gives the per-function scores."""

    def __init__(self, functions: dict[str, RewardFn], weights: dict[str, float]):
        self.names = list(functions)
        self.functions, self.weights = functions, [float(weights[n]) for n in self.names]

    def __call__(self, completions: list[str], rows: list[dict]) -> list[list[float]]:
        """[completion][function] scores; a function returning the wrong count or a non-number is an error."""
        columns = []
        for name, fn in self.functions.items():
            scores = list(fn(completions, rows))
            if len(scores) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions")
            try:
                columns.append([float(s) for s in scores])
            except (TypeError, ValueError):
                raise ValueError(f"reward {name!r} returned a non-number: {scores[:4]}") from None
        return [list(col) for col in zip(*columns, strict=True)]

    def total(self, scores: list[float]) -> float:
        return sum(w * s for w, s in zip(self.weights, scores, strict=True))


def reward_model_reward(model, tokenizer, template, batch_size: int = 16) -> RewardFn:
    """Scores of a frozen sequence-classification model on each rendered conversation + completion.

    The text is what recipe=reward trained on: the chat template's prompt, the reply, the EOS token.
    """
    import torch

    from steptrain.models.reward import sequence_scores

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def reward(completions: list[str], rows: list[dict]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(completions), batch_size):
            seqs = [
                tokenizer(template.generation_prompt(split_reply(row)[0]) + text, add_special_tokens=False)["input_ids"]
                + [tokenizer.eos_token_id]
                for text, row in zip(completions[i : i + batch_size], rows[i : i + batch_size], strict=True)
            ]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
            out += sequence_scores(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}).tolist()
        return out

    return reward


def build_rewards(cfg, device, tokenizer, template) -> Rewards:
    """The run's reward functions (``cfg.objective.rewards`` with non-zero weights) and weights; ``template``
    (the run's chat template) renders conversations for a reward model."""
    functions = {}
    for name, weight in cfg.objective.rewards.items():
        if not weight:
            continue
        if name in _MODEL_SCORED:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(cfg.objective.reward_model_path)
            model.requires_grad_(False).eval().to(device)
            functions[name] = reward_model_reward(model, tokenizer, template)
        else:
            functions[name] = resolve_reward(name, cfg.objective)
    return Rewards(functions, dict(cfg.objective.rewards))
