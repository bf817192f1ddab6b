"""The released Step-Audio 2 checkpoint layout (Step-Audio-2-mini / -Base / -Think, Step-Audio-R1), natively.

A released directory has a config.json with ``model_type "step_audio_2"``, ``architectures
["StepAudio2ForCausalLM"]``, a nested ``audio_encoder_config`` (n_mels, n_audio_ctx, n_audio_state,
n_audio_head, n_audio_layer, llm_dim, kernel_size, adapter_stride) and a nested ``text_config`` (a Qwen2);
safetensors with the keys ``encoder.*`` (Whisper-like, OpenAI names), ``adapter.*``, ``model.*`` (Qwen2Model)
and ``lm_head.weight``; and a Qwen2 BPE tokenizer with the audio special tokens. The facts and their
sources are in docs/released_layouts.md, section "Step-Audio 2 / Step-Audio-R1".

:data:`STEP_AUDIO_2` is the one object that resolves the layout: the config both ways
(:meth:`CheckpointLayout.to_speech_config` / :meth:`CheckpointLayout.to_released_config`), the weight names
both ways (:meth:`CheckpointLayout.to_steptrain_keys` / :meth:`CheckpointLayout.to_released_keys`), and
:meth:`CheckpointLayout.load` / :meth:`CheckpointLayout.save`. The loader (``steptrain.models.loader``)
and the export (``steptrain.export.hf``) both go through it, so a model loaded from the released layout is
trained as a :class:`~steptrain.models.speech.modeling.SpeechLMForCausalLM` and exported back with the
same config.json fields, model_type, architectures and tensor names.

Behaviour of a released checkpoint reproduced here (where steptrain's own default differs):
- patch count and encoder key mask follow the official code (``length_rule="step_audio_2"``: the clip
  length passed to the encoder is T - 2; 313 patches for a 25 s chunk);
- the position table is the checkpoint's ``encoder.positional_embedding.weight`` (a frozen nn.Embedding
  there, a non-trainable buffer here);
- adapter gelu(conv) -> linear1 (2048) -> ReLU -> linear2, and attention scaled by 1/sqrt(head_dim)
  (the official q and k scaling by head_dim**-0.25 each is the same product) are steptrain's own.
- no BOS in the prompt (``data.template=auto`` resolves the Step template without BOS for this family).

Importing :mod:`steptrain.models.speech` registers ``step_audio_2`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``StepAudio2ForCausalLM``), so ``AutoModelForCausalLM.from_pretrained(dir)``
loads a released directory without remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from steptrain.models.speech.configuration import AudioEncoderConfig, SpeechLMConfig
from steptrain.models.speech.modeling import SpeechLMForCausalLM

MODEL_TYPE = "step_audio_2"
ARCHITECTURE = "StepAudio2ForCausalLM"

# Token ids of the released tokenizer, used when no tokenizer is at hand (docs/released_layouts.md).
OFFICIAL_IDS = {
    "audio_start_id": 151688,
    "audio_end_id": 151689,
    "audio_patch_id": 151690,
    "tts_start_id": 151693,
    "tts_end_id": 151694,
}
_ID_TOKENS = {
    "audio_start_id": "<audio_start>",
    "audio_end_id": "<audio_end>",
    "audio_patch_id": "<audio_patch>",
    "tts_start_id": "<tts_start>",
    "tts_end_id": "<tts_end>",
}
ADAPTER_HIDDEN = 2048  # hard-coded in the official Adaptor

# audio_encoder_config field -> AudioEncoderConfig field
_ENCODER_FIELDS = {
    "n_mels": "n_mels",
    "n_audio_state": "d_model",
    "n_audio_head": "n_heads",
    "n_audio_layer": "n_layers",
    "n_audio_ctx": "max_source_positions",
}
# text_config fields copied into the Qwen2 config as they are (rope_theta / rope_scaling handled apart)
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_TOP_FIELDS = ("use_sliding_window", "sliding_window", "max_window_layers")

# (released prefix, steptrain prefix); "{i}" is a block index. The suffix (weight / bias) is kept.
_KEY_PAIRS = (
    ("encoder.conv1.", "audio_encoder.conv1."),
    ("encoder.conv2.", "audio_encoder.conv2."),
    ("encoder.blocks.{i}.attn.query.", "audio_encoder.layers.{i}.self_attn.q_proj."),
    ("encoder.blocks.{i}.attn.key.", "audio_encoder.layers.{i}.self_attn.k_proj."),
    ("encoder.blocks.{i}.attn.value.", "audio_encoder.layers.{i}.self_attn.v_proj."),
    ("encoder.blocks.{i}.attn.out.", "audio_encoder.layers.{i}.self_attn.out_proj."),
    ("encoder.blocks.{i}.attn_ln.", "audio_encoder.layers.{i}.self_attn_layer_norm."),
    ("encoder.blocks.{i}.mlp.0.", "audio_encoder.layers.{i}.fc1."),
    ("encoder.blocks.{i}.mlp.2.", "audio_encoder.layers.{i}.fc2."),
    ("encoder.blocks.{i}.mlp_ln.", "audio_encoder.layers.{i}.final_layer_norm."),
    ("encoder.after_norm.", "audio_encoder.layer_norm."),
    ("adapter.conv.", "audio_adapter.conv."),
    ("adapter.linear1.", "audio_adapter.linear1."),
    ("adapter.linear2.", "audio_adapter.linear2."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)
_FULL_PAIRS = (("encoder.positional_embedding.weight", "audio_encoder.embed_positions"),)
_SUFFIX = r"([A-Za-z0-9_.]+)"


def _compile(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)") + _SUFFIX + "$")


_TO_STEPTRAIN = [(_compile(a), b) for a, b in _KEY_PAIRS]
_TO_RELEASED = [(_compile(b), a) for a, b in _KEY_PAIRS]


def _rename(key: str, full: dict[str, str], rules) -> str | None:
    if key in full:
        return full[key]
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            i = m.groupdict().get("i")
            return target.replace("{i}", i if i is not None else "") + m.groups()[-1]
    return None


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style checkpoint directory: model.safetensors, a sharded safetensors index,
    or pytorch_model.bin."""
    from safetensors.torch import load_file

    d = Path(directory)
    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(d / shard)))
        return state
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CheckpointLayout:
    """A released checkpoint layout: its config.json identity and the conversions to steptrain's model."""

    model_type: str
    architecture: str

    # --- recognising ----------------------------------------------------------------------------
    def matches(self, directory: str | os.PathLike | None) -> bool:
        """Whether ``directory`` holds a config.json of this layout."""
        if not directory:
            return False
        path = Path(directory) / "config.json"
        return path.is_file() and json.loads(path.read_text()).get("model_type") == self.model_type

    # --- config ---------------------------------------------------------------------------------
    def encoder_config(self, released: dict, adapter_hidden: int = ADAPTER_HIDDEN) -> AudioEncoderConfig:
        enc = released.get("audio_encoder_config") or {}
        missing = [k for k in _ENCODER_FIELDS if k not in enc]
        if missing:
            raise ValueError(f"{self.model_type} config.json: audio_encoder_config lacks {missing}")
        kernel, stride = enc.get("kernel_size", 3), enc.get("adapter_stride", 2)
        if (kernel, stride) != (3, 2):
            raise ValueError(
                f"{self.model_type}: adapter kernel_size={kernel}, adapter_stride={stride} is not supported "
                "(steptrain's adapter is Conv1d k3 s2 p1, the released Step-Audio 2 value)"
            )
        return AudioEncoderConfig(
            **{ours: enc[theirs] for theirs, ours in _ENCODER_FIELDS.items()},
            adapter_hidden=adapter_hidden,
            layer_norm_eps=1e-5,
            length_rule="step_audio_2",
        )

    def text_config(self, released: dict):
        """The Qwen2Config of ``text_config`` (the official loader turns it into a Qwen2Config too)."""
        from transformers import Qwen2Config

        text = dict(released.get("text_config") or {})
        groups, kv = text.get("num_attention_groups"), text.get("num_key_value_heads")
        if groups is not None and kv is not None and groups != kv:
            raise ValueError(f"text_config: num_attention_groups={groups} != num_key_value_heads={kv}")
        fields = {k: text[k] for k in _TEXT_FIELDS if k in text}
        if "num_key_value_heads" not in fields and groups is not None:
            fields["num_key_value_heads"] = groups
        rope = {"rope_type": "default", "rope_theta": float(text.get("rope_theta", 10000.0))}
        if text.get("rope_scaling"):
            rope.update(text["rope_scaling"])
        fields.update({k: released[k] for k in _TOP_FIELDS if k in released})
        return Qwen2Config(**fields, rope_parameters=rope, tie_word_embeddings=bool(text.get("tie_word_embeddings", False)))

    def to_speech_config(self, released: dict, adapter_hidden: int = ADAPTER_HIDDEN, **overrides) -> SpeechLMConfig:
        """The :class:`SpeechLMConfig` of a released config.json dict (``overrides``: token ids and other
        SpeechLMConfig fields; ids default to the released tokenizer's, :data:`OFFICIAL_IDS`)."""
        llm_cfg = self.text_config(released)
        llm_dim = (released.get("audio_encoder_config") or {}).get("llm_dim", llm_cfg.hidden_size)
        if llm_dim != llm_cfg.hidden_size:
            raise ValueError(f"audio_encoder_config.llm_dim={llm_dim} != text_config.hidden_size={llm_cfg.hidden_size}")
        fields = {**OFFICIAL_IDS, **overrides}
        return SpeechLMConfig(
            encoder_config=self.encoder_config(released, adapter_hidden),
            llm_config=llm_cfg,
            checkpoint_layout=self.model_type,
            layout_config=released,
            **fields,
        )

    def to_released_config(self, model: SpeechLMForCausalLM, dtype: torch.dtype | None = None) -> dict:
        """config.json for ``model``: the config it was loaded from, with what training may change updated
        (vocabulary size after added tokens, dtype); a fresh one when it was not loaded from this layout."""
        cfg = model.config
        enc, llm = cfg.encoder_config, cfg.llm_config
        out = json.loads(json.dumps(cfg.layout_config or {}))
        out["model_type"] = self.model_type
        out.setdefault("architectures", [self.architecture])
        a = out.setdefault("audio_encoder_config", {})
        a.update(
            {
                "n_mels": enc.n_mels,
                "n_audio_ctx": enc.max_source_positions,
                "n_audio_state": enc.d_model,
                "n_audio_head": enc.n_heads,
                "n_audio_layer": enc.n_layers,
                "llm_dim": llm.hidden_size,
            }
        )
        a.setdefault("kernel_size", 3)
        a.setdefault("adapter_stride", 2)
        t = out.setdefault("text_config", {})
        t["vocab_size"] = int(model.get_input_embeddings().weight.shape[0])
        if not cfg.layout_config:  # a fresh config: write all text fields
            for k in _TEXT_FIELDS:
                if getattr(llm, k, None) is not None:
                    t[k] = getattr(llm, k)
            t["num_attention_groups"] = llm.num_key_value_heads
            t["rope_theta"] = (llm.rope_parameters or {}).get("rope_theta", 10000.0)
        if dtype is not None:
            for key in ("torch_dtype", "dtype"):
                if key in out or key == "torch_dtype":
                    out[key] = _dtype_name(dtype)
        return out

    # --- weights --------------------------------------------------------------------------------
    def to_steptrain_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Released tensor names -> :class:`SpeechLMForCausalLM` state-dict names (unknown names raise)."""
        full = dict(_FULL_PAIRS)
        out, unknown = {}, []
        for key, value in state.items():
            new = _rename(key, full, _TO_STEPTRAIN)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
        if unknown:
            raise ValueError(f"{self.model_type}: unexpected tensors {unknown[:5]} ({len(unknown)} in all)")
        return out

    def to_released_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:class:`SpeechLMForCausalLM` state-dict names -> released tensor names (unknown names raise)."""
        full = {b: a for a, b in _FULL_PAIRS}
        out, unknown = {}, []
        for key, value in state.items():
            new = _rename(key, full, _TO_RELEASED)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
        if unknown:
            raise ValueError(f"no {self.model_type} name for {unknown[:5]} ({len(unknown)} in all)")
        return out

    # --- load / save ----------------------------------------------------------------------------
    def load(
        self,
        directory: str | os.PathLike,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        tokenizer=None,
        **overrides,
    ) -> SpeechLMForCausalLM:
        """A :class:`StepAudio2ForCausalLM` (a SpeechLMForCausalLM) with the weights of ``directory``.

        Token ids: ``overrides`` first, else looked up in ``tokenizer`` (or the directory's own
        tokenizer), else :data:`OFFICIAL_IDS`.
        """
        released = json.loads((Path(directory) / "config.json").read_text())
        if released.get("model_type") != self.model_type:
            raise ValueError(f"{directory}: config.json model_type is not {self.model_type!r}")
        state = self.to_steptrain_keys(read_state_dict(directory))
        linear1 = state.get("audio_adapter.linear1.weight")
        adapter_hidden = int(linear1.shape[0]) if linear1 is not None else ADAPTER_HIDDEN
        ids = _token_ids(tokenizer, directory)
        overrides = {**ids, **overrides}
        if attn_implementation is not None:
            overrides.setdefault("attn_implementation", attn_implementation)
        config = self.to_speech_config(released, adapter_hidden=adapter_hidden, **overrides)
        if attn_implementation is not None:
            config.llm_config._attn_implementation = attn_implementation
        with _building(dtype):  # every tensor is loaded below: skip the random init, build in the target dtype
            model = StepAudio2ForCausalLM(config)
        if config.llm_config.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
            model.tie_weights()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if config.llm_config.tie_word_embeddings:
            missing = [k for k in missing if k != "llm.lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{directory}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
            model.to(dtype)  # built in dtype already, which keeps fp32 buffers (RoPE inv_freq) as transformers does
        if dtype is not None:  # the position table is a checkpoint tensor: it takes the model's dtype
            model.audio_encoder.embed_positions = model.audio_encoder.embed_positions.to(dtype)
        if config.freeze_encoder:
            model.audio_encoder.requires_grad_(False)
        gen = model.llm.generation_config
        if gen.eos_token_id is None:
            gen.eos_token_id = config.llm_config.eos_token_id
        model.generation_config = gen
        return model.eval()

    def save(
        self,
        model: SpeechLMForCausalLM,
        directory: str | os.PathLike,
        source: str | os.PathLike | None = None,
        max_shard_size: str = "5GB",
    ) -> None:
        """Write ``model`` in this layout: config.json (released fields) and safetensors with the released
        names (sharded with an index above ``max_shard_size``). ``source``: the directory the model was
        loaded from; its remote-code files (``*.py``, named by ``auto_map``) are copied along so that the
        export also loads with the official remote code."""
        from huggingface_hub import save_torch_state_dict

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.llm_config.tie_word_embeddings:
            state.pop("llm.lm_head.weight", None)
        released = self.to_released_keys(state)
        dtypes = {v.dtype for k, v in released.items() if v.is_floating_point()}
        dtype = next(iter(dtypes)) if len(dtypes) == 1 else None
        save_torch_state_dict(released, d, max_shard_size=max_shard_size, metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(self.to_released_config(model, dtype), indent=2) + "\n")
        if source is not None and Path(source).is_dir():
            for py in Path(source).glob("*.py"):
                shutil.copy2(py, d / py.name)


STEP_AUDIO_2 = CheckpointLayout(MODEL_TYPE, ARCHITECTURE)


def layout_of(model) -> CheckpointLayout | None:
    """The released layout a model was loaded from (None: steptrain's own layout)."""
    cfg = getattr(model, "config", None)
    return STEP_AUDIO_2 if getattr(cfg, "checkpoint_layout", None) == MODEL_TYPE else None


@contextlib.contextmanager
def _building(dtype: torch.dtype | None):
    from transformers.initialization import no_init_weights

    old = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(old)


def _token_ids(tokenizer, directory) -> dict[str, int]:
    """The audio/tts token ids from ``tokenizer`` (or the directory's tokenizer), where it has them."""
    if tokenizer is None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except Exception:  # noqa: BLE001 - no tokenizer files: fall back to the published ids
            return {}
    vocab = tokenizer.get_vocab()
    return {field: vocab[tok] for field, tok in _ID_TOKENS.items() if tok in vocab}


class StepAudio2Config(PreTrainedConfig):
    """The released config.json as transformers reads it (``AutoConfig``); only a carrier of its fields.

    The model itself runs on the :class:`SpeechLMConfig` that :meth:`CheckpointLayout.to_speech_config`
    makes of these fields.
    """

    model_type = MODEL_TYPE

    audio_encoder_config: dict | None = None
    text_config: dict | None = None

    def get_text_config(self, decoder=None, encoder=None):
        return STEP_AUDIO_2.text_config(self.to_dict())


class StepAudio2ForCausalLM(SpeechLMForCausalLM):
    """A :class:`SpeechLMForCausalLM` loaded from (and saved in) the released Step-Audio 2 layout.

    ``from_pretrained(dir)`` reads the released layout (also through ``AutoModelForCausalLM``, with no
    remote code); ``save_pretrained(dir)`` writes it back.
    """

    config_class = StepAudio2Config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        kwargs.pop("config", None)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        model = STEP_AUDIO_2.load(
            pretrained_model_name_or_path,
            dtype=dtype,
            attn_implementation=kwargs.pop("attn_implementation", None),
            tokenizer=kwargs.pop("tokenizer", None),
        )
        device = kwargs.pop("device_map", None)
        if isinstance(device, (str, torch.device)) and device != "auto":
            model.to(device)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        STEP_AUDIO_2.save(self, save_directory, max_shard_size=kwargs.get("max_shard_size", "5GB"))


__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPE",
    "OFFICIAL_IDS",
    "STEP_AUDIO_2",
    "CheckpointLayout",
    "StepAudio2Config",
    "StepAudio2ForCausalLM",
    "layout_of",
    "read_state_dict",
]
