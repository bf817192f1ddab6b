"""GRPO throughput benchmark: steptrain's GRPO recipe vs TRL's GRPOTrainer, on one CPU machine, in one run.

    python bench/grpo.py --threads 1   # the full benchmark: 2 rounds x (2 warmup + 10 timed steps of 2 prompts
                                       # x 8 completions of up to 32 tokens) per contender, about 4 min on 2 cores
    python bench/grpo.py --quick       # smoke run: 1 round of 1 warmup + 2 timed steps of 1 prompt x 8 completions

Everything is built in a temporary directory in the same run: ``data_pipelines.make_demo`` writes the demo
tokenizer (Step special tokens and the Step Jinja chat template), the digit-task conversations and one randomly
initialised "small-20m" Qwen2 saved with ``save_pretrained``, so both contenders start from the same weights.
The prompts are the first conversations of the demo's train.jsonl without their assistant reply, written as
ms-swift GRPO rows (``messages`` ending with the user turn, plus ``solution``) for steptrain and in TRL's
conversational format (``prompt``: the same messages, plus ``solution``).

Each contender trains in its own subprocess, one after the other (ABBA order over --rounds, best round reported),
with --threads torch threads (default: every usable core):

    steptrain   steptrain.recipes.grpo.run (experiment=grpo), data.template=jinja: the tokenizer's own template
    trl         trl.GRPOTrainer with the same template, transformers' generate (no vLLM)

Both: the same prompts per optimizer step (by default in the same order: --order same), num_generations G = 8,
max_new_tokens, temperature 1 / top_p 1 / top_k 0, the same reward (grpo_workers.digit_fraction: the fraction of
the completion's non-space characters that are digits), group-normalised advantages (std within each prompt's
group), no KL (beta 0), clip 0.2 on both sides, one update per rollout, the loss summed over completion tokens and
divided by the step's completion tokens, fp32, AdamW (lr, constant schedule, no warmup, no weight decay, clipping
at 1.0), KV cache in generation, seed.

Timing, as bench/dpo.py: the wall time between the end of the last warmup step and the end of the last step, where
"end of a step" is the moment its optimizer step is done (steptrain: its metrics record is logged; TRL:
on_step_end). Rollout generation, reward scoring, the loss forward/backward, the optimizer step and per-step
logging are all inside the window; the seconds spent in generate() are also timed on their own. Completions and
tokens are counted from the batches each framework actually built.

Checks, recorded in the results JSON: both frameworks rolled out the same prompts, step by step, with identical
token ids; the mean reward per step is recorded for both (it should rise).

Results go to bench/results/grpo.json and a Markdown table on stdout; --update-readme also rewrites the results
block of the GRPO section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    add_output_options,
    add_round_options,
    chosen_contenders,
    driver_parser,
    fmt,
    machine_info,
    markdown_table,
    model_facts,
    readme_head,
    repo_on_path,
    resolve_settings,
    run_rounds,
    timed_window,
    usable_cores,
    versions,
    work_dir,
    worker_main,
    write_results,
)

RESULTS = ROOT / "bench" / "results" / "grpo.json"
README = ROOT / "bench" / "README.md"
README_START, README_END = "<!-- grpo-results:start -->", "<!-- grpo-results:end -->"
PRESET = "small-20m"
EDGE_STEPS = 3  # "first / last few steps" of the reward curve

FULL = {"prompts_per_step": 2, "steps": 10, "warmup": 2, "rounds": 2, "max_new_tokens": 32}
QUICK = {"prompts_per_step": 1, "steps": 2, "warmup": 1, "rounds": 1, "max_new_tokens": 16}

CONTENDERS: dict[str, dict] = {
    "steptrain": {"framework": "steptrain", "label": "steptrain GRPO recipe"},
    "trl": {"framework": "trl", "label": "TRL GRPOTrainer (transformers generate)"},
}


# --- data and model ---------------------------------------------------------------------------------------


def prepare(work: Path, n_prompts: int, seed: int) -> dict:
    """Demo tokenizer + small-20m model directory, the prompts in both formats, and facts about the model."""
    repo_on_path()
    from data_pipelines.make_demo import make_demo

    t0 = time.perf_counter()
    demo = make_demo(work / "demo", seed=seed, preset=PRESET)  # demo corpus -> tokenizer; model after manual_seed
    with open(demo["train"]) as f:
        rows = [json.loads(line) for _, line in zip(range(n_prompts), f, strict=False)]
    if len(rows) < n_prompts:
        raise RuntimeError(f"the demo has {len(rows)} conversations, {n_prompts} prompts are needed")
    data_file, trl_file = work / "prompts.jsonl", work / "prompts_trl.jsonl"
    with data_file.open("w") as ms_swift, trl_file.open("w") as trl:
        for row in rows:  # the conversation up to its last user turn; the dropped reply is the "solution"
            prompt, solution = row["messages"][:-1], row["messages"][-1]["content"]
            ms_swift.write(json.dumps({"messages": prompt, "solution": solution}) + "\n")
            trl.write(json.dumps({"prompt": prompt, "solution": solution}) + "\n")
    return {
        "model_dir": demo["model"],
        "data_file": str(data_file),
        "trl_data_file": str(trl_file),
        "prepare_s": round(time.perf_counter() - t0, 1),
        "model": model_facts(demo["model"], PRESET),
    }


def run_worker(spec_path: str) -> None:
    from grpo_workers import worker_steptrain, worker_trl

    worker_main(spec_path, {"steptrain": worker_steptrain, "trl": worker_trl})


# --- driver -----------------------------------------------------------------------------------------------


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize_round(name: str, result: dict, warmup: int) -> dict:
    steps = result["steps"]
    timed, seconds = timed_window(steps, warmup, name)
    total = {k: sum(s[k] for s in timed) for k in ("completions", "completion_tokens", "tokens", "slots", "generate_s")}
    n = len(timed)
    rewards = [s.get("reward") for s in steps]
    edge = min(EDGE_STEPS, len(steps) // 2) or 1
    out = {
        "name": name,
        **CONTENDERS[name],
        "steps_timed": n,
        "seconds_timed": seconds,
        "step_time_s": seconds / n,
        "steps_per_s": n / seconds,
        "completions_per_s": total["completions"] / seconds,
        "completion_tokens_per_s": total["completion_tokens"] / seconds,
        "tokens_per_s": total["tokens"] / seconds,
        "completions_per_step": total["completions"] / n,
        "completion_tokens_per_step": total["completion_tokens"] / n,
        "completion_length": total["completion_tokens"] / total["completions"],
        "tokens_per_step": total["tokens"] / n,
        "padding_fraction": 1 - total["tokens"] / total["slots"],
        "generate_s_per_step": total["generate_s"] / n,
        "rest_s_per_step": (seconds - total["generate_s"]) / n,
        "generate_share": total["generate_s"] / seconds,
        "rewards": rewards,
        "reward_first": _mean(rewards[:edge]),
        "reward_last": _mean(rewards[-edge:]),
        "reward_edge_steps": edge,
        "losses": [s.get("loss") for s in steps],
        "completion_lengths": [s["completion_tokens"] / s["completions"] for s in steps],
        "truncated": [s.get("truncated") for s in steps],
        "grad_norms": [s.get("grad_norm") for s in steps],
        "threads": result["threads"],
        "optimizer": result["optimizer"],
        "options": result["options"],
        "worker_wall_s": result["wall_s"],
        "load_avg_at_start": result["load_avg_at_start"],
        **{k: result[k] for k in ("activation_checkpointing", "ref_model_in_memory", "eos_token_ids", "init_s")
           if k in result},
    }
    if all("own_step_time" in s for s in timed):  # steptrain's own clock: batch fetch to optimizer step, no logging
        out["own_step_time_s"] = sum(s["own_step_time"] for s in timed) / n
    return out


def summarize(name: str, rounds: list[dict], warmup: int) -> dict:
    """The round with the shortest step time (noise on a shared machine only ever adds time), plus every
    round's figures."""
    per = [summarize_round(name, r, warmup) for r in rounds]
    best = min(per, key=lambda c: c["step_time_s"])
    return {
        **best,
        "step_time_s_median": statistics.median(c["step_time_s"] for c in per),
        "rounds_same_rewards": all(c["rewards"] == per[0]["rewards"] for c in per),
        "rounds": [{k: c.get(k) for k in ("step_time_s", "generate_s_per_step", "own_step_time_s", "reward_first",
                                          "reward_last", "worker_wall_s", "load_avg_at_start")} for c in per],
    }


