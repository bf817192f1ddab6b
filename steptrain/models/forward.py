"""The one way steptrain calls a causal LM on a collated batch."""

from __future__ import annotations

import contextlib

import torch


def lm_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a batch from ``steptrain.data.collate``.

    Unpacked rows carry a padding ``attention_mask``; packed rows carry none, and transformers tells
    the sequences in a row apart by where ``position_ids`` restart (block-diagonal causal attention).
    Speech batches also carry ``audio_features`` / ``audio_lengths`` for the placeholder spans.
    The KV cache is off: training and scoring never reuse it.
    """
    audio = {k: batch[k] for k in ("audio_features", "audio_lengths") if k in batch}
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
        **audio,
    ).logits


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, its previous mode restored after: scoring,
    generation and reference passes of a model that is being trained."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
