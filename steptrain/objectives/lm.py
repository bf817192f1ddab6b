"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from steptrain.objectives.chunked_head import IGNORE_INDEX, HeadInput, head_token_logps


def token_nll(logits: torch.Tensor | HeadInput, targets: torch.Tensor) -> torch.Tensor:
    """-log p(targets[b, t] | logits[b, t]) per position ``[B, T]`` in float32; 0 where the target is -100.

    ``reduction="none"`` cross-entropy: no float32 log-softmax of the whole vocabulary is kept around.
    ``logits`` may be a :class:`HeadInput` (hidden states and head weight, ``objective.head_chunk_tokens``):
    then the head runs chunk by chunk over the labelled positions and no ``[B, T, V]`` logits exist.
    """
    if isinstance(logits, HeadInput):
        return -head_token_logps(logits, targets)[0]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


def lm_loss_sum(
    logits: torch.Tensor | HeadInput,
    labels: torch.Tensor,
    audio_ids: tuple[int, int] | None = None,
    audio_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token negative log-likelihood over labelled positions.

        L_sum = - sum_{t : y_t != -100} log p_theta(y_t | x_<t)

    ``labels`` follow the HF convention (aligned with ``input_ids``; the shift happens here). The sum,
    not the mean, is returned so the caller can divide by the token count of the whole optimizer step
    (all micro-batches, all ranks): then packing, padding, accumulation and data parallelism all give
    the same loss and gradient as one big batch.

    With ``audio_ids = (first, last)`` (the discrete audio tokens' id range), targets are split into
    two streams and weighted:  L_sum = sum_text nll + audio_weight * sum_audio nll, and the metrics
    carry per-stream sums (``audio_nll``, ``audio_tokens``, ``audio_correct``) for separate curves.
    ``logits`` may be a :class:`HeadInput` (the chunked head, see ``objectives/chunked_head.py``).
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if isinstance(logits, HeadInput):
        logp, hit = head_token_logps(logits[:, :-1], shift_labels)
        nll = -logp
    else:
        shift_logits = logits[:, :-1].float()
        nll = token_nll(shift_logits, shift_labels)
        with torch.no_grad():
            hit = (shift_logits.argmax(-1) == shift_labels) & mask
    metrics = {"nll": nll.sum().detach(), "label_tokens": mask.sum(), "correct": hit.sum()}
    if audio_ids is None:
        return nll.sum(), metrics
    audio = (shift_labels >= audio_ids[0]) & (shift_labels <= audio_ids[1])
    audio_nll = nll[audio].sum()
    metrics |= {"audio_nll": audio_nll.detach(), "audio_tokens": audio.sum(), "audio_correct": hit[audio].sum()}
    return nll.sum() + (audio_weight - 1.0) * audio_nll, metrics


STATS = ("nll", "label_tokens", "correct", "audio_nll", "audio_tokens", "audio_correct")


def stats_vector(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The metrics of one micro-batch as a float64 vector (summable over micro-batches and ranks)."""
    return torch.tensor([float(metrics.get(k, 0)) for k in STATS], dtype=torch.float64)


def summarize_stats(totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Per-token means from summed stats: loss and accuracy overall, and per stream when audio is present."""
    t = dict(zip(STATS, totals.tolist(), strict=True))
    n = max(t["label_tokens"], 1.0)
    out = {f"{prefix}loss": t["nll"] / n, f"{prefix}token_acc": t["correct"] / n, f"{prefix}label_tokens": int(t["label_tokens"])}
    if t["audio_tokens"]:
        text = max(t["label_tokens"] - t["audio_tokens"], 1.0)
        out |= {
            f"{prefix}text_loss": (t["nll"] - t["audio_nll"]) / text,
            f"{prefix}audio_loss": t["audio_nll"] / t["audio_tokens"],
            f"{prefix}audio_acc": t["audio_correct"] / t["audio_tokens"],
        }
    return out
