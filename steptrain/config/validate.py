"""Cross-field checks that a typed schema cannot express.

Every check runs before any model, tokenizer or dataset is loaded, and names the key at fault plus the
valid choices, so a typo costs seconds, not a queue slot on a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from steptrain.config.schema import BUILTIN_REWARDS, CHOICES
from steptrain.engines import ENGINES
from steptrain.objectives.registry import PREFERENCE_LOSSES, PreferenceLoss, names_with
from steptrain.recipes import RECIPES, Recipe
from steptrain.rollout.registry import REWARDS

# Stand-ins for a name the choices check already rejected: no property set, so no rule of theirs applies.
_UNKNOWN_RECIPE, _UNKNOWN_LOSS = Recipe(module=""), PreferenceLoss(summary="")


def _recipe(cfg: DictConfig) -> Recipe:
    return RECIPES.get(cfg.recipe.name, _UNKNOWN_RECIPE)


def _loss(cfg: DictConfig) -> PreferenceLoss:
    return PREFERENCE_LOSSES.get(cfg.objective.loss, _UNKNOWN_LOSS)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what would be valid."""


def _get(cfg: DictConfig, dotted: str):
    return OmegaConf.select(cfg, dotted)


def validate(cfg: DictConfig) -> None:
    problems: list[str] = []

    def fail(msg: str) -> None:
        problems.append(msg)

    for key, valid in CHOICES.items():
        value = _get(cfg, key)
        if value not in valid:
            fail(f"{key}={value!r} is not one of: {', '.join(map(str, valid))}")

    if OmegaConf.is_missing(cfg, "output_dir") or not cfg.output_dir:
        fail("output_dir is required (output_dir=DIR)")

    m = cfg.model
    if sum(bool(x) for x in (m.path, m.preset, m.llm_path)) != 1:
        fail("set exactly one of model.path (HF model directory), model.preset (tiny architecture) or "
             "model.llm_path (speech model from an LLM directory)")
    if m.preset and not m.tokenizer_path:
        fail("model.preset needs model.tokenizer_path (a tokenizer directory)")
    if m.encoder_path and not m.llm_path:
        fail("model.encoder_path goes with model.llm_path (a speech model assembled from parts)")
    if m.llm_path and not m.encoder_path and m.freeze_encoder:
        fail("model.llm_path without model.encoder_path starts the audio encoder from random weights, and "
             "model.freeze_encoder=true would keep it random: set model.encoder_path (an HF Whisper directory or "
             "a saved steptrain encoder) or model.freeze_encoder=false")
    for key in ("path", "llm_path", "encoder_path"):
        if m[key] and not Path(m[key]).is_dir():
            fail(f"model.{key}={m[key]!r} is not a directory")

    if m.audio_codes < 0:
        fail(f"model.audio_codes={m.audio_codes} must be >= 0")
    if cfg.objective.audio_loss_weight < 0:
        fail(f"objective.audio_loss_weight={cfg.objective.audio_loss_weight} must be >= 0")
    _check_head_chunks(cfg, fail)

    d = cfg.data
    if d.reply_interleave is not None:
        if not re.fullmatch(r"[1-9]\d*:[1-9]\d*", str(d.reply_interleave)):
            fail(f"data.reply_interleave={d.reply_interleave!r} must be 'T:A' with two positive integers, e.g. '10:15'")
        if not m.audio_codes:
            fail("data.reply_interleave interleaves spoken replies' audio tokens: it needs model.audio_codes > 0")
    if not 0.0 <= d.deaf_negatives <= 1.0:
        fail(f"data.deaf_negatives={d.deaf_negatives} must be a fraction in [0, 1]")
    if d.audio_tokenizer and not m.audio_codes:
        fail("data.audio_tokenizer turns spoken replies into codes: it needs model.audio_codes > 0")
    if not d.train_files:
        fail("data.train_files is empty (data.train_files=[a.jsonl,...])")
    for key in ("train_files", "eval_files"):
        for f in d[key]:
            if not Path(f).exists():
                fail(f"data.{key}: {f!r} does not exist")
    if d.max_length < 8:
        fail(f"data.max_length={d.max_length} is too small (>= 8)")
    if not 0.0 <= d.eval_fraction < 1.0:
        fail(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_fraction > 0 and d.eval_files:
        fail("data.eval_fraction and data.eval_files contradict each other: use one source of eval rows")

    t = cfg.trainer
    for key in ("batch_size", "grad_accum", "keep_last"):
        if t[key] < 1:
            fail(f"trainer.{key}={t[key]} must be >= 1")
    if cfg.logging.log_every < 1:
        fail(f"logging.log_every={cfg.logging.log_every} must be >= 1")
    for key in ("max_steps", "save_every", "eval_every", "eval_batches", "generate_eval"):
        if t[key] < 0:
            fail(f"trainer.{key}={t[key]} must be >= 0")
    if t.max_steps == 0 and t.epochs < 1:
        fail("trainer.max_steps=0 needs trainer.epochs >= 1")
    if t.generate_eval and not (d.eval_files or d.eval_fraction):
        fail("trainer.generate_eval needs eval rows: set data.eval_files or data.eval_fraction")

    o = cfg.optim
    if o.lr <= 0:
        fail(f"optim.lr={o.lr} must be > 0")
    if o.warmup_steps and o.warmup_ratio:
        fail("optim.warmup_steps and optim.warmup_ratio contradict each other: set only one")
    if not 0.0 <= o.warmup_ratio < 1.0:
        fail(f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    if o.hold_steps < 0 or t.max_steps and o.hold_steps >= t.max_steps:
        fail(f"optim.hold_steps={o.hold_steps} must be >= 0 and below trainer.max_steps={t.max_steps}")
    if t.max_steps and o.warmup_steps > t.max_steps:
        fail(f"optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps={t.max_steps}")
    if len(o.betas) != 2:
        fail(f"optim.betas must have two values, got {list(o.betas)}")
    for pattern, mult in o.lr_mult.items():
        if mult < 0:
            fail(f"optim.lr_mult[{pattern!r}]={mult} must be >= 0")

    p = cfg.peft
    if p.method == "lora":
        if p.r < 1 or p.alpha <= 0:
            fail(f"peft.r={p.r} and peft.alpha={p.alpha} must be positive")
        if not 0.0 <= p.dropout < 1.0:
            fail(f"peft.dropout={p.dropout} must be in [0, 1)")
        tm = p.target_modules
        if not (tm == "all-linear" or OmegaConf.is_list(tm) and len(tm) > 0):
            fail(f"peft.target_modules={tm!r} must be 'all-linear' or a non-empty list of module names")

    o, recipe = cfg.objective, _recipe(cfg)
    if recipe.pairs and cfg.data.packing:
        fail(f"data.packing is not supported by recipe={cfg.recipe.name} (pairs are batched padded)")
    if recipe.preference_loss:
        if o.beta <= 0:
            fail(f"objective.beta={o.beta} must be positive")
        if not 0.0 <= o.label_smoothing < 0.5:
            fail(f"objective.label_smoothing={o.label_smoothing} must be in [0, 0.5)")
        if o.label_smoothing and not _loss(cfg).uses_label_smoothing:
            smoothed = "|".join(names_with(PREFERENCE_LOSSES, "uses_label_smoothing"))
            fail(f"objective.label_smoothing is used by objective.loss={smoothed}, not {o.loss}")
        _check_reference(cfg, fail)

    if recipe.online_rl:
        _check_rl(cfg, fail)

    e = cfg.engine
    if e.backend == "nccl" and e.device == "cpu":
        fail("engine.backend=nccl needs engine.device=cuda (use gloo on CPU)")
    if t.precision == "fp16" and e.device == "cpu":
        fail("trainer.precision=fp16 is not supported on CPU (use bf16 or fp32)")
    if e.name == "deepspeed":
        if e.zero_stage == 0:
            fail("engine=deepspeed needs engine.zero_stage=1|2|3")
        if e.offload_param != "none" and e.zero_stage != 3:
            fail(f"engine.offload_param={e.offload_param} needs engine.zero_stage=3 (got {e.zero_stage})")
        if e.config_file and not Path(e.config_file).is_file():
            fail(f"engine.config_file={e.config_file!r} does not exist")

    runs = ENGINES[e.name].recipes if e.name in ENGINES else None
    if runs is not None and cfg.recipe.name not in runs:
        fail(f"engine={e.name} runs recipe={'|'.join(runs)} (not {cfg.recipe.name})")
    if e.name == "megatron":
        _check_megatron(cfg, fail)

    r = cfg.resume
    if r not in ("auto", "none") and not Path(r).is_dir():
        fail(f"resume={r!r} is not 'auto', 'none' or an existing checkpoint directory")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _check_head_chunks(cfg: DictConfig, fail) -> None:
    """objective.head_chunk_tokens: the chunked LM head (objectives/chunked_head.py) and where it cannot run."""
    chunk, e = cfg.objective.head_chunk_tokens, cfg.engine
    if chunk < 0:
        fail(f"objective.head_chunk_tokens={chunk} must be >= 0 (0: the plain head)")
    if chunk <= 0:
        return
    if _recipe(cfg).scalar_head:
        fail(f"objective.head_chunk_tokens applies to the LM head; recipe={cfg.recipe.name} trains a scalar head "
             "(set 0)")
    if e.name == "megatron":
        fail("objective.head_chunk_tokens is not supported on engine=megatron (its last pipeline stage computes "
             "vocabulary-parallel logits itself); set 0")
    if e.find_unused_parameters:
        fail("objective.head_chunk_tokens uses the head's weight after the model's forward, which DDP's "
             "engine.find_unused_parameters=true would mark unused; set one of them off")
    if e.name == "deepspeed" and e.zero_stage == 3:
        fail("objective.head_chunk_tokens is not supported with engine.zero_stage=3 (the head's weight is gathered "
             "only inside its own forward); set 0 or use engine.zero_stage=1|2")


def _check_reference(cfg: DictConfig, fail) -> None:
    """Where reference log-probs come from must exist for this run."""
    o = cfg.objective
    if o.reference == "adapter_off" and cfg.peft.method != "lora":
        fail("objective.reference=adapter_off needs peft=lora (the reference is the policy without its adapter)")
    if o.reference == "model" and not o.ref_model_path:
        fail("objective.reference=model needs objective.ref_model_path=DIR")
    if o.reference == "model" and cfg.engine.name == "deepspeed":
        fail("objective.reference=model is not supported on engine=deepspeed (the reference would not be "
             "partitioned); use peft=lora with reference=adapter_off")


def _check_rl(cfg: DictConfig, fail) -> None:
    """recipe=grpo|ppo: sampling, rewards, the KL reference, and (PPO) the critic."""
    o, r, recipe = cfg.objective, cfg.rollout, _recipe(cfg)
    if recipe.group_relative and r.num_generations < 2:
        fail(f"rollout.num_generations={r.num_generations} must be >= 2 (advantages compare a prompt's samples)")
    if r.num_generations < 1:
        fail(f"rollout.num_generations={r.num_generations} must be >= 1")
    if r.max_new_tokens < 1:
        fail(f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1")
    if r.temperature <= 0:
        fail(f"rollout.temperature={r.temperature} must be > 0 (RL needs sampled, different completions)")
    if not 0.0 < r.top_p <= 1.0 or r.top_k < 0 or r.batch_size < 0:
        fail(f"rollout.top_p={r.top_p} must be in (0, 1], rollout.top_k={r.top_k} and rollout.batch_size="
             f"{r.batch_size} >= 0")
    if not any(o.rewards.values()):
        fail("objective.rewards names no reward with a non-zero weight, e.g. objective.rewards={accuracy:1.0}")
    for name in o.rewards:
        if name not in BUILTIN_REWARDS and name not in o.reward_functions:
            fail(f"objective.rewards: {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor in "
                 f"objective.reward_functions (name -> 'module:function')")
    for name in o.rewards:
        if name in REWARDS and REWARDS[name].needs_model and not (o.reward_model_path and Path(o.reward_model_path).is_dir()):
            fail(f"the {name} reward needs objective.reward_model_path=DIR (got {o.reward_model_path!r})")
    if o.clip_eps <= 0 or o.clip_eps_high <= 0 or o.clip_eps >= 1:
        fail(f"objective.clip_eps={o.clip_eps} must be in (0, 1) and objective.clip_eps_high={o.clip_eps_high} > 0")
    if o.kl_beta < 0:
        fail(f"objective.kl_beta={o.kl_beta} must be >= 0")
    if o.kl_beta > 0:
        if o.reference == "precompute":
            fail("objective.kl_beta > 0 scores fresh samples: objective.reference must be adapter_off (peft=lora) "
                 "or model (objective.ref_model_path), not precompute")
        _check_reference(cfg, fail)
    if cfg.data.packing:
        fail(f"data.packing is not supported by recipe={cfg.recipe.name} (prompts are sampled as groups)")
    if recipe.critic:
        m = cfg.model
        critic = o.critic_path or m.path
        from steptrain.models.loader import is_speech_config  # reads config.json only

        if m.llm_path or ((m.preset or (m.path and Path(m.path).is_dir())) and is_speech_config(m)):
            fail(f"recipe={cfg.recipe.name} trains text LLMs (its critic is a token classifier); use recipe=grpo "
                 "for speech models")
        elif not critic or not Path(critic).is_dir():
            fail(f"recipe={cfg.recipe.name} needs a critic: objective.critic_path=DIR or model.path=DIR (got {critic!r})")
        if o.critic_lr is not None and o.critic_lr <= 0:
            fail(f"objective.critic_lr={o.critic_lr} must be > 0")
        if not (0.0 <= o.gamma <= 1.0 and 0.0 <= o.lam <= 1.0) or o.value_clip <= 0:
            fail(f"objective.gamma={o.gamma} and objective.lam={o.lam} must be in [0, 1], objective.value_clip="
                 f"{o.value_clip} > 0")


def _llm_shape(cfg: DictConfig) -> dict | None:
    """Layer / head counts of the configured LLM (preset or config.json), None when not readable here."""
    import json

    from steptrain.models.presets import PRESETS

    if cfg.model.preset:
        return PRESETS.get(cfg.model.preset)
    path = Path(cfg.model.path or cfg.model.llm_path or "") / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _check_megatron(cfg: DictConfig, fail) -> None:
    """Layouts megatron-core cannot build, and settings the Megatron engine does not take."""
    e, o = cfg.engine, cfg.objective
    tp, pp, vpp = e.tensor_parallel, e.pipeline_parallel, e.virtual_pipeline
    for key, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("virtual_pipeline", vpp)):
        if value < 1:
            fail(f"engine.{key}={value} must be >= 1")
    if e.zero_stage or e.offload_optimizer != "none" or e.offload_param != "none":
        fail(f"engine=megatron cannot be combined with DeepSpeed ZeRO (engine.zero_stage={e.zero_stage}, "
             f"offload_optimizer={e.offload_optimizer}, offload_param={e.offload_param}): Megatron shards with "
             "engine.tensor_parallel / pipeline_parallel; use engine=deepspeed for ZeRO-3")
    if vpp > 1 and pp < 2:
        fail(f"engine.virtual_pipeline={vpp} needs engine.pipeline_parallel >= 2 (got {pp})")
    if vpp > 1 and cfg.trainer.grad_accum % pp:
        fail(f"engine.virtual_pipeline={vpp}: trainer.grad_accum={cfg.trainer.grad_accum} (micro-batches per step) "
             f"must be a multiple of engine.pipeline_parallel={pp}")
    shape = _llm_shape(cfg)
    if shape and tp >= 1 and pp >= 1 and vpp >= 1:
        heads, groups = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
        layers = shape["num_hidden_layers"]
        if heads % tp or groups % tp:
            fail(f"engine.tensor_parallel={tp} must divide the model's attention heads ({heads}) and KV groups "
                 f"(num_key_value_heads={groups})")
        if shape["intermediate_size"] % tp:
            fail(f"engine.tensor_parallel={tp} must divide the model's intermediate_size ({shape['intermediate_size']})")
        if pp * vpp > layers:
            fail(f"engine.pipeline_parallel={pp} x virtual_pipeline={vpp} exceeds the model's {layers} layers")
        elif layers % (pp * vpp):
            fail(f"the model's {layers} layers do not split evenly over engine.pipeline_parallel={pp} "
                 f"x virtual_pipeline={vpp}")
    if (cfg.model.llm_path or cfg.model.encoder_path or "speech" in (cfg.model.preset or "")) and cfg.peft.method != "none":
        fail("engine=megatron trains a speech LLM's LLM and adapter in full: set peft=none (LoRA: engine=deepspeed)")
    if _recipe(cfg).preference_loss and o.reference in ("adapter_off", "model") and not _loss(cfg).reference_free:
        fail(f"objective.reference={o.reference} is not supported on engine=megatron; use reference=precompute")
    if cfg.trainer.generate_eval:
        fail("trainer.generate_eval is not supported on engine=megatron (set 0; export and evaluate with "
             "`steptrain eval`)")
    if cfg.trainer.precision == "fp16":
        fail("engine=megatron trains in fp32 or bf16 (trainer.precision)")