def checks(results: dict, prompts_per_step: int) -> dict:
    """Both frameworks rolled out the same prompts, step by step, as the same token ids."""
    if "steptrain" not in results or "trl" not in results:
        return {}
    s, t = results["steptrain"][0]["prompt_ids"], results["trl"][0]["prompt_ids"]
    n = min(len(s), len(t))
    return {
        "prompts_compared": n,
        "prompt_count": {"steptrain": len(s), "trl": len(t)},
        "prompt_token_mismatches": sum(a != b for a, b in zip(s, t, strict=False)),
        "steps_with_different_prompts": sum(s[i : i + prompts_per_step] != t[i : i + prompts_per_step]
                                            for i in range(0, n, prompts_per_step)),
    }


def data_facts(prompt_ids: list[list[int]]) -> dict:
    lengths = [len(p) for p in prompt_ids]
    return {"prompts": len(lengths), "prompt_tokens": {"min": min(lengths), "mean": round(statistics.fmean(lengths), 1),
                                                       "max": max(lengths)}}


def ratios(by_name: dict) -> dict:
    """Speed ratios steptrain : TRL (above 1: steptrain is faster)."""
    if "steptrain" not in by_name or "trl" not in by_name:
        return {}
    s, t = by_name["steptrain"], by_name["trl"]
    return {
        "optimizer steps/s (= completions/s)": t["step_time_s"] / s["step_time_s"],
        "completion tokens generated per s": s["completion_tokens_per_s"] / t["completion_tokens_per_s"],
        "generate() per step (TRL s / steptrain s)": t["generate_s_per_step"] / s["generate_s_per_step"],
        "rest of the step: rewards, loss forward/backward, optimizer, logging (TRL s / steptrain s)":
            t["rest_s_per_step"] / s["rest_s_per_step"],
    }


