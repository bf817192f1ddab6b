"""Step-1, the decoder of Step-Audio-Chat (130B) and Step-Audio-TTS-3B, as a native transformers model.

The architecture and the checkpoint layout follow docs/released_layouts.md, "Step-1 (Step-Audio-Chat,
Step-Audio-TTS-3B)": a pre-norm decoder (RMSNorm, the normalised product formed in the input dtype),
grouped-query attention with ``num_attention_groups`` key/value heads, a SwiGLU MLP, no biases anywhere and
no rotary embedding. Positions enter only through the ALiBi-sqrt bias: query i and key j <= i get
``-slope_h * sqrt(i - j)`` added to their attention score, with the standard ALiBi slopes
(:func:`alibi_slopes`). The module names are the released tensor names (``model.layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``lm_head``, ...), so ``from_pretrained`` reads a released directory as it is and
``save_pretrained`` writes the same layout back, with no converter.

Positions are ``position_ids``, not row indices, so the bias is exact for packed rows (positions restart for
every sequence; with no attention mask, a restart also starts a new block of the block-diagonal causal mask,
as transformers does for other models) and for DPO shared-prompt rows (a 4D mask plus positions that restart
after the prompt). With a KV cache holding earlier tokens (generation), the positions of the cached keys are
rebuilt from the 2D attention mask (``cumsum - 1``, the position_ids ``generate`` passes) or are the cache
indices when no mask is given; packed rows and 4D masks are for cache-free forwards (training, scoring).

Attention backends: ``sdpa`` (default) and ``eager`` add the bias as a dense ``[B, H, Q, K]`` tensor (fp32,
cast to the compute dtype); ``flex_attention`` (meant for CUDA) computes the same bias inside the kernel with
a FlexAttention ``score_mod`` and the mask as a block mask, in fp32, without materialising it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from steptrain.models.step1.configuration import Step1Config


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The per-head ALiBi slopes as Step-1 writes them (fp32, [num_heads]).

    ``n = 2 ** floor(log2(H))``; slopes ``(2 ** (-8 / n)) ** k`` for k = 1..n, then, when H is not a power of
    two, ``(2 ** (-4 / n)) ** k`` for the odd k = 1, 3, 5, ... of the remaining H - n heads
    (docs/released_layouts.md, Step-1, "Attention: ALiBi-sqrt, GQA, scaling").
    """
    n = 2 ** int(math.floor(math.log2(num_heads)))
    m0 = 2.0 ** (-8.0 / n)
    slopes = [m0**k for k in range(1, n + 1)]
    if n < num_heads:
        m1 = 2.0 ** (-4.0 / n)
        slopes += [m1**k for k in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float64).float()


def config_slopes(config: Step1Config) -> torch.Tensor:
    """The config's explicit ``alibi_slopes`` when it has them, else :func:`alibi_slopes`."""
    explicit = getattr(config, "alibi_slopes", None)
    if explicit is not None:
        return torch.tensor(explicit, dtype=torch.float32)
    return alibi_slopes(config.num_attention_heads)


