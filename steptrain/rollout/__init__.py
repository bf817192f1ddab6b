"""Generation behind one function so recipes (eval now, RL rollouts later) do not care how it runs."""

from steptrain.rollout.generate import generate_greedy

__all__ = ["generate_greedy"]
