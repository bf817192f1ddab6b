"""Batched greedy generation with the model's KV cache (HF ``generate``), left-padded prompts."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Decode each prompt greedily; returns the generated text only (special tokens removed)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i : i + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):
                ids[row, width - len(e) :] = torch.tensor(e)
                mask[row, width - len(e) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
            )
            for row in out[:, width:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs
