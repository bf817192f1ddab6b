"""LoRA on megatron-core's tensor-parallel linears, numerically the same adapter peft puts on HF layers.

HF has separate q/k/v and gate/up projections where Megatron fuses them (``linear_qkv``, ``linear_fc1``),
so each fused linear carries one adapter *part* per HF projection, with that projection's own A and B:
delta W_part = (alpha / r) B_part A_part, exactly as peft's. A part that is not targeted adds zeros.

Tensor parallelism (y = x W^T; TP ranks hold slices of W):
- column-parallel (qkv, fc1): A [r, in] is replicated and B [out/tp, r] is split like W's rows. The
  rank-local t = x A^T passes a copy-region (identity forward, all-reduce backward) so A and the input
  get the gradient summed over every rank's B slice.
- row-parallel (proj, fc2): A [r, in/tp] is split like W's columns, B [out, r] replicated; the partial
  t = x_r A_r^T is all-reduced in the forward (as W's output is).
The adapter's parts are laid out like the fused output: for qkv, per KV group [q_g; k_g; v_g]; for fc1,
[gate_r; up_r].
"""

from __future__ import annotations

import math
import re

import torch

COLUMN = {"linear_qkv": ("q", "k", "v"), "linear_fc1": ("gate", "up")}
ROW = {"linear_proj": ("o",), "linear_fc2": ("down",)}
_PART = re.compile(r"^decoder\.layers\.(\d+)\.\w+\.\w+\.(lora_[AB])\.(\w+)$")
HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class ParallelLoRA(torch.nn.Module):
    """A megatron Column/RowParallelLinear (``base``, frozen) plus LoRA parts."""

    def __init__(self, base, kind: str, parts: dict[str, int], targeted: list[str], in_features: int, r: int,
                 alpha: float, dropout: float, tp_size: int, groups: int = 0):
        super().__init__()
        self.base, self.kind, self.groups, self.r = base, kind, groups, r
        self.scaling = alpha / r
        self.order = list(parts)  # every part of the fused output, in layout order
        self.sizes = {p: n // tp_size for p, n in parts.items()} if kind == "column" else parts
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        self.tp_group = getattr(base, "tp_group", None)
        dtype = base.weight.dtype
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        a_in = in_features if kind == "column" else in_features // tp_size
        for part in targeted:
            a = torch.nn.Parameter(torch.empty(r, a_in, dtype=dtype, device=base.weight.device))
            b = torch.nn.Parameter(torch.zeros(self.sizes[part], r, dtype=dtype, device=base.weight.device))
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            sharded, dim = (b, 0) if kind == "column" else (a, 1)
            set_tensor_model_parallel_attributes(sharded, True, dim, 1)
            self.lora_A[part], self.lora_B[part] = a, b

    def forward(self, x, *args, **kwargs):
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        out, bias = self.base(x, *args, **kwargs)
        h = self.dropout(x)
        if self.kind == "row":
            part = self.order[0]
            t = reduce_from_tensor_model_parallel_region(h @ self.lora_A[part].t(), group=self.tp_group)
            return out + (t @ self.lora_B[part].t()) * self.scaling, bias
        deltas = []
        for part in self.order:
            if part in self.lora_A:
                t = copy_to_tensor_model_parallel_region(h @ self.lora_A[part].t(), group=self.tp_group)
                deltas.append((t @ self.lora_B[part].t()) * self.scaling)
            else:
                deltas.append(out.new_zeros(*out.shape[:-1], self.sizes[part]))
        if self.groups:  # qkv: interleave per KV group
            deltas = [d.reshape(*d.shape[:-1], self.groups, -1) for d in deltas]
            delta = torch.cat(deltas, dim=-1).reshape(out.shape)
        else:
            delta = torch.cat(deltas, dim=-1)
        return out + delta, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base weight under its own key (checkpoints of the base stay layout-free) + the parts."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        state = {f"lora_{ab}.{p}": t for ab, d in (("A", self.lora_A), ("B", self.lora_B)) for p, t in d.items()}
        split = {f"lora_B.{p}": 0 for p in self.lora_B} if self.kind == "column" else {f"lora_A.{p}": 1 for p in self.lora_A}
        out.update(make_sharded_tensors_for_checkpoint(
            state, prefix, split, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        ))
        return out


def wrap_layer(layer, cfg, targets: set[str], r: int, alpha: float, dropout: float, tp_size: int) -> None:
    """Put LoRA parts on the targeted projections (HF names: q k v o gate up down) of one layer."""
    heads, groups, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    sizes = {"q": heads * d, "k": groups * d, "v": groups * d, "gate": cfg.ffn_hidden_size,
             "up": cfg.ffn_hidden_size, "o": cfg.hidden_size, "down": cfg.hidden_size}
    inputs = {"linear_qkv": cfg.hidden_size, "linear_fc1": cfg.hidden_size, "linear_proj": heads * d,
              "linear_fc2": cfg.ffn_hidden_size}
    owners = {"linear_qkv": layer.self_attention, "linear_proj": layer.self_attention,
              "linear_fc1": layer.mlp, "linear_fc2": layer.mlp}
    for linear, parts in {**COLUMN, **ROW}.items():
        chosen = [p for p in parts if p in targets]
        if not chosen:
            continue
        kind = "column" if linear in COLUMN else "row"
        lora = ParallelLoRA(
            getattr(owners[linear], linear), kind, {p: sizes[p] for p in parts}, chosen, inputs[linear], r, alpha,
            dropout, tp_size, groups=groups // tp_size if linear == "linear_qkv" else 0,
        )
        setattr(owners[linear], linear, lora)


def peft_name(name: str) -> str:
    """peft's name of a LoRA part ("decoder.layers.3.mlp.linear_fc1.lora_B.up" ->
    "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight")."""
    m = _PART.match(name)
    return f"base_model.model.model.layers.{m.group(1)}.{HF_PROJ[m.group(3)]}.{m.group(2)}.default.weight"


def hf_targets(target_modules) -> set[str]:
    """HF projection short names (q k v o gate up down) a peft target list selects."""
    if target_modules == "all-linear":
        return set(HF_PROJ)
    names = {str(t).rsplit(".", 1)[-1] for t in target_modules}
    chosen = {p for p, proj in HF_PROJ.items() if proj.rsplit(".", 1)[1] in names}
    unknown = names - {proj.rsplit(".", 1)[1] for proj in HF_PROJ.values()}
    if unknown:
        raise ValueError(
            f"peft.target_modules {sorted(unknown)}: the Megatron engine puts LoRA on q_proj k_proj v_proj o_proj "
            "gate_proj up_proj down_proj (or all-linear)"
        )
    return chosen
