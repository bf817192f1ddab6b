"""Run under torchrun: the Megatron engine's logits on fixed eval batches, to compare with an HF model.

    python -m torch.distributed.run ... tests/megatron_probe.py OUT.pt [--ckpt CKPT] steptrain overrides...

Builds the model exactly as ``steptrain train`` does (config -> engine -> build_model -> prepare), loads a
checkpoint through the engine when ``--ckpt`` is given (any TP/PP layout), and writes the batches (one
padded, one packed) and the logits of every batch from the main rank.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ckpt")
    args, overrides = parser.parse_known_args()

    from steptrain.config import load_config, load_saved_config
    from steptrain.data import collate, load_sft_data, read_rows
    from steptrain.engines import build_engine
    from steptrain.engines.optim import param_groups
    from steptrain.inputs import resolve_inputs
    from steptrain.models.loader import load_tokenizer
    from steptrain.recipes.loop import build_model

    if args.ckpt:
        from omegaconf import OmegaConf

        cfg = load_saved_config(f"{args.ckpt}/config.yaml")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    else:
        cfg = load_config(overrides)
    engine = build_engine(cfg.engine, cfg.trainer, cfg.optim)
    tokenizer = load_tokenizer(cfg.model)
    rows, _ = read_rows(list(cfg.data.eval_files))
    examples = load_sft_data(rows[:6], tokenizer, cfg.data, resolve_inputs(cfg, tokenizer)).examples
    batches = [
        collate([[0], [1], [2]], examples, pad_id=tokenizer.pad_token_id, packing=False),
        collate([[3, 4], [5]], examples, pad_id=tokenizer.pad_token_id, packing=True),
    ]
    batches = [{k: v for k, v in b.items() if v is not None} for b in batches]
    model = build_model(cfg, engine, tokenizer)
    engine.prepare(model, param_groups(model, cfg.optim), cfg.optim, 10)
    if args.ckpt:
        engine.load(args.ckpt)
    logits = engine.forward_only(batches, lambda out, batch: out)
    if engine.is_main:
        torch.save({"batches": batches, "logits": [t.cpu() for t in logits]}, args.out)
    engine.close()


if __name__ == "__main__":
    sys.exit(main())
