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
    peak_matmul_flops,
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


# --- data and model ---------------------------------------------------------------------------------------


def prepare(work: Path, n_pairs: int, seed: int) -> dict:
    """Demo tokenizer + small-20m model directory, preference pairs in both formats, and facts about them."""
    repo_on_path()
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
    return {
        "model_dir": demo["model"],
        "data_file": str(paths["train"]),
        "trl_data_file": str(trl_file),
        "prepare_s": round(time.perf_counter() - t0, 1),
        "model": model_facts(demo["model"], PRESET),
    }


def run_worker(spec_path: str) -> None:
    from dpo_workers import worker_steptrain, worker_trl

    worker_main(spec_path, {"steptrain": worker_steptrain, "trl": worker_trl})


# --- driver -----------------------------------------------------------------------------------------------


def summarize_round(name: str, result: dict, warmup: int, model: dict, peak: float) -> dict:
    steps = result["steps"]
    timed, seconds = timed_window(steps, warmup, name)
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
    return {
        **best,
        **{k: ref_best[k] for k in ("reference_s", "reference_pairs_per_s", "reference_mfu")},
        "pairs_per_s_median": statistics.median(c["pairs_per_s"] for c in per),
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


def tables(res: dict) -> str:
    rows = []
    for c in res["contenders"]:
        rows.append([
            c["label"], fmt(c["pairs_per_step"]), fmt(c["tokens_per_step"]), f"{100 * c['padding_fraction']:.1f}%",
            fmt(c["step_time_s"], 2), fmt(c["pairs_per_s"], 1), fmt(c["tokens_per_s"]), f"{100 * c['mfu']:.1f}%",
            f"{fmt(c['reference_s'], 1)} ({fmt(c['reference_pairs_per_s'], 1)} pairs/s)",
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
    s, pk = res["settings"], res["peak_matmul"]
    lines = [
        *readme_head(res),
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
    p = driver_parser(__doc__, QUICK, FULL)
    p.add_argument("--pairs-per-step", type=int, help=f"pairs per optimizer step (default {FULL['pairs_per_step']})")
    p.add_argument("--max-length", type=int, help=f"max tokens per sequence (default {FULL['max_length']})")
    p.add_argument("--pairs", type=int,
                   help="preference pairs generated, all of them reference-scored (default: exactly the pairs the "
                        "warmup and timed steps use, one epoch)")
    p.add_argument("--order", default="same", choices=["same", "default"],
                   help="same: both read the pairs in file order (same batches, comparable loss curves); default: "
                        "each framework's own sampler (steptrain shuffled group_by_length, TRL random)")
    p.add_argument("--matmul-size", type=int, help=f"square matmul for peak FLOP/s (default {FULL['matmul_size']})")
    add_round_options(p, FULL, CONTENDERS, threads_also=" and for the peak matmul")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    add_output_options(p, seed=0, results=RESULTS, section="DPO")
    args = p.parse_args(argv)
    if args.worker:
        return args
    resolve_settings(p, args, QUICK, FULL)
    needed = (args.warmup + args.steps) * args.pairs_per_step
    if args.pairs is None:
        args.pairs = needed
    elif args.pairs < needed:
        p.error(f"--pairs {args.pairs} < (warmup + steps) x pairs-per-step = {needed}")
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
                                                ("steps", "warmup", "rounds", "pairs_per_step", "pairs", "max_length", "order",
                                                 "matmul_size", "lr", "beta", "seed")},
                        "threads": threads, "contenders": args.contenders},
           "machine": machine_info(), "versions": versions()}
    print(f"machine: {res['machine']['cpu_model']}, {threads} torch threads; torch {torch.__version__}", flush=True)

    with work_dir(args.work_dir, "steptrain-bench-dpo-") as work:
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
        # ABBA...: each contender runs first in every other round, in a fresh process and output directory
        # (no cached reference log-probs are reused)
        results, failures = run_rounds(__file__, CONTENDERS, args.contenders, spec, work, args.rounds)
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

    write_results(res, args.out, readme_block(res), README if args.update_readme else None, README_START, README_END)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
