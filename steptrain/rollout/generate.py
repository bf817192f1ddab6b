"""Batched greedy generation with the model's KV cache (HF ``generate``), left-padded prompts."""

from __future__ import annotations

import torch

from steptrain.data.batching import pad_clip_features


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[str] | list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    audio: list[list[torch.Tensor]] | None = None,
    synced: bool = False,
) -> list[str]:
    """Decode each prompt greedily; returns the generated text only (special tokens removed).

    ``prompts`` are texts or token ids. For a speech model, ``audio[i]`` holds the log-mel features of
    the clips whose placeholder spans prompt ``i`` contains, in order. ``synced``: every rank calls
    this with the same number of prompts and keeps stepping until all ranks finish (ZeRO-3).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            encoded = [p if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):
                ids[row, width - len(e) :] = torch.tensor(e)
                mask[row, width - len(e) :] = 1
            extra = {}
            clips = [f for clips in (audio[i : i + batch_size] if audio else []) for f in clips]
            if clips:
                feats, lengths = pad_clip_features(clips)
                extra = {"audio_features": feats.to(device), "audio_lengths": lengths.to(device)}
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                synced_gpus=synced,
                **extra,
            )
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs
