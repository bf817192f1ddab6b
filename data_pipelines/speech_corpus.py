"""Deterministic synthetic speech corpus for the speech-LLM demo and tests: spoken digit strings.

Every utterance is a string of 3-8 digits, rendered to 16 kHz mono 16-bit PCM WAV by a "voice":

- ``"dtmf"`` (default, always available, pure numpy + the standard ``wave`` module): each digit is the
  sum of its two DTMF tones (row 697/770/852/941 Hz, column 1209/1336/1477 Hz), 120-200 ms long, with
  seeded per-digit jitter in duration, amplitude, row/column level ("twist"), a detune of at most 1%,
  a random phase and 5 ms raised-cosine ramps; 40-120 ms of silence between digits, 20-100 ms before
  and after, and white noise 20-35 dB below the tones everywhere (so silences are not digital zero).
  On a 128-bin log-mel at 100 Hz the digits are clearly separable (DTMF frequencies fall into distinct
  mel bins) yet a model still has to segment, count and classify: easy, but a real acoustic task.
- ``"espeak"`` (optional, needs ``espeak-ng``; ``apt-get install espeak-ng``): the digits spoken as
  English words ("three nine one") with a seeded speaking rate and pitch. Resampled to 16 kHz with
  ``sox`` when it is installed; otherwise the files keep espeak's own rate (22050 Hz), which is recorded
  in ``meta.json`` (``"sample_rate"``) so a loader knows to resample.

:func:`write_speech_corpus` writes, under ``out_dir``::

    audio/train_00000.wav ...       one WAV per train utterance
    audio/eval_00000.wav ...        one WAV per eval utterance
    asr_train.jsonl asr_eval.jsonl  ASR: audio in, digits out
    chat_train.jsonl chat_eval.jsonl spoken chat: two audio turns, text answers
    tts_train.jsonl tts_eval.jsonl  TTS: text in, audio reply
    bad_rows.jsonl                  deliberately broken rows for data-layer error tests
    bad_rows.expected.json          line number (1-based, as a string) -> expected error reason keyword
    bad_audio/...                   the broken audio files the bad rows point to
    meta.json                       voice, sample rate, seed, counts, task descriptions

All rows are ms-swift JSONL: each ``<audio>`` tag, in message order (user and assistant alike), takes
the next path of ``audios``; paths are RELATIVE to the directory of the JSONL file (= ``out_dir``).

ASR rows (reference = last assistant message, digits separated by single spaces)::

    {"messages": [{"role": "user", "content": "<audio>Transcribe the digits."},
                  {"role": "assistant", "content": "3 9 1 7"}], "audios": ["audio/train_00042.wav"]}

Spoken-chat rows: two user turns, each with its own utterance (``<audio>`` + a question) and a short
text answer. Questions (see :data:`CHAT_QUESTIONS` and :func:`answer_question`): "What is the first
digit?", "What is the last digit?", "How many digits?" (answer "3".."8"), "Say the digits backwards.",
"Transcribe the digits."; the second turn may instead ask "Is it longer than the first one?"
("yes"/"no", strictly more digits), which needs the first turn's audio too. Chat train rows reuse the
train utterances, chat eval rows the eval utterances.

TTS rows: the user turn is text, the assistant reply is the audio; the TTS recipe turns the reply audio
into codes (the text is the digits of the utterance)::

    {"messages": [{"role": "user", "content": "Say: 3 9 1 7"},
                  {"role": "assistant", "content": "<audio>"}], "audios": ["audio/train_00042.wav"]}

Determinism: the same arguments give byte-identical files (WAV included). Eval digit strings are
pairwise distinct and none of them occurs among the train utterances. Generating the default
2000 + 100 utterances takes a few seconds on one CPU core (about 100 MB of WAV).

    python -m data_pipelines.speech_corpus OUT_DIR [--n-train 2000] [--n-eval 100] [--seed 0] [--voice dtmf]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.demo_corpus import write_jsonl

SAMPLE_RATE = 16000
MIN_DIGITS, MAX_DIGITS = 3, 8
DIGIT_MS = (120, 200)  # tone length per digit
GAP_MS = (40, 120)  # silence between digits
EDGE_MS = (20, 100)  # silence before the first and after the last digit
RAMP_MS = 5  # raised-cosine on/off ramps of each tone
SNR_DB = (20.0, 35.0)  # tone power over white-noise power, per utterance
MAX_DETUNE = 0.01  # relative frequency error per digit (DTMF receivers accept 1.5%)
MAX_AUDIO_SECONDS = 30.0  # clip length the bad "too long" row exceeds (Whisper's 30 s window)
TOO_LONG_SECONDS = 40.0

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
DTMF_COLS = (1209.0, 1336.0, 1477.0)
# digit -> (row frequency, column frequency), the telephone keypad layout
DTMF_FREQS: dict[str, tuple[float, float]] = {
    "1": (697.0, 1209.0), "2": (697.0, 1336.0), "3": (697.0, 1477.0),
    "4": (770.0, 1209.0), "5": (770.0, 1336.0), "6": (770.0, 1477.0),
    "7": (852.0, 1209.0), "8": (852.0, 1336.0), "9": (852.0, 1477.0),
    "0": (941.0, 1336.0),
}  # fmt: skip

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOICES = ("dtmf", "espeak")

ASR_PROMPT = "Transcribe the digits."
TTS_PREFIX = "Say: "
CHAT_QUESTIONS: dict[str, str] = {
    "first": "What is the first digit?",
    "last": "What is the last digit?",
    "count": "How many digits?",
    "reverse": "Say the digits backwards.",
    "transcribe": ASR_PROMPT,
    "longer": "Is it longer than the first one?",  # second turn only
}
_FIRST_TURN_TASKS = ("first", "last", "count", "reverse", "transcribe")
_P_LONGER = 0.25  # probability that the second chat turn asks the cross-turn question

# Bad rows for data-layer error tests: (file name or None, reason keyword). Each row is otherwise a
# well-formed ASR row, so exactly one thing is wrong with it:
#   1 missing     - the audio path does not exist
#   2 mismatch    - two <audio> tags but one path in "audios"
#   3 mismatch    - one <audio> tag but no "audios" field at all
#   4 empty       - a valid WAV header with zero frames
#   5 unreadable  - garbage bytes with a .wav name (not a RIFF file)
#   6 too long    - a well-formed 40 s clip, over MAX_AUDIO_SECONDS
BAD_REASONS = ("missing", "mismatch", "mismatch", "empty", "unreadable", "too long")


@dataclass(frozen=True)
class Utterance:
    split: str  # "train" or "eval"
    index: int
    digits: str  # e.g. "3917"

    @property
    def rel_path(self) -> str:
        return f"audio/{self.split}_{self.index:05d}.wav"

    @property
    def text(self) -> str:
        return " ".join(self.digits)


# ---------------------------------------------------------------------------------------------- labels


def answer_question(task: str, digits: str, prev_digits: str | None = None) -> str:
    """The reference answer of a chat question ``task`` (a key of :data:`CHAT_QUESTIONS`)."""
    if task == "first":
        return digits[0]
    if task == "last":
        return digits[-1]
    if task == "count":
        return str(len(digits))
    if task == "reverse":
        return " ".join(digits[::-1])
    if task == "transcribe":
        return " ".join(digits)
    if task == "longer":
        if prev_digits is None:
            raise ValueError("the 'longer' question needs the previous turn's digits")
        return "yes" if len(digits) > len(prev_digits) else "no"
    raise ValueError(f"unknown chat task {task!r}; valid tasks: {', '.join(CHAT_QUESTIONS)}")


def draw_digit_strings(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, eval)`` digit strings; eval strings are distinct and none occurs in train."""
    rng = random.Random(f"steptrain-speech-corpus/{seed}")

    def draw() -> str:
        n = rng.randint(MIN_DIGITS, MAX_DIGITS)
        return "".join(str(rng.randrange(10)) for _ in range(n))

    eval_strings: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(eval_strings) < n_eval:
        attempts += 1
        if attempts > 100 * max(n_eval, 1):
            raise RuntimeError("could not draw enough distinct eval digit strings")
        s = draw()
        if s not in seen:
            seen.add(s)
            eval_strings.append(s)
    train_strings: list[str] = []
    while len(train_strings) < n_train:
        s = draw()
        if s not in seen:
            train_strings.append(s)
    return train_strings, eval_strings


