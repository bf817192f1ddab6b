"""The two contenders of bench/grpo.py, each run in its own subprocess (``bench/grpo.py --worker SPEC``):
steptrain's GRPO recipe and TRL's GRPOTrainer, instrumented to time each optimizer step and the generation
inside it, and to count the completions and tokens each framework generated and trained on.

The reward both optimise is :func:`digit_fraction` of the completion text; steptrain imports it as
``grpo_workers:steptrain_digits`` (``objective.reward_functions``), TRL gets :func:`trl_digits`.
"""

from __future__ import annotations

import re
import time

from common import (
    STEPTRAIN_CPU_OVERRIDES,
    TRL_CPU_FP32_OPTIONS,
    TRL_RUN_OPTIONS,
    StepCounts,
    clock_steptrain_steps,
    steptrain_config,
    steptrain_optim_overrides,
    steptrain_train_metrics,
    trl_inputs,
    trl_optim_options,
    trl_step_clock,
)

# --- the reward --------------------------------------------------------------------------------------------

# The demo tokenizer's special tokens as text (<s>, </s>, <unk>, <|EOT|>, <|BOT|>, ...). steptrain decodes a
# completion with its special tokens, TRL without them (skip_special_tokens=True), so they are removed first.
# Only ASCII characters count: the byte-level tokenizer can sample partial UTF-8 sequences, and whether the
# bytes on either side of a removed special token merge into one character (or into U+FFFD) depends on the
# decoding; ASCII bytes decode to themselves either way. So the reward is the same function of the sampled
# token ids in both frameworks.
_SPECIAL = re.compile(r"<\|[A-Za-z_]+\|>|</?s>|<unk>")


def digit_fraction(text: str) -> float:
    """The fraction of the visible ASCII characters of ``text`` (not spaces, not special tokens) that are
    digits; 0 when there are none."""
    chars = [c for c in _SPECIAL.sub("", text) if "!" <= c <= "~"]
    return sum(c in "0123456789" for c in chars) / len(chars) if chars else 0.0


def steptrain_digits(completions: list[str], rows: list[dict]) -> list[float]:
    """steptrain's reward signature: decoded completions and their prompt rows."""
    return [digit_fraction(c) for c in completions]


