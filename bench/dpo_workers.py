"""The two contenders of bench/dpo.py, each run in its own subprocess (``bench/dpo.py --worker SPEC``):
steptrain's DPO recipe and TRL's DPOTrainer, instrumented to count the pairs and tokens they feed the
model and to time the training steps and the reference precompute separately."""

from __future__ import annotations

import time
from pathlib import Path

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

# --- workers (one subprocess per contender) ---------------------------------------------------------------


def _counts() -> StepCounts:
    """What one optimizer step fed the model: pairs, real (non-pad) tokens, tensor slots, scored reply tokens."""
    return StepCounts("pairs", "tokens", "slots", "reply_tokens")


def _steptrain_overrides(spec: dict) -> list[str]:
    order = ["data.shuffle=false"] if spec["order"] == "same" else []  # default: shuffled, group_by_length
    return [
        "experiment=dpo",
        f"model.path={spec['model_dir']}",
        f"data.train_files=[{spec['data_file']}]",
        "data.template=jinja",  # the tokenizer's own chat template, as TRL uses it
        f"data.max_length={spec['max_length']}",
        *order,
        f"output_dir={spec['out_dir']}",
        f"trainer.max_steps={spec['max_steps']}",
        f"trainer.batch_size={spec['pairs_per_step']}",
        "trainer.grad_accum=1",
        "trainer.save_every=0",
        f"trainer.seed={spec['seed']}",
        "trainer.precision=fp32",
        "objective.loss=sigmoid",
        f"objective.beta={spec['beta']}",
        "objective.reference=precompute",
        *steptrain_optim_overrides(spec["lr"], "cosine"),
        *STEPTRAIN_CPU_OVERRIDES,
    ]


def worker_steptrain(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    import steptrain.recipes.dpo as dpo
    import steptrain.recipes.pairs as run_pairs

    overrides = _steptrain_overrides(spec)
    cfg = steptrain_config(overrides)
    counts, steps, timing, encoded = _counts(), [], {}, {}
    batch, shared_batch, precomputed, load_data = (
        dpo.PairBatches.batch, dpo.SharedPromptBatches.batch, dpo.precomputed_reference, run_pairs.load_preference_data)
    compute = dpo.compute_reference

    def counting_batch(self, rows):
        out = batch(self, rows)
        counts.add(pairs=len(out["pair_ids"]), tokens=int(out["attention_mask"].sum()), slots=out["input_ids"].numel(),
                   reply_tokens=int((out["labels"][:, 1:] != -100).sum()))
        return out

    def counting_shared_batch(self, rows):  # one row per pair: the prompt once, then both replies
        out = shared_batch(self, rows)
        replies = sum(int((out[f"{side}_targets"] != -100).sum()) for side in ("chosen", "rejected"))
        counts.add(pairs=len(out["pair_ids"]), tokens=sum(self.lengths[i] for i in out["pair_ids"].tolist()),
                   slots=out["input_ids"].numel(), reply_tokens=replies)
        return out

    def on_step(t_end, record):
        steps.append({"t_end": t_end, **counts.pop(), "loss": record["loss"]})

    def timed_precompute(*args, **kwargs):
        t0 = time.perf_counter()
        out = precomputed(*args, **kwargs)
        timing["reference_s"] = time.perf_counter() - t0
        counts.reset()  # the reference forwards are not training batches
        return out

    def timed_compute(*args, **kwargs):
        t0 = time.perf_counter()
        out = compute(*args, **kwargs)
        timing["reference_forward_s"] = timing.get("reference_forward_s", 0.0) + time.perf_counter() - t0
        return out

    def recording_load(*args, **kwargs):
        data = load_data(*args, **kwargs)
        encoded["pairs"] = [[c.input_ids, [int(x != -100) for x in c.labels], r.input_ids,
                             [int(x != -100) for x in r.labels]] for c, r in data.pairs]
        return data

    dpo.PairBatches.batch = counting_batch
    dpo.SharedPromptBatches.batch = counting_shared_batch
    clock_steptrain_steps(on_step)
    dpo.precomputed_reference = timed_precompute
    dpo.compute_reference = timed_compute
    run_pairs.load_preference_data = recording_load
    t0 = time.perf_counter()
    dpo.run(cfg)
    run_s = time.perf_counter() - t0

    out = Path(spec["out_dir"])
    for step, record in zip(steps, steptrain_train_metrics(out), strict=True):  # steptrain's own per-step figures
        step.update(own_step_time=record["step_time"], own_pairs=record["pairs"], own_tokens=record["tokens"],
                    reward_accuracy=record.get("rewards/accuracy"), grad_norm=record.get("grad_norm"))
    ref = load_file(str(out / dpo.CACHE))
    return {
        "steps": steps,
        "reference_s": timing["reference_s"],
        "reference_forward_s": timing["reference_forward_s"],
        "run_s": run_s,
        "reference_logps": {"chosen": ref["train_chosen"].tolist(), "rejected": ref["train_rejected"].tolist()},
        "encoded": encoded["pairs"],
        "threads": torch.get_num_threads(),
        "options": overrides,
        "optimizer": "torch.optim.AdamW (steptrain engine default)",
    }


def worker_trl(spec: dict) -> dict:
    import torch
    from trl import DPOConfig, DPOTrainer

    dataset, tokenizer, model = trl_inputs(spec)
    options = {
        "max_steps": spec["max_steps"],
        "per_device_train_batch_size": spec["pairs_per_step"],
        "gradient_accumulation_steps": 1,
        **trl_optim_options(spec["lr"], "cosine"),
        **TRL_CPU_FP32_OPTIONS,
        "seed": spec["seed"],
        "max_length": spec["max_length"],
        "loss_type": ["sigmoid"],
        "beta": spec["beta"],
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": spec["pairs_per_step"],
        "train_sampling_strategy": "sequential" if spec["order"] == "same" else "random",
        **TRL_RUN_OPTIONS,
    }
    args = DPOConfig(output_dir=spec["out_dir"], **options)
    counts, steps, records, timing = _counts(), [], {}, {}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timing[f"reference_s_{name}"] = time.perf_counter() - t0
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                counts.add(pairs=inputs["input_ids"].shape[0] // 2, tokens=int(inputs["attention_mask"].sum()),
                           slots=inputs["input_ids"].numel(), reply_tokens=int(inputs["completion_mask"][:, 1:].sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[trl_step_clock(steps, counts, records)])
    init_s = time.perf_counter() - t0
    prepared = trainer.train_dataset
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    for i, step in enumerate(steps, 1):
        logs = records.get(i)
        step.update({"loss": logs["loss"], "reward_accuracy": logs.get("rewards/accuracies"),
                     "grad_norm": logs.get("grad_norm")} if logs else {"loss": None})
    encoded = []
    for ex in prepared:
        p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
        encoded.append([p + c, [0] * len(p) + [1] * len(c), p + r, [0] * len(p) + [1] * len(r)])
    return {
        "steps": steps,
        "reference_s": timing["reference_s_train"],
        "init_s": init_s,
        "run_s": init_s + train_s,
        "reference_logps": {"chosen": list(prepared["ref_chosen_logps"]),
                            "rejected": list(prepared["ref_rejected_logps"])},
        "encoded": encoded,
        "threads": torch.get_num_threads(),
        "options": {**options, "attn_implementation": "sdpa", "chat_template": "the tokenizer's (Step, Jinja)"},
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} (transformers default)",
        "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "ref_model_in_memory": trainer.ref_model is not None,
    }
