"""Audio tokenizers: a protocol, a built-in k-means reference tokenizer, and adapters to real codecs.

Step-Audio v1's dual-codebook tokenizers (the reference ``DualCodebookTokenizer``, the stream protocol and
the exact rates) are in ``steptrain.audio.dual``; ``StepAudioTokenizer`` here adapts the real one.

``KMeansAudioTokenizer`` is a small reference/test tokenizer, not a speech codec: features are the
Step-Audio 2 log-mel frames (100 Hz) averaged over windows of 4 frames (25 Hz, one code per 40 ms),
quantised by k-means (k-means++ init, seeded, Lloyd iterations, in torch). It cannot decode.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .codes import STEP_AUDIO_V1, deinterleave_dual, interleave_dual
from .features import SAMPLE_RATE, log_mel, num_frames
from .io import resample

__all__ = [
    "AudioTokenizer",
    "AudioTokenizerError",
    "CosyVoice2Tokenizer",
    "KMeansAudioTokenizer",
    "StepAudioTokenizer",
    "kmeans",
    "load_audio_tokenizer",
]


class AudioTokenizerError(RuntimeError):
    """A tokenizer cannot be built (missing package, weights or bad spec)."""


@runtime_checkable
class AudioTokenizer(Protocol):
    rate_hz: float
    n_codes: int

    def encode(self, audio: np.ndarray, sr: int) -> list[int]: ...

    def decode(self, codes: list[int]) -> np.ndarray:
        """Codes -> 16 kHz waveform; raise NotImplementedError (with a message) if unsupported."""
        ...


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min_(0)


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and its squared distance per row, in row chunks (bounded memory)."""
    idx, dist = [], []
    for i in range(0, x.shape[0], chunk):
        d, j = _sq_dists(x[i : i + chunk], c).min(1)
        idx.append(j)
        dist.append(d)
    return torch.cat(idx), torch.cat(dist)


