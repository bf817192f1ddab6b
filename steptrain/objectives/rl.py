"""Policy-gradient objectives for online RL from sampled groups (GRPO and relatives).

A prompt q gets G sampled completions o_1..o_G with scalar rewards R_1..R_G. Notation per completion
token t of o_i:  r_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(...)  (pi_old: the policy that
sampled; r = 1 in value on-policy, where the gradient is that of A * log pi_theta);  pi_ref  a frozen
reference model.
"""

from __future__ import annotations

import torch

ADVANTAGES = ("group", "mean", "rloo")


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
    if kind == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif kind == "rloo":
        centred = centred * group_size / (group_size - 1)
    return centred.view(-1).to(rewards.dtype)


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
    ignored by the caller's weights); ``advantages`` is ``[B]``. Without ``old_logps`` the sampler is the
    current policy (on-policy): r = exp(logp - logp.detach()) = 1 with the right gradient.
    The parts: ``ratio`` and ``clipped`` (1 where the clip took effect) per token, ``kl`` per token.
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages[:, None].to(logps.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_beta * kl
    return loss, {"ratio": ratio.detach(), "clipped": (clipped < unclipped).to(logps.dtype), "kl": kl.detach()}
