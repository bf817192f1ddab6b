"""Recipes: one training loop per module. ``RECIPES`` names them with what the config and validation need
to know; it is plain data, so importing this package is cheap (a recipe's module loads when it runs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    module: str  # defines run(cfg) -> {"checkpoint": ..., "eval": {...}, ...}
    # Trains on preference pairs (chosen and rejected batched padded: no data.packing).
    pairs: bool = False
    # Trains with a preference loss (objective.loss, beta, label_smoothing) against a reference.
    preference_loss: bool = False
    # The model is a scalar-head sequence classifier, not the causal LM (built and exported as such).
    scalar_head: bool = False
    # Online RL: samples rollout.num_generations completions per prompt and scores them with objective.rewards.
    online_rl: bool = False
    # Advantages compare the samples of a prompt's group (needs rollout.num_generations >= 2).
    group_relative: bool = False
    # Trains a critic next to the policy (objective.critic_path; text LLMs only).
    critic: bool = False


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("steptrain.recipes.sft"),
    "dpo": Recipe("steptrain.recipes.dpo", pairs=True, preference_loss=True),
    "reward": Recipe("steptrain.recipes.reward", pairs=True, scalar_head=True),
    "grpo": Recipe("steptrain.recipes.grpo", online_rl=True, group_relative=True),
    "ppo": Recipe("steptrain.recipes.ppo", online_rl=True, critic=True),
}
