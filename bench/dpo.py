"""DPO throughput benchmark: steptrain's DPO recipe vs TRL's DPOTrainer, on one CPU machine, in one run.

    python bench/dpo.py --threads 1   # the full benchmark: 2 rounds x (2 warmup + 10 timed steps of 32 pairs)
                                      # per contender, about 3.5 min on a 2-core machine
    python bench/dpo.py --quick       # smoke run: 1 round of 1 warmup + 2 timed steps of 8 pairs (~30 s)

Everything is built in a temporary directory in the same run: ``data_pipelines.make_demo`` writes the demo
tokenizer (Step special tokens and the Step Jinja chat template) and one randomly initialised "small-20m"
Qwen2 saved with ``save_pretrained``, so both contenders start from the same weights;
``data_pipelines.preference_corpus`` writes the preference pairs (ms-swift: ``messages`` +
``rejected_response``), which are also converted to TRL's conversational format (``prompt`` / ``chosen`` /
``rejected`` message lists) for the same conversations.

Each contender trains in its own subprocess, one after the other (ABBA order over --rounds, best round reported),
with --threads torch threads (default: every usable core):

    steptrain   steptrain.recipes.dpo.run (experiment=dpo), data.template=jinja: the tokenizer's own template,
                objective.reference=precompute (its default): reference log-probs of every pair before step 1
    trl         trl.DPOTrainer with precompute_ref_log_probs=True (the matching mode), the same template

Both: sigmoid loss, beta 0.1, fp32, AdamW (lr, cosine schedule, no warmup, no weight decay, clipping at 1.0),
the same pairs per optimizer step, max_length, seed, and by default the same pairs in the same order
(``--order same``: both read the file sequentially; ``--order default``: each framework's own sampler).

Timing: the reference precompute is timed on its own (the call that computes every pair's reference log-probs,
in each framework). Training is timed like bench/sft.py: the wall time between the end of the last warmup step
and the end of the last step, where "end of a step" is the moment its optimizer step is done (steptrain: its
metrics record is logged; TRL: on_step_end); data loading, collation and per-step logging are inside the window
for both. Pairs are counted from the batches each framework actually feeds its model.

Checks, recorded in the results JSON: both frameworks tokenize every pair identically (token ids and the
scored reply tokens), their precomputed reference log-probs agree, the step-1 losses are log 2, and the loss
curves agree (max relative difference per step).

Results go to bench/results/dpo.json and a Markdown table on stdout; --update-readme also rewrites the results
block of the DPO section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
    machine_info,
    markdown_table,
    peak_matmul_flops,
    replace_readme_block,
    usable_cores,
    versions,
)

RESULTS = ROOT / "bench" / "results" / "dpo.json"
README = ROOT / "bench" / "README.md"
README_START, README_END = "<!-- dpo-results:start -->", "<!-- dpo-results:end -->"
PRESET = "small-20m"

FULL = {"pairs_per_step": 32, "steps": 10, "warmup": 2, "rounds": 2, "max_length": 128, "matmul_size": 2048}
QUICK = {"pairs_per_step": 8, "steps": 2, "warmup": 1, "rounds": 1, "max_length": 128, "matmul_size": 1024}

CONTENDERS: dict[str, dict] = {
    "steptrain": {"framework": "steptrain", "label": "steptrain DPO recipe (reference=precompute)"},
    "trl": {"framework": "trl", "label": "TRL DPOTrainer (precompute_ref_log_probs=True)"},
}


def _repo_on_path() -> None:
    """`python bench/dpo.py` puts bench/ on sys.path; the repository root holds data_pipelines."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --- data and model ---------------------------------------------------------------------------------------


