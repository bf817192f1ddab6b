"""Audio layer: file reading, the Step-Audio 2 / Whisper log-mel front end, discrete audio codes and
audio tokenizers."""

from .codes import (
    STEP_AUDIO_2,
    STEP_AUDIO_V1,
    AudioIdMap,
    deinterleave_dual,
    interleave_dual,
    interleave_text_audio,
    split_text_audio,
)
from .dual import DualCodebookTokenizer, DualStreamTokenizer
from .features import chunk_audio, log_mel, log_mel_batch, mel_filters, num_frames
from .io import AudioError, audio_duration, load_audio, resample
from .tokenizer import AudioTokenizer, AudioTokenizerError, KMeansAudioTokenizer, load_audio_tokenizer

__all__ = [
    "STEP_AUDIO_2",
    "STEP_AUDIO_V1",
    "AudioError",
    "AudioIdMap",
    "AudioTokenizer",
    "AudioTokenizerError",
    "DualCodebookTokenizer",
    "DualStreamTokenizer",
    "KMeansAudioTokenizer",
    "audio_duration",
    "chunk_audio",
    "deinterleave_dual",
    "interleave_dual",
    "interleave_text_audio",
    "load_audio",
    "load_audio_tokenizer",
    "log_mel",
    "log_mel_batch",
    "mel_filters",
    "num_frames",
    "resample",
    "split_text_audio",
]
