"""Load a tokenizer and a causal LM from an HF-format directory or a tiny preset.

Nothing here knows about training: the recipe decides precision, devices and sharding through the
engine. ``trust_remote_code`` stays off unless the config asks for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from steptrain.audio.codes import STEP_AUDIO_V1

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SPEECH_TOKENS = ("<audio_start>", "<audio_end>", "<audio_patch>")


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 holds only a partition of it (``ds_shape``)."""
    return getattr(p, "ds_shape", p.shape)


SPEECH_MODEL_TYPES = ("steptrain_speech_lm", "step_audio_2")  # steptrain's own layout, the released Step-Audio 2


def _config_json(directory) -> dict:
    import json
    from pathlib import Path

    config = Path(directory) / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def model_family(model_cfg) -> str | None:
    """The checkpoint's config.json ``model_type`` (of ``model.path``, else ``model.llm_path``), or None;
    read without loading anything, so the chat template is known before a model is built."""
    path = model_cfg.path or model_cfg.llm_path
    return _config_json(path).get("model_type") if path else None


def is_speech_config(model_cfg) -> bool:
    """Whether the config describes an encoder + adapter + LLM speech model."""
    if model_cfg.llm_path:
        return True
    if model_cfg.preset:
        from steptrain.models.speech import SPEECH_PRESETS

        return model_cfg.preset in SPEECH_PRESETS
    return _config_json(model_cfg.path).get("model_type") in SPEECH_MODEL_TYPES


@dataclass(frozen=True)
class SpeechFrontEnd:
    """What a speech model expects of its inputs: log-mel bins and the patch-count rule.

    ``patches(n_samples)``: the number of ``<audio_patch>`` tokens for a chunk of ``n_samples`` 16 kHz
    samples (``steptrain.models.speech.num_patches`` of the front end's frame count, under ``length_rule``).
    """

    n_mels: int = 128
    length_rule: str = "steptrain"

    def patches(self, n_samples: int) -> int:
        from steptrain.audio.features import num_frames
        from steptrain.models.speech.modeling import num_patches

        return num_patches(num_frames(n_samples), self.length_rule)


def speech_front_end(model_cfg) -> SpeechFrontEnd:
    """The :class:`SpeechFrontEnd` of the configured speech model, read from its files (nothing is built).

    Sources: a released ``step_audio_2`` directory (official patch arithmetic, docs/released_layouts.md), a
    steptrain-saved model or encoder (their encoder_config), a Whisper ``model.encoder_path``
    (``num_mel_bins``: 80 up to Whisper large-v2, 128 from large-v3), a speech preset. The run's log-mel
    features are computed with its ``n_mels`` (``steptrain.inputs.resolve_inputs``).
    """
    import json
    from pathlib import Path

    n_mels, rule = 128, "steptrain"
    if model_cfg.preset:
        from steptrain.models.speech import SPEECH_PRESETS

        n_mels = SPEECH_PRESETS.get(model_cfg.preset, {}).get("encoder", {}).get("n_mels", 128)
    elif model_cfg.llm_path:
        enc = model_cfg.encoder_path
        cfg = _config_json(enc) if enc else {}
        if cfg.get("model_type") == "whisper":
            n_mels = cfg.get("num_mel_bins", 128)
        elif enc and (Path(enc) / "audio_encoder_config.json").exists():
            meta = json.loads((Path(enc) / "audio_encoder_config.json").read_text())["encoder_config"]
            n_mels, rule = meta.get("n_mels", 128), meta.get("length_rule", "steptrain")
    else:
        cfg = _config_json(model_cfg.path)
        if cfg.get("model_type") == "step_audio_2":
            n_mels, rule = (cfg.get("audio_encoder_config") or {}).get("n_mels", 128), "step_audio_2"
        elif cfg.get("model_type") == "steptrain_speech_lm":
            enc = cfg.get("encoder_config") or {}
            n_mels, rule = enc.get("n_mels", 128), enc.get("length_rule", "steptrain")
    return SpeechFrontEnd(int(n_mels), rule)