def attention_layout(
    *,
    batch: int,
    q_len: int,
    past_len: int,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(query positions [B, Q], key positions [B, K], allowed [B, 1, Q, K] bool, extra additive mask or None).

    ``allowed`` combines causality (by index), the block-diagonal mask of packed rows (no mask given: a new
    block wherever position_ids do not step by one), a 2D padding mask, or a full 4D mask (bool, or additive
    float with 0 for kept entries) used as it is. Every query may always attend to itself, so padding rows
    stay finite; no real token's result depends on that.
    """
    kv_len = past_len + q_len
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids[None]
    mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    if past_len == 0:
        if position_ids is not None:
            q_pos = position_ids.to(device).long().expand(batch, q_len)
        else:
            q_pos = torch.arange(q_len, device=device).expand(batch, q_len)
        k_pos = q_pos
    else:
        if mask_2d is not None and mask_2d.shape[-1] == kv_len:
            k_pos = (mask_2d.to(device).long().cumsum(-1) - 1).clamp(min=0)
        else:
            k_pos = torch.arange(kv_len, device=device).expand(batch, kv_len)
        q_pos = k_pos[:, past_len:]
    q_idx = torch.arange(past_len, kv_len, device=device)
    k_idx = torch.arange(kv_len, device=device)
    diagonal = k_idx[None, :] == q_idx[:, None]
    extra = None
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask.to(device)[..., -q_len:, -kv_len:]
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = m > torch.finfo(m.dtype).min / 2
            extra = m.float().masked_fill(~allowed, 0.0)
        allowed = allowed | diagonal
    else:
        allowed = (k_idx[None, :] <= q_idx[:, None]).expand(batch, 1, q_len, kv_len)
        if mask_2d is not None:
            allowed = allowed & mask_2d.to(device).bool()[:, None, None, -kv_len:]
        elif past_len == 0 and position_ids is not None:
            first = q_pos[:, :1] - 1
            seg = (torch.diff(q_pos, prepend=first, dim=-1) != 1).cumsum(-1)
            allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
        allowed = allowed | diagonal
    return q_pos, k_pos, allowed, extra


def dense_bias(
    slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, allowed: torch.Tensor,
    extra: torch.Tensor | None, dtype: torch.dtype,
) -> torch.Tensor:
    """The additive attention bias [B, H, Q, K]: ``-slope_h * sqrt(pos_q - pos_k)`` where allowed, -inf elsewhere
    (computed in fp32, returned in ``dtype``)."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).clamp(min=0).float()
    bias = -slopes.to(dist.device)[None, :, None, None] * dist.sqrt()[:, None]
    if extra is not None:
        bias = bias + extra
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


class Step1RMSNorm(nn.Module):
    """RMSNorm as Step-1 computes it: the variance in fp32, ``x * rsqrt(var + eps)`` formed in the input dtype,
    then times the weight (docs/released_layouts.md, Step-1, "Norms and MLP")."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps).to(x.dtype)
        return x * self.weight


class Step1MLP(nn.Module):
    def __init__(self, config: Step1Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def copy_released_files(source, directory, names: tuple[str, ...] = ()) -> list[str]:
    """Copy what a released Step-1 directory carries besides weights and config from ``source`` to
    ``directory``: its remote-code files (``*.py``, which ``auto_map`` names), the ``lib/`` folder of the
    official attention kernel, and the given ``names`` (e.g. ``tokenizer.model``). So a save of a model
    loaded from a released directory also runs in the official remote code. Returns the names copied."""
    if not source or not Path(source).is_dir() or Path(source).resolve() == Path(directory).resolve():
        return []
    src, dst = Path(source), Path(directory)
    copied = []
    for f in [*src.glob("*.py"), *(src / n for n in names)]:
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    if (src / "lib").is_dir() and not (dst / "lib").exists():
        shutil.copytree(src / "lib", dst / "lib")
        copied.append("lib")
    return copied


_compiled_flex = None


def flex_layout(slopes, q_pos, k_pos, allowed, extra) -> dict:
    """What :func:`_flex_attention` needs, built once per forward: the ALiBi-sqrt ``score_mod`` (fp32 inside the
    kernel) and ``allowed`` as a FlexAttention block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, _, q_len, kv_len = allowed.shape
    allowed3 = allowed[:, 0].contiguous()
    qp, kp = q_pos.contiguous(), k_pos.contiguous()
    extra3 = None if extra is None else extra[:, 0].contiguous()

    def score_mod(score, bi, hi, qi, ki):
        dist = (qp[bi, qi] - kp[bi, ki]).clamp(min=0).to(torch.float32)
        out = score - slopes[hi] * torch.sqrt(dist)
        if extra3 is not None:
            out = out + extra3[bi, qi, ki]
        return out

    def mask_mod(bi, hi, qi, ki):
        return allowed3[bi, qi, ki]

    block_mask = create_block_mask(mask_mod, b, None, q_len, kv_len, device=allowed.device)
    return {"score_mod": score_mod, "block_mask": block_mask}


def _flex_attention(q, k, v, *, score_mod, block_mask, scale):
    """FlexAttention (compiled once per process) with GQA through ``enable_gqa`` (query head h reads group
    h // (H / G))."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=k.shape[1] != q.shape[1])


class Step1Attention(nn.Module):
    """Grouped-query attention with the ALiBi-sqrt bias; no biases on the projections, no rotary embedding."""

    def __init__(self, config: Step1Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_attention_groups
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, attn: dict, cache: Cache | None = None) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, self.num_groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, self.num_groups, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation
        if impl == "flex_attention":
            out = _flex_attention(q, k, v, scale=self.scaling, **attn["layout"])
        else:
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            bias = attn["bias"]
            if impl == "eager":
                scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + bias
                probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                out = torch.matmul(probs, v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)


class Step1DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + attn(input_layernorm(x)); h = h + mlp(post_attention_layernorm(h))``."""

    def __init__(self, config: Step1Config, layer_idx: int):
        super().__init__()
        self.self_attn = Step1Attention(config, layer_idx)
        self.mlp = Step1MLP(config)
        self.input_layernorm = Step1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Step1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attn: dict, cache: Cache | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attn, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Step1PreTrainedModel(PreTrainedModel):
    config_class = Step1Config
    config: Step1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Step1DecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False
    _can_compile_fullgraph = False
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"position_ids"]


class Step1Model(Step1PreTrainedModel):
    """Embeddings, the decoder layers and the final norm (``model.*`` in the released checkpoint)."""

    def __init__(self, config: Step1Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Step1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Step1RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        b, t, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        q_pos, k_pos, allowed, extra = attention_layout(
            batch=b, q_len=t, past_len=past_len, position_ids=position_ids, attention_mask=attention_mask,
            device=inputs_embeds.device,
        )
        slopes = config_slopes(self.config).to(inputs_embeds.device)
        if self.config._attn_implementation == "flex_attention":
            attn = {"layout": flex_layout(slopes, q_pos, k_pos, allowed, extra)}
        else:
            attn = {"bias": dense_bias(slopes, q_pos, k_pos, allowed, extra, inputs_embeds.dtype)}
        hidden_states = inputs_embeds
        all_hidden = [] if kwargs.get("output_hidden_states") else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, attn, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class Step1ForCausalLM(Step1PreTrainedModel, GenerationMixin):
    """Step-1 with its (untied, in the released checkpoints) ``lm_head``; loss on ``labels`` as other HF causal LMs."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: Step1Config):
        super().__init__(config)
        self.model = Step1Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=kwargs.get("output_hidden_states"),
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` (the released names and config fields, as loaded), plus the remote
        code of the released directory this model was loaded from (:func:`copy_released_files`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self.config, "auto_map", None):
            copy_released_files(getattr(self.config, "_name_or_path", None), save_directory)


__all__ = [
    "Step1ForCausalLM",
    "Step1Model",
    "Step1PreTrainedModel",
    "alibi_slopes",
    "attention_layout",
    "copy_released_files",
    "dense_bias",
]