# ----------------------------------------------------------------------------------------------- audio


def duration_bounds(n_digits: int) -> tuple[float, float]:
    """Smallest and largest possible duration in seconds of a DTMF utterance with ``n_digits``."""
    lo = (2 * EDGE_MS[0] + n_digits * DIGIT_MS[0] + (n_digits - 1) * GAP_MS[0]) / 1000
    hi = (2 * EDGE_MS[1] + n_digits * DIGIT_MS[1] + (n_digits - 1) * GAP_MS[1]) / 1000
    return lo, hi


_SPLIT_IDS = {"train": 0, "eval": 1, "bad": 2}


def _utterance_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # keyed by (seed, split, index): an utterance's audio does not depend on how many others there are
    return np.random.default_rng([seed, _SPLIT_IDS[split], index, 0x5EEC])


def _ms(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    """A duration drawn uniformly from ``bounds`` (ms), in samples."""
    return int(rng.integers(bounds[0], bounds[1] + 1)) * SAMPLE_RATE // 1000


def synth_dtmf(digits: str, rng: np.random.Generator) -> np.ndarray:
    """Render ``digits`` as DTMF tones with seeded jitter; float32 in [-1, 1] at :data:`SAMPLE_RATE`."""
    gain = rng.uniform(0.2, 0.5)
    lengths, gaps = [], []
    for i in range(len(digits)):
        lengths.append(_ms(rng, DIGIT_MS))
        gaps.append(_ms(rng, EDGE_MS) if i == 0 else _ms(rng, GAP_MS))
    tail = _ms(rng, EDGE_MS)
    out = np.zeros(sum(lengths) + sum(gaps) + tail, dtype=np.float64)
    ramp_n = RAMP_MS * SAMPLE_RATE // 1000
    pos = 0
    for d, n, gap in zip(digits, lengths, gaps, strict=True):
        pos += gap
        t = np.arange(n) / SAMPLE_RATE
        amp = gain * rng.uniform(0.8, 1.2)
        twist = rng.uniform(0.8, 1.25)  # column level relative to row level
        tone = np.zeros(n)
        for f, a in zip(DTMF_FREQS[d], (amp, amp * twist), strict=True):
            f = f * (1.0 + rng.uniform(-MAX_DETUNE, MAX_DETUNE))
            tone += a * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
        env = np.ones(n)
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp_n) / ramp_n)
        env[:ramp_n], env[-ramp_n:] = ramp, ramp[::-1]
        out[pos : pos + n] = tone * env / 2  # two tones: keep the peak near ``amp``
        pos += n
    tone_power = (gain / 2) ** 2 * 0.5 * 2  # mean power of two sinusoids of amplitude gain/2
    noise_std = np.sqrt(tone_power / 10 ** (rng.uniform(*SNR_DB) / 10))
    out += rng.normal(0.0, noise_std, size=out.shape)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float samples in [-1, 1] as 16-bit PCM WAV (standard ``wave`` module)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV: ``(float32 samples in [-1, 1], sample_rate)``; channels are averaged."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        channels, rate = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = pcm.astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "voice='espeak' needs the espeak-ng program, which is not installed "
            "(apt-get install espeak-ng; optionally also sox to resample to 16 kHz); "
            "or use the default voice='dtmf'"
        )
    return exe


