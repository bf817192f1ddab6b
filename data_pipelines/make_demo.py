"""Build the demo bundle: synthetic corpus, tokenizer and a random-init model, in a few seconds.

    python -m data_pipelines.make_demo --out DIR [--seed 0] [--preset tiny]

writes

    DIR/data/train.jsonl, DIR/data/eval.jsonl   ms-swift JSONL (see data_pipelines.demo_corpus)
    DIR/tokenizer/                              byte-level BPE, Step special tokens and chat template
    DIR/model/                                  Qwen2ForCausalLM (random init, seeded), its tokenizer and
                                                a generation_config with eos_token_id = <|EOT|>
    DIR/manifest.json                           what was built, with which settings

and prints the paths as JSON. Stages whose outputs exist and were built with the same settings are
skipped, so running it twice is cheap; ``--force`` rebuilds everything.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from data_pipelines.demo_corpus import iter_tokenizer_texts, read_jsonl, write_demo_corpus

MANIFEST = "manifest.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", *_TOKENIZER_FILES)


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def _have(directory: Path, names: tuple[str, ...]) -> bool:
    return all((directory / n).is_file() for n in names)


def make_demo(
    out: str | Path,
    seed: int = 0,
    preset: str = "tiny",
    n_train: int = 20000,
    n_eval: int = 256,
    force: bool = False,
) -> dict[str, str]:
    """Build (or reuse) the demo bundle under ``out``; return the paths (strings) by name."""
    out = Path(out)
    data_dir, tok_dir, model_dir = out / "data", out / "tokenizer", out / "model"
    paths = {
        "root": str(out),
        "train": str(data_dir / "train.jsonl"),
        "eval": str(data_dir / "eval.jsonl"),
        "tokenizer": str(tok_dir),
        "model": str(model_dir),
        "manifest": str(out / MANIFEST),
    }
    old = {} if force else _read_manifest(out)
    data_key = {"seed": seed, "n_train": n_train, "n_eval": n_eval}
    model_key = {**data_key, "preset": preset}
    data_ok = old.get("data") == data_key and _have(data_dir, ("train.jsonl", "eval.jsonl"))
    tok_ok = data_ok and old.get("tokenizer") == data_key and _have(tok_dir, _TOKENIZER_FILES)
    model_ok = tok_ok and old.get("model") == model_key and _have(model_dir, _MODEL_FILES)
    if model_ok:  # everything is there: answer without importing torch / transformers
        return paths

    import torch

    from data_pipelines.demo_tokenizer import EOT_ID, train_demo_tokenizer
    from steptrain.models.presets import PRESETS, build_preset

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": seed, "preset": preset}

    if not data_ok:
        write_demo_corpus(data_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    manifest["data"] = data_key

    if tok_ok:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_demo_tokenizer(iter_tokenizer_texts(read_jsonl(data_dir / "train.jsonl")), tok_dir)
    manifest["tokenizer"] = data_key
    manifest["vocab_size"] = len(tokenizer)

    # model stage: reaching this point means it has to be (re)built
    torch.manual_seed(seed)
    model = build_preset(preset, tokenizer)
    model.generation_config.eos_token_id = EOT_ID
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    manifest["num_parameters"] = sum(p.numel() for p in model.parameters())
    manifest["model"] = model_key

    manifest["paths"] = paths
    manifest["reused"] = {"data": data_ok, "tokenizer": tok_ok}
    _write_manifest(out, manifest)
    return paths


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.make_demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the corpus and the model init")
    parser.add_argument("--preset", default="tiny", help="model preset (steptrain.models.presets.PRESETS)")
    parser.add_argument("--n-train", type=int, default=20000, help="training rows")
    parser.add_argument("--n-eval", type=int, default=256, help="held-out rows")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    args = parser.parse_args(argv)
    paths = make_demo(
        args.out,
        seed=args.seed,
        preset=args.preset,
        n_train=args.n_train,
        n_eval=args.n_eval,
        force=args.force,
    )
    print(json.dumps(paths, indent=2))
    return paths


if __name__ == "__main__":
    main()