def kmeans(x: torch.Tensor, k: int, n_iter: int = 25, seed: int = 0) -> torch.Tensor:
    """k-means++ initialisation + Lloyd iterations on x [N, D]; returns centroids [k, D] (float32).

    Runs on CPU; deterministic for a given seed. An empty cluster is re-seeded with the point farthest
    from its centroid. Lloyd stops early when the centroids no longer change.
    """
    x = x.detach().to("cpu", torch.float32)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} feature frames, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    centroids = torch.empty(k, x.shape[1], dtype=torch.float32)
    centroids[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = _sq_dists(x, centroids[:1]).squeeze(1)
    for i in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: any point
            idx = torch.randint(n, (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centroids[i] = x[idx]
        d2 = torch.minimum(d2, _sq_dists(x, centroids[i : i + 1]).squeeze(1))
    for _ in range(n_iter):
        assign, far = _assign(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = counts == 0
        if empty.any():
            for ci in torch.nonzero(empty).flatten().tolist():
                j = int(far.argmax())
                new[ci] = x[j]
                far[j] = -1.0
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


class KMeansAudioTokenizer:
    """Reference tokenizer: 25 Hz averaged log-mel frames -> nearest of ``n_codes`` k-means centroids.

    ``encode`` returns ``num_frames(len(audio_16k)) // 4`` codes (about one per 40 ms; the last partial
    window is dropped).
    """

    FRAMES_PER_CODE = 4  # 100 Hz log-mel -> 25 Hz codes

    def __init__(
        self,
        n_codes: int = 256,
        n_mels: int = 128,
        n_iter: int = 25,
        seed: int = 0,
        max_fit_frames: int = 200_000,
    ):
        if n_codes <= 0:
            raise ValueError(f"n_codes must be positive, got {n_codes}")
        self.n_codes = int(n_codes)
        self.n_mels = int(n_mels)
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        self.max_fit_frames = int(max_fit_frames)
        self.rate_hz = SAMPLE_RATE / 160 / self.FRAMES_PER_CODE
        self.centroids: torch.Tensor | None = None

    def features(self, audio: np.ndarray, sr: int) -> torch.Tensor:
        """[n_windows, n_mels] features at 25 Hz for one utterance."""
        audio = resample(np.asarray(audio, dtype=np.float32), sr, SAMPLE_RATE)
        mel = log_mel(audio, n_mels=self.n_mels)  # [n_mels, T]
        w = self.FRAMES_PER_CODE
        n = mel.shape[1] // w
        return mel[:, : n * w].reshape(self.n_mels, n, w).mean(-1).T.contiguous()

    def num_codes(self, n_samples_16k: int) -> int:
        return num_frames(n_samples_16k) // self.FRAMES_PER_CODE

    def fit(self, audios: list[np.ndarray], sr: int) -> KMeansAudioTokenizer:
        feats = [self.features(a, sr) for a in audios]
        x = torch.cat([f for f in feats if f.shape[0]], dim=0) if feats else torch.empty(0, self.n_mels)
        if x.shape[0] > self.max_fit_frames:  # seeded subsample keeps fitting time and memory bounded
            g = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.max_fit_frames]]
        self.centroids = kmeans(x, self.n_codes, n_iter=self.n_iter, seed=self.seed)
        return self

    def encode(self, audio: np.ndarray, sr: int) -> list[int]:
        if self.centroids is None:
            raise RuntimeError("KMeansAudioTokenizer is not fitted: call fit() or load() first")
        f = self.features(audio, sr).cpu()
        if f.shape[0] == 0:
            return []
        return _assign(f, self.centroids)[0].tolist()

    def decode(self, codes: list[int]) -> np.ndarray:
        raise NotImplementedError(
            "KMeansAudioTokenizer cannot decode codes to audio (it is an analysis-only tokenizer)"
        )

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        if self.centroids is None:
            raise RuntimeError("KMeansAudioTokenizer is not fitted: nothing to save")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids.contiguous()}, str(d / "centroids.safetensors"))
        cfg = {
            "type": "kmeans",
            "n_codes": self.n_codes,
            "n_mels": self.n_mels,
            "n_iter": self.n_iter,
            "seed": self.seed,
            "rate_hz": self.rate_hz,
            "frames_per_code": self.FRAMES_PER_CODE,
        }
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> KMeansAudioTokenizer:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path, w_path = d / "config.json", d / "centroids.safetensors"
        if not cfg_path.is_file():
            raise AudioTokenizerError(f"{d}: not a k-means audio tokenizer directory ({cfg_path.name} missing)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("type") != "kmeans":  # e.g. a 'dual' directory given as kmeans:DIR
            raise AudioTokenizerError(f"{cfg_path}: type is {cfg.get('type')!r}, expected 'kmeans'")
        if not w_path.is_file():
            raise AudioTokenizerError(f"{d}: not a k-means audio tokenizer directory ({w_path.name} missing)")
        tok = cls(
            n_codes=cfg["n_codes"],
            n_mels=cfg["n_mels"],
            n_iter=cfg.get("n_iter", 25),
            seed=cfg.get("seed", 0),
        )
        c = load_file(str(w_path))["centroids"]
        if tuple(c.shape) != (tok.n_codes, tok.n_mels):
            raise AudioTokenizerError(
                f"{w_path}: centroids shape {tuple(c.shape)} != ({tok.n_codes}, {tok.n_mels})"
            )
        tok.centroids = c.to(torch.float32)
        return tok


def _require_module(module: str, purpose: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and missing != module and not module.startswith(missing + "."):
            # the module exists but one of its own imports does not (e.g. Step-Audio's 'whisper')
            raise AudioTokenizerError(
                f"{purpose}: importing '{module}' failed, its dependency '{missing}' is not installed "
                f"({e}; {hint})"
            ) from e
        raise AudioTokenizerError(
            f"{purpose} needs the Python package '{module}', which is not installed ({hint})"
        ) from e


class CosyVoice2Tokenizer:
    """Adapter to the CosyVoice2 speech tokenizer (25 Hz, 6561 codes): Step-Audio 2's output audio codes.

    Needs ``onnxruntime`` and ``DIR/speech_tokenizer_v2.onnx`` (from the CosyVoice2 release). Input:
    128-bin Whisper log-mel without padding. UNVERIFIED here (no weights available in this environment).
    """

    rate_hz = 25.0
    n_codes = 6561
    WEIGHTS = "speech_tokenizer_v2.onnx"

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        ort = _require_module("onnxruntime", "cosyvoice2 audio tokenizer", "pip install onnxruntime")
        weights = d / self.WEIGHTS
        if not weights.is_file():
            raise AudioTokenizerError(
                f"cosyvoice2 audio tokenizer: weights {weights} not found (download the CosyVoice2 model directory)"
            )
        self.session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])

    def encode(self, audio: np.ndarray, sr: int) -> list[int]:
        audio = resample(np.asarray(audio, dtype=np.float32), sr, SAMPLE_RATE)
        feat = log_mel(audio, n_mels=128, padding=0)[None].numpy()
        inputs = self.session.get_inputs()
        out = self.session.run(
            None, {inputs[0].name: feat, inputs[1].name: np.array([feat.shape[2]], dtype=np.int32)}
        )[0]
        return [int(v) for v in np.asarray(out).reshape(-1)]

    def decode(self, codes: list[int]) -> np.ndarray:
        raise NotImplementedError(
            "cosyvoice2 adapter: decoding needs CosyVoice2's flow-matching decoder + vocoder"
        )


class InterleavedStreams:
    """``encode`` / ``decode_streams`` of a Step-Audio v1 codec from its own ``encode_streams`` (vq02, vq06):
    the streams are interleaved 2:3 into codes 0..5119 by ``codes.interleave_dual`` (one rule for all)."""

    def encode(self, audio: np.ndarray, sr: int) -> list[int]:
        """Interleaved codes k (0..5119); LLM ids are ``STEP_AUDIO_V1.to_ids``."""
        return interleave_dual(*self.encode_streams(audio, sr))

    def decode_streams(self, codes: list[int]) -> tuple[list[int], list[int]]:
        """Interleaved codes -> (vq02, vq06); checks the layout (groups of 5, each code in its slot range)."""
        return deinterleave_dual(codes)


