"""Turn a training checkpoint into what people load: an HF model directory or a PEFT adapter.

Full fine-tuning -> HF directory (config, safetensors, tokenizer, generation config, model card). A model
loaded from a released layout (the Step-Audio 2 ``step_audio_2`` directory) is exported back in that layout:
same config.json fields, model_type and architectures, same tensor names (``steptrain.models.speech.released``).
LoRA -> PEFT adapter directory (``PeftModel.from_pretrained``), or with ``merge_lora`` the merged HF
directory. The checkpoint's own config.yaml says how to rebuild the model, so no extra flags are needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from steptrain.checkpoint.manager import COMPLETE
from steptrain.checkpoint.rng import seed_everything
from steptrain.config import load_saved_config
from steptrain.engines.torch_engine import WEIGHTS, load_trainable
from steptrain.models.loader import load_tokenizer
from steptrain.models.lora import apply_lora
from steptrain.models.reward import model_loader
from steptrain.models.speech.released import layout_of


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message names the file."""


def rebuild_from_checkpoint(ckpt_dir: str | Path):
    """(model with trained weights, tokenizer, cfg) from a steptrain checkpoint directory."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / COMPLETE).exists():
        raise ExportError(f"{ckpt}: not a complete steptrain checkpoint (no {COMPLETE} marker)")
    cfg = load_saved_config(ckpt / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    seed_everything(cfg.trainer.seed)  # a preset's frozen random base must match the one trained
    model, new_ids = model_loader(cfg.recipe.name)(cfg.model, tokenizer)
    if cfg.peft.method == "lora":
        model = apply_lora(model, cfg.peft, new_ids)
    if (ckpt / WEIGHTS).exists():
        load_trainable(model, ckpt / WEIGHTS)
    else:
        from steptrain.engines.deepspeed_engine import consolidate_checkpoint

        state = consolidate_checkpoint(ckpt)
        if state is None:
            raise ExportError(f"{ckpt}: holds neither {WEIGHTS} nor DeepSpeed shards")
        load_trainable(model, state, source=f"{ckpt} (consolidated ZeRO shards)")
    model.eval()
    return model, tokenizer, cfg


def model_card(cfg, *, kind: str, base: str | None) -> str:
    lib = "peft" if kind == "adapter" else "transformers"
    header = {"library_name": lib, "tags": ["steptrain", "sft"] + (["lora"] if cfg.peft.method == "lora" else [])}
    if base:
        header["base_model"] = base
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in header.items()), "---", ""]
    lines += [
        f"# {kind} trained with steptrain",
        "",
        f"Recipe `{cfg.recipe.name}`, experiment `{cfg.experiment}`, PEFT `{cfg.peft.method}`.",
        "",
        "## Training config",
        "",
        "```yaml",
        OmegaConf.to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, merge_lora: bool = False) -> Path:
    """Write the export into ``out_dir`` (atomically: a temp dir renamed at the end)."""
    model, tokenizer, cfg = rebuild_from_checkpoint(ckpt_dir)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    is_lora = cfg.peft.method == "lora"
    if is_lora and merge_lora:
        model = model.merge_and_unload()
    kind = "adapter" if is_lora and not merge_lora else "model"
    layout = layout_of(model) if kind == "model" else None
    if layout is not None:  # loaded from a released layout (e.g. Step-Audio 2): written back in it
        layout.save(model, tmp, source=cfg.model.path)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if kind == "model" and getattr(model, "generation_config", None) is not None:
        gen = model.generation_config
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        gen.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(cfg, kind=kind, base=cfg.model.path))
    _check_no_empty_tensors(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _check_no_empty_tensors(directory: Path) -> None:
    """Refuse to publish a file holding zero-element tensors (the classic sharded-LoRA failure)."""
    from safetensors import safe_open

    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            empty = [k for k in st.keys() if st.get_slice(k).get_shape() and 0 in st.get_slice(k).get_shape()]
        if empty:
            raise ExportError(f"{f}: tensors with zero elements {empty[:3]} — refusing to export an empty model")


__all__ = ["ExportError", "export_checkpoint", "rebuild_from_checkpoint"]