def _rewards(values: list) -> str:
    return " ".join("-" if v is None else f"{v:.3f}" for v in values)


def tables(res: dict) -> str:
    rows = []
    for c in res["contenders"]:
        e = c["reward_edge_steps"]
        rows.append([
            c["label"], fmt(c["completions_per_step"]), f"{fmt(c['completion_tokens_per_step'])} "
            f"({c['completion_length']:.1f})", fmt(c["tokens_per_step"]), f"{100 * c['padding_fraction']:.1f}%",
            fmt(c["step_time_s"], 2), f"{fmt(c['generate_s_per_step'], 2)} ({100 * c['generate_share']:.0f}%)",
            fmt(c["completions_per_s"], 1), fmt(c["completion_tokens_per_s"]),
            f"{c['reward_first']:.3f} → {c['reward_last']:.3f} (steps 1-{e} → last {e})",
        ])
    out = [markdown_table(["contender", "completions/step", "completion tokens/step (mean length)",
                           "trained tokens/step", "padding", "step time (s)", "of which generate() (s)",
                           "completions/s", "completion tokens/s", "mean reward"], rows)]
    if res["ratios"]:
        out.append("")
        out.append(markdown_table(["speed ratio steptrain : TRL", "value"],
                                  [[k, f"{v:.2f}x"] for k, v in res["ratios"].items()]))
    out.append("")
    for c in res["contenders"]:
        rounds = ", ".join(f"{r['step_time_s']:.2f}" for r in c["rounds"])
        same = "identical in every round" if c["rounds_same_rewards"] else "differing between rounds"
        out.append(f"- {c['name']}, every round: step time s {rounds} (median {c['step_time_s_median']:.2f}); "
                   f"rewards {same}. Mean reward per step: {_rewards(c['rewards'])}.")
    d, ch = res.get("data"), res.get("checks", {})
    if d:
        out.append("")
        out.append(f"Prompts: {d['prompt_tokens']['min']}-{d['prompt_tokens']['max']} tokens (mean "
                   f"{d['prompt_tokens']['mean']}), {d['prompts']} rolled out per contender.")
    if "prompt_token_mismatches" in ch:
        out.append(f"Checks: prompts whose token ids differ between steptrain and TRL: {ch['prompt_token_mismatches']} "
                   f"of {ch['prompts_compared']}; steps whose prompts differ: {ch['steps_with_different_prompts']}.")
    return "\n".join(out)


