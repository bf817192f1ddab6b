"""Data layer: ms-swift JSONL (and HF datasets) -> chat-template segments -> token ids/labels -> batches."""

from steptrain.data.audio_spans import AUDIO_TAG, AudioClip, AudioSpec, ReplyAudioSpec
from steptrain.data.batching import collate, plan_epoch, to_device
from steptrain.data.dataset import SFTData, load_sft_data
from steptrain.data.encode import IGNORE_INDEX, Encoded, encode_segments
from steptrain.data.errors import DataError
from steptrain.data.reader import read_rows, row_messages
from steptrain.data.run_inputs import RunInputs
from steptrain.data.templates import TEMPLATES, ChatTemplate, Segment, resolve_template

__all__ = [
    "AUDIO_TAG",
    "AudioClip",
    "AudioSpec",
    "ReplyAudioSpec",
    "IGNORE_INDEX",
    "TEMPLATES",
    "ChatTemplate",
    "DataError",
    "Encoded",
    "SFTData",
    "Segment",
    "collate",
    "encode_segments",
    "load_sft_data",
    "plan_epoch",
    "read_rows",
    "resolve_template",
    "row_messages",
    "RunInputs",
    "to_device",
]
