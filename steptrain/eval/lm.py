"""Held-out token loss/accuracy and greedy-generation exact match for chat data."""

from __future__ import annotations

import torch

from steptrain.data import RunInputs, collate, plan_epoch, row_messages, to_device
from steptrain.data.prompts import encode_prompt
from steptrain.eval.asr import error_rates
from steptrain.objectives import lm_loss_sum, stats_vector, summarize_stats
from steptrain.rollout import generate_greedy


def rank_share(engine, items: list, pad: bool | None = None) -> tuple[list, int]:
    """This replica's items (every data_world-th) and how many of them count.

    On a lockstep engine (ZeRO-3, model parallel) every rank must run the same number of forwards, so
    a short share is padded with copies of the first item, which are run but not counted (``pad=True``
    does the same on any engine).
    """
    mine = items[engine.data_rank :: engine.data_world]
    if not (engine.lockstep if pad is None else pad) or not items:
        return mine, len(mine)
    rounds = -(-len(items) // engine.data_world)
    return mine + [items[0]] * (rounds - len(mine)), len(mine)


@torch.no_grad()
def evaluate_loss(
    engine, examples, *, batch_size: int, max_length: int, pad_id: int, max_batches: int = 0, audio_features=None,
    audio_ids: tuple[int, int] | None = None,
) -> dict:
    """Token-mean loss and next-token accuracy over ``examples``, sharded over ranks and reduced."""
    plan = plan_epoch(
        [len(e.input_ids) for e in examples], batch_size=batch_size, max_length=max_length,
        packing=False, group_by_length=True, shuffle=True, seed=0, epoch=0,  # order is irrelevant to a sum
    )
    if max_batches:
        plan = plan[:max_batches]
    mine, counted = rank_share(engine, plan)
    batches = [
        to_device(collate(rows, examples, pad_id=pad_id, packing=False, audio_features=audio_features), engine.device)
        for rows in mine
    ]
    results = engine.forward_only(batches, lambda logits, batch: stats_vector(lm_loss_sum(logits, batch["labels"], audio_ids)[1]))
    totals = sum(results[:counted], stats_vector({}))
    engine.data_all_reduce(totals)
    return summarize_stats(totals, prefix="eval/")


def generation_metrics(engine, tokenizer, inputs: RunInputs, rows: list[dict], *, max_new_tokens: int) -> dict:
    """Greedy-decode the last assistant reply of each row from its preceding turns (``inputs.template``).

    Reports exact match (fraction of replies exactly right) and corpus CER/WER, gathered over ranks.
    With ``inputs.audio`` (a speech model), the prompt's ``<audio>`` tags become placeholder spans and the
    clips' features (``inputs.features(clip)``) go to the model with it.
    """
    audio, audio_features = inputs.audio, inputs.features
    mine, counted = rank_share(engine, rows)
    prompts, refs, clips = [], [], []
    for row in mine:
        messages = row_messages(row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        refs.append(messages[last]["content"].strip())
        prompt = encode_prompt(row, messages[:last], inputs.template, tokenizer, audio)
        prompts.append(prompt.ids)
        clips.append([audio_features(c) for c in prompt.clips])
    preds = (
        generate_greedy(
            engine.module, tokenizer, prompts, max_new_tokens=max_new_tokens, audio=clips if audio else None,
            synced=engine.lockstep,
        )
        if prompts
        else []
    )
    preds, refs = preds[:counted], refs[:counted]
    preds, refs = _gather_pairs(engine, preds, refs)
    hits = sum(p == r for p, r in zip(preds, refs, strict=True))
    rates = {f"eval/{k}": v for k, v in error_rates(preds, refs).items()}
    return {"eval/exact_match": hits / max(len(refs), 1), **rates, "eval/generated": len(refs)}


def _gather_pairs(engine, preds: list[str], refs: list[str]):
    """All ranks' (predictions, references); error rates are corpus-level, so the strings are needed."""
    if engine.world_size == 1:
        return preds, refs
    import torch.distributed as dist

    everything: list = [None] * engine.world_size
    dist.all_gather_object(everything, (preds, refs))
    return [p for ps, _ in everything for p in ps], [r for _, rs in everything for r in rs]