def trl_digits(completions: list, **kwargs) -> list[float]:
    """TRL's reward signature; in conversational mode a completion is a list of (assistant) messages."""
    return [digit_fraction(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


# --- workers (one subprocess per contender) ---------------------------------------------------------------


def _counts() -> StepCounts:
    """What one optimizer step sampled and trained on: completions, their tokens (EOS included), the real
    prompt + completion tokens and the tensor slots of the training forward, and the seconds spent generating."""
    return StepCounts("completions", "completion_tokens", "tokens", "slots", "generate_s")


def _steptrain_overrides(spec: dict) -> list[str]:
    order = ["data.shuffle=false"] if spec["order"] == "same" else []  # default: shuffled, group_by_length
    return [
        "experiment=grpo",
        f"model.path={spec['model_dir']}",
        f"data.train_files=[{spec['data_file']}]",
        "data.template=jinja",  # the tokenizer's own chat template, as TRL uses it
        *order,
        f"output_dir={spec['out_dir']}",
        f"trainer.max_steps={spec['max_steps']}",
        f"trainer.batch_size={spec['prompts_per_step']}",  # prompts; each gets num_generations completions
        "trainer.grad_accum=1",
        "trainer.save_every=0",
        f"trainer.seed={spec['seed']}",
        "trainer.precision=fp32",
        f"rollout.num_generations={spec['num_generations']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        "rollout.batch_size=0",  # one generate() call for the micro-batch's prompts x G, as TRL does
        "objective.rewards={digits:1.0}",
        "objective.reward_functions={digits:'grpo_workers:steptrain_digits'}",
        "objective.advantage=group",
        "objective.kl_beta=0.0",
        "objective.clip_eps=0.2",
        "objective.clip_eps_high=0.2",
        "objective.loss_agg=token",
        "objective.mask_truncated=false",
        *steptrain_optim_overrides(spec["lr"], "constant"),
        *STEPTRAIN_CPU_OVERRIDES,
    ]


def worker_steptrain(spec: dict) -> dict:
    import torch

    import steptrain.recipes.grpo as grpo

    overrides = _steptrain_overrides(spec)
    cfg = steptrain_config(overrides)
    counts, steps, sampled = _counts(), [], []
    batch, complete = grpo.GRPOTask.batch, grpo.GRPOTask.complete

    def counting_batch(self, rows):
        sampled.extend(self.prompts[i].ids for row in rows for i in row)  # in the order they are rolled out
        out = batch(self, rows)
        counts.add(completions=len(out["advantages"]), completion_tokens=int(out["completion_mask"].sum()),
                   tokens=int(out["attention_mask"].sum()), slots=out["input_ids"].numel())
        return out

    def timed_complete(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = complete(self, *args, **kwargs)
        counts.add(generate_s=time.perf_counter() - t0)
        return out

    def on_step(t_end, record):
        steps.append({"t_end": t_end, **counts.pop()})

    grpo.GRPOTask.batch = counting_batch
    grpo.GRPOTask.complete = timed_complete
    clock_steptrain_steps(on_step)
    t0 = time.perf_counter()
    grpo.run(cfg)
    run_s = time.perf_counter() - t0

    for step, record in zip(steps, steptrain_train_metrics(spec["out_dir"]), strict=True):  # its own figures
        step.update(loss=record["loss"], reward=record["reward"], reward_std=record.get("reward_std"),
                    completion_length=record.get("completion_length"), truncated=record.get("truncated"),
                    grad_norm=record.get("grad_norm"), own_step_time=record["step_time"], own_tokens=record["tokens"])
    return {
        "steps": steps,
        "run_s": run_s,
        "prompt_ids": sampled,
        "threads": torch.get_num_threads(),
        "options": overrides,
        "optimizer": "torch.optim.AdamW (steptrain engine default)",
    }


def worker_trl(spec: dict) -> dict:
    import torch
    from trl import GRPOConfig, GRPOTrainer

    dataset, tokenizer, model = trl_inputs(spec)
    group = spec["num_generations"]
    completions_per_step = spec["prompts_per_step"] * group
    options = {
        "max_steps": spec["max_steps"],
        "per_device_train_batch_size": completions_per_step,  # TRL counts completions, not prompts
        "generation_batch_size": completions_per_step,  # one generation per optimizer step (steps_per_generation 1)
        "gradient_accumulation_steps": 1,
        "num_generations": group,
        "max_completion_length": spec["max_new_tokens"],
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "use_vllm": False,
        "beta": 0.0,
        "num_iterations": 1,
        "epsilon": 0.2,
        "epsilon_high": 0.2,
        "loss_type": "dapo",  # / the step's completion tokens, as steptrain's loss_agg=token (see the README)
        "scale_rewards": "group",
        "mask_truncated_completions": False,
        **trl_optim_options(spec["lr"], "constant"),
        **TRL_CPU_FP32_OPTIONS,
        "seed": spec["seed"],
        "shuffle_dataset": spec["order"] != "same",
        "log_completions": False,
        **TRL_RUN_OPTIONS,
    }
    args = GRPOConfig(output_dir=spec["out_dir"], **options)
    counts, steps, records, sampled = _counts(), [], {}, []

    class TimedGRPOTrainer(GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            if self.model.training:
                sampled.extend(list(ids) for ids in out[0][:: self.num_generations])  # G adjacent copies
            return out

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            counts.add(generate_s=time.perf_counter() - t0)
            return out

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self.model.training:  # the batch the loss is computed on: [left-padded prompt | completion]
                pm, cm = out["prompt_mask"], out["completion_mask"]
                counts.add(completions=cm.shape[0], completion_tokens=int(cm.sum()),
                           tokens=int(pm.sum() + cm.sum()), slots=pm.numel() + cm.numel())
            return out

    t0 = time.perf_counter()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[trl_digits], args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[trl_step_clock(steps, counts, records)])
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    for i, step in enumerate(steps, 1):
        logs = records.get(i, {})
        step.update(loss=logs.get("loss"), reward=logs.get("reward"), reward_std=logs.get("reward_std"),
                    completion_length=logs.get("completions/mean_length"),
                    truncated=logs.get("completions/clipped_ratio"), grad_norm=logs.get("grad_norm"),
                    training_step_time=logs.get("step_time"))  # TRL's own: its training_step, no optimizer step
    return {
        "steps": steps,
        "init_s": init_s,
        "run_s": init_s + train_s,
        "prompt_ids": sampled,
        "threads": torch.get_num_threads(),
        "options": {**options, "attn_implementation": "sdpa", "chat_template": "the tokenizer's (Step, Jinja)",
                    "reward_funcs": ["grpo_workers.trl_digits"]},
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (transformers default)",
        "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "eos_token_ids": list(trainer.eos_token_ids),
        "ref_model_in_memory": trainer.ref_model is not None,
    }