def prepare(work: Path, n_pairs: int, seed: int) -> dict:
    """Demo tokenizer + small-20m model directory, preference pairs in both formats, and facts about them."""
    _repo_on_path()
    import torch
    from transformers import AutoModelForCausalLM

    from data_pipelines.make_demo import make_demo
    from data_pipelines.preference_corpus import write_preference_corpus

    t0 = time.perf_counter()
    demo = make_demo(work / "demo", seed=seed, preset=PRESET)  # demo corpus -> tokenizer; model after manual_seed
    paths = write_preference_corpus(work / "pairs", n_train=n_pairs, n_eval=0, seed=seed)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines() if line.strip()]
    trl_file = work / "pairs" / "pref_train_trl.jsonl"
    with trl_file.open("w") as f:
        for row in rows:  # the same conversations: the prompt turns, then the chosen or the rejected reply
            f.write(json.dumps({
                "prompt": row["messages"][:-1],
                "chosen": [row["messages"][-1]],
                "rejected": [{"role": "assistant", "content": row["rejected_response"]}],
            }) + "\n")
    model = AutoModelForCausalLM.from_pretrained(demo["model"], dtype=torch.float32)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "model_dir": demo["model"],
        "data_file": str(paths["train"]),
        "trl_data_file": str(trl_file),
        "prepare_s": round(time.perf_counter() - t0, 1),
        "model": {
            "preset": PRESET,
            "vocab_size": cfg.vocab_size,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_matmul_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
            "n_layers": cfg.num_hidden_layers,
            "d_attn": cfg.num_attention_heads * head_dim,
            "hidden_size": cfg.hidden_size,
            "attn_implementation": "sdpa",
            "dtype": "float32",
        },
    }


# --- workers (one subprocess per contender) ---------------------------------------------------------------


