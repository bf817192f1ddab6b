"""Character and word error rates (jiwer), the ASR metrics."""

from __future__ import annotations

import jiwer


def error_rates(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level CER and WER: edit operations summed over all pairs / reference length summed.

    Pairs with an empty reference are skipped (an error rate against nothing is undefined).
    """
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r.strip()]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {"cer": float(jiwer.cer(refs, preds)), "wer": float(jiwer.wer(refs, preds))}