def readme_block(res: dict) -> str:
    s = res["settings"]
    lines = [
        *readme_head(res),
        f"Settings: {s['prompts_per_step']} prompts x {s['num_generations']} completions per step, max_new_tokens "
        f"{s['max_new_tokens']}, {s['warmup']} warmup + {s['steps']} timed steps, {s['rounds']} round(s) per "
        f"contender (ABBA order, best reported), order {s['order']}, lr {s['lr']}, "
        f"{s['threads']} torch thread(s) per contender; model {res['model']['preset']} at the demo tokenizer's "
        f"vocabulary ({res['model']['vocab_size']}): {res['model']['n_params'] / 1e6:.2f}M params.",
        "",
        tables(res),
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = driver_parser(__doc__, QUICK, FULL)
    p.add_argument("--prompts-per-step", type=int,
                   help=f"prompts per optimizer step, each sampled num-generations times (default "
                        f"{FULL['prompts_per_step']})")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt, G (default 8)")
    p.add_argument("--max-new-tokens", type=int, help=f"longest completion (default {FULL['max_new_tokens']})")
    p.add_argument("--order", default="same", choices=["same", "default"],
                   help="same: both roll out the prompts in file order (the same prompts at every step); default: "
                        "each framework's own sampler (steptrain shuffled group_by_length, TRL shuffled)")
    add_round_options(p, FULL, CONTENDERS)
    p.add_argument("--lr", type=float, default=1e-4)
    add_output_options(p, seed=0, results=RESULTS, section="GRPO")
    args = p.parse_args(argv)
    if args.worker:
        return args
    resolve_settings(p, args, QUICK, FULL)
    if args.num_generations < 2 or args.prompts_per_step < 1 or args.max_new_tokens < 1:
        p.error("--num-generations must be >= 2, --prompts-per-step and --max-new-tokens >= 1")
    args.prompts = (args.warmup + args.steps) * args.prompts_per_step  # one epoch: every prompt rolled out once
    args.contenders = chosen_contenders(p, args.only, CONTENDERS)
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
                                                ("steps", "warmup", "rounds", "prompts_per_step", "num_generations",
                                                 "prompts", "max_new_tokens", "order", "lr", "seed")},
                        "threads": threads, "contenders": args.contenders},
           "machine": machine_info(), "versions": versions()}
    print(f"machine: {res['machine']['cpu_model']}, {threads} torch threads; torch {torch.__version__}", flush=True)

    with work_dir(args.work_dir, "steptrain-bench-grpo-") as work:
        assets = prepare(work, args.prompts, args.seed)
        res["model"] = assets["model"]
        print(f"data: {args.prompts} prompts; model {assets['model']['n_params']:,} params "
              f"(V={assets['model']['vocab_size']}); prepared in {assets['prepare_s']}s", flush=True)
        spec = {"model_dir": assets["model_dir"], "data_file": assets["data_file"],
                "trl_data_file": assets["trl_data_file"], "max_steps": args.warmup + args.steps,
                "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
                "max_new_tokens": args.max_new_tokens, "lr": args.lr, "seed": args.seed, "order": args.order,
                "threads": threads}
        # ABBA...: each contender runs first in every other round, in a fresh process and output directory
        results, failures = run_rounds(__file__, CONTENDERS, args.contenders, spec, work, args.rounds)
        summaries = [summarize(n, r, args.warmup) for n, r in results.items()]
        res["contenders"] = summaries
        res["ratios"] = ratios({c["name"]: c for c in summaries})
        res["checks"] = checks(results, args.prompts_per_step)
        if results:
            res["data"] = data_facts(next(iter(results.values()))[0]["prompt_ids"])
        res["failures"] = failures
        res["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        res["total_wall_s"] = time.perf_counter() - t_start

    write_results(res, args.out, readme_block(res), README if args.update_readme else None, README_START, README_END)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
