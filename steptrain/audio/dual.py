"""Step-Audio v1 dual-codebook tokenizers: the stream protocol, the exact stream rates and a built-in
reference tokenizer fitted offline.

Step-Audio v1 (docs/step_facts.md, section 1) cuts 16 kHz speech into two code streams, a linguistic
stream "vq02" (1024 codes, 16.7 Hz: one code per 60 ms) and a semantic stream "vq06" (4096 codes,
25 Hz: one code per 40 ms), and interleaves them 2:3 per 120 ms group with ``codes.interleave_dual``
(linguistic first; a trailing incomplete group is dropped). The result is a list of codes
k = vq02 (0..1023) or 1024 + vq06 (1024..5119); the LLM id is 65536 + k (``codes.STEP_AUDIO_V1``).

Every dual-stream tokenizer here (``DualCodebookTokenizer`` below, ``tokenizer.StepAudioTokenizer`` for
the real Step-Audio-Tokenizer) follows ``DualStreamTokenizer``:

- ``encode(audio, sr) -> list[int]``: interleaved codes k in 0..5119 (what the data layer writes as
  ``<audio_k>`` / id 65536 + k via ``id_map``);
- ``encode_streams(audio, sr) -> (vq02, vq06)``: the two raw streams, before interleaving;
- ``decode_streams(codes) -> (vq02, vq06)``: the inverse of the interleaving (``deinterleave_dual``);
- ``n_codes = 5120`` (the code space), ``rate_hz`` = 125 / 3 interleaved codes per second (5 per 120 ms),
  ``linguistic_rate_hz = 50 / 3`` and ``semantic_rate_hz = 25``.

``DualCodebookTokenizer`` (ours, not Step's codec: a reference/test tokenizer that cannot synthesise
audio). Features are normalised log-mel frames (the Whisper/Step-Audio 2 recipe of ``features.log_mel``,
100 Hz, without the 479-sample tail padding), averaged over non-overlapping windows: 6 frames (60 ms) of an
80-bin log-mel for the linguistic stream, 4 frames (40 ms) of a 128-bin log-mel for the semantic stream.
Each stream is quantised to the nearest centroid of its own k-means codebook (``tokenizer.kmeans``). The
stream lengths follow the rates exactly: for n samples at 16 kHz, ``n // 960`` linguistic codes and
``n // 640`` semantic codes, hence ``n // 1920`` groups and ``5 * (n // 1920)`` interleaved codes (see
``stream_lengths``); the codes of one window depend only on that window's audio and the utterance's
log-mel maximum (the -8 floor).

Id layout vs fitted size: the code space is always Step's (vq02 slots 0..1023, vq06 slots 1024..5119, so
``n_codes`` is 5120 and ids stay 65536 + k whatever was fitted); a fitted codebook may be smaller
(``linguistic_codes <= 1024``, ``semantic_codes <= 4096``, e.g. 16 / 32 for tests and the demo), in which
case only the first ``linguistic_codes`` / ``semantic_codes`` slots of each stream are ever produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .codes import N_VQ02, N_VQ06, STEP_AUDIO_V1, AudioIdMap
from .features import HOP_LENGTH, SAMPLE_RATE, log_mel
from .io import resample
from .tokenizer import AudioTokenizer, AudioTokenizerError, InterleavedStreams, _assign, kmeans

__all__ = [
    "GROUP_SAMPLES",
    "LINGUISTIC_HOP",
    "SEMANTIC_HOP",
    "DualCodebookTokenizer",
    "DualStreamTokenizer",
    "num_groups",
    "stream_lengths",
]

LINGUISTIC_HOP = 960  # samples at 16 kHz per linguistic (vq02) code: 60 ms, 16.7 Hz
SEMANTIC_HOP = 640  # samples per semantic (vq06) code: 40 ms, 25 Hz
GROUP_SAMPLES = 1920  # one interleaving group: 120 ms = 2 linguistic + 3 semantic codes
LINGUISTIC_RATE_HZ = SAMPLE_RATE / LINGUISTIC_HOP  # 16.666...
SEMANTIC_RATE_HZ = SAMPLE_RATE / SEMANTIC_HOP  # 25.0
DUAL_RATE_HZ = 5 * SAMPLE_RATE / GROUP_SAMPLES  # 41.666... interleaved codes per second
CONFIG_TYPE = "dual"
CODEBOOKS_FILE = "codebooks.safetensors"


def stream_lengths(n_samples_16k: int) -> tuple[int, int]:
    """(linguistic, semantic) stream lengths of ``DualCodebookTokenizer.encode_streams`` for n samples."""
    n = int(n_samples_16k)
    if n < 0:
        raise ValueError(f"n_samples must be >= 0, got {n}")
    return n // LINGUISTIC_HOP, n // SEMANTIC_HOP


def num_groups(n_samples_16k: int) -> int:
    """Number of 120 ms groups ``encode`` keeps: ``min(n02 // 2, n06 // 3)`` = ``n // 1920``."""
    n02, n06 = stream_lengths(n_samples_16k)
    return min(n02 // 2, n06 // 3)


@runtime_checkable
class DualStreamTokenizer(AudioTokenizer, Protocol):
    """An ``AudioTokenizer`` whose codes are Step-Audio v1's interleaved vq02 / vq06 streams."""

    linguistic_rate_hz: float
    semantic_rate_hz: float
    id_map: AudioIdMap

    def encode_streams(self, audio: np.ndarray, sr: int) -> tuple[list[int], list[int]]: ...

    def decode_streams(self, codes: list[int]) -> tuple[list[int], list[int]]: ...


def _window_means(mel: torch.Tensor, width: int) -> torch.Tensor:
    """[n_mels, T] -> [T // width, n_mels]: means over non-overlapping windows of ``width`` frames."""
    n_mels, t = mel.shape
    n = t // width
    return mel[:, : n * width].reshape(n_mels, n, width).mean(-1).T.contiguous()


class DualCodebookTokenizer(InterleavedStreams):
    """Reference Step-Audio v1 dual-codebook tokenizer: two k-means codebooks over log-mel windows.

    See the module docstring for the features, the exact stream lengths and the id layout. Fit with
    ``fit`` (or ``python -m data_pipelines.fit_audio_tokenizer AUDIO_DIR OUT --dual``), then ``save`` /
    ``load`` a directory (``config.json`` + ``codebooks.safetensors``), reachable as
    ``load_audio_tokenizer("dual:DIR")``.
    """

    rate_hz = DUAL_RATE_HZ
    n_codes = N_VQ02 + N_VQ06
    linguistic_rate_hz = LINGUISTIC_RATE_HZ
    semantic_rate_hz = SEMANTIC_RATE_HZ
    id_map = STEP_AUDIO_V1
    LINGUISTIC_FRAMES = LINGUISTIC_HOP // HOP_LENGTH  # 6 log-mel frames per linguistic code
    SEMANTIC_FRAMES = SEMANTIC_HOP // HOP_LENGTH  # 4 log-mel frames per semantic code

    def __init__(
        self,
        linguistic_codes: int = N_VQ02,
        semantic_codes: int = N_VQ06,
        *,
        linguistic_mels: int = 80,
        semantic_mels: int = 128,
        n_iter: int = 25,
        seed: int = 0,
        max_fit_frames: int = 200_000,
    ):
        if not 0 < int(linguistic_codes) <= N_VQ02:
            raise ValueError(f"linguistic_codes must be in [1, {N_VQ02}], got {linguistic_codes}")
        if not 0 < int(semantic_codes) <= N_VQ06:
            raise ValueError(f"semantic_codes must be in [1, {N_VQ06}], got {semantic_codes}")
        self.linguistic_codes = int(linguistic_codes)
        self.semantic_codes = int(semantic_codes)
        self.linguistic_mels = int(linguistic_mels)
        self.semantic_mels = int(semantic_mels)
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        self.max_fit_frames = int(max_fit_frames)
        self.linguistic: torch.Tensor | None = None  # [linguistic_codes, linguistic_mels]
        self.semantic: torch.Tensor | None = None  # [semantic_codes, semantic_mels]

    # ---- features ----

    def features(self, audio: np.ndarray, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(linguistic [n // 960, linguistic_mels], semantic [n // 640, semantic_mels]) for one utterance."""
        audio = resample(np.asarray(audio, dtype=np.float32), sr, SAMPLE_RATE)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio [samples], got shape {tuple(audio.shape)}")
        n02, n06 = stream_lengths(audio.shape[0])
        if n06 == 0:  # under 40 ms: no code in either stream (and too short for the STFT)
            return torch.empty(0, self.linguistic_mels), torch.empty(0, self.semantic_mels)
        # padding=0: exactly n // 160 frames, so windows of 6 / 4 frames give n // 960 / n // 640 codes
        ling = _window_means(log_mel(audio, n_mels=self.linguistic_mels, padding=0), self.LINGUISTIC_FRAMES)
        sem = _window_means(log_mel(audio, n_mels=self.semantic_mels, padding=0), self.SEMANTIC_FRAMES)
        assert ling.shape[0] == n02 and sem.shape[0] == n06, (ling.shape, sem.shape, n02, n06)
        return ling, sem

    # ---- fitting ----

    def _fit_one(self, feats: list[torch.Tensor], k: int, dim: int, what: str, seed: int) -> torch.Tensor:
        x = torch.cat(feats, dim=0) if feats else torch.empty(0, dim)
        if x.shape[0] < k:
            hop = LINGUISTIC_HOP if what == "linguistic" else SEMANTIC_HOP
            raise ValueError(
                f"the {what} codebook of {k} codes needs at least {k} feature frames "
                f"({k * hop / SAMPLE_RATE:.1f} s of audio), got {x.shape[0]}: give more audio or fewer codes"
            )
        if x.shape[0] > self.max_fit_frames:  # seeded subsample bounds fitting time and memory
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.max_fit_frames]]
        return kmeans(x, k, n_iter=self.n_iter, seed=seed)

    def fit(self, audios: list[np.ndarray], sr: int) -> DualCodebookTokenizer:
        """Fit both codebooks on a list of utterances (all at sample rate ``sr``); deterministic per seed."""
        pairs = [self.features(a, sr) for a in audios]
        self.linguistic = self._fit_one(
            [p[0] for p in pairs], self.linguistic_codes, self.linguistic_mels, "linguistic", self.seed
        )
        self.semantic = self._fit_one(
            [p[1] for p in pairs], self.semantic_codes, self.semantic_mels, "semantic", self.seed + 1
        )
        return self

    # ---- the protocol ----

    def _require_fitted(self) -> None:
        if self.linguistic is None or self.semantic is None:
            raise RuntimeError("DualCodebookTokenizer is not fitted: call fit() or load() first")

    def encode_streams(self, audio: np.ndarray, sr: int) -> tuple[list[int], list[int]]:
        """(vq02, vq06): ``n // 960`` linguistic and ``n // 640`` semantic codes (n samples at 16 kHz)."""
        self._require_fitted()
        ling, sem = self.features(audio, sr)
        vq02 = _assign(ling, self.linguistic)[0].tolist() if ling.shape[0] else []
        vq06 = _assign(sem, self.semantic)[0].tolist() if sem.shape[0] else []
        return vq02, vq06

    def decode(self, codes: list[int]) -> np.ndarray:
        raise NotImplementedError(
            "DualCodebookTokenizer cannot decode codes to audio (it is an analysis-only reference "
            "tokenizer); decode_streams gives the vq02 / vq06 streams"
        )

    def num_codes(self, n_samples_16k: int) -> int:
        """Length of ``encode``'s output for n samples of 16 kHz audio."""
        return 5 * num_groups(n_samples_16k)

    # ---- persistence ----

    def config(self) -> dict:
        return {
            "type": CONFIG_TYPE,
            "sample_rate": SAMPLE_RATE,
            "linguistic": {
                "codes": self.linguistic_codes,
                "n_mels": self.linguistic_mels,
                "hop_samples": LINGUISTIC_HOP,
                "rate_hz": self.linguistic_rate_hz,
            },
            "semantic": {
                "codes": self.semantic_codes,
                "n_mels": self.semantic_mels,
                "hop_samples": SEMANTIC_HOP,
                "rate_hz": self.semantic_rate_hz,
            },
            "layout": {"n_vq02": N_VQ02, "n_vq06": N_VQ06, "id_offset": self.id_map.offset},
            "n_iter": self.n_iter,
            "seed": self.seed,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        self._require_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {"linguistic": self.linguistic.contiguous(), "semantic": self.semantic.contiguous()},
            str(d / CODEBOOKS_FILE),
        )
        (d / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DualCodebookTokenizer:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / "config.json", d / CODEBOOKS_FILE
        if not cfg_path.is_file():
            raise AudioTokenizerError(f"{d}: not a dual-codebook audio tokenizer directory (config.json missing)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("type") != CONFIG_TYPE:  # e.g. a 'kmeans' directory given as dual:DIR
            raise AudioTokenizerError(f"{cfg_path}: type is {cfg.get('type')!r}, expected {CONFIG_TYPE!r}")
        if not w_path.is_file():
            raise AudioTokenizerError(f"{d}: not a dual-codebook audio tokenizer directory ({w_path.name} missing)")
        expected = {"n_vq02": N_VQ02, "n_vq06": N_VQ06, "id_offset": STEP_AUDIO_V1.offset}
        if cfg.get("layout") != expected:
            raise AudioTokenizerError(f"{cfg_path}: id layout {cfg.get('layout')} != Step-Audio v1's {expected}")
        hops = (cfg["linguistic"].get("hop_samples"), cfg["semantic"].get("hop_samples"))
        if hops != (LINGUISTIC_HOP, SEMANTIC_HOP) or cfg.get("sample_rate") != SAMPLE_RATE:
            raise AudioTokenizerError(
                f"{cfg_path}: hops {hops} at {cfg.get('sample_rate')} Hz != ({LINGUISTIC_HOP}, {SEMANTIC_HOP}) "
                f"at {SAMPLE_RATE} Hz"
            )
        tok = cls(
            cfg["linguistic"]["codes"],
            cfg["semantic"]["codes"],
            linguistic_mels=cfg["linguistic"]["n_mels"],
            semantic_mels=cfg["semantic"]["n_mels"],
            n_iter=cfg.get("n_iter", 25),
            seed=cfg.get("seed", 0),
        )
        books = load_file(str(w_path))
        for name, shape in (
            ("linguistic", (tok.linguistic_codes, tok.linguistic_mels)),
            ("semantic", (tok.semantic_codes, tok.semantic_mels)),
        ):
            if name not in books:
                raise AudioTokenizerError(f"{w_path}: no {name!r} codebook")
            if tuple(books[name].shape) != shape:
                raise AudioTokenizerError(f"{w_path}: {name} codebook shape {tuple(books[name].shape)} != {shape}")
            setattr(tok, name, books[name].to(torch.float32))
        return tok