def _render_espeak(
    digits: str, rng: np.random.Generator, out_path: Path, espeak: str, sox: str | None, tmp: Path
) -> int:
    """Speak ``digits`` as words into ``out_path``; returns the file's sample rate."""
    words = " ".join(DIGIT_WORDS[int(d)] for d in digits)
    speed, pitch = int(rng.integers(140, 191)), int(rng.integers(30, 71))
    raw = tmp / "raw.wav"
    cmd = [espeak, "-v", "en-us", "-s", str(speed), "-p", str(pitch), "-w", str(raw), words]
    subprocess.run(cmd, check=True, capture_output=True)
    if sox is not None:
        # -R: repeatable (fixed seeds), -D: no dither, so reruns are byte-identical
        subprocess.run(
            [sox, "-R", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out_path)],
            check=True,
            capture_output=True,
        )
    else:
        shutil.copyfile(raw, out_path)
    with wave.open(str(out_path), "rb") as w:
        return w.getframerate()


def render_utterances(
    utterances: list[Utterance], out_dir: str | Path, seed: int = 0, voice: str = "dtmf"
) -> int:
    """Write the WAV of every utterance under ``out_dir``; returns the sample rate of the files."""
    if voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    if voice == "dtmf":
        for u in utterances:
            write_wav(out_dir / u.rel_path, synth_dtmf(u.digits, _utterance_rng(seed, u.split, u.index)))
        return SAMPLE_RATE
    espeak, sox = _require_espeak(), shutil.which("sox")
    rates = set()
    with tempfile.TemporaryDirectory() as tmp:
        for u in utterances:
            rng = _utterance_rng(seed, u.split, u.index)
            rates.add(_render_espeak(u.digits, rng, out_dir / u.rel_path, espeak, sox, Path(tmp)))
    if len(rates) > 1:
        raise RuntimeError(f"espeak-ng produced several sample rates: {sorted(rates)}")
    return rates.pop() if rates else SAMPLE_RATE


