"""Fit the reference k-means audio tokenizer on a folder of audio files (for TTS on the demo corpus).

    python -m data_pipelines.fit_audio_tokenizer AUDIO_DIR OUT_DIR [--codes 64] [--max-files 500]

Then train with ``model.audio_codes=64 data.audio_tokenizer=kmeans:OUT_DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steptrain.audio.io import load_audio
from steptrain.audio.tokenizer import KMeansAudioTokenizer


def fit_audio_tokenizer(audio_dir: str | Path, out_dir: str | Path, *, codes: int = 64, max_files: int = 500,
                        seed: int = 0) -> Path:
    files = sorted(Path(audio_dir).glob("*.wav"))[:max_files]
    if not files:
        raise SystemExit(f"{audio_dir}: no .wav files")
    tokenizer = KMeansAudioTokenizer(n_codes=codes, seed=seed).fit([load_audio(f) for f in files], 16000)
    return tokenizer.save(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--codes", type=int, default=64)
    parser.add_argument("--max-files", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(fit_audio_tokenizer(args.audio_dir, args.out_dir, codes=args.codes, max_files=args.max_files, seed=args.seed))


if __name__ == "__main__":
    main()
