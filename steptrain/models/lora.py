"""LoRA through peft: the adapter config built from ``cfg.peft``, and the trainable-parameter report."""

from __future__ import annotations

import logging

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from steptrain.models.loader import full_shape

log = logging.getLogger(__name__)


def _speech_targets(model) -> list[str]:
    """LoRA on a speech model's LLM only: the encoder stays frozen, the adapter trains in full."""
    return [
        name for name, module in model.llm.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"
    ]


def lora_config(peft_cfg, new_token_ids: list[int], model=None) -> LoraConfig:
    targets = peft_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(OmegaConf.to_object(targets))
    modules_to_save = list(peft_cfg.modules_to_save)
    if getattr(model, "audio_encoder", None) is not None and targets == "all-linear":
        targets = [f"llm.{name}" for name in _speech_targets(model)]
        modules_to_save = modules_to_save or ["audio_adapter"]
    task_type = "CAUSAL_LM"
    heads = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS"}  # reward model, critic
    head = next((kind for suffix, kind in heads.items() if type(model).__name__.endswith(suffix)), None)
    if head:
        task_type = head  # peft then keeps the (new) score head fully trainable
        modules_to_save = [*modules_to_save, "score"] if "score" not in modules_to_save else modules_to_save
    kwargs = {}
    if new_token_ids and peft_cfg.train_new_tokens:
        # Rows of added tokens are random/mean-initialised: they must learn, while the rest stays frozen.
        kwargs["trainable_token_indices"] = list(new_token_ids)
    return LoraConfig(
        task_type=task_type,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        **kwargs,
    )


def apply_lora(model: PreTrainedModel, peft_cfg, new_token_ids: list[int]):
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    model = get_peft_model(model, lora_config(peft_cfg, new_token_ids, model))
    if checkpointing:
        model.enable_input_require_grads()
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(full_shape(p).numel() for p in model.parameters())
    trainable = sum(full_shape(p).numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
