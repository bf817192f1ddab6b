"""Held-out token loss/accuracy and greedy-generation exact match for chat data."""

from __future__ import annotations

import torch

from steptrain.data import collate, plan_epoch, row_messages
from steptrain.models.forward import lm_logits
from steptrain.objectives import lm_loss_sum
from steptrain.rollout import generate_greedy


@torch.no_grad()
def evaluate_loss(engine, examples, *, batch_size: int, max_length: int, pad_id: int, max_batches: int = 0) -> dict:
    """Token-mean loss and next-token accuracy over ``examples``, sharded over ranks and reduced."""
    model = engine.module
    was_training = model.training
    model.eval()
    plan = plan_epoch(
        [len(e.input_ids) for e in examples], batch_size=batch_size, max_length=max_length,
        packing=False, group_by_length=True, shuffle=True, seed=0, epoch=0,  # order is irrelevant to a sum
    )
    if max_batches:
        plan = plan[:max_batches]
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, label tokens, correct
    for rows in plan[engine.rank :: engine.world_size]:
        batch = {k: v.to(engine.device) for k, v in collate(rows, examples, pad_id=pad_id, packing=False).items() if v is not None}
        with engine.autocast():
            logits = lm_logits(model, batch)
        loss, m = lm_loss_sum(logits, batch["labels"])
        totals += torch.tensor([loss.item(), m["label_tokens"].item(), m["correct"].item()], dtype=torch.float64)
    model.train(was_training)
    engine.all_reduce(totals)
    n = max(totals[1].item(), 1.0)
    return {"eval/loss": totals[0].item() / n, "eval/token_acc": totals[2].item() / n}


def exact_match(engine, tokenizer, template, rows: list[dict], *, max_new_tokens: int) -> dict:
    """Greedy-decode the last assistant reply of each row from its preceding turns; fraction exactly right."""
    mine = rows[engine.rank :: engine.world_size]
    prompts, refs = [], []
    for row in mine:
        messages = row_messages(row)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(template.generation_prompt(messages[:last]))
        refs.append(messages[last]["content"].strip())
    preds = generate_greedy(engine.module, tokenizer, prompts, max_new_tokens=max_new_tokens) if prompts else []
    hits = torch.tensor([float(sum(p == r for p, r in zip(preds, refs, strict=True))), float(len(refs))])
    engine.all_reduce(hits)
    return {"eval/exact_match": hits[0].item() / max(hits[1].item(), 1.0), "eval/generated": int(hits[1].item())}
