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

from steptrain.audio.codes import interleave_text_audio
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


@dataclass(frozen=True)
class ReplyAudioSpec:
    """Spoken replies as discrete audio tokens: ``<tts_start>`` ``<audio_k>``... ``<tts_end>``, trained."""

    first_id: int  # id of <audio_0>; code k is first_id + k
    n_codes: int
    start_id: int | None  # <tts_start> / <tts_end> around the codes (Step-Audio 2); None: bare codes (Step-Audio v1)
    end_id: int | None
    encode: Callable[[str], list[int]] | None = None  # audio file -> codes (an AudioTokenizer), if any
    # (text, audio) tokens per chunk: the reply's transcript (the turn's text before the tag) and its
    # audio tokens alternate inside one <tts_start> ... <tts_end> block (see interleave_text_audio).
    interleave: tuple[int, int] | None = None

    def tokens(self, codes: list[int]) -> list[int]:
        if not isinstance(codes, list) or not all(isinstance(k, int) and 0 <= k < self.n_codes for k in codes):
            raise DataError("bad audio codes", f"audio codes must be integers in [0, {self.n_codes - 1}]")
        return self._wrap([self.first_id + k for k in codes])

    def with_transcript(self, block: list[int], transcript: list[int]) -> list[int]:
        """A ``tokens`` block with the transcript's ids interleaved into it at ``interleave``."""
        codes = block[1:-1] if self.start_id is not None else block
        return self._wrap(interleave_text_audio(transcript, codes, self.interleave))

    def _wrap(self, ids: list[int]) -> list[int]:
        return ids if self.start_id is None else [self.start_id, *ids, self.end_id]


def audio_paths(row: dict, source: str, expected: int | None = None) -> list[str]:
    """The row's audio files (relative paths resolved against the data file), checked against its tags."""
    audios = row.get("audios") or []
    if not isinstance(audios, list) or not all(isinstance(a, str) for a in audios):
        raise DataError("bad audios", "'audios' must be a list of file paths")
    tags = sum(m["content"].count(AUDIO_TAG) for m in row["messages"]) if expected is None else expected
    if tags != len(audios):
        raise DataError("audio count mismatch", f"{tags} {AUDIO_TAG} tags but {len(audios)} audios")
    base = Path(source.rsplit(":", 1)[0]).parent
    return [str(p if Path(p).is_absolute() else base / p) for p in audios]


def audio_spans_for(row: dict, messages: list[dict], source: str, audio: AudioSpec | None,
                    reply: ReplyAudioSpec | None):
    """Per ``<audio>`` tag, in reading order: [(ids, clip or None), ...] (None for a text-only row).

    A tag in a user/system/tool turn is heard: encoder placeholder spans (needs ``audio``). A tag in
    an assistant turn is spoken: discrete audio tokens the model learns to emit (needs ``reply``),
    from the row's ``audio_codes`` (one list per spoken reply, used as-is) or else from the audio
    file through ``reply.encode``. ``audios`` lists the files of all tags that need one, in order.
    """
    roles = [m["role"] for m in messages for _ in range(m["content"].count(AUDIO_TAG))]
    if not roles and not row.get("audios"):
        return None
    codes = row.get("audio_codes")
    spoken = sum(r == "assistant" for r in roles)
    if codes is not None and (not isinstance(codes, list) or len(codes) != spoken):
        raise DataError("audio_codes count mismatch", f"{spoken} spoken replies but audio_codes has "
                        f"{len(codes) if isinstance(codes, list) else 'no list'}")
    # With audio_codes, spoken replies need no file; ``audios`` may still list one per tag (then unused).
    every_tag = codes is None or len(row.get("audios") or []) == len(roles)
    expected = len(roles) if every_tag else sum(r != "assistant" for r in roles)
    paths = iter(audio_paths(row, source, expected=expected))
    codes = iter(codes or [])
    out = []
    for role in roles:
        if role == "assistant" and row.get("audio_codes") is not None and every_tag:
            next(paths)  # this reply's file is not needed: its codes are given
        if role != "assistant":
            if audio is None:
                raise DataError("audio in a text-only run", "the row has audio input but the model takes none")
            out.append(clip_tokens(next(paths), audio))
            continue
        if reply is None:
            raise DataError("spoken reply without audio tokens", "set model.audio_codes (and data.audio_tokenizer)")
        if row.get("audio_codes") is not None:
            out.append([(reply.tokens(next(codes)), None)])
            continue
        if reply.encode is None:
            raise DataError("spoken reply without codes", "give audio_codes in the row or set data.audio_tokenizer")
        path = next(paths)
        if not Path(path).is_file():
            raise DataError("missing audio", f"{path} does not exist")
        out.append([(reply.tokens(reply.encode(path)), None)])
    return iter(out)


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


def audio_in_last_turn_only(row: dict, messages: list[dict]) -> tuple[dict, list[dict]]:
    """Step-Audio's multi-turn SFT: earlier heard clips become their ASR text, only the last keeps audio.

    Needs ``"transcripts"`` (one string per ``audios`` entry). Returns the row with the earlier
    clips removed from ``audios`` and the messages with their tags replaced by the transcripts.
    """
    heard = [i for i, m in enumerate(messages) if m["role"] != "assistant" and AUDIO_TAG in m["content"]]
    if len(heard) < 2:
        return row, messages
    transcripts = row.get("transcripts")
    audios = list(row.get("audios") or [])
    n_tags = sum(m["content"].count(AUDIO_TAG) for m in messages)
    if not isinstance(transcripts, list) or len(transcripts) != len(audios) or len(audios) != n_tags:
        raise DataError("missing transcripts", "data.audio_last_turn_only needs one transcript per audio")
    out, k, keep_audios = [], 0, []
    for i, m in enumerate(messages):
        pieces = m["content"].split(AUDIO_TAG)
        text = pieces[0]
        for piece in pieces[1:]:
            if i == heard[-1] or m["role"] == "assistant":
                text += AUDIO_TAG + piece
                keep_audios.append(audios[k])
            else:
                text += transcripts[k] + piece
            k += 1
        out.append({**m, "content": text})
    return {**row, "audios": keep_audios}, out
