"""HF Qwen2 / LLaMA causal LMs <-> megatron-core GPTModel: config and weights, both directions.

Names on the Megatron side are those of an unsplit GPTModel with global layer numbers
("decoder.layers.7.mlp.linear_fc1.weight"); ``shard``/``unshard`` move between that full tensor and one
tensor-parallel rank's piece. The layouts that differ from HF:

- ``linear_qkv`` holds, per KV group g, [q_g; k_g; v_g] (rows; biases alike), so a TP rank's contiguous
  slice is whole groups: q_g are the ``heads / groups`` query heads that share KV head g.
- ``linear_fc1`` is [gate; up] on the full model, but each TP rank holds [gate_r; up_r]: the full weight
  is not a concatenation of the ranks' pieces.
- The vocabulary is padded to a multiple of the TP size (zero rows; logits are sliced back).
- Tied embeddings: the output layer reuses ``embedding.word_embeddings.weight``.
"""

from __future__ import annotations

import re

import torch

LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix -> HF suffix inside a layer (1:1 weights)
_PLAIN = {
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# How a full Megatron tensor is split over TP ranks: row-split (0), column-split (1), [gate; up] (swiglu).
_ROW = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_COL = ("linear_proj.weight", "linear_fc2.weight")


class BridgeError(ValueError):
    """The HF model cannot be expressed as a Megatron GPTModel (the message names the setting)."""


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise BridgeError(f"rope scaling {params} is not supported by the Megatron bridge")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def check_supported(cfg) -> None:
    if cfg.model_type not in ("qwen2", "llama"):
        raise BridgeError(f"model_type={cfg.model_type!r}: the Megatron engine bridges qwen2 and llama models")
    if getattr(cfg, "mlp_bias", False):
        raise BridgeError("mlp_bias=true is not supported by the Megatron bridge")
    if getattr(cfg, "use_sliding_window", False):
        raise BridgeError("use_sliding_window=true is not supported by the Megatron bridge")
    _rope_theta(cfg)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def qkv_bias(cfg) -> bool:
    return cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))


def padded_vocab(cfg, tp: int) -> int:
    return -(-cfg.vocab_size // tp) * tp


def transformer_config(cfg, *, tp: int, pp: int, vpp: int | None, dtype: torch.dtype, on_cpu: bool, **extra):
    """megatron TransformerConfig of an HF Qwen2/LLaMA config (fusions off: they need CUDA kernels)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_supported(cfg)
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=head_dim(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias(cfg),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        **extra,
    )


def rotary_base(cfg) -> float:
    return _rope_theta(cfg)


# --- names ------------------------------------------------------------------------------------------
def hf_name(name: str) -> str | None:
    """HF name of a 1:1 Megatron weight (None for the fused qkv / fc1 ones)."""
    if name in _TOP:
        return _TOP[name]
    m = LAYER.match(name)
    if m and m.group(2) in _PLAIN:
        return f"model.layers.{m.group(1)}.{_PLAIN[m.group(2)]}"
    return None


def megatron_names(cfg) -> list[str]:
    """Every weight name of the unsplit GPTModel of ``cfg``."""
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("output_layer.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"decoder.layers.{i}."
        names += [p + "self_attention.linear_qkv.weight", p + "mlp.linear_fc1.weight"] + [p + s for s in _PLAIN]
        if qkv_bias(cfg):
            names.append(p + "self_attention.linear_qkv.bias")
    return names


# --- HF -> Megatron (full tensors) ---------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q_g; k_g; v_g] per KV group (weights [rows, hidden] or biases [rows])."""
    tail = q.shape[1:]
    parts = [t.reshape(groups, -1, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, g = head_dim(cfg), cfg.num_key_value_heads
    per_q = cfg.num_attention_heads // g * d
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, per_q + 2 * d, *tail)
    q, k, v = grouped.split([per_q, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def to_megatron(hf: dict[str, torch.Tensor], cfg, vocab: int) -> dict[str, torch.Tensor]:
    """Full Megatron weights (vocab padded to ``vocab`` rows) from an HF causal-LM state dict."""
    out = {}
    g = cfg.num_key_value_heads
    for name in megatron_names(cfg):
        m = LAYER.match(name)
        src = hf_name(name)
        if name == "output_layer.weight" or name == "embedding.word_embeddings.weight":
            w = hf[src]
            out[name] = torch.cat([w, w.new_zeros(vocab - w.shape[0], w.shape[1])]) if vocab > w.shape[0] else w
        elif src is not None:
            out[name] = hf[src]
        else:
            p = f"model.layers.{m.group(1)}."
            if m.group(2) == "mlp.linear_fc1.weight":
                out[name] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
            else:
                kind = m.group(2).rsplit(".", 1)[1]
                out[name] = fuse_qkv(*(hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"), groups=g)
    return out


def to_hf(full: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """HF causal-LM state dict from full Megatron weights (inverse of ``to_megatron``)."""
    out = {}
    for name, t in full.items():
        m = LAYER.match(name)
        src = hf_name(name)
        if src in ("model.embed_tokens.weight", "lm_head.weight"):
            out[src] = t[: cfg.vocab_size]
        elif src is not None:
            out[src] = t
        elif m and m.group(2) == "mlp.linear_fc1.weight":
            gate, up = t.chunk(2)
            out[f"model.layers.{m.group(1)}.mlp.gate_proj.weight"] = gate
            out[f"model.layers.{m.group(1)}.mlp.up_proj.weight"] = up
        elif m:
            kind = m.group(2).rsplit(".", 1)[1]
            for x, part in zip("qkv", split_qkv(t, cfg), strict=True):
                out[f"model.layers.{m.group(1)}.self_attn.{x}_proj.{kind}"] = part
        else:
            raise BridgeError(f"no HF name for Megatron weight {name}")
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# --- tensor-parallel pieces ---------------------------------------------------------------------------
def split_kind(name: str) -> str | None:
    """How ``name`` is split over TP ranks: "row", "col", "swiglu", or None (replicated).

    LoRA parts (``<linear>.lora_A.<part>``, see megatron_lora.py): B of a column-parallel linear is split
    like its weight's rows, A of a row-parallel linear like its weight's columns; the others replicate.
    """
    if ".lora_B." in name:
        return "row" if (".linear_qkv." in name or ".linear_fc1." in name) else None
    if ".lora_A." in name:
        return "col" if (".linear_proj." in name or ".linear_fc2." in name) else None
    if name.endswith("linear_fc1.weight"):
        return "swiglu"
    if name.endswith(_ROW):
        return "row"
    if name.endswith(_COL):
        return "col"
    return None


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    kind = split_kind(name)
    if kind is None or size == 1:
        return full
    if kind == "swiglu":
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=0 if kind == "row" else 1)[rank]


def unshard(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    kind = split_kind(name)
    if kind is None or len(pieces) == 1:
        return pieces[0]
    if kind == "swiglu":
        halves = [p.chunk(2) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(pieces, dim=0 if kind == "row" else 1)
