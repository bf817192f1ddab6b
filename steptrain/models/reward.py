"""Reward models: an HF causal LM body with a scalar head (``<Arch>ForSequenceClassification``, 1 label).

The score of a sequence is the head's output at its last token that is not padding (transformers'
pooling; steptrain pads with the tokenizer's pad token, so a tokenizer whose pad token equals its
end-of-turn token scores the token before the final end-of-turn). Saved and loaded as a standard HF
sequence-classification directory, as TRL / OpenRLHF reward models are.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from steptrain.models.loader import DTYPES, full_shape, is_speech_config, load_model
from steptrain.recipes import RECIPES


def load_reward_model(model_cfg, tokenizer) -> tuple[PreTrainedModel, list[int]]:
    """A one-label sequence-classification model from ``model.path`` or a text preset; (model, new token ids)."""
    if is_speech_config(model_cfg):
        raise ValueError("recipe=reward supports text LLMs; a speech reward model is not built yet")
    if model_cfg.preset:
        from steptrain.models.presets import preset_config

        config = preset_config(
            model_cfg.preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config).to(DTYPES[model_cfg.dtype])
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_cfg.path, num_labels=1, dtype=DTYPES[model_cfg.dtype],
            trust_remote_code=model_cfg.trust_remote_code, attn_implementation=model_cfg.attn_implementation,
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    old_vocab = full_shape(model.get_input_embeddings().weight)[0]
    new_ids: list[int] = []
    if len(tokenizer) > old_vocab:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=model_cfg.new_token_init == "mean")
        new_ids = list(range(old_vocab, len(tokenizer)))
    model.config.use_cache = False
    return model, new_ids


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One score per row [B] (float32)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return out.logits[:, 0].float()


def model_loader(recipe: str):
    """How a recipe's model is built: a scalar-head model for ``reward`` (registry: scalar_head), else the
    causal LM."""
    spec = RECIPES.get(recipe)
    return load_reward_model if spec is not None and spec.scalar_head else load_model
