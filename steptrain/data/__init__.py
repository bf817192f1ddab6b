"""Data layer: ms-swift JSONL (and HF datasets) -> chat-template segments -> token ids/labels -> batches.

The names below load on first use, so the config can read ``templates.TEMPLATES`` without the audio
and tensor code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from steptrain.lazy import lazy_exports

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers and editors
    from steptrain.data.audio_spans import AUDIO_TAG, AudioClip, AudioSpec, ReplyAudioSpec
    from steptrain.data.batching import collate, plan_epoch, to_device
    from steptrain.data.dataset import SFTData, load_sft_data
    from steptrain.data.encode import IGNORE_INDEX, Encoded, encode_segments
    from steptrain.data.errors import DataError
    from steptrain.data.reader import read_rows, row_messages
    from steptrain.data.run_inputs import RunInputs
    from steptrain.data.templates import TEMPLATES, ChatTemplate, Segment, resolve_template

_EXPORTS = {
    **dict.fromkeys(("AUDIO_TAG", "AudioClip", "AudioSpec", "ReplyAudioSpec"), "audio_spans"),
    **dict.fromkeys(("collate", "plan_epoch", "to_device"), "batching"),
    **dict.fromkeys(("SFTData", "load_sft_data"), "dataset"),
    **dict.fromkeys(("IGNORE_INDEX", "Encoded", "encode_segments"), "encode"),
    "DataError": "errors",
    **dict.fromkeys(("read_rows", "row_messages"), "reader"),
    "RunInputs": "run_inputs",
    **dict.fromkeys(("TEMPLATES", "ChatTemplate", "Segment", "resolve_template"), "templates"),
}
__all__ = [
    "AUDIO_TAG",
    "AudioClip",
    "AudioSpec",
    "ReplyAudioSpec",
    "collate",
    "plan_epoch",
    "to_device",
    "SFTData",
    "load_sft_data",
    "IGNORE_INDEX",
    "Encoded",
    "encode_segments",
    "DataError",
    "read_rows",
    "row_messages",
    "RunInputs",
    "TEMPLATES",
    "ChatTemplate",
    "Segment",
    "resolve_template",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
