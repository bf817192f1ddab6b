"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token negative log-likelihood over labelled positions.

        L_sum = - sum_{t : y_t != -100} log p_theta(y_t | x_<t)

    ``labels`` follow the HF convention (aligned with ``input_ids``; the shift happens here). The sum,
    not the mean, is returned so the caller can divide by the token count of the whole optimizer step
    (all micro-batches, all ranks): then packing, padding, accumulation and data parallelism all give
    the same loss and gradient as one big batch.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    mask = shift_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss, {"label_tokens": mask.sum(), "correct": correct}
