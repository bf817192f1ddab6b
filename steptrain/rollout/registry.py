"""The built-in rewards a config can name in ``objective.rewards``, with what each needs from the run.

Plain data (no torch): ``steptrain.config`` derives its list of built-ins from it and validation reads the
properties. ``rewards.py`` implements every entry under the same name and refuses to import when the
two disagree. Sources of the Step-Audio 2 / Step-Audio-R1 rewards: docs/step_facts.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reward:
    summary: str
    # Compares the completion with the row's reference answer (``solution``, or the final assistant turn):
    # rows without one are bad rows, found when the prompts are loaded.
    needs_reference: bool = False
    # Scores with the sequence classifier at ``objective.reward_model_path``; the recipe builds it (it owns
    # the device and the tokenizer).
    needs_model: bool = False


# The order is the order of the built-ins in error messages.
REWARDS: dict[str, Reward] = {
    "accuracy": Reward("1 if the final answer equals the reference, else 0", needs_reference=True),
    "reasoning": Reward("1 if a non-empty thinking block precedes the answer"),
    "mgrd": Reward("Step-Audio-R1: 0.8 accuracy + 0.2 reasoning on audio rows, accuracy on text rows",
                   needs_reference=True),
    "think_length": Reward("Step-Audio 2 PPO stage 1: 1 if the thinking is neither empty nor longer than "
                           "objective.think_max_words words"),
    "cer": Reward("max(0, 1 - CER(answer, reference))", needs_reference=True),
    "reward_model": Reward("the score of a sequence classifier (e.g. from recipe=reward)", needs_model=True),
}
