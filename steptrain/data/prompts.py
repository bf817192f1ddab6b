"""Chat rows -> generation prompts (token ids, plus the heard clips of a speech prompt).

Used wherever the model continues a conversation: greedy evaluation and RL rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steptrain.data.audio_spans import AudioClip, AudioSpec, audio_paths, clip_tokens
from steptrain.data.encode import tokenize_with_audio
from steptrain.data.errors import DataError
from steptrain.data.reader import row_messages
from steptrain.data.templates import Segment


@dataclass
class Prompt:
    ids: list[int]
    clips: list[AudioClip] = field(default_factory=list)  # heard audio chunks, in placeholder order
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token span of each chunk


def encode_prompt(row: dict, messages: list[dict], template, tokenizer, audio: AudioSpec | None = None) -> Prompt:
    """The generation prompt after ``messages`` (the template's assistant header last).

    With ``audio`` (a speech model) each ``<audio>`` tag takes the row's next clip as a placeholder span.
    """
    text = template.generation_prompt(messages)
    if audio is None:
        return Prompt(tokenizer(text, add_special_tokens=False)["input_ids"])
    spans = (clip_tokens(path, audio) for path in audio_paths(row, row.get("_source", "row")))
    ids, _, clips, chunk_spans = tokenize_with_audio([Segment(text, False)], tokenizer, spans)
    return Prompt(ids, clips, chunk_spans)


def split_reply(row: dict) -> tuple[list[dict], str | None]:
    """(the turns before the reply to generate, the reference reply or None).

    A row ending in an assistant turn is (its earlier turns, that turn's text); a row ending in a user
    turn (RL prompts, ms-swift GRPO data) is (all its turns, None).
    """
    messages = row_messages(row)
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"].strip()
    if messages[-1]["role"] not in ("user", "tool", "input"):
        raise DataError("bad prompt", f"a prompt must end with a user turn, not {messages[-1]['role']!r}")
    return messages, None
