"""Offline preference optimisation: DPO and its variants, and the Bradley-Terry reward-model loss.

Every loss works on per-sequence summed log-probs (from :func:`sequence_logps`) of a chosen and a rejected
response, and returns a per-pair loss ``[B]``: the caller chooses the reduction (mean over pairs of the
optimizer step). Notation:  pi_c, pi_r  policy log-probs of chosen / rejected;  ref_c, ref_r  the frozen
reference model's;  |c|, |r|  their counted-token numbers;  h = (pi_c - pi_r) - (ref_c - ref_r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from steptrain.objectives.chunked_head import HeadInput
from steptrain.objectives.lm import IGNORE_INDEX, token_nll
from steptrain.objectives.registry import PREFERENCE_LOSSES, names_with

LOSSES = tuple(PREFERENCE_LOSSES)  # the names, in registry order
# ORPO's log(1 - exp(a)) is -inf at a = 0 (a saturated model: every target token has probability 1 in
# float32); average log-probs are capped just below 0 so the odds stay finite.
_ORPO_MAX_AVG_LOGP = -1e-6


def sequence_logps(
    logits: torch.Tensor | HeadInput, labels: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of label-token log-probs and the number of counted tokens, both ``[B]``.

        log pi(y | x) = sum_{t : y_t != -100, mask_t} log p_theta(y_t | x_<t)

    ``labels`` follow the HF convention (aligned with ``input_ids``; logits at t predict labels at t+1, the
    shift happens here). ``token_mask [B, T]`` (bool, aligned with ``labels``) additionally drops targets,
    e.g. discrete audio tokens so a speech model's preference signal comes from its text only. Dropped
    targets are turned into ``-100`` before the cross-entropy, so they add exactly zero to the value and
    the gradient. Cross-entropy in float32 with ``reduction="none"`` avoids gathering from a materialised
    float32 log-softmax of the whole vocabulary. ``logits`` may be a :class:`HeadInput` (the chunked head).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[:2] {tuple(logits.shape[:2])}")
    if token_mask is not None and token_mask.shape != labels.shape:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} must match labels {tuple(labels.shape)}")
    return target_logps(logits[:, :-1], labels[:, 1:], None if token_mask is None else token_mask[:, 1:])


def gathered_logps(
    logits: torch.Tensor | HeadInput, positions: torch.Tensor, targets: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`sequence_logps` for targets read at explicit positions: ``targets[b, j]`` (-100: none)
    is scored by ``logits[b, positions[b, j]]``. Used when two replies share one prompt in a row, so
    the prompt's last position predicts the first token of both. ``token_mask`` is aligned with targets.
    """
    if isinstance(logits, HeadInput):  # gather the hidden states, not the logits
        return target_logps(logits.gather(positions), targets, token_mask)
    picked = torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    return target_logps(picked, targets, token_mask)