# ------------------------------------------------------------------------------------------------ rows


def asr_row(u: Utterance) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"<audio>{ASR_PROMPT}"},
            {"role": "assistant", "content": u.text},
        ],
        "audios": [u.rel_path],
    }


def tts_row(u: Utterance) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{TTS_PREFIX}{u.text}"},
            {"role": "assistant", "content": "<audio>"},
        ],
        "audios": [u.rel_path],
    }


def chat_rows(utterances: list[Utterance], n: int, rng: random.Random) -> list[dict]:
    """``n`` two-turn spoken-chat rows over pairs of distinct utterances drawn from ``utterances``."""
    if n and len(utterances) < 2:
        raise ValueError("spoken chat rows need at least 2 utterances")
    rows = []
    for _ in range(n):
        a, b = rng.sample(utterances, 2)
        t1 = rng.choice(_FIRST_TURN_TASKS)
        t2 = "longer" if rng.random() < _P_LONGER else rng.choice(_FIRST_TURN_TASKS)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"<audio>{CHAT_QUESTIONS[t1]}"},
                    {"role": "assistant", "content": answer_question(t1, a.digits)},
                    {"role": "user", "content": f"<audio>{CHAT_QUESTIONS[t2]}"},
                    {"role": "assistant", "content": answer_question(t2, b.digits, a.digits)},
                ],
                "audios": [a.rel_path, b.rel_path],
            }
        )
    return rows