class StepAudioTokenizer(InterleavedStreams):
    """Adapter to Step-Audio v1's dual-codebook tokenizer (vq02 + vq06, interleaved 2:3 -> 5120 codes).

    Same protocol as ``dual.DualCodebookTokenizer`` (``encode``, ``encode_streams``, ``decode_streams``).
    Needs the Step-Audio repository (https://github.com/stepfun-ai/Step-Audio) on PYTHONPATH, so that its
    ``tokenizer`` module (class ``StepAudioTokenizer``, with its own requirements: funasr_detach, whisper,
    onnxruntime, torchaudio) imports, and DIR = the Step-Audio-Tokenizer weights directory holding
    ``REQUIRED_FILES``. Step's class runs its ONNX model with the CUDA provider and the Paraformer on
    device 0, so it needs a GPU. ``trim_silence`` / ``energy_norm`` = None keep the defaults of Step's
    ``wav2token`` (both on: silence is trimmed before coding, so a clip's code count follows its trimmed
    length); ``encode`` with defaults is what Step-Audio-TTS does to a prompt clip (docs/step_facts.md,
    section 1). UNVERIFIED here (package and weights absent); the wiring is tested with a stand-in.
    """

    rate_hz = 25.0 + 50.0 / 3.0  # 16.7 Hz linguistic + 25 Hz semantic codes per second
    n_codes = 5120
    linguistic_rate_hz = 50.0 / 3.0
    semantic_rate_hz = 25.0
    id_map = STEP_AUDIO_V1
    MODULE = "tokenizer"
    REQUIRED_FILES = (
        "linguistic_tokenizer.npy",  # vq02 k-means centroids
        "speech_tokenizer_v1.onnx",  # vq06: CosyVoice speech tokenizer v1
        "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online",  # Paraformer
    )

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        trim_silence: bool | None = None,
        energy_norm: bool | None = None,
    ):
        d = Path(directory)
        mod = _require_module(
            self.MODULE,
            "stepaudio audio tokenizer",
            "put the Step-Audio repository (https://github.com/stepfun-ai/Step-Audio) on PYTHONPATH and "
            "install its requirements.txt",
        )
        if not hasattr(mod, "StepAudioTokenizer"):
            raise AudioTokenizerError(
                f"stepaudio audio tokenizer: module '{self.MODULE}' ({getattr(mod, '__file__', '?')}) has no "
                "StepAudioTokenizer; put the Step-Audio repository first on PYTHONPATH"
            )
        if not d.is_dir():
            raise AudioTokenizerError(
                f"stepaudio audio tokenizer: weights directory {d} not found (Step-Audio-Tokenizer)"
            )
        missing = [name for name in self.REQUIRED_FILES if not (d / name).exists()]
        if missing:
            raise AudioTokenizerError(
                f"stepaudio audio tokenizer: {d} is not a Step-Audio-Tokenizer weights directory, missing "
                f"{', '.join(missing)} (download stepfun-ai/Step-Audio-Tokenizer)"
            )
        self.wav2token_kwargs = {
            k: bool(v) for k, v in (("enable_trim", trim_silence), ("energy_norm", energy_norm)) if v is not None
        }
        self.impl = mod.StepAudioTokenizer(str(d))

    def encode_streams(self, audio: np.ndarray, sr: int) -> tuple[list[int], list[int]]:
        """(vq02, vq06) as Step's tokenizer computes them (codes without the 65536 / 1024 offsets).

        Step-Audio's ``wav2token(audio [channels, samples] tensor, sample_rate)`` returns
        ``(llm ids, vq02, vq06)``; we keep the raw streams and interleave them ourselves.
        """
        wav = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        if wav.ndim == 1:
            wav = wav[None]
        _, vq02, vq06 = self.impl.wav2token(wav, sr, **self.wav2token_kwargs)
        return [int(v) for v in vq02], [int(v) for v in vq06]

    def decode(self, codes: list[int]) -> np.ndarray:
        raise NotImplementedError(
            "stepaudio adapter: decoding needs Step-Audio-TTS's flow-matching decoder + vocoder"
        )


def _load_dual(directory: str) -> AudioTokenizer:
    from .dual import DualCodebookTokenizer

    return DualCodebookTokenizer.load(directory)


def load_audio_tokenizer(spec: str) -> AudioTokenizer:
    """'kmeans:DIR' -> KMeansAudioTokenizer.load(DIR); 'dual:DIR' -> dual.DualCodebookTokenizer.load(DIR)
    (Step-Audio v1 layout, reference codebooks); 'cosyvoice2:DIR' / 'stepaudio:DIR' -> codec adapters."""
    kind, sep, directory = spec.partition(":")
    kinds = {
        "kmeans": KMeansAudioTokenizer.load,
        "dual": _load_dual,
        "cosyvoice2": CosyVoice2Tokenizer,
        "stepaudio": StepAudioTokenizer,
    }
    if not sep or not directory or kind not in kinds:
        raise AudioTokenizerError(
            f"bad audio tokenizer spec {spec!r}: expected one of {sorted(kinds)} as 'KIND:DIR'"
        )
    return kinds[kind](directory)
