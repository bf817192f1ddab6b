"""Generation behind one function so recipes (evaluation, RL rollouts) do not care how it runs."""

from steptrain.rollout.generate import Sampling, generate_greedy, generate_ids, stop_ids

__all__ = ["Sampling", "generate_greedy", "generate_ids", "stop_ids"]