def write_bad_rows(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``bad_rows.jsonl``, ``bad_rows.expected.json`` and their ``bad_audio/`` files."""
    out_dir = Path(out_dir)
    bad = out_dir / "bad_audio"
    bad.mkdir(parents=True, exist_ok=True)
    rng = _utterance_rng(seed, "bad", 0)
    ok = "bad_audio/ok.wav"  # a good clip for the rows whose fault is not the audio itself
    write_wav(out_dir / ok, synth_dtmf("123", rng))
    write_wav(bad / "empty.wav", np.zeros(0, dtype=np.float32))
    (bad / "garbage.wav").write_bytes(
        bytes(random.Random(f"steptrain-speech-corpus/garbage/{seed}").randrange(256) for _ in range(1000))
    )
    n_long = int(TOO_LONG_SECONDS * SAMPLE_RATE)
    clip = synth_dtmf("0123456789", rng)
    long_clip = np.tile(clip, -(-n_long // len(clip)))[:n_long]
    write_wav(bad / "too_long.wav", long_clip)

    def row(content: str, audios: list[str] | None, answer: str = "1 2 3") -> dict:
        r: dict = {
            "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        }
        if audios is not None:
            r["audios"] = audios
        return r

    prompt = f"<audio>{ASR_PROMPT}"
    rows = [
        row(prompt, ["bad_audio/does_not_exist.wav"]),
        row(f"<audio><audio>{ASR_PROMPT}", [ok]),
        row(prompt, None),
        row(prompt, ["bad_audio/empty.wav"], "0"),
        row(prompt, ["bad_audio/garbage.wav"], "0"),
        row(prompt, ["bad_audio/too_long.wav"], "0 1 2 3 4 5 6 7 8 9"),
    ]
    assert len(rows) == len(BAD_REASONS)
    rows_path, expected_path = out_dir / "bad_rows.jsonl", out_dir / "bad_rows.expected.json"
    write_jsonl(rows, rows_path)
    expected = {str(i): reason for i, reason in enumerate(BAD_REASONS, start=1)}
    expected_path.write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    return rows_path, expected_path


# -------------------------------------------------------------------------------------------- top level


def write_speech_corpus(
    out_dir: str | Path,
    n_train: int = 2000,
    n_eval: int = 100,
    seed: int = 0,
    voice: str = "dtmf",
    *,
    n_chat_train: int | None = None,
    n_chat_eval: int | None = None,
    bad_rows: bool = True,
) -> dict[str, Path]:
    """Write the corpus (see the module docstring) under ``out_dir`` and return its paths.

    Keys: ``asr_train asr_eval chat_train chat_eval tts_train tts_eval meta audio_dir`` and, with
    ``bad_rows``, ``bad_rows bad_rows_expected``. Chat row counts default to ``n_train // 4`` and
    ``n_eval``. Same arguments -> byte-identical files.
    """
    if voice not in VOICES:
        raise ValueError(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    if voice == "espeak":
        _require_espeak()  # fail before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_digits, eval_digits = draw_digit_strings(n_train, n_eval, seed)
    train = [Utterance("train", i, d) for i, d in enumerate(train_digits)]
    evals = [Utterance("eval", i, d) for i, d in enumerate(eval_digits)]
    sample_rate = render_utterances(train + evals, out_dir, seed=seed, voice=voice)

    n_chat_train = n_train // 4 if n_chat_train is None else n_chat_train
    n_chat_eval = n_eval if n_chat_eval is None else n_chat_eval
    chat_rng = random.Random(f"steptrain-speech-corpus/chat/{seed}")
    paths = {
        name: out_dir / f"{name}.jsonl"
        for name in ("asr_train", "asr_eval", "chat_train", "chat_eval", "tts_train", "tts_eval")
    }
    write_jsonl([asr_row(u) for u in train], paths["asr_train"])
    write_jsonl([asr_row(u) for u in evals], paths["asr_eval"])
    write_jsonl(chat_rows(train, n_chat_train, chat_rng), paths["chat_train"])
    write_jsonl(chat_rows(evals, n_chat_eval, chat_rng), paths["chat_eval"])
    write_jsonl([tts_row(u) for u in train], paths["tts_train"])
    write_jsonl([tts_row(u) for u in evals], paths["tts_eval"])
    if bad_rows:
        paths["bad_rows"], paths["bad_rows_expected"] = write_bad_rows(out_dir, seed)
    meta = {
        "voice": voice,
        "sample_rate": sample_rate,
        "seed": seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "n_chat_train": n_chat_train,
        "n_chat_eval": n_chat_eval,
        "digits_per_utterance": [MIN_DIGITS, MAX_DIGITS],
        "max_audio_seconds": MAX_AUDIO_SECONDS,
        "tasks": {
            "asr": f"user '<audio>{ASR_PROMPT}' -> assistant digits separated by spaces",
            "chat": "two user turns '<audio>' + question, text answers; see CHAT_QUESTIONS",
            "tts": f"user '{TTS_PREFIX}<digits>' -> assistant '<audio>' (the reply audio)",
        },
        "chat_questions": CHAT_QUESTIONS,
    }
    paths["meta"] = out_dir / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["audio_dir"] = out_dir / "audio"
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice", choices=VOICES, default="dtmf")
    a = p.parse_args(argv)
    paths = write_speech_corpus(a.out_dir, a.n_train, a.n_eval, a.seed, a.voice)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
