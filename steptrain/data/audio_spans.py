"""Audio inputs in chat rows: ``<audio>`` tags -> placeholder token spans + the clips that fill them.

ms-swift rows name their audio in ``"audios"``; each ``<audio>`` tag in a message takes the next path.
For an encoder + adapter speech LLM (Step-Audio 2), a clip becomes, per 25 s chunk,
``<audio_start>`` + N x ``<audio_patch>`` + ``<audio_end>``, where N is exactly the number of adapter
outputs the model produces for that chunk; the model writes its audio embeddings over the patch tokens.
The data layer does not know the model, so N comes from ``AudioSpec.patches`` (set by the recipe from
the model's own arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steptrain.data.errors import DataError

AUDIO_TAG = "<audio>"


@dataclass(frozen=True)
class AudioClip:
    """One chunk of one audio file, as it will be fed to the encoder."""

    path: str
    start: int  # first sample (at the spec's sample rate)
    length: int  # samples


@dataclass(frozen=True)
class AudioSpec:
    """How audio appears in token space, and the limits on it."""

    start_id: int
    patch_id: int
    end_id: int
    patches: Callable[[int], int]  # samples of one chunk -> number of patch tokens
    load: Callable[[str], object]  # path -> mono float waveform at sample_rate (raises on bad audio)
    sample_rate: int = 16000
    chunk_seconds: float = 25.0
    max_seconds: float = 600.0

    @classmethod
    def from_tokenizer(cls, tokenizer, patches, load, **kw) -> AudioSpec:
        ids = {}
        for name in ("<audio_start>", "<audio_patch>", "<audio_end>"):
            tid = tokenizer.convert_tokens_to_ids(name)
            if tid is None or tid == tokenizer.unk_token_id:
                raise DataError("tokenizer lacks audio tokens", f"{name} is not a single token of the tokenizer")
            ids[name] = tid
        return cls(ids["<audio_start>"], ids["<audio_patch>"], ids["<audio_end>"], patches, load, **kw)


def audio_paths(row: dict, source: str) -> list[str]:
    """The row's audio files (relative paths resolved against the data file), checked against its tags."""
    audios = row.get("audios") or []
    if not isinstance(audios, list) or not all(isinstance(a, str) for a in audios):
        raise DataError("bad audios", "'audios' must be a list of file paths")
    tags = sum(m["content"].count(AUDIO_TAG) for m in row["messages"])
    if tags != len(audios):
        raise DataError("audio count mismatch", f"{tags} {AUDIO_TAG} tags but {len(audios)} audios")
    base = Path(source.rsplit(":", 1)[0]).parent
    return [str(p if Path(p).is_absolute() else base / p) for p in audios]


def clip_tokens(path: str, spec: AudioSpec) -> list[tuple[list[int], AudioClip]]:
    """(placeholder ids, chunk) for every 25 s chunk of a file, in order."""
    if not Path(path).is_file():
        raise DataError("missing audio", f"{path} does not exist")
    try:
        wave = spec.load(path)
    except (OSError, ValueError, RuntimeError) as exc:
        text = str(exc) if path in str(exc) else f"{path}: {exc}"
        raise DataError("empty audio" if "zero samples" in text else "unreadable audio", text) from None
    n = len(wave)
    if n == 0:
        raise DataError("empty audio", f"{path} has zero samples")
    if n > spec.max_seconds * spec.sample_rate:
        raise DataError(
            "audio too long", f"{path} is {n / spec.sample_rate:.1f} s > data.max_audio_seconds={spec.max_seconds:g}"
        )
    chunk = int(spec.chunk_seconds * spec.sample_rate)
    out = []
    for start in range(0, n, chunk):
        length = min(chunk, n - start)
        ids = [spec.start_id, *[spec.patch_id] * spec.patches(length), spec.end_id]
        out.append((ids, AudioClip(path, start, length)))
    return out


def split_on_audio(text: str) -> list[str]:
    """Text pieces around ``<audio>`` tags (k tags -> k + 1 pieces)."""
    return text.split(AUDIO_TAG)
