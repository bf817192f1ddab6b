"""The one way steptrain calls a causal LM on a collated batch."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from steptrain.objectives.chunked_head import HeadInput

log = logging.getLogger("steptrain")

# Config fields of heads that transform the logits after the projection (Gemma-2's soft-capping, Cohere's
# and Granite's scales): the chunked head computes the plain projection only, so these models keep the
# plain path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def lm_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a batch from ``steptrain.data.collate``.

    Unpacked rows carry a padding ``attention_mask``; packed rows carry none, and transformers tells
    the sequences in a row apart by where ``position_ids`` restart (block-diagonal causal attention).
    Speech batches also carry ``audio_features`` / ``audio_lengths`` for the placeholder spans.
    The KV cache is off: training and scoring never reuse it.
    """
    return _call(model, batch).logits


def _call(model, batch):
    audio = {k: batch[k] for k in ("audio_features", "audio_lengths") if k in batch}
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
        **audio,
    )


def lm_forward(cfg):
    """The ``forward`` of a causal-LM task under ``cfg``: :func:`lm_logits`, or with
    ``objective.head_chunk_tokens > 0`` :func:`lm_head_input` at that chunk size (the objectives accept both)."""
    chunk = int(cfg.objective.get("head_chunk_tokens", 0) or 0)
    if chunk <= 0:
        return lm_logits
    return functools.partial(lm_head_input, chunk_tokens=chunk)


def output_head(model) -> torch.nn.Module | None:
    """The module that turns the last hidden states into logits (``lm_head``), through DDP / DeepSpeed / peft
    wrappers and a speech model's LLM; None when the model does not say."""
    model = _unwrap(model)
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _unwrap(model):
    """The model inside DDP / DeepSpeed engine wrappers (``.module``); a peft model stays as it is."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _configs(model):
    config = getattr(_unwrap(model), "config", None)
    stack, seen = [config], []
    while stack:
        c = stack.pop()
        if c is None or any(c is s for s in seen):
            continue
        seen.append(c)
        stack += [getattr(c, key, None) for key in ("llm_config", "text_config")]
    return seen


def chunkable_head(model) -> str | None:
    """Why the chunked head cannot replace ``model``'s head (None: it can): it must be a plain ``nn.Linear``
    (not wrapped by peft: LoRA, modules_to_save or trainable tokens on the head), not partitioned by ZeRO-3,
    and the logits must be the projection itself (no soft-capping or scale after it)."""
    head = output_head(model)
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not torch.nn.Linear:
        return f"the head is a {type(head).__name__}, not a plain Linear (peft wraps it?)"
    if hasattr(head.weight, "ds_id"):
        return "the head's weight is partitioned by ZeRO-3"
    for config in _configs(model):
        for key in _LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value not in (None, 0, 0.0, 1, 1.0):
                return f"the model's config sets {key}={value} (a transform after the head)"
    return None


_warned: set[str] = set()


def lm_head_input(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> HeadInput | torch.Tensor:
    """The last hidden states and head weight of a batch (:class:`HeadInput`) instead of its logits.

    The model runs as in :func:`lm_logits` with its head's forward replaced by one that keeps its input and
    returns an empty ``[B, T, 0]`` tensor, so no logits are computed here; the objectives then apply the head
    ``chunk_tokens`` positions at a time (``objectives/chunked_head.py``). The head's matmul dtype is the
    autocast dtype when this runs under autocast, as the plain head's would be. A model whose head cannot
    be replaced (:func:`chunkable_head`) gets its plain logits, with a warning once.
    """
    why = chunkable_head(model)
    if why is not None:
        if why not in _warned:
            _warned.add(why)
            log.warning("objective.head_chunk_tokens: %s; computing full logits", why)
        return lm_logits(model, batch)
    head = output_head(model)
    kept: list[torch.Tensor] = []

    def keep(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden)
        return hidden[..., :0]

    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) is put back
    head.forward = keep
    try:
        _call(model, batch)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    if len(kept) != 1:
        raise RuntimeError(f"the LM head ran {len(kept)} times in one forward (expected once)")
    hidden = kept[0]
    device = hidden.device.type
    dtype = None
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return HeadInput(hidden, head.weight, head.bias, chunk_tokens, dtype)


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
