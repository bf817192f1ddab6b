"""Run under torchrun with 2 ranks by tests/test_deepspeed.py: checks that need to look inside ZeRO-3.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ds_probe.py ASSETS_DIR OUT

ASSETS_DIR is a data_pipelines.make_demo bundle (model/, tokenizer/, data/train.jsonl).

1. partition: a pretrained model is built already partitioned (zero.Init: no rank ever materialises it
   whole), after deepspeed.initialize each rank holds about half of every parameter, and the gathered
   full state dict is written by rank 0 to OUT/full.safetensors (the test compares it with the file).
2. mixed audio: a tiny speech LLM where rank 0's batch has audio and rank 1's has none trains a step
   (the encoder runs on a dummy input on rank 1, so the ZeRO-3 all-gathers match); OUT/mixed_ok marks it.
Both share the process group (DeepSpeed caches its groups, so it is created once and closed at the end).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from steptrain.config import load_config
from steptrain.engines import build_engine
from steptrain.engines.optim import param_groups
from steptrain.models.loader import load_model, load_tokenizer
from steptrain.models.speech.modeling import num_patches


def _config(assets: Path, out: Path, *overrides: str):
    return load_config([f"data.train_files=[{assets / 'data' / 'train.jsonl'}]", f"output_dir={out}", "engine=deepspeed", *overrides])


def _engine(cfg):
    return build_engine(cfg.engine, cfg.trainer, cfg.optim)


def check_partition(assets: Path, out: Path) -> None:
    # A user DeepSpeed file: persistence threshold 0 so that even tiny tensors are partitioned.
    ds_file = out / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = _config(assets, out, f"model.path={assets / 'model'}", f"engine.config_file={ds_file}")
    engine = _engine(cfg)
    tokenizer = load_tokenizer(cfg.model)
    with engine.init_context(cfg.model):
        model, _ = load_model(cfg.model, tokenizer)
    params = list(model.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "not built partitioned (zero.Init)"
    engine.prepare(model, param_groups(model, cfg.optim), cfg.optim, total_steps=1)
    total = sum(p.ds_numel for p in params)
    local = sum(p.ds_tensor.numel() for p in params)
    # Each parameter is padded to a multiple of the world size, hence "about" half.
    assert abs(local - total / engine.world_size) <= len(params) * engine.world_size, (local, total)
    print(f"rank {engine.rank}: {local} of {total} parameter elements", flush=True)
    state = engine.full_state_dict()
    if engine.is_main:
        save_file(state, str(out / "full.safetensors"))


def check_mixed_audio(assets: Path, out: Path) -> None:
    cfg = _config(assets, out, "model.preset=tiny-speech", f"model.tokenizer_path={assets / 'tokenizer'}",
                  "model.freeze_encoder=false")
    engine = _engine(cfg)
    tokenizer = load_tokenizer(cfg.model)
    with engine.init_context(cfg.model):
        model, _ = load_model(cfg.model, tokenizer)
    model, _, _ = engine.prepare(model, param_groups(model, cfg.optim), cfg.optim, total_steps=2)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<audio_start>", "<audio_patch>", "<audio_end>")}
    text = tokenizer("1 2 3", add_special_tokens=False)["input_ids"]
    batch: dict[str, torch.Tensor] = {}
    if engine.rank == 0:  # one 0.5 s clip
        frames = 50
        span = [ids["<audio_start>"], *[ids["<audio_patch>"]] * num_patches(frames), ids["<audio_end>"]]
        batch["audio_features"] = torch.randn(1, 128, frames)
        batch["audio_lengths"] = torch.tensor([frames])
    else:
        span = []
    input_ids = torch.tensor([span + text])
    for _ in range(2):
        with engine.accumulate(last=True):
            loss = model(input_ids=input_ids, labels=input_ids, **batch).loss
            engine.backward(loss)
        engine.step()
    engine.barrier()
    if engine.is_main:
        (out / "mixed_ok").write_text("ok")
    engine.close()


if __name__ == "__main__":
    assets_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    check_partition(assets_dir, out)
    check_mixed_audio(assets_dir, out)
