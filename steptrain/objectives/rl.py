"""Policy-gradient objectives for online RL from sampled groups (GRPO and relatives).

A prompt q gets G sampled completions o_1..o_G with scalar rewards R_1..R_G (GRPO compares them; PPO
scores each token with a learned critic V instead). Notation per completion token t of o_i:  r_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...)  (pi_old: the policy that
sampled; r = 1 in value on-policy, where the gradient is that of A * log pi_theta);  pi_ref  a frozen
reference model.
"""

from __future__ import annotations

import torch

from steptrain.objectives.registry import ADVANTAGES


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Per-completion advantages from rewards laid out prompt-major (the G samples of a prompt adjacent).

    - ``group`` (GRPO, Shao et al. 2024, eq. 3):  A_i = (R_i - mean_j R_j) / (std_j R_j + eps), the
      unbiased standard deviation of the group (as TRL computes it);
    - ``mean`` (Dr. GRPO, Liu et al. 2025):  A_i = R_i - mean_j R_j  (no division: no preference for
      groups whose rewards barely differ);
    - ``rloo`` (Ahmadian et al. 2024):  A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_j R_j).
    A group whose rewards are all equal gets A = 0: it carries no learning signal.
    """
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage {kind!r} is not one of: {', '.join(ADVANTAGES)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make groups of {group_size} (>= 2)")
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return _SCALES[kind](centred, grouped, eps).view(-1).to(rewards.dtype)


# How each registered advantage turns centred rewards [prompts, G] into advantages (keyed like
# registry.ADVANTAGES).
_SCALES = {
    "group": lambda centred, grouped, eps: centred / (grouped.std(dim=1, keepdim=True) + eps),
    "mean": lambda centred, grouped, eps: centred,
    "rloo": lambda centred, grouped, eps: centred * grouped.shape[1] / (grouped.shape[1] - 1),
}
if _SCALES.keys() != ADVANTAGES.keys():
    raise ImportError(f"advantages without an implementation or a registry entry: "
                      f"{sorted(_SCALES.keys() ^ ADVANTAGES.keys())}")


def clipped_policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``[B, T]`` of the clipped surrogate plus an optional KL penalty, and its parts.

        L_{i,t} = -min(r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_{i,t}
        KL_{i,t} = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (k3 estimator, >= 0, unbiased)

    PPO's clip (Schulman et al. 2017) with DAPO's decoupled ``clip_high`` (Yu et al. 2025). ``logps``,
    ``old_logps`` and ``ref_logps`` are the completion tokens' log-probs ``[B, T]`` (values at padding are
    ignored by the caller's weights); ``advantages`` is ``[B]`` (one per completion, GRPO) or ``[B, T]``
    (per token, PPO). Without ``old_logps`` the sampler is the
    current policy (on-policy): r = exp(logp - logp.detach()) = 1 with the right gradient.
    The parts: ``ratio`` and ``clipped`` (1 where the clip took effect) per token, ``kl`` per token.
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(logps.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_beta * kl
    return loss, {"ratio": ratio.detach(), "clipped": (clipped < unclipped).to(logps.dtype), "kl": kl.detach()}


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_beta: float = 0.0):
    """PPO's per-token reward ``[B, T]``: the completion's score on its last token, minus the KL penalty
    (InstructGPT, Ouyang et al. 2022) on every token:  r_t = -beta * (log pi_old - log pi_ref)_t + [t = last] R.
    ``mask [B, T]`` marks completion tokens; ``kl`` is log pi_old - log pi_ref per token (None: no penalty)."""
    rewards = torch.zeros_like(mask, dtype=torch.float64)
    if kl is not None and kl_beta:
        rewards = rewards - kl_beta * kl.double() * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    has = last >= 0
    rewards[has, last[has]] += scores[has].double()
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked tokens, and returns.

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last completion token is 0)
        A_t = sum_l (gamma * lam)^l * delta_{t+l},   returns_t = A_t + V_t
    With gamma = lam = 1 (Step-Audio-R1's PPO), A_t = sum_{l >= t} r_l - V_t. ``[B, T]`` in, ``[B, T]`` out
    (0 outside the mask); masked positions of a row must be contiguous (a completion).
    """
    rewards, values, mask = rewards.double(), values.double() * mask, mask.double()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population std), 0 elsewhere: PPO's advantage normalisation."""
    m = mask.double()
    n = m.sum().clamp(min=1)
    mean = (x.double() * m).sum() / n
    var = (((x.double() - mean) * m) ** 2).sum() / n
    return ((x.double() - mean) / (var.sqrt() + eps) * m).to(x.dtype)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's critic loss per token ``[B, T]``:  0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
