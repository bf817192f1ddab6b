"""Fit a reference audio tokenizer on a folder of audio files (offline, CPU).

    python -m data_pipelines.fit_audio_tokenizer AUDIO_DIR OUT_DIR [--codes 64] [--max-files 500]
    python -m data_pipelines.fit_audio_tokenizer AUDIO_DIR OUT_DIR --dual [--linguistic 1024] [--semantic 4096]

Without ``--dual``: the single-stream k-means tokenizer (25 Hz); train TTS with
``model.audio_codes=64 data.audio_tokenizer=kmeans:OUT_DIR``.

With ``--dual``: the Step-Audio v1 dual-codebook reference tokenizer (steptrain.audio.dual), a linguistic
codebook at 16.7 Hz and a semantic one at 25 Hz, interleaved 2:3 into codes 0..5119 (LLM ids 65536 + k);
use it as ``dual:OUT_DIR``. ``--linguistic`` / ``--semantic`` set the fitted codebook sizes (at most
1024 / 4096, e.g. 16 / 32 for a demo); the id layout stays Step's whatever the sizes. Fitting the full
1024 + 4096 codes needs at least 4096 semantic frames (164 s of audio) and takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from steptrain.audio.dual import DualCodebookTokenizer
from steptrain.audio.io import load_audio
from steptrain.audio.tokenizer import KMeansAudioTokenizer


def _load_folder(audio_dir: str | Path, max_files: int) -> list:
    files = sorted(Path(audio_dir).glob("*.wav"))[:max_files]
    if not files:
        raise SystemExit(f"{audio_dir}: no .wav files")
    return [load_audio(f) for f in files]


def fit_audio_tokenizer(audio_dir: str | Path, out_dir: str | Path, *, codes: int = 64, max_files: int = 500,
                        seed: int = 0) -> Path:
    tokenizer = KMeansAudioTokenizer(n_codes=codes, seed=seed).fit(_load_folder(audio_dir, max_files), 16000)
    return tokenizer.save(out_dir)


def fit_dual_tokenizer(audio_dir: str | Path, out_dir: str | Path, *, linguistic: int = 1024,
                       semantic: int = 4096, max_files: int = 500, seed: int = 0, n_iter: int = 25) -> Path:
    """Fit ``DualCodebookTokenizer`` on the .wav files of ``audio_dir`` (sorted, the first ``max_files``)."""
    tokenizer = DualCodebookTokenizer(linguistic, semantic, seed=seed, n_iter=n_iter)
    try:
        tokenizer.fit(_load_folder(audio_dir, max_files), 16000)
    except ValueError as e:  # too little audio for the codebook sizes: say so without a traceback
        raise SystemExit(f"{audio_dir}: {e}") from e
    return tokenizer.save(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--codes", type=int, default=64, help="k-means tokenizer: number of codes")
    parser.add_argument("--dual", action="store_true", help="fit the Step-Audio v1 dual-codebook tokenizer")
    parser.add_argument("--linguistic", type=int, default=1024, help="--dual: linguistic codebook size")
    parser.add_argument("--semantic", type=int, default=4096, help="--dual: semantic codebook size")
    parser.add_argument("--n-iter", type=int, default=25, help="--dual: Lloyd iterations per codebook")
    parser.add_argument("--max-files", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dual:
        out = fit_dual_tokenizer(args.audio_dir, args.out_dir, linguistic=args.linguistic, semantic=args.semantic,
                                 max_files=args.max_files, seed=args.seed, n_iter=args.n_iter)
    else:
        out = fit_audio_tokenizer(args.audio_dir, args.out_dir, codes=args.codes, max_files=args.max_files,
                                  seed=args.seed)
    print(out)


if __name__ == "__main__":
    main()