def load_tokenizer(model_cfg) -> PreTrainedTokenizerBase:
    path = model_cfg.tokenizer_path or model_cfg.path or model_cfg.llm_path
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Padding positions never carry loss, so any id works; EOS is the conventional choice.
        tok.pad_token = tok.eos_token or tok.unk_token
    wanted = list(SPEECH_TOKENS) if is_speech_config(model_cfg) else []
    step1 = is_step1_config(model_cfg)
    if model_cfg.audio_codes:  # codes first, so <audio_0..N-1> get contiguous ids
        # Step-Audio v1 (step1) writes audio tokens bare, without Step-Audio 2's <tts_start> / <tts_end>.
        wanted = [f"<audio_{k}>" for k in range(model_cfg.audio_codes)] + wanted + ([] if step1 else ["<tts_start>", "<tts_end>"])
    if wanted:
        vocab = tok.get_vocab()
        missing = [t for t in wanted if t not in vocab]
        if missing:  # a text tokenizer becoming a speech one: the model's embeddings grow to match
            tok.add_tokens(list(missing), special_tokens=True)
    if step1 and model_cfg.audio_codes:
        first = tok.convert_tokens_to_ids("<audio_0>")
        if first != STEP_AUDIO_V1.offset:
            raise ValueError(f"{path}: a Step-1 tokenizer must hold <audio_k> at id {STEP_AUDIO_V1.offset} + k (the "
                             f"released vocabulary: 65,536 text ids, then the audio codes); <audio_0> is id {first}")
    return tok


def is_step1_config(model_cfg) -> bool:
    """Whether ``model.path`` is a Step-1 checkpoint (Step-Audio-Chat, Step-Audio-TTS-3B)."""
    return bool(model_cfg.path) and model_family(model_cfg) == "step1"


def audio_code_ids(tokenizer, n_codes: int) -> tuple[int, int] | None:
    """(first, last) id of the discrete audio tokens <audio_0..N-1>, checked to be contiguous."""
    if not n_codes:
        return None
    first, last = tokenizer.convert_tokens_to_ids("<audio_0>"), tokenizer.convert_tokens_to_ids(f"<audio_{n_codes - 1}>")
    if last - first != n_codes - 1:
        raise ValueError(f"audio tokens <audio_0>..<audio_{n_codes - 1}> are not contiguous ids ({first}..{last})")
    return first, last


def speech_overrides(tokenizer, model_cfg) -> dict:
    """SpeechLMConfig fields set by the run: the audio token ids and whether the encoder trains."""
    ids = {f"{t.strip('<>')}_id": tokenizer.convert_tokens_to_ids(t) for t in SPEECH_TOKENS}
    return {**ids, "freeze_encoder": model_cfg.freeze_encoder}


def load_model(model_cfg, tokenizer) -> tuple[PreTrainedModel, list[int]]:
    """The model, plus the ids of tokens that were added to its vocabulary (their rows are new)."""
    speech = is_speech_config(model_cfg)
    if speech:
        import steptrain.models.speech  # noqa: F401 - registers the speech model with the Auto classes
    if model_cfg.preset and speech:
        from steptrain.models.speech import build_speech_preset

        model = build_speech_preset(model_cfg.preset, tokenizer, **speech_overrides(tokenizer, model_cfg))
        model.to(DTYPES[model_cfg.dtype])
    elif model_cfg.preset:
        from steptrain.models.presets import build_preset

        model = build_preset(model_cfg.preset, tokenizer)
        model.to(DTYPES[model_cfg.dtype])
        model.config._attn_implementation = model_cfg.attn_implementation
    elif model_cfg.llm_path:
        from steptrain.models.speech import SpeechLMForCausalLM

        model = SpeechLMForCausalLM.from_parts(
            model_cfg.llm_path, model_cfg.encoder_path, dtype=DTYPES[model_cfg.dtype], **speech_overrides(tokenizer, model_cfg)
        )
    elif speech and _config_json(model_cfg.path).get("model_type") == "step_audio_2":
        from steptrain.models.speech.released import STEP_AUDIO_2

        model = STEP_AUDIO_2.load(
            model_cfg.path, dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation,
            tokenizer=tokenizer, **speech_overrides(tokenizer, model_cfg),
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.path,
            dtype=DTYPES[model_cfg.dtype],
            trust_remote_code=model_cfg.trust_remote_code,
            attn_implementation=model_cfg.attn_implementation,
        )
    if speech:  # the run decides, also for a saved speech model
        model.config.freeze_encoder = model_cfg.freeze_encoder
        model.audio_encoder.requires_grad_(not model_cfg.freeze_encoder)
    old_vocab = full_shape(model.get_input_embeddings().weight)[0]
    new_ids: list[int] = []
    if len(tokenizer) > old_vocab:
        # Mean-initialised rows for tokens the tokenizer has and the checkpoint lacks.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=model_cfg.new_token_init == "mean")
        new_ids = list(range(old_vocab, len(tokenizer)))
        log.info("resized embeddings %d -> %d for added tokens", old_vocab, len(tokenizer))
    if model_cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return model, new_ids