class _Counts:
    """What one optimizer step fed the model: pairs, real (non-pad) tokens, tensor slots, scored reply tokens."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.pairs = self.tokens = self.slots = self.reply_tokens = 0

    def add(self, pairs: int, tokens: int, slots: int, reply_tokens: int):
        self.pairs += pairs
        self.tokens += tokens
        self.slots += slots
        self.reply_tokens += reply_tokens

    def pop(self) -> dict:
        out = {k: getattr(self, k) for k in ("pairs", "tokens", "slots", "reply_tokens")}
        self.reset()
        return out


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
        f"optim.lr={spec['lr']}",
        "optim.scheduler=cosine",
        "optim.warmup_ratio=0.0",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        "engine.device=cpu",
        "resume=none",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        "logging.wandb=disabled",
    ]


def _worker_steptrain(spec: dict) -> dict:
    import logging

    import torch
    from safetensors.torch import load_file

    import steptrain.recipes.dpo as dpo
    import steptrain.recipes.pairs as run_pairs
    from steptrain.config import load_config
    from steptrain.logging import MetricsLogger

    overrides = _steptrain_overrides(spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(overrides)
    counts, steps, timing, encoded = _Counts(), [], {}, {}
    batch, shared_batch, log, precomputed, load_data = (
        dpo.PairBatches.batch, dpo.SharedPromptBatches.batch, MetricsLogger.log, dpo.precomputed_reference,
        run_pairs.load_preference_data)
    compute = dpo.compute_reference

    def counting_batch(self, rows):
        out = batch(self, rows)
        counts.add(len(out["pair_ids"]), int(out["attention_mask"].sum()), out["input_ids"].numel(),
                   int((out["labels"][:, 1:] != -100).sum()))
        return out

    def counting_shared_batch(self, rows):  # one row per pair: the prompt once, then both replies
        out = shared_batch(self, rows)
        replies = sum(int((out[f"{side}_targets"] != -100).sum()) for side in ("chosen", "rejected"))
        counts.add(len(out["pair_ids"]), sum(self.lengths[i] for i in out["pair_ids"].tolist()),
                   out["input_ids"].numel(), replies)
        return out

    def timed_log(self, record):
        if "loss" in record and "eval/loss" not in record:  # a train step's record
            steps.append({"t_end": time.perf_counter(), **counts.pop(), "loss": record["loss"]})
        return log(self, record)

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
    MetricsLogger.log = timed_log
    dpo.precomputed_reference = timed_precompute
    dpo.compute_reference = timed_compute
    run_pairs.load_preference_data = recording_load
    t0 = time.perf_counter()
    dpo.run(cfg)
    run_s = time.perf_counter() - t0

    out = Path(spec["out_dir"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [m for m in metrics if "loss" in m and "eval/loss" not in m]
    for step, record in zip(steps, train_records, strict=True):  # steptrain's own per-step figures
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


def _worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(spec["trl_data_file"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])  # its own Step Jinja chat template
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    options = {
        "max_steps": spec["max_steps"],
        "per_device_train_batch_size": spec["pairs_per_step"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": False,  # TRL's default is on
        "fp16": False,
        "activation_checkpointing": False,  # TRL's default is on
        "use_cpu": True,
        "seed": spec["seed"],
        "max_length": spec["max_length"],
        "loss_type": ["sigmoid"],
        "beta": spec["beta"],
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": spec["pairs_per_step"],
        "train_sampling_strategy": "sequential" if spec["order"] == "same" else "random",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
    }
    args = DPOConfig(output_dir=spec["out_dir"], **options)
    counts, steps, losses, timing = _Counts(), [], {}, {}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timing[f"reference_s_{name}"] = time.perf_counter() - t0
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                counts.add(inputs["input_ids"].shape[0] // 2, int(inputs["attention_mask"].sum()),
                           inputs["input_ids"].numel(), int(inputs["completion_mask"][:, 1:].sum()))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"t_end": time.perf_counter(), **counts.pop()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = {"loss": logs["loss"], "reward_accuracy": logs.get("rewards/accuracies"),
                                             "grad_norm": logs.get("grad_norm")}

    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
    init_s = time.perf_counter() - t0
    prepared = trainer.train_dataset
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    for i, step in enumerate(steps, 1):
        step.update(losses.get(i, {"loss": None}))
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


def run_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    _repo_on_path()
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    result = (_worker_steptrain if spec["framework"] == "steptrain" else _worker_trl)(spec)
    result["worker_s"] = time.perf_counter() - t0
    Path(spec["result_path"]).write_text(json.dumps(result))


# --- driver -----------------------------------------------------------------------------------------------


def run_contender(name: str, spec: dict, work: Path, round_: int) -> dict:
    tag = f"{name}-r{round_}"  # a fresh output directory per run: no cached reference log-probs are reused
    spec_path = work / f"{tag}.spec.json"
    spec = {**spec, **CONTENDERS[name], "out_dir": str(work / f"run-{tag}"), "result_path": str(work / f"{tag}.result.json")}
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{tag}.log"
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(Path(spec["result_path"]).read_text())
    result["wall_s"] = wall
    result["load_avg_at_start"] = load
    return result


def summarize_round(name: str, result: dict, warmup: int, model: dict, peak: float) -> dict:
    steps = result["steps"]
    if len(steps) <= warmup:
        raise RuntimeError(f"{name}: only {len(steps)} steps recorded, warmup is {warmup}")
    timed = steps[warmup:]
    seconds = timed[-1]["t_end"] - steps[warmup - 1]["t_end"]
    total = {k: sum(s[k] for s in timed) for k in ("pairs", "tokens", "slots", "reply_tokens")}
    # Model FLOPs of a training step: 6 per matmul weight per real token (forward 2 + backward 4; attention
    # scores not counted: at ~32 tokens per sequence they would add about 1%). Padding is not counted.
    flops = 6 * model["n_matmul_params"] * total["tokens"]
    n_ref_tokens = sum(len(e[0]) + len(e[2]) for e in result["encoded"])
    out = {
        "name": name,
        **CONTENDERS[name],
        "steps_timed": len(timed),
        "seconds_timed": seconds,
        "step_time_s": seconds / len(timed),
        "pairs_per_s": total["pairs"] / seconds,
        "tokens_per_s": total["tokens"] / seconds,
        "pairs_per_step": total["pairs"] / len(timed),
        "tokens_per_step": total["tokens"] / len(timed),
        "padding_fraction": 1 - total["tokens"] / total["slots"],
        "mfu": flops / seconds / peak,
        "reference_s": result["reference_s"],
        "reference_pairs": len(result["encoded"]),
        "reference_pairs_per_s": len(result["encoded"]) / result["reference_s"],
        "reference_mfu": 2 * model["n_matmul_params"] * n_ref_tokens / result["reference_s"] / peak,
        "losses": [s.get("loss") for s in steps],
        "reward_accuracy": [s.get("reward_accuracy") for s in steps],
        "loss_first": steps[0].get("loss"),
        "loss_last": steps[-1].get("loss"),
        "threads": result["threads"],
        "optimizer": result["optimizer"],
        "options": result["options"],
        "worker_wall_s": result["wall_s"],
        "load_avg_at_start": result["load_avg_at_start"],
        **{k: result[k] for k in ("activation_checkpointing", "ref_model_in_memory", "init_s", "reference_forward_s")
           if k in result},
    }
    if all("own_step_time" in s for s in timed):  # steptrain's own clock: batch fetch to optimizer step, no logging
        own = sum(s["own_step_time"] for s in timed)
        out["own_step_time_s"] = own / len(timed)
        out["own_pairs_per_s"] = sum(s["own_pairs"] for s in timed) / own
    return out


def summarize(name: str, rounds: list[dict], warmup: int, model: dict, peak: float) -> dict:
    """The round with the best training pairs/s (noise on a shared machine only ever adds time), plus every
    round's figures; the reference precompute likewise reports its best round."""
    per = [summarize_round(name, r, warmup, model, peak) for r in rounds]
    best = max(per, key=lambda c: c["pairs_per_s"])
    ref_best = max(per, key=lambda c: c["reference_pairs_per_s"])
    by_speed = sorted(c["pairs_per_s"] for c in per)
    return {
        **best,
        **{k: ref_best[k] for k in ("reference_s", "reference_pairs_per_s", "reference_mfu")},
        "pairs_per_s_median": by_speed[len(by_speed) // 2] if len(by_speed) % 2 else
        (by_speed[len(by_speed) // 2 - 1] + by_speed[len(by_speed) // 2]) / 2,
        "rounds": [{k: c.get(k) for k in ("pairs_per_s", "step_time_s", "own_step_time_s", "reference_s",
                                          "worker_wall_s", "load_avg_at_start")} for c in per],
    }


def checks(results: dict) -> dict:
    """Same tokenization, same reference log-probs, step-1 loss = log 2, similar loss curves."""
    out: dict = {"log2": math.log(2)}
    if "steptrain" not in results or "trl" not in results:
        return out
    s, t = results["steptrain"][0], results["trl"][0]
    n = min(len(s["encoded"]), len(t["encoded"]))
    out["pairs_compared"] = n
    out["pair_count"] = {"steptrain": len(s["encoded"]), "trl": len(t["encoded"])}
    out["token_mismatches"] = sum(s["encoded"][i][k] != t["encoded"][i][k] for i in range(n) for k in (0, 2))
    out["reply_mask_mismatches"] = sum(s["encoded"][i][k] != t["encoded"][i][k] for i in range(n) for k in (1, 3))
    diffs, scale = [], []
    for side in ("chosen", "rejected"):
        for a, b in zip(s["reference_logps"][side], t["reference_logps"][side], strict=True):
            diffs.append(abs(a - b))
            scale.append(abs(b))
    out["reference_logps_max_abs_diff"] = max(diffs)
    out["reference_logps_max_rel_diff"] = max(d / max(c, 1e-12) for d, c in zip(diffs, scale, strict=True))
    out["reference_logps_mean_abs"] = sum(scale) / len(scale)
    ls, lt = [x["loss"] for x in s["steps"]], [x["loss"] for x in t["steps"]]
    out["loss_step1"] = {"steptrain": ls[0], "trl": lt[0]}
    out["loss_step1_minus_log2"] = {"steptrain": ls[0] - math.log(2), "trl": lt[0] - math.log(2)}
    rel = [abs(a - b) / abs(b) for a, b in zip(ls, lt, strict=False) if a is not None and b is not None]
    out["loss_max_rel_diff"] = max(rel)
    out["loss_max_rel_diff_step"] = rel.index(max(rel)) + 1
    out["loss_mean_rel_diff"] = sum(rel) / len(rel)
    return out


def data_facts(encoded: list) -> dict:
    """Token counts of the pairs (from one framework's encoding): what a forward of both full sequences costs,
    and what it would cost with the shared prompt computed once (prefix sharing)."""
    import statistics

    prompt = [e[1].index(1) for e in encoded]
    chosen = [len(e[0]) - p for e, p in zip(encoded, prompt, strict=True)]
    rejected = [len(e[2]) - p for e, p in zip(encoded, prompt, strict=True)]
    full = sum(len(e[0]) + len(e[2]) for e in encoded)
    shared = sum(p + c + r for p, c, r in zip(prompt, chosen, rejected, strict=True))
    lengths = [len(e[0]) for e in encoded] + [len(e[2]) for e in encoded]
    return {
        "pairs": len(encoded),
        "sequence_tokens": {"min": min(lengths), "mean": round(statistics.fmean(lengths), 1), "max": max(lengths)},
        "prompt_tokens_mean": round(statistics.fmean(prompt), 1),
        "reply_tokens_mean": round(statistics.fmean(chosen + rejected), 1),
        "tokens_per_pair": full / len(encoded),
        "tokens_per_pair_prompt_shared": shared / len(encoded),
        "prefix_sharing_saving": 1 - shared / full,
    }


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def tables(res: dict) -> str:
    rows = []
    for c in res["contenders"]:
        rows.append([
            c["label"], _fmt(c["pairs_per_step"]), _fmt(c["tokens_per_step"]), f"{100 * c['padding_fraction']:.1f}%",
            _fmt(c["step_time_s"], 2), _fmt(c["pairs_per_s"], 1), _fmt(c["tokens_per_s"]), f"{100 * c['mfu']:.1f}%",
            f"{_fmt(c['reference_s'], 1)} ({_fmt(c['reference_pairs_per_s'], 1)} pairs/s)",
            f"{c['loss_first']:.4f} → {c['loss_last']:.4f}" if c["loss_first"] is not None else "n/a",
        ])
    out = [markdown_table(["contender", "pairs/step", "real tokens/step", "padding", "step time (s)", "pairs/s",
                           "tokens/s", "MFU", f"reference precompute, s ({res['contenders'][0]['reference_pairs']} "
                           "pairs)", "loss step 1 → last"], rows)]
    if res["ratios"]:
        out.append("")
        out.append(markdown_table(["ratio steptrain / TRL", "value"],
                                  [[k, f"{v:.2f}x"] for k, v in res["ratios"].items()]))
    out.append("")
    for c in res["contenders"]:
        rounds = ", ".join(f"{r['pairs_per_s']:.1f}" for r in c["rounds"])
        refs = ", ".join(f"{r['reference_s']:.1f}" for r in c["rounds"])
        out.append(f"- {c['name']}, every round: training pairs/s {rounds} (median {c['pairs_per_s_median']:.1f}); "
                   f"reference precompute s {refs}.")
    d = res.get("data")
    if d:
        out.append("")
        out.append(
            f"Data: sequences of {d['sequence_tokens']['min']}-{d['sequence_tokens']['max']} tokens (mean "
            f"{d['sequence_tokens']['mean']}): prompt {d['prompt_tokens_mean']} + reply {d['reply_tokens_mean']} on "
            f"average; {d['tokens_per_pair']:.1f} tokens per pair as two sequences, "
            f"{d['tokens_per_pair_prompt_shared']:.1f} with the prompt computed once "
            f"({100 * d['prefix_sharing_saving']:.0f}% fewer)."
        )
    ch = res.get("checks", {})
    if "loss_max_rel_diff" in ch:
        out.append("")
        out.append(
            f"Checks: token-id mismatches {ch['token_mismatches']}, reply-mask mismatches "
            f"{ch['reply_mask_mismatches']} over {ch['pairs_compared']} pairs; reference log-probs max abs diff "
            f"{ch['reference_logps_max_abs_diff']:.2e} (mean |log-prob| {ch['reference_logps_mean_abs']:.1f}); "
            f"step-1 loss - log 2: steptrain {ch['loss_step1_minus_log2']['steptrain']:+.1e}, TRL "
            f"{ch['loss_step1_minus_log2']['trl']:+.1e}; loss curves, per step |steptrain - TRL| / TRL: max "
            f"{ch['loss_max_rel_diff']:.1e} (step {ch['loss_max_rel_diff_step']}), mean {ch['loss_mean_rel_diff']:.1e}."
        )
    return "\n".join(out)


def ratios(by_name: dict) -> dict:
    if "steptrain" not in by_name or "trl" not in by_name:
        return {}
    s, t = by_name["steptrain"], by_name["trl"]
    return {
        "training pairs/s": s["pairs_per_s"] / t["pairs_per_s"],
        "reference precompute pairs/s": s["reference_pairs_per_s"] / t["reference_pairs_per_s"],
        "end to end (precompute + timed steps) pairs/s":
            ((s["reference_pairs"] + s["pairs_per_step"] * s["steps_timed"]) / (s["reference_s"] + s["seconds_timed"]))
            / ((t["reference_pairs"] + t["pairs_per_step"] * t["steps_timed"]) / (t["reference_s"] + t["seconds_timed"])),
    }


def readme_block(res: dict) -> str:
    m, v, s, pk = res["machine"], res["versions"], res["settings"], res["peak_matmul"]
    kind = ("**Smoke run (`--quick`): tiny step counts on a shared machine, not a measurement; to be replaced by "
            "a full run.**" if s["quick"] else "Full run.")
    lines = [
        kind,
        "",
        f"Machine: {m['cpu_model']}, {m['cores_usable']} usable cores ({', '.join(m['simd']) or 'no SIMD flags'}), "
        f"{m['memory_gib']} GiB; load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'] or [])}"
        f", at end {', '.join(f'{x:.2f}' for x in res.get('load_avg_at_end') or [])}.",
        f"Versions: steptrain {v['steptrain']} ({v['steptrain_git']}), torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}, accelerate {v['accelerate']}, datasets {v['datasets']}.",
        f"Peak fp32 matmul ({pk['size']}x{pk['size']}, {pk['threads']} thread(s)): {pk['before'] / 1e9:.1f} GFLOP/s "
        f"before the contenders, {pk['after'] / 1e9:.1f} after; MFU uses the better one.",
        f"Settings: {s['pairs']} pairs, {s['pairs_per_step']} pairs/step, max_length {s['max_length']}, "
        f"{s['warmup']} warmup + {s['steps']} timed steps, {s['rounds']} round(s) per contender (ABBA order, best "
        f"reported), order {s['order']}, lr {s['lr']}, beta {s['beta']}, "
        f"{s['threads']} torch thread(s) per contender; model "
        f"{res['model']['preset']} at the demo tokenizer's vocabulary ({res['model']['vocab_size']}): "
        f"{res['model']['n_params'] / 1e6:.2f}M params.",
        "",
        tables(res),
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    p.add_argument("--steps", type=int, help=f"timed optimizer steps per contender (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps before them, >= 1 (default {FULL['warmup']})")
    p.add_argument("--pairs-per-step", type=int, help=f"pairs per optimizer step (default {FULL['pairs_per_step']})")
    p.add_argument("--max-length", type=int, help=f"max tokens per sequence (default {FULL['max_length']})")
    p.add_argument("--pairs", type=int,
                   help="preference pairs generated, all of them reference-scored (default: exactly the pairs the "
                        "warmup and timed steps use, one epoch)")
    p.add_argument("--order", default="same", choices=["same", "default"],
                   help="same: both read the pairs in file order (same batches, comparable loss curves); default: "
                        "each framework's own sampler (steptrain shuffled group_by_length, TRL random)")
    p.add_argument("--matmul-size", type=int, help=f"square matmul for peak FLOP/s (default {FULL['matmul_size']})")
    p.add_argument("--rounds", type=int,
                   help=f"runs per contender, in ABBA order; the best is reported (default {FULL['rounds']})")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per contender and for the peak matmul (default 0: every usable core); on a "
                        "machine shared with other work, 1 is far steadier (see bench/README.md)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--work-dir", type=Path, help="keep data, model, logs and metrics.jsonl here (default: temp dir)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the DPO results block of bench/README.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    base = QUICK if args.quick else FULL
    for key, default in base.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1 (the timed window starts at the end of the last "
                "warmup step)")
    needed = (args.warmup + args.steps) * args.pairs_per_step
    if args.pairs is None:
        args.pairs = needed
    elif args.pairs < needed:
        p.error(f"--pairs {args.pairs} < (warmup + steps) x pairs-per-step = {needed}")
    names = args.only.split(",") if args.only else list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; valid: {', '.join(CONTENDERS)}")
    args.contenders = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    import torch

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    res = {"settings": {"quick": args.quick, **{k: getattr(args, k) for k in
                                                ("steps", "warmup", "rounds", "pairs_per_step", "pairs", "max_length", "order",
                                                 "matmul_size", "lr", "beta", "seed")},
                        "threads": threads, "contenders": args.contenders},
           "machine": machine_info(), "versions": versions()}
    print(f"machine: {res['machine']['cpu_model']}, {threads} torch threads; torch {torch.__version__}", flush=True)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="steptrain-bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    failures = []
    try:
        assets = prepare(work, args.pairs, args.seed)
        res["model"] = assets["model"]
        print(f"data: {args.pairs} pairs; model {assets['model']['n_params']:,} params "
              f"(V={assets['model']['vocab_size']}); prepared in {assets['prepare_s']}s", flush=True)
        peaks = [peak_matmul_flops(args.matmul_size, trials=3 if args.quick else 5)]
        print(f"peak fp32 matmul: {peaks[0]['best_flops'] / 1e9:.1f} GFLOP/s", flush=True)
        spec = {"model_dir": assets["model_dir"], "data_file": assets["data_file"],
                "trl_data_file": assets["trl_data_file"], "max_length": args.max_length,
                "max_steps": args.warmup + args.steps, "pairs_per_step": args.pairs_per_step, "lr": args.lr,
                "beta": args.beta, "seed": args.seed, "order": args.order, "threads": threads}
        results: dict[str, list[dict]] = {name: [] for name in args.contenders}
        for r in range(args.rounds):  # ABBA...: each contender runs first in every other round
            for name in args.contenders if r % 2 == 0 else args.contenders[::-1]:
                print(f"round {r + 1}/{args.rounds}: running {name} ...", flush=True)
                try:
                    out = run_contender(name, spec, work, r)
                    results[name].append(out)
                    print(f"  done in {out['wall_s']:.0f}s", flush=True)
                except RuntimeError as e:
                    failures.append(str(e))
                    print(e, file=sys.stderr, flush=True)
        results = {name: rounds for name, rounds in results.items() if rounds}
        peaks.append(peak_matmul_flops(args.matmul_size, trials=3 if args.quick else 5))
        best = max(peaks, key=lambda p: p["best_flops"])
        res["peak_matmul"] = {**best, "before": peaks[0]["best_flops"], "after": peaks[1]["best_flops"]}
        summaries = [summarize(n, r, args.warmup, res["model"], best["best_flops"]) for n, r in results.items()]
        res["contenders"] = summaries
        res["ratios"] = ratios({c["name"]: c for c in summaries})
        res["checks"] = checks(results)
        if results:
            res["data"] = data_facts(next(iter(results.values()))[0]["encoded"])
        res["failures"] = failures
        res["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        res["total_wall_s"] = time.perf_counter() - t_start
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(readme_block(res))
    print(f"\nresults: {args.out}  (total {res['total_wall_s']:.0f}s)")
    if args.update_readme:
        replace_readme_block(README, README_START, README_END, readme_block(res))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
