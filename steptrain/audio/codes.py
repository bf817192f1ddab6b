"""Discrete audio tokens: Step-Audio v1 dual-codebook interleaving, code <-> LLM id maps, and
text/audio interleaving for spoken replies.

Step-Audio v1: linguistic codes "vq02" (1024 codes, 16.7 Hz) and semantic codes "vq06" (4096 codes,
25 Hz) are interleaved 2:3 per 120 ms group, linguistic first; a trailing incomplete group is dropped.
Code space: k = vq02 (0..1023) or 1024 + vq06 (1024..5119); LLM id = 65536 + k. Step-Audio 2:
CosyVoice2 codes 0..6560 plus the audio pad 6561; LLM id = 151696 + k. Sources: docs/step_facts.md,
sections 1 and 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "N_VQ02",
    "N_VQ06",
    "STEP_AUDIO_2",
    "STEP_AUDIO_V1",
    "AudioIdMap",
    "deinterleave_dual",
    "interleave_dual",
    "interleave_text_audio",
    "split_text_audio",
]

N_VQ02 = 1024
N_VQ06 = 4096
_GROUP02, _GROUP06 = 2, 3


def _check_range(values: Sequence[int], n: int, what: str) -> None:
    for i, v in enumerate(values):
        if not 0 <= int(v) < n:
            raise ValueError(f"{what}[{i}] = {int(v)} is out of range [0, {n - 1}]")


def interleave_dual(vq02: Sequence[int], vq06: Sequence[int]) -> list[int]:
    """Step-Audio v1: ``[vq02[2i], vq02[2i+1], 1024+vq06[3i], 1024+vq06[3i+1], 1024+vq06[3i+2]]`` per group.

    The number of groups is ``min(len(vq02) // 2, len(vq06) // 3)``; leftovers are dropped.
    """
    _check_range(vq02, N_VQ02, "vq02")
    _check_range(vq06, N_VQ06, "vq06")
    groups = min(len(vq02) // _GROUP02, len(vq06) // _GROUP06)
    out: list[int] = []
    for g in range(groups):
        out.extend(int(v) for v in vq02[_GROUP02 * g : _GROUP02 * g + _GROUP02])
        out.extend(N_VQ02 + int(v) for v in vq06[_GROUP06 * g : _GROUP06 * g + _GROUP06])
    return out


def deinterleave_dual(codes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Inverse of ``interleave_dual``: dual-codebook codes (groups of 5) -> (vq02, vq06).

    Raises ValueError if the length is not a multiple of 5 or a code sits in the wrong codebook slot.
    """
    size = _GROUP02 + _GROUP06
    if len(codes) % size:
        raise ValueError(f"dual-codebook sequence length {len(codes)} is not a multiple of {size}")
    vq02: list[int] = []
    vq06: list[int] = []
    for i, c in enumerate(codes):
        c = int(c)
        if i % size < _GROUP02:
            if not 0 <= c < N_VQ02:
                raise ValueError(f"codes[{i}] = {c}: expected a linguistic (vq02) code in [0, {N_VQ02 - 1}]")
            vq02.append(c)
        else:
            if not N_VQ02 <= c < N_VQ02 + N_VQ06:
                raise ValueError(
                    f"codes[{i}] = {c}: expected a semantic (vq06) code in [{N_VQ02}, {N_VQ02 + N_VQ06 - 1}]"
                )
            vq06.append(c - N_VQ02)
    return vq02, vq06


@dataclass(frozen=True)
class AudioIdMap:
    """Audio code k <-> LLM token id ``offset + k`` and token text ``<audio_k>``.

    Valid codes are ``0..n_codes-1`` plus ``pad_code`` if given (Step-Audio 2: 6561 codes, pad 6561, so
    ``0..6561``; ``pad_code`` must equal ``n_codes`` so the id range stays contiguous).
    """

    offset: int
    n_codes: int
    pad_code: int | None = None

    def __post_init__(self) -> None:
        if self.offset < 0 or self.n_codes <= 0:
            raise ValueError(
                f"AudioIdMap needs offset >= 0 and n_codes > 0, got {self.offset}, {self.n_codes}"
            )
        if self.pad_code is not None and self.pad_code != self.n_codes:
            raise ValueError(f"pad_code must be n_codes ({self.n_codes}), got {self.pad_code}")

    @property
    def size(self) -> int:
        """Number of valid codes (including the pad code)."""
        return self.n_codes + (self.pad_code is not None)

    @property
    def id_range(self) -> tuple[int, int]:
        """(first, last) LLM id, inclusive."""
        return self.offset, self.offset + self.size - 1

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_code is None else self.offset + self.pad_code

    def token_text(self, k: int) -> str:
        self._check_code(k, 0)
        return f"<audio_{int(k)}>"

    def token_texts(self) -> list[str]:
        """All token strings in id order (what to add to a tokenizer's vocabulary)."""
        return [f"<audio_{k}>" for k in range(self.size)]

    def _check_code(self, k: int, i: int) -> None:
        if not 0 <= int(k) < self.size:
            raise ValueError(f"audio code [{i}] = {int(k)} is out of range [0, {self.size - 1}]")

    def to_ids(self, codes: Sequence[int]) -> list[int]:
        out = []
        for i, k in enumerate(codes):
            self._check_code(k, i)
            out.append(self.offset + int(k))
        return out

    def from_ids(self, ids: Sequence[int]) -> list[int]:
        lo, hi = self.id_range
        out = []
        for i, t in enumerate(ids):
            t = int(t)
            if not lo <= t <= hi:
                raise ValueError(f"token id [{i}] = {t} is not an audio id; valid range [{lo}, {hi}]")
            out.append(t - self.offset)
        return out

    def is_audio(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Boolean mask of audio ids: a torch tensor for tensor input, else a numpy array."""
        lo, hi = self.id_range
        if isinstance(ids, torch.Tensor):
            return (ids >= lo) & (ids <= hi)
        arr = np.asarray(ids, dtype=np.int64)
        return (arr >= lo) & (arr <= hi)


STEP_AUDIO_V1 = AudioIdMap(offset=65536, n_codes=N_VQ02 + N_VQ06)
STEP_AUDIO_2 = AudioIdMap(offset=151696, n_codes=6561, pad_code=6561)


def interleave_text_audio(
    text_ids: Sequence[int], audio_ids: Sequence[int], ratio: tuple[int, int] = (10, 15)
) -> list[int]:
    """Interleave a spoken reply's text and audio tokens at a fixed ratio.

    With ratio (t, a): t text tokens, then a audio tokens, then the next t text tokens, ... Each chunk
    takes what is left if fewer remain; once one stream is exhausted the rest of the other is appended
    in order. Example with (2, 3): text [T0..T4], audio [A0..A3] -> T0 T1 A0 A1 A2 T2 T3 A3 T4.
    Step-Audio 2's ratio is unpublished; 10:15 is the best ratio reported by Step-Audio-AQAA.
    """
    t, a = ratio
    if int(t) <= 0 or int(a) <= 0:
        raise ValueError(f"ratio must be two positive integers, got {ratio}")
    out: list[int] = []
    i = j = 0
    while i < len(text_ids) or j < len(audio_ids):
        out.extend(int(x) for x in text_ids[i : i + t])
        i += t
        out.extend(int(x) for x in audio_ids[j : j + a])
        j += a
    return out


def split_text_audio(ids: Sequence[int], id_map: AudioIdMap) -> tuple[list[int], list[int]]:
    """Inverse of ``interleave_text_audio``: (text ids, audio ids), each in its original order."""
    mask = id_map.is_audio(list(ids))
    text = [int(x) for x, m in zip(ids, mask, strict=True) if not m]
    audio = [int(x) for x, m in zip(ids, mask, strict=True) if m]
    return text, audio
