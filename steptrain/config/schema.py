"""Typed schemas for every config group.

Hydra merges the YAML files under ``configs/`` into these dataclasses, so an unknown key or a value of
the wrong type fails while the config is composed, before anything is built. Cross-field rules live in
``validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from steptrain.data.templates import TEMPLATES
from steptrain.engines import ENGINES
from steptrain.objectives.registry import ADVANTAGES, PREFERENCE_LOSSES
from steptrain.recipes import RECIPES
from steptrain.rollout.registry import REWARDS


@dataclass
class RecipeConfig:
    name: str = "sft"  # which recipe runs the loop: a name in steptrain/recipes/__init__.py (RECIPES)


@dataclass
class ModelConfig:
    path: str | None = None  # HF-format model directory (AutoModelForCausalLM)
    preset: str | None = None  # or a tiny architecture from steptrain.models.presets (random init)
    llm_path: str | None = None  # speech model assembled from an HF causal LM directory ...
    encoder_path: str | None = None  # ... plus an HF Whisper directory or a saved steptrain encoder+adapter (fresh: unset)
    freeze_encoder: bool = True  # speech models: Step-Audio 2 keeps its audio encoder frozen throughout
    audio_codes: int = 0  # add N discrete audio output tokens <audio_k> + <tts_start>/<tts_end> (Step-Audio 2: 6561)
    new_token_init: str = "mean"  # embedding rows of added tokens: mean of the existing rows | random
    tokenizer_path: str | None = None  # defaults to `path` (or `llm_path`); required with `preset`
    trust_remote_code: bool = False
    dtype: str = "float32"  # weights dtype on load: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention (Step-1: the fused ALiBi-sqrt path, CUDA)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    # auto: resolved per checkpoint and tokenizer before the model is built (steptrain/data/templates.py:
    # Step family -> step, a tokenizer chat template -> jinja, <|BOT|>/<|EOT|> -> step, else plain) and
    # recorded in config.yaml | step | jinja (the tokenizer's own chat template) | plain (User:/Assistant:)
    template: str = "auto"
    # BOS in front of the step / plain template; null: the convention (step1: yes, step_audio_2: no, other
    # step tokenizers: when they have a BOS, plain: when the tokenizer adds BOS by itself)
    bos: bool | None = None
    system: str | None = None  # default system prompt for rows without one
    loss_on: str = "all_assistant"  # all_assistant | last_assistant
    max_length: int = 1024
    truncation: str = "right"  # right (cut the end) | left (keep the end) | drop (skip the row)
    packing: bool = False  # concatenate rows into max_length bins; attention never crosses rows
    group_by_length: bool = True  # batch rows of similar length (less padding)
    shuffle: bool = True
    on_error: str = "error"  # error: stop at the first bad row | skip: skip it and count it
    eval_fraction: float = 0.0  # hold out this fraction of train rows when eval_files is empty
    max_audio_seconds: float = 600.0  # longer clips are bad rows (cut into 25 s chunks below this)
    audio_last_turn_only: bool = False  # earlier heard clips -> their "transcripts" text (Step-Audio multi-turn SFT)
    audio_tokenizer: str | None = None  # spoken replies -> codes: "kmeans:DIR" | "cosyvoice2:DIR" | "stepaudio:DIR"
    # "T:A" (e.g. "10:15"): an assistant turn "TRANSCRIPT<audio>" is a spoken reply whose transcript tokens
    # interleave with its audio tokens, T text then A audio, inside <tts_start> ... <tts_end>. None: the
    # turn's text stays text and the audio tokens follow it as one block.
    reply_interleave: str | None = None
    # recipe=dpo|reward: add this fraction of "deaf" pairs (rejected = another clip's reply) per audio row
    deaf_negatives: float = 0.0


@dataclass
class ObjectiveConfig:
    audio_loss_weight: float = 1.0  # weight of discrete-audio-token targets relative to text targets
    # > 0: the LM head's loss / log-probs are computed this many labelled tokens at a time from the last
    # hidden states (objectives/chunked_head.py), never materialising [B, T, V] logits (Step-Audio 2's V is
    # 158,720); equal to the plain head to rounding. SFT, DPO, GRPO, PPO (policy, reference, KL). 0: the
    # plain head (full logits). Refused with engine=megatron, ZeRO-3 and engine.find_unused_parameters; a head
    # wrapped by peft or followed by a logit transform (soft-capping) falls back to plain logits, with a warning.
    head_chunk_tokens: int = 0
    # --- preference optimisation (recipe=dpo) ---
    loss: str = "sigmoid"  # a name in steptrain/objectives/registry.py (PREFERENCE_LOSSES; math: preference.py)
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo / robust: assumed fraction of flipped preference labels
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    # Where reference log-probs come from: precompute (once, before training, cached in output_dir),
    # adapter_off (the LoRA policy with its adapter disabled: no second model), model (ref_model_path).
    reference: str = "precompute"
    ref_model_path: str | None = None
    length_normalize: bool = False  # per-token mean log-probs instead of sums (sigmoid / cdpo / robust)
    mask_audio: bool = False  # leave discrete audio tokens out of the log-probs (Step-Audio-AQAA)
    # Dropout off in the policy (as TRL does): the reference is scored without dropout, so with dropout
    # on the first loss is not log 2 and the preference signal is noisier.
    disable_dropout: bool = True
    # One row per pair (prompt once, then both replies; a 4D mask keeps them apart) instead of two rows:
    # the prompt's compute is shared. Text-only data; heard audio always uses two rows.
    share_prompt: bool = True
    # --- online RL (recipe=grpo); see steptrain/objectives/rl.py and steptrain/rollout/rewards.py ---
    # Reward name -> weight (0: off); the reward of a completion is the weighted sum. Built-ins: REWARDS in
    # steptrain/rollout/registry.py (accuracy, mgrd, ...); other names are looked up in reward_functions.
    rewards: dict[str, float] = field(default_factory=dict)
    reward_functions: dict[str, str] = field(default_factory=dict)  # your own: name -> "module:function"
    advantage: str = "group"  # group (GRPO) | mean (Dr. GRPO) | rloo: ADVANTAGES in steptrain/objectives/registry.py
    clip_eps: float = 0.2  # PPO clip range below 1 ...
    clip_eps_high: float = 0.2  # ... and above it (DAPO's clip-higher uses 0.28)
    kl_beta: float = 0.0  # weight of the k3 KL to the reference (objective.reference: adapter_off | model)
    loss_agg: str = "token"  # token: mean over all completion tokens of the step | sequence: per-sequence means
    mask_truncated: bool = False  # completions cut at rollout.max_new_tokens get no loss (DAPO)
    think_max_words: int = 512  # think_length reward: the longest thinking that still earns it
    reward_model_path: str | None = None  # the reward_model reward: an HF sequence classifier
    # --- PPO (recipe=ppo): a critic V(s_t) per completion token, GAE advantages ---
    critic_path: str | None = None  # the critic's initial weights (default: model.path; a reward model is common)
    critic_lr: float | None = None  # default: optim.lr
    gamma: float = 1.0  # discount (Step-Audio-R1: 1)
    lam: float = 1.0  # GAE lambda (Step-Audio-R1: 1)
    value_clip: float = 0.2  # clip of the critic's change from its rollout values
    whiten_advantages: bool = True  # normalise each micro-batch's token advantages to mean 0, std 1


@dataclass
class RolloutConfig:
    """Sampling of RL completions (recipe=grpo). trainer.batch_size counts prompts; each gets a group."""

    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    batch_size: int = 0  # sequences per generate() call; 0: a micro-batch's prompts x G at once


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    modules_to_save: list[str] = field(default_factory=list)
    train_new_tokens: bool = True  # make embedding rows of tokens added to the vocabulary trainable


@dataclass
class EngineConfig:
    name: str = "single"  # a name in steptrain/engines/__init__.py (ENGINES)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    find_unused_parameters: bool = False
    # --- deepspeed only (engine=deepspeed) ---
    zero_stage: int = 3  # 1 | 2 | 3 (0: no ZeRO, what engine=megatron sets)
    offload_optimizer: str = "none"  # none | cpu: optimizer states (and the update) in host memory
    offload_param: str = "none"  # none | cpu: ZeRO-3 parameter partitions in host memory
    # Build pretrained models already partitioned (zero.Init), so a model larger than one rank fits.
    zero_init: bool = True
    # DeepSpeed's C++ Adam (needed to train fast with an offloaded optimizer; compiles on first use).
    # false: torch.optim.AdamW, nothing compiles.
    ds_cpu_adam: bool = False
    # Also write the gathered trainable weights (model.safetensors) at every checkpoint (deepspeed and
    # megatron). Cheap for LoRA; for full fine-tuning of a large DeepSpeed model set false: export then
    # consolidates the ZeRO shards.
    consolidate_on_save: bool = True
    config_file: str | None = None  # a DeepSpeed JSON to start from; checked against steptrain's settings
    # --- megatron only (engine=megatron); world size = data x pipeline_parallel x tensor_parallel ---
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1  # model chunks per pipeline rank (> 1: the interleaved 1F1B schedule)
    # Run megatron-core on a machine without CUDA (gloo, a small shim; for tests and debugging only).
    megatron_cpu: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    # lr 0 for the first N steps, then warmup and decay over the rest (recipe=ppo: the critic warm-up, when
    # only the critic learns; the critic's own schedule does not hold)
    hold_steps: int = 0
    # Learning-rate multipliers by parameter-name regex, e.g. {"embed_tokens": 5.0, "lm_head": 5.0}.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 0  # optimizer steps; 0 means `epochs` full passes
    epochs: int = 1
    batch_size: int = 4  # rows per device per micro-batch
    grad_accum: int = 1
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted after a good save)
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the start and the end
    eval_batches: int = 0  # cap on eval micro-batches (0: all)
    generate_eval: int = 0  # rows of the eval set scored by greedy generation (exact match); 0: off
    max_new_tokens: int = 64


@dataclass
class LoggingConfig:
    log_every: int = 10  # console/progress-bar cadence in steps; metrics.jsonl gets every step
    progress_bar: bool = True  # on a terminal; elsewhere a log line every log_every steps
    tensorboard: bool = True
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "steptrain"
    plot: bool = True  # loss-curve PNG at the end of a run


@dataclass
class TrainConfig:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = MISSING
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | none | PATH
    experiment: str | None = None  # name of the preset this run started from (informational)


# objective.rewards of an online-RL run that names none (steptrain/config/compose.py: apply_recipe_defaults).
DEFAULT_RL_REWARDS = {"accuracy": 1.0}

# objective.rewards names that need no objective.reward_functions entry (steptrain/rollout/registry.py).
BUILTIN_REWARDS = tuple(REWARDS)

# Allowed values of enumerated string fields, checked in validate.py with the valid choices named.
CHOICES: dict[str, tuple[str, ...]] = {
    "recipe.name": tuple(RECIPES),
    "objective.advantage": tuple(ADVANTAGES),
    "objective.loss_agg": ("token", "sequence"),
    "objective.loss": tuple(PREFERENCE_LOSSES),
    "objective.reference": ("precompute", "adapter_off", "model"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "model.new_token_init": ("mean", "random"),
    "data.template": TEMPLATES,
    "data.loss_on": ("all_assistant", "last_assistant"),
    "data.truncation": ("right", "left", "drop"),
    "data.on_error": ("error", "skip"),
    "peft.method": ("none", "lora"),
    "engine.name": tuple(ENGINES),
    "engine.zero_stage": (0, 1, 2, 3),
    "engine.offload_optimizer": ("none", "cpu"),
    "engine.offload_param": ("none", "cpu"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "engine.device": ("auto", "cpu", "cuda"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "logging.wandb": ("disabled", "offline", "online"),
}
