"""The frozen reference policy of DPO and RL: the LoRA policy with its adapter off, or a separate model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from steptrain.models.forward import eval_mode, lm_forward
from steptrain.models.loader import load_model


def reference_logits(cfg, engine, tokenizer) -> Callable[[dict], torch.Tensor]:
    """``batch -> logits`` of the reference model, without gradients and without dropout.

    ``objective.reference=adapter_off``: the policy being trained with its LoRA adapter disabled (no
    second model in memory; on ZeRO-3 every rank calls it in lockstep like any forward).
    ``objective.reference=model``: a frozen model from ``objective.ref_model_path`` on this rank's device.
    With ``objective.head_chunk_tokens`` the "logits" are the chunked head's input (:func:`lm_forward`).
    """
    lm_logits = lm_forward(cfg)
    if cfg.objective.reference == "adapter_off":

        def adapter_off(batch):
            with eval_mode(engine.module) as model, torch.no_grad(), model.disable_adapter(), engine.autocast():
                return lm_logits(model, batch)

        return adapter_off
    ref_cfg = OmegaConf.merge(cfg.model, {"path": cfg.objective.ref_model_path, "preset": None, "llm_path": None})
    model, _ = load_model(ref_cfg, tokenizer)
    model.requires_grad_(False).eval().to(engine.device)

    def frozen(batch):
        with torch.no_grad(), engine.autocast():
            return lm_logits(model, batch)

    return frozen
