"""Speech LLM: Whisper-style encoder -> adapter -> any HF causal LM (Step-Audio 2 layout).

Rates: 100 Hz log-mel -> conv2 (stride 2) 50 Hz -> AvgPool(2) 25 Hz (encoder output) -> adapter conv
(stride 2) 12.5 Hz. :func:`num_patches` gives the exact number of adapter outputs for ``n`` mel frames,
which is the number of ``<audio_patch>`` tokens a clip must have in the text.

Padding: clips in a batch are padded to the longest; everything past a clip's valid length is zeroed
before every strided conv, so a clip's features do not depend on what it was batched with (the zeros
equal the convs' own zero padding), and encoder self-attention masks padded keys.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from steptrain.models.speech.configuration import AudioEncoderConfig, SpeechLMConfig

ENCODER_WEIGHTS = "audio_encoder.safetensors"
ENCODER_CONFIG = "audio_encoder_config.json"


# ----------------------------------------------------------------------------------------------
# Length arithmetic
# ----------------------------------------------------------------------------------------------


def _conv_s2(n):
    """Output length of Conv1d(k=3, s=2, p=1): floor((n + 2 - 3) / 2) + 1 (0 for empty input)."""
    return (n - 1) // 2 + 1 if n > 0 else 0


def encoder_length(n_frames: int, rule: str = "steptrain") -> int:
    """Encoder (25 Hz) output length for ``n_frames`` mel frames: conv2 (s2), then AvgPool1d(2, 2).

    ``rule="step_audio_2"``: the length the official Step-Audio 2 code assigns, ``(T - 2 + 1) // 2 // 2``
    (it passes ``T - 2`` as the clip length; docs/released_layouts.md), one less than the pooled length
    for some T. See :class:`~steptrain.models.speech.configuration.AudioEncoderConfig` ``length_rule``.
    """
    n = int(n_frames)
    if rule == "step_audio_2":
        return max((n - 1) // 2 // 2, 0)
    return _conv_s2(n) // 2


def num_patches(n_frames: int, rule: str = "steptrain") -> int:
    """Exact number of adapter outputs (12.5 Hz patches) for ``n_frames`` 100 Hz mel frames.

    conv1 keeps the length; conv2 (k3 s2 p1) gives L1 = (n-1)//2 + 1; AvgPool1d(2, 2) gives
    L2 = L1 // 2; the adapter conv (k3 s2 p1) gives (L2-1)//2 + 1, or 0 when L2 == 0 (n < 3).
    E.g. 2500 frames (25 s) -> 1250 -> 625 -> 313 patches.

    ``rule="step_audio_2"``: the official Step-Audio 2 count ``((T-2+1)//2//2 - 1)//2 + 1`` (313 for the
    2502 frames of a 25 s chunk; docs/released_layouts.md). It is never larger than the steptrain count,
    and the encoder's first that many patches are used.
    """
    return _conv_s2(encoder_length(n_frames, rule))


def encoder_lengths(n_frames: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`encoder_length` (steptrain rule: the pooled positions a clip really has)."""
    n = n_frames.long()
    l1 = torch.where(n > 0, torch.div(n - 1, 2, rounding_mode="floor") + 1, torch.zeros_like(n))
    return torch.div(l1, 2, rounding_mode="floor")


def num_patches_tensor(n_frames: torch.Tensor, rule: str = "steptrain") -> torch.Tensor:
    """Vectorised :func:`num_patches` for an integer tensor of frame counts."""
    if rule == "step_audio_2":
        n = n_frames.long()
        l2 = torch.clamp(torch.div(torch.div(n - 1, 2, rounding_mode="floor"), 2, rounding_mode="floor"), min=0)
    else:
        l2 = encoder_lengths(n_frames)
    return torch.where(l2 > 0, torch.div(l2 - 1, 2, rounding_mode="floor") + 1, torch.zeros_like(l2))


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] bool, True at valid positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table [length, channels]: sin half then cos half."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


# ----------------------------------------------------------------------------------------------
# Encoder and adapter
# ----------------------------------------------------------------------------------------------


class AudioSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)  # Whisper: no key bias
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T], True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class AudioEncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x)) with a GELU MLP (4x wide unless ``ffn_dim``)."""

    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-5, ffn_dim: int | None = None):
        super().__init__()
        ffn_dim = ffn_dim or 4 * d_model
        self.self_attn_layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = AudioSelfAttention(d_model, n_heads)
        self.final_layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperStyleEncoder(nn.Module):
    """Log-mel [B, n_mels, T] at 100 Hz -> [B, T', d_model] at 25 Hz, plus the valid lengths T'.

    conv1 (k3 s1 p1) + GELU, conv2 (k3 s2 p1) + GELU, + a position table, pre-LN transformer blocks with
    key-padding masks, AvgPool1d(2, 2), LayerNorm.

    The position table ``embed_positions`` [max_source_positions, d_model] is a persistent, non-trainable
    buffer: a fresh encoder starts from Whisper's sinusoids, and a loaded one takes the checkpoint's
    table exactly (a Whisper ``embed_positions.weight``, the released Step-Audio 2
    ``encoder.positional_embedding.weight``, or steptrain's own), whatever values it holds.
    Module names equal transformers' ``WhisperEncoder`` (conv1, conv2, layers.N.self_attn.q_proj, ...,
    layer_norm), whose final ``layer_norm`` is this encoder's after-pool norm.
    """

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        d = config.d_model
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("embed_positions", sinusoids(config.max_source_positions, d), persistent=True)
        self.layers = nn.ModuleList(
            [
                AudioEncoderLayer(d, config.n_heads, config.layer_norm_eps, getattr(config, "ffn_dim", None))
                for _ in range(config.n_layers)
            ]
        )
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def frames(self, features: torch.Tensor, lengths: torch.Tensor | None = None):
        """The last block's output before the pool and the norm: [B, L1, d] at 50 Hz, and lengths [B].

        This is what transformers' ``WhisperEncoder`` holds just before its final ``layer_norm``.
        """
        b, _, t = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        lengths = lengths.to(features.device).long()
        if t < 2:
            raise ValueError(f"the encoder needs at least 2 mel frames, got {t}")
        features = features * _length_mask(lengths, t)[:, None, :].to(features.dtype)
        x = F.gelu(self.conv1(features))
        x = x * _length_mask(lengths, t)[:, None, :].to(x.dtype)  # padding must look like conv2's zero pad
        x = F.gelu(self.conv2(x))  # [B, d, L1]
        l1 = x.shape[-1]
        if l1 > self.embed_positions.shape[0]:
            raise ValueError(
                f"audio too long: {t} frames -> {l1} positions > max_source_positions "
                f"{self.embed_positions.shape[0]}; cut it into chunks"
            )
        x = x.transpose(1, 2) + self.embed_positions[:l1].to(x.dtype)
        valid1 = torch.where(lengths > 0, torch.div(lengths - 1, 2, rounding_mode="floor") + 1, 0)
        if getattr(self.config, "length_rule", "steptrain") == "step_audio_2":
            # The official code passes T - 2 as the length, which leaves a clip's last conv2 frame out of
            # the keys (as for the clip encoded on its own; docs/released_layouts.md). Keep >= 1 key.
            valid1 = torch.clamp(valid1 - 1, min=1)
        key_mask = _length_mask(valid1, l1)
        if bool(key_mask.all()):
            key_mask = None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # set by PreTrainedModel.activation_checkpointing_enable / gradient_checkpointing_enable
                ckpt = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                    torch.utils.checkpoint.checkpoint, use_reentrant=False
                )
                x = ckpt(layer, x, key_mask)
            else:
                x = layer(x, key_mask)
        return x, valid1

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None):
        b, _, t = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        x, _ = self.frames(features, lengths)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)
        return x, encoder_lengths(lengths.to(x.device))


class AudioAdapter(nn.Module):
    """[B, T', d] 25 Hz -> [B, T'', llm_hidden] 12.5 Hz: Conv1d(k3 s2 p1) + GELU, Linear, ReLU, Linear.

    The order and activations are the released Step-Audio 2 ``Adaptor``'s (gelu(conv) -> linear1 -> ReLU
    -> linear2; docs/released_layouts.md), so its weights load unchanged.
    """

    def __init__(self, d_model: int, adapter_hidden: int, llm_hidden: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.linear1 = nn.Linear(d_model, adapter_hidden)
        self.linear2 = nn.Linear(adapter_hidden, llm_hidden)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is not None:  # zero past the valid length so padding equals the conv's zero pad
            x = x * _length_mask(lengths.to(x.device), x.shape[1])[:, :, None].to(x.dtype)
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(F.relu(self.linear1(x)))


# ----------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------


class SpeechLMPreTrainedModel(PreTrainedModel):
    config_class = SpeechLMConfig
    config: SpeechLMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["AudioEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = self.config.encoder_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, WhisperStyleEncoder):
            init.copy_(module.embed_positions, sinusoids(*module.embed_positions.shape))


class SpeechLMForCausalLM(SpeechLMPreTrainedModel, GenerationMixin):
    """Audio encoder + adapter + an HF causal LM (``self.llm``), fed through ``inputs_embeds``.

    Submodules: ``audio_encoder`` (:class:`WhisperStyleEncoder`), ``audio_adapter``
    (:class:`AudioAdapter`), ``llm`` (``AutoModelForCausalLM.from_config(config.llm_config)``).
    """

    def __init__(self, config: SpeechLMConfig, llm: PreTrainedModel | None = None):
        """``llm``: an already built (e.g. loaded) causal LM to use instead of a random one; its
        weights are left untouched and its config becomes ``config.llm_config``."""
        if llm is not None:
            config.llm_config = llm.config
        super().__init__(config)
        enc = config.encoder_config
        if llm is not None:
            for module in llm.modules():  # post_init must not re-initialise loaded weights
                module._is_hf_initialized = True
        self.audio_encoder = WhisperStyleEncoder(enc)
        self.audio_adapter = AudioAdapter(enc.d_model, enc.adapter_hidden, config.llm_config.hidden_size)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.llm_config)
        self.post_init()
        if config.freeze_encoder:
            self.audio_encoder.requires_grad_(False)

    # --- embeddings delegate to the LLM ---------------------------------------------------------
    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        out = self.llm.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.llm_config.vocab_size = out.weight.shape[0]
        return out

    # --- audio ----------------------------------------------------------------------------------
    def encode_audio(self, audio_features: torch.Tensor, audio_lengths: torch.Tensor | None = None):
        """Adapter outputs [n_clips, P_max, llm_hidden] and the valid patch count of each clip."""
        return encode_clips(self.audio_encoder, self.audio_adapter, audio_features, audio_lengths)

    def _merge_audio(self, input_ids, inputs_embeds, audio_features, audio_lengths):
        audio_out, counts = self.encode_audio(audio_features, audio_lengths)
        return place_audio(input_ids, inputs_embeds, audio_out, counts, self.config.audio_patch_id)

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """Embed ``input_ids``, place audio patches, run the LLM on ``inputs_embeds``.

        audio_features: [n_clips, n_mels, T] log-mel, padded on the right; audio_lengths: [n_clips]
        valid frames (default: T for all). Returns the LLM's ``CausalLMOutputWithPast``; with
        ``labels`` the loss is the LLM's shifted mean cross-entropy (ignore index -100).
        """
        if use_cache is None:  # e.g. the loader sets config.use_cache = False for training
            use_cache = getattr(self.config, "use_cache", None)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        has_audio = audio_features is not None and audio_features.shape[0] > 0
        if has_audio:
            if input_ids is None:
                raise ValueError("audio_features need input_ids to find the <audio_patch> positions")
            inputs_embeds = self._merge_audio(input_ids, inputs_embeds, audio_features, audio_lengths)
        else:
            if input_ids is not None and self.config.audio_patch_id is not None:
                n_patch = int((input_ids == self.config.audio_patch_id).sum())
                cache = _kv_cache(past_key_values, kwargs)
                prefill = cache is None or cache.get_seq_length() == 0
                if n_patch and prefill:
                    raise ValueError(
                        f"audio patch mismatch: input_ids hold {n_patch} <audio_patch> position(s) "
                        "but no audio_features were given (expected 0 patches)"
                    )
            if self.training and self.config.run_encoder_on_dummy:
                # Every rank must run the same modules each step: under ZeRO-3 / FSDP the encoder's
                # parameters are all-gathered inside its forward, a collective every rank must join,
                # and gradient reduction expects a gradient for each trainable parameter. A text-only
                # batch on one rank would otherwise hang (or fail) the ranks that got audio. Running on
                # a zero input and adding 0 * sum keeps the values exactly unchanged (finite x: x*0 = 0)
                # while the autograd graph reaches every encoder/adapter parameter.
                p = next(self.audio_encoder.parameters())
                n_mels = self.config.encoder_config.n_mels
                dummy = torch.zeros(1, n_mels, 8, device=p.device, dtype=p.dtype)
                out, _ = self.encode_audio(dummy)
                inputs_embeds = inputs_embeds + 0.0 * out.sum().to(inputs_embeds.dtype)
        if past_key_values is not None:  # forward the cache under the name it came with
            kwargs["past_key_values"] = past_key_values
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, is_first_iteration=False, **kwargs
    ):
        """Audio goes only into the prefill step: later steps feed one new token against the cache."""
        audio_features = kwargs.pop("audio_features", None)
        audio_lengths = kwargs.pop("audio_lengths", None)
        cache = _kv_cache(past_key_values, kwargs)
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        cached = cache is not None and cache.get_seq_length() > 0
        use_cache = kwargs.get("use_cache", True)
        if (is_first_iteration or not use_cache) and not cached:
            model_inputs["audio_features"] = audio_features
            model_inputs["audio_lengths"] = audio_lengths
        return model_inputs

    # --- assembly and encoder checkpoints -------------------------------------------------------
    def save_encoder(self, directory: str | os.PathLike) -> None:
        """Save encoder + adapter weights (safetensors) and their config to ``directory``."""
        hidden = self.config.llm_config.hidden_size
        save_audio_encoder(directory, self.audio_encoder, self.audio_adapter, hidden)

    def load_encoder(self, directory: str | os.PathLike) -> None:
        """Load weights written by :meth:`save_encoder` (sizes must match this model's)."""
        state = load_file(os.path.join(directory, ENCODER_WEIGHTS))
        enc = {k[len("audio_encoder.") :]: v for k, v in state.items() if k.startswith("audio_encoder.")}
        ada = {k[len("audio_adapter.") :]: v for k, v in state.items() if k.startswith("audio_adapter.")}
        self.audio_encoder.load_state_dict(enc, strict=True)
        self.audio_adapter.load_state_dict(ada, strict=True)

    @classmethod
    def from_parts(
        cls,
        llm_path: str | None,
        encoder_path: str | None = None,
        llm_config=None,
        dtype: torch.dtype | None = None,
        **overrides,
    ) -> SpeechLMForCausalLM:
        """Assemble from an HF causal-LM directory (or ``llm_config`` for a random LLM) and an encoder.

        ``encoder_path``: an encoder+adapter saved with :meth:`save_encoder`, or a transformers Whisper
        directory (:mod:`steptrain.models.speech.whisper`: encoder and final norm from Whisper, a fresh
        adapter of width ``adapter_hidden``, 2048 by default), or None for a fresh random encoder.

        ``overrides`` are :class:`SpeechLMConfig` fields (token ids, ``encoder_config``, ...). With an
        ``encoder_path`` the saved encoder config is used unless ``encoder_config`` is overridden.
        """
        from transformers import AutoConfig

        from steptrain.models.speech import whisper

        adapter_hidden = overrides.pop("adapter_hidden", whisper.DEFAULT_ADAPTER_HIDDEN)
        if llm_path is not None:
            llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype)
            llm_cfg = llm.config
        else:
            if llm_config is None:
                raise ValueError("from_parts needs llm_path or llm_config")
            llm = None
            llm_cfg = llm_config if not isinstance(llm_config, dict) else AutoConfig.for_model(**llm_config)
        whisper_state = None
        if whisper.is_whisper_dir(encoder_path):
            enc_cfg, whisper_state = whisper.load_whisper_encoder(encoder_path, adapter_hidden)
            overrides.setdefault("encoder_config", enc_cfg)
        elif encoder_path is not None and "encoder_config" not in overrides:
            with open(os.path.join(encoder_path, ENCODER_CONFIG)) as f:
                meta = json.load(f)
            if meta["llm_hidden_size"] != llm_cfg.hidden_size:
                raise ValueError(
                    f"saved adapter projects to {meta['llm_hidden_size']} but the LLM hidden size is "
                    f"{llm_cfg.hidden_size}"
                )
            enc_cfg = {
                k: v
                for k, v in meta["encoder_config"].items()
                if k not in ("model_type", "transformers_version")
            }
            overrides["encoder_config"] = AudioEncoderConfig(**enc_cfg)
        # Building the composite config resets the sub-config's attention implementation; keep the LLM's.
        overrides.setdefault("attn_implementation", llm_cfg._attn_implementation)
        config = SpeechLMConfig(llm_config=llm_cfg, **overrides)
        model = cls(config, llm=llm)
        if whisper_state is not None:
            model.audio_encoder.load_state_dict(whisper_state, strict=True)
        elif encoder_path is not None:
            model.load_encoder(encoder_path)
        if dtype is not None:
            model.to(dtype)
        if config.freeze_encoder:
            model.audio_encoder.requires_grad_(False)
        model.generation_config = model.llm.generation_config
        return model


def encode_clips(encoder, adapter, audio_features: torch.Tensor, audio_lengths: torch.Tensor | None = None):
    """Adapter outputs [n_clips, P_max, llm_hidden] of log-mel clips and the valid patch count of each."""
    if audio_lengths is None:
        audio_lengths = torch.full(
            (audio_features.shape[0],), audio_features.shape[-1], dtype=torch.long, device=audio_features.device
        )
    param = next(encoder.parameters())
    feats = audio_features.to(device=param.device, dtype=param.dtype)
    hidden, enc_lengths = encoder(feats, audio_lengths)
    out = adapter(hidden, enc_lengths)
    rule = getattr(encoder.config, "length_rule", "steptrain")
    return out, num_patches_tensor(audio_lengths.to(out.device), rule)


def place_audio(input_ids, inputs_embeds, audio_out, counts, patch_id):
    """Write clip i's first counts[i] adapter outputs into the i-th run of ``patch_id`` in ``input_ids``.

    Runs are maximal stretches of ``patch_id`` within a row, taken in reading order over the flattened
    batch (row 0 left to right, then row 1, ...). The number of runs and each run's length must match the
    clips exactly. ``inputs_embeds`` is [batch, seq, hidden] like ``input_ids`` plus the hidden dim.
    """
    if patch_id is None:
        raise ValueError("config.audio_patch_id is not set, cannot place audio features")
    patch_mask = input_ids == patch_id
    expected = counts.tolist()
    found = _patch_runs(patch_mask)
    if found != expected:
        raise ValueError(
            f"audio patch mismatch: the {len(expected)} clip(s) need runs of <audio_patch> "
            f"(id {patch_id}) of lengths {expected} (total {sum(expected)}), but input_ids hold "
            f"{len(found)} run(s) of lengths {found} (total {sum(found)})"
        )
    valid = _length_mask(counts, audio_out.shape[1])
    flat = audio_out[valid].to(inputs_embeds.dtype)  # [sum(counts), H] in clip order
    return inputs_embeds.masked_scatter(patch_mask.unsqueeze(-1), flat)


def save_audio_encoder(
    directory: str | os.PathLike, encoder: WhisperStyleEncoder, adapter: AudioAdapter, llm_hidden_size: int
) -> None:
    """Write ``encoder`` + ``adapter`` as :meth:`SpeechLMForCausalLM.load_encoder` reads them (also
    for an encoder trained on its own, e.g. by data_pipelines.pretrain_audio_encoder)."""
    os.makedirs(directory, exist_ok=True)
    state = {f"audio_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"audio_adapter.{k}": v for k, v in adapter.state_dict().items()})
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        os.path.join(directory, ENCODER_WEIGHTS),
    )
    meta = {"encoder_config": encoder.config.to_dict(), "llm_hidden_size": llm_hidden_size}
    with open(os.path.join(directory, ENCODER_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)


def _kv_cache(past_key_values, kwargs: dict):
    """The KV cache, passed as ``past_key_values`` (transformers < 5.24) or ``cache`` (>= 5.24)."""
    return past_key_values if past_key_values is not None else kwargs.get("cache")


def _patch_runs(patch_mask: torch.Tensor) -> list[int]:
    """Lengths of maximal runs of True within each row, in reading order (row-major)."""
    m = patch_mask.to(torch.int8)
    if m.numel() == 0:
        return []
    prev = F.pad(m, (1, 0))[:, :-1]
    nxt = F.pad(m, (0, 1))[:, 1:]
    starts = ((m == 1) & (prev == 0)).flatten().nonzero().squeeze(-1)
    ends = ((m == 1) & (nxt == 0)).flatten().nonzero().squeeze(-1)
    return (ends - starts + 1).tolist()
