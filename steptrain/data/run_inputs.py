"""How a run's rows become model inputs, resolved once into one object that every consumer takes.

``steptrain.inputs.resolve_inputs(cfg, tokenizer)`` builds it before any model is built; the data
readers (SFT, preference pairs, RL prompts), rewards that read conversations, greedy evaluation and
``steptrain inspect`` all take it instead of re-reading ``data.template`` and the audio settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from steptrain.data.audio_spans import AudioClip, AudioSpec, ReplyAudioSpec
from steptrain.data.templates import ChatTemplate


@dataclass(frozen=True)
class RunInputs:
    template: ChatTemplate
    audio: AudioSpec | None = None  # heard audio (a speech model): <audio> tags -> placeholder spans
    reply: ReplyAudioSpec | None = None  # spoken replies: <audio> in assistant turns -> discrete audio tokens
    features: Callable[[AudioClip], object] | None = None  # a heard chunk -> its encoder input (log-mel)
    audio_ids: tuple[int, int] | None = None  # (first, last) id of the discrete audio tokens <audio_k>
