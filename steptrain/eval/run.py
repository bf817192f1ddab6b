"""`steptrain eval`: generation metrics (exact match, CER, WER) and held-out loss of a trained model.

The model is a steptrain checkpoint (rebuilt from its own config) or any HF-format directory,
including an exported speech model; the data is ms-swift JSONL (with ``<audio>`` tags for speech).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from steptrain.checkpoint.manager import COMPLETE
from steptrain.config.schema import TrainConfig
from steptrain.data import load_sft_data, read_rows
from steptrain.engines.single import SingleEngine
from steptrain.eval.lm import evaluate_loss, generation_metrics
from steptrain.inputs import resolve_inputs
from steptrain.models.loader import load_model, load_tokenizer


def with_overrides(cfg, overrides: list[str]):
    """``cfg`` with ``key=value`` overrides in Hydra's syntax (as ``steptrain train`` takes them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def load_for_inference(model_dir: str, overrides: list[str]):
    """(model in eval mode, tokenizer, config) from a steptrain checkpoint or an HF-format directory."""
    if (Path(model_dir) / COMPLETE).exists():
        from steptrain.export import rebuild_from_checkpoint

        model, tokenizer, cfg = rebuild_from_checkpoint(model_dir)
        return model, tokenizer, with_overrides(cfg, overrides)
    cfg = with_overrides(
        OmegaConf.merge(OmegaConf.structured(TrainConfig), {"model": {"path": model_dir}, "output_dir": "."}), overrides
    )
    tokenizer = load_tokenizer(cfg.model)
    model, _ = load_model(cfg.model, tokenizer)
    return model.eval(), tokenizer, cfg


def evaluate_model(model_dir: str, data_files: list[str], *, max_new_tokens: int = 128, limit: int = 0,
                   batch_size: int = 8, overrides: list[str] = ()) -> dict:
    """Metrics of ``model_dir`` on ``data_files``; ``overrides`` are config keys (e.g. data.template=jinja)."""
    model, tokenizer, cfg = load_for_inference(model_dir, list(overrides))
    rows, _ = read_rows(list(data_files), on_error=cfg.data.on_error)
    rows = rows[:limit] if limit else rows
    inputs = resolve_inputs(cfg, tokenizer)
    engine = SingleEngine(cfg.engine, cfg.trainer)
    engine.module = model.to(engine.device)
    examples = load_sft_data(rows, tokenizer, cfg.data, inputs).examples
    metrics = evaluate_loss(engine, examples, batch_size=batch_size, max_length=cfg.data.max_length,
                            pad_id=tokenizer.pad_token_id, audio_features=inputs.features, audio_ids=inputs.audio_ids)
    metrics |= generation_metrics(engine, tokenizer, inputs, rows, max_new_tokens=max_new_tokens)
    return {k.removeprefix("eval/"): v for k, v in metrics.items()}