def target_logps(
    logits: torch.Tensor | HeadInput, targets: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(targets[b, j] | logits[b, j]) over j, counted targets) per row; ``token_mask``
    (aligned with targets) drops targets by turning them into -100: zero value and zero gradient."""
    if token_mask is not None:
        targets = targets.masked_fill(~token_mask.bool(), IGNORE_INDEX)
    return -token_nll(logits, targets).sum(-1), (targets != IGNORE_INDEX).sum(-1)


def audio_token_mask(labels: torch.Tensor, audio_ids: tuple[int, int] | None) -> torch.Tensor | None:
    """True where a label is NOT a discrete audio token (ids ``first..last`` inclusive); None without audio.

    For ``sequence_logps(..., token_mask=...)``: preference losses on a speech model are then computed on
    the text tokens only. ``-100`` labels count as "not audio" (they are ignored anyway).
    """
    if audio_ids is None:
        return None
    first, last = audio_ids
    return (labels < first) | (labels > last)


def _check_counts(loss: str, chosen_tokens, rejected_tokens) -> None:
    for name, value in (("chosen_tokens", chosen_tokens), ("rejected_tokens", rejected_tokens)):
        if value is None:
            raise ValueError(f"loss={loss!r} length-normalises log-probs: {name} is required")


def _per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Average log-prob per counted token; a sequence with no counted token averages to 0, not nan."""
    return logps / torch.as_tensor(tokens, device=logps.device).to(logps.dtype).clamp(min=1)


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with log p = a:  a - log(1 - exp(a)), the second term via expm1 (exact near a = 0)."""
    a = avg_logp.clamp(max=_ORPO_MAX_AVG_LOGP)
    return a - torch.log(-torch.expm1(a))


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Per-pair preference loss ``[B]`` and the implicit rewards (detached) of chosen and rejected.

    ``loss`` (ε = ``label_smoothing``, the assumed rate of flipped preference labels; σ the logistic):

    - ``sigmoid``  DPO (Rafailov et al. 2023):  L = -log σ(β h)
    - ``cdpo``  conservative DPO, the target is smoothed to 1-ε:
      L = -(1-ε) log σ(β h) - ε log σ(-β h),  0 <= ε <= 0.5
    - ``robust``  rDPO (Chowdhury et al. 2024), unbiased under label noise ε:
      L = [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε),  0 <= ε < 0.5
    - ``ipo``  IPO (Azar et al. 2023), a squared loss that does not push h to infinity:
      L = (h' - 1/(2β))^2, h' = h with every log-prob divided by its token count (ref by the same counts)
    - ``simpo``  SimPO (Meng et al. 2024), reference-free, length-normalised:
      L = -log σ(β (pi_c/|c| - pi_r/|r|) - γ),  γ = ``simpo_gamma`` is the paper's absolute target margin
      in reward units (not divided by β; the paper tunes γ/β in about 0.3..1.6)
    - ``orpo``  ORPO (Hong et al. 2024), reference-free, SFT plus an odds-ratio penalty:
      L = -pi_c/|c| + β · -log σ(log odds_c - log odds_r),  log odds = a - log(1 - exp(a)),  a = pi/|y|

    Rewards: β (pi - ref) for sigmoid / cdpo / robust, the same on per-token log-probs for ipo, and β pi/|y|
    for simpo and orpo. ``ref_*`` may be None for the reference-free losses (they are ignored);
    ``chosen_tokens`` / ``rejected_tokens`` (counted tokens, from :func:`sequence_logps`) are required
    by ipo, simpo and orpo.
    """
    spec = PREFERENCE_LOSSES.get(loss)
    if spec is None:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if not spec.accepts_label_smoothing(eps):
        if spec.uses_label_smoothing:
            raise ValueError(f"label_smoothing must be in {spec.label_smoothing_range} for {loss}, got {eps}")
        raise ValueError(f"label_smoothing applies only to {names_with(PREFERENCE_LOSSES, 'uses_label_smoothing')}; "
                         f"it must be 0 for loss={loss!r}")
    if not spec.reference_free:
        for name, value in (
            ("ref_chosen_logps", ref_chosen_logps),
            ("ref_rejected_logps", ref_rejected_logps),
        ):
            if value is None:
                raise ValueError(f"loss={loss!r} needs the reference model: {name} is required")
    if spec.length_normalized:
        _check_counts(loss, chosen_tokens, rejected_tokens)

    pi_c, pi_r, ref_c, ref_r = chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    if spec.length_normalized:
        pi_c, pi_r = _per_token(pi_c, chosen_tokens), _per_token(pi_r, rejected_tokens)
    if spec.reference_free:
        chosen_rewards, rejected_rewards = beta * pi_c, beta * pi_r
    else:
        if spec.length_normalized:  # the reference by the same counts
            ref_c, ref_r = _per_token(ref_c, chosen_tokens), _per_token(ref_r, rejected_tokens)
        chosen_rewards, rejected_rewards = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    losses = _LOSS_FNS[loss](pi_c, pi_r, ref_c, ref_r, beta=beta, eps=eps, gamma=simpo_gamma)
    return {
        "loss": losses,
        "chosen_rewards": chosen_rewards.detach(),
        "rejected_rewards": rejected_rewards.detach(),
    }


def _margin(pi_c, pi_r, ref_c, ref_r) -> torch.Tensor:
    """h = (pi_c - pi_r) - (ref_c - ref_r)."""
    return (pi_c - pi_r) - (ref_c - ref_r)


def _sigmoid(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    return -F.logsigmoid(beta * _margin(pi_c, pi_r, ref_c, ref_r))


def _ipo(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    return (_margin(pi_c, pi_r, ref_c, ref_r) - 1.0 / (2.0 * beta)) ** 2


def _cdpo(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    h = _margin(pi_c, pi_r, ref_c, ref_r)
    return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    h = _margin(pi_c, pi_r, ref_c, ref_r)
    return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


def _simpo(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    return -F.logsigmoid(beta * (pi_c - pi_r) - gamma)


def _orpo(pi_c, pi_r, ref_c, ref_r, *, beta, eps, gamma):
    odds_ratio = -F.logsigmoid(_log_odds(pi_c) - _log_odds(pi_r))
    return -pi_c + beta * odds_ratio


# Per-pair loss of each registered name, on log-probs already per-token where the loss is length-normalised
# (ref_* are None for the reference-free ones). Keyed exactly like registry.PREFERENCE_LOSSES.
_LOSS_FNS = {"sigmoid": _sigmoid, "ipo": _ipo, "cdpo": _cdpo, "robust": _robust, "simpo": _simpo, "orpo": _orpo}
if _LOSS_FNS.keys() != PREFERENCE_LOSSES.keys():
    raise ImportError(f"preference losses without an implementation or a registry entry: "
                      f"{sorted(_LOSS_FNS.keys() ^ PREFERENCE_LOSSES.keys())}")


def reward_model_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss for a scalar reward model, per pair ``[B]``:

        L = -log σ(r_c - r_r - m)

    P(chosen ≻ rejected) = σ(r_c - r_r); the optional margin m (Llama 2, Touvron et al. 2023) asks for a
    larger score gap on pairs rated as clearly different. m = 0 when None.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
