"""RL prompts: ms-swift GRPO rows -> encoded generation prompts (with their heard clips), checked up front
against what the configured rewards need."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from steptrain.data import DataError, RunInputs
from steptrain.data.audio_spans import AudioClip
from steptrain.data.prompts import encode_prompt, split_reply
from steptrain.rollout.rewards import NEEDS_REFERENCE, reference_answer


@dataclass
class RLPrompt:
    ids: list[int]
    row: dict
    clips: list[AudioClip] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token span of each heard chunk


def load_prompts(rows: list[dict], tokenizer, cfg, inputs: RunInputs) -> tuple[list[RLPrompt], Counter]:
    """Encoded prompts, and the rows left out by reason (longer than data.max_length; bad rows under
    data.on_error=skip).

    A bad row (e.g. missing audio, or no reference answer for a reward that needs one) stops the run
    naming its file and line, unless data.on_error=skip.
    """
    needs_reference = any(w and name in NEEDS_REFERENCE for name, w in cfg.objective.rewards.items())
    prompts, left_out = [], Counter()
    for row in rows:
        try:
            prompt = encode_prompt(row, split_reply(row)[0], inputs.template, tokenizer, inputs.audio)
            if needs_reference:
                reference_answer(row)
        except DataError as e:
            if cfg.data.on_error == "error":
                raise e.at(row["_source"]) from None
            left_out[e.reason] += 1
            continue
        if len(prompt.ids) > cfg.data.max_length:
            left_out["longer than data.max_length"] += 1
            continue
        prompts.append(RLPrompt(prompt.ids, row, prompt.clips, prompt.spans))
    return prompts, left_out
