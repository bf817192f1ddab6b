"""Batched generation with the model's KV cache (HF ``generate``), left-padded prompts.

One core (:func:`generate_ids`) serves greedy evaluation and sampled RL rollouts, so both see the same
prompt layout, audio inputs and stopping rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steptrain.data.batching import pad_clip_features
from steptrain.models.forward import eval_mode


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: greedy when ``temperature`` is 0, else softmax(logits / temperature)
    restricted to the ``top_k`` most likely tokens (0: all) and the smallest set of mass ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def generate_kwargs(self) -> dict:
        """Every setting that shapes the distribution, so nothing comes from the checkpoint's
        generation_config.json (a repetition penalty there would make RL samples off-policy)."""
        neutral = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
                   "min_new_tokens": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
        if self.temperature == 0:
            return {**neutral, "do_sample": False}  # sampling knobs do not apply to greedy decoding
        return {**neutral, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config (chat models often have
    several, e.g. <|im_end|> and <|endoftext|>)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    *,
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    audio: list[list[torch.Tensor]] | None = None,
    synced: bool = False,
) -> list[list[int]]:
    """Completion token ids of each prompt (for several samples of one prompt, repeat it).

    A completion ends with the first of ``eos_ids`` it generated (that token is what the policy chose to
    stop with, so RL trains it); padding after it is cut. ``audio[i]`` holds the log-mel features of the clips
    whose placeholder spans prompt ``i`` contains, in order. ``synced``: every rank calls this with the
    same number of prompts and keeps stepping until all ranks finish (ZeRO-3).
    """
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    with eval_mode(model):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(chunk):
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
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                use_cache=True,
                synced_gpus=synced,
                **sampling.generate_kwargs(),
                **extra,
            )
            for row in out[:, width:].tolist():
                end = next((k for k, t in enumerate(row) if t in eos_ids), len(row) - 1)
                outputs.append(row[: end + 1])
    return outputs


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
    """Decode each prompt (text or token ids) greedily; returns the generated text (special tokens removed)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [p if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = generate_ids(model, encoded, eos_ids=stop_ids(model, tokenizer), pad_id=pad, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, audio=audio, synced=synced)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
