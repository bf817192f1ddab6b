"""Audio batches with and without duration bucketing: padding waste and samples/s (tiny-speech, CPU).

steptrain's ``data.group_by_length`` sorts shuffled mega-batches by token length. For a speech row the
token length includes the ``<audio_patch>`` placeholder span of each clip, so it tracks clip duration, and
bucketing also cuts the zero-padding of the ``[n_clips, 128, T_max]`` log-mel batch. This script:

1. writes a DTMF spoken-digit corpus (``data_pipelines.speech_corpus``) and concatenates 1-8 of its
   utterances per row into longer WAVs (about 0.6-17 s), with matching transcripts, as ms-swift ASR JSONL;
2. loads it with ``steptrain.data.load_sft_data`` (audio spans included) for the ``tiny-speech`` preset;
3. plans one epoch with ``plan_epoch(group_by_length=True)`` ("bucketed") and ``False`` ("random", which is
   also what a plain PyTorch / HF loop with a shuffling sampler does), same batch size;
4. reports, over the whole epoch, the padding waste of the audio features and of the token tensor, and the
   same for transformers' ``LengthGroupedSampler`` on the same lengths (index computation only);
5. times ``collate`` alone (log-mel extraction included) and a full training step (collate + forward +
   backward + AdamW, fp32, encoder trained) over the whole epoch, for both plans, on the same initial
   weights. Every row is seen exactly once per timed epoch, so both plans do the same useful work.

    python bench/audio_batching.py             # default: 240 rows, batch 8, 3 timed epochs per plan
    python bench/audio_batching.py --quick     # smoke run: 32 rows
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine_info, markdown_table, versions  # noqa: E402

SAMPLE_RATE = 16000
PROMPT = "Transcribe the digits."


# ------------------------------------------------------------------------------------------------ data


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def _write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def write_long_corpus(out: Path, rows: int, max_concat: int, seed: int) -> tuple[Path, list[str]]:
    """ASR JSONL whose rows each hold 1..max_concat concatenated DTMF utterances (seeded)."""
    from data_pipelines.speech_corpus import write_speech_corpus

    pool = max(64, rows)
    paths = write_speech_corpus(out / "corpus", n_train=pool, n_eval=1, seed=seed, n_chat_train=0,
                                n_chat_eval=0, bad_rows=False)
    base = [json.loads(line) for line in Path(paths["asr_train"]).read_text().splitlines() if line.strip()]
    utts = [(_read_wav(Path(paths["asr_train"]).parent / r["audios"][0]), r["messages"][-1]["content"])
            for r in base]
    rng = random.Random(seed)
    (out / "long").mkdir(parents=True, exist_ok=True)
    lines, texts = [], []
    for k in range(rows):
        picks = rng.sample(range(len(utts)), rng.randint(1, max_concat))
        pcm = np.concatenate([utts[i][0] for i in picks])
        text = " ".join(utts[i][1] for i in picks)
        rel = f"long/row_{k:05d}.wav"
        _write_wav(out / rel, pcm)
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<audio>" + PROMPT},
                                              {"role": "assistant", "content": text}], "audios": [rel]}))
        texts.append(text)
    jsonl = out / "asr_long.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl, texts


# ----------------------------------------------------------------------------------------- padding waste


def waste(batches: list[list[int]], tok_lens: list[int], clip_frames: list[list[int]]) -> dict:
    """Padding waste of [B, T] tokens and [n_clips, 128, T_max] features, summed over ``batches``."""
    real_t = slots_t = real_f = slots_f = 0
    for b in batches:
        real_t += sum(tok_lens[i] for i in b)
        slots_t += len(b) * max(tok_lens[i] for i in b)
        frames = [f for i in b for f in clip_frames[i]]
        real_f += sum(frames)
        slots_f += len(frames) * max(frames)
    return {
        "batches": len(batches),
        "token_padding": 1 - real_t / slots_t,
        "audio_padding": 1 - real_f / slots_f,
        "real_tokens": real_t,
        "token_slots": slots_t,
        "real_frames": real_f,
        "frame_slots": slots_f,
    }


def hf_length_grouped(tok_lens: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """transformers' LengthGroupedSampler order on the same lengths, cut into batches."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    gen = torch.Generator().manual_seed(seed)
    order = list(LengthGroupedSampler(batch_size, lengths=tok_lens, generator=gen))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------ timing


def time_collate(batches, examples, pad_id, clip_features, collate) -> float:
    """Seconds to collate (log-mel extraction included) every batch of one epoch."""
    t0 = time.perf_counter()
    for b in batches:
        collate([[i] for i in b], examples, pad_id=pad_id, packing=False, audio_features=clip_features)
    return time.perf_counter() - t0


def time_train(batches, warmup_batches, examples, pad_id, clip_features, collate, make_model, lr) -> dict:
    import torch
    import torch.nn.functional as F

    from steptrain.models.forward import lm_logits

    model = make_model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)

    def step(b):
        batch = collate([[i] for i in b], examples, pad_id=pad_id, packing=False, audio_features=clip_features)
        logits = lm_logits(model, batch)
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach()), batch

    for b in warmup_batches:
        step(b)
    losses, tok_real = [], [0, 0]
    frames = [0, 0]
    t0 = time.perf_counter()
    for b in batches:
        loss, batch = step(b)
        losses.append(loss)
        tok_real[0] += int(batch["attention_mask"].sum())
        tok_real[1] += batch["input_ids"].numel()
        frames[0] += int(batch["audio_lengths"].sum())
        frames[1] += batch["audio_features"].shape[0] * batch["audio_features"].shape[-1]
    secs = time.perf_counter() - t0
    n = sum(len(b) for b in batches)
    return {
        "seconds": secs,
        "samples": n,
        "samples_per_s": n / secs,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        # measured on the tensors the model got (a check of the analytic waste above)
        "token_padding_measured": 1 - tok_real[0] / tok_real[1],
        "audio_padding_measured": 1 - frames[0] / frames[1],
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "encoder_trainable": any(p.requires_grad for n_, p in model.named_parameters() if "audio_encoder" in n_),
    }


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 rows, 1 warmup step")
    ap.add_argument("--rows", type=int, default=None, help="rows in the corpus (default 240, --quick 32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-concat", type=int, default=8, help="utterances concatenated per row: 1..this")
    ap.add_argument("--warmup", type=int, default=None, help="untimed train steps before each timed epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1; 0 = all usable cores; on a shared machine more threads mostly measure contention)")
    ap.add_argument("--train-rounds", type=int, default=None, help="timed train epochs per plan (default 3, --quick 1)")
    ap.add_argument("--collate-rounds", type=int, default=4, help="timed collate epochs per plan (median kept)")
    ap.add_argument("--skip-train", action="store_true", help="padding and collate only")
    ap.add_argument("--work-dir", default=None, help="keep the corpus and tokenizer here")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "audio_batching.json"))
    args = ap.parse_args(argv)
    rows = args.rows or (32 if args.quick else 240)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    info = machine_info()
    import torch

    torch.set_num_threads(args.threads or info["cores_usable"])
    args.train_rounds = args.train_rounds or (1 if args.quick else 3)

    from data_pipelines.demo_tokenizer import train_demo_tokenizer
    from steptrain.audio.features import num_frames
    from steptrain.config import load_config
    from steptrain.data import collate, load_sft_data, plan_epoch
    from steptrain.inputs import clip_features, resolve_inputs
    from steptrain.models.loader import load_tokenizer, speech_overrides
    from steptrain.models.speech import build_speech_preset

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_audio_")
        work = Path(tmp.name)
    t_data = time.perf_counter()
    jsonl, texts = write_long_corpus(work, rows, args.max_concat, args.seed)
    train_demo_tokenizer(texts + [PROMPT] * 4, work / "tokenizer")
    cfg = load_config([
        "model.preset=tiny-speech", f"model.tokenizer_path={work / 'tokenizer'}", "model.freeze_encoder=false",
        f"data.train_files=[{jsonl}]", "data.max_length=512", "data.group_by_length=true",
        f"trainer.batch_size={args.batch_size}", "trainer.precision=fp32", f"optim.lr={args.lr}",
        f"output_dir={work / 'run'}",
    ])
    tok = load_tokenizer(cfg.model)
    data = load_sft_data([str(jsonl)], tok, cfg.data, resolve_inputs(cfg, tok))
    examples = data.examples
    data_secs = time.perf_counter() - t_data
    tok_lens = [len(e.input_ids) for e in examples]
    clip_frames = [[num_frames(c.length) for c in e.audio] for e in examples]
    durations = [sum(c.length for c in e.audio) / SAMPLE_RATE for e in examples]
    corr = float(np.corrcoef(tok_lens, durations)[0, 1])

    def plan(bucketed: bool, epoch: int = 0) -> list[list[int]]:
        batches = plan_epoch(tok_lens, batch_size=args.batch_size, max_length=cfg.data.max_length,
                             packing=False, group_by_length=bucketed, shuffle=True, seed=args.seed, epoch=epoch)
        return [[row[0] for row in b] for b in batches]

    plans = {"bucketed": plan(True), "random": plan(False)}
    padding = {k: waste(v, tok_lens, clip_frames) for k, v in plans.items()}
    padding["hf_length_grouped"] = waste(hf_length_grouped(tok_lens, args.batch_size, args.seed), tok_lens,
                                         clip_frames)

    overrides = speech_overrides(tok, cfg.model)

    def make_model():
        torch.manual_seed(args.seed)
        return build_speech_preset("tiny-speech", tok, **overrides).to(torch.float32)

    collate_t, train_t = {}, {}
    pad_id = tok.pad_token_id
    # One untimed pass over every clip first (FFT plans for every clip length, allocator growth), then
    # args.collate_rounds rounds in alternating order (ABBA...); the median round is reported.
    time_collate(plans["random"], examples, pad_id, clip_features, collate)
    rounds: dict[str, list[float]] = {"bucketed": [], "random": []}
    for r in range(args.collate_rounds):
        for name in ("bucketed", "random") if r % 2 == 0 else ("random", "bucketed"):
            rounds[name].append(time_collate(plans[name], examples, pad_id, clip_features, collate))
    for name, secs in rounds.items():
        n = len(examples)
        med = float(np.median(secs))
        collate_t[name] = {"seconds_per_epoch": secs, "median_seconds": med, "samples": n, "samples_per_s": n / med}
        print(f"collate {name}: {collate_t[name]['samples_per_s']:.1f} samples/s", flush=True)
    if not args.skip_train:
        warm = plan(False, epoch=1)[:warmup]  # untimed steps on another epoch's (random) batches
        runs: dict[str, list[dict]] = {"bucketed": [], "random": []}
        for r in range(args.train_rounds):  # alternating order (AB BA AB ...), fresh model each epoch
            for name in ("bucketed", "random") if r % 2 == 0 else ("random", "bucketed"):
                load_before = list(os.getloadavg())
                run = time_train(plans[name], warm, examples, pad_id, clip_features, collate, make_model, args.lr)
                run["load_avg_before"] = load_before
                run["seconds_per_step"] = run["seconds"] / len(plans[name])
                runs[name].append(run)
                print(f"train {name} round {r}: {run['samples_per_s']:.2f} samples/s ({run['seconds']:.1f} s)",
                      flush=True)
        for name, rs in runs.items():
            med = float(np.median([x["seconds"] for x in rs]))
            train_t[name] = {**rs[0], "seconds": med, "samples_per_s": rs[0]["samples"] / med,
                             "rounds": rs}
    load_end = list(os.getloadavg())

    result = {
        "settings": {"rows": rows, "examples": len(examples), "batch_size": args.batch_size,
                     "max_concat": args.max_concat, "warmup_steps": warmup, "seed": args.seed, "lr": args.lr,
                     "threads": torch.get_num_threads(), "quick": args.quick, "model": "tiny-speech",
                     "freeze_encoder": False, "precision": "fp32",
                     "train_rounds": args.train_rounds, "collate_rounds": args.collate_rounds},
        "data": {
            "seconds_to_build": data_secs,
            "duration_s": {"min": min(durations), "median": float(np.median(durations)),
                           "mean": float(np.mean(durations)), "max": max(durations),
                           "total": float(np.sum(durations))},
            "tokens": {"min": min(tok_lens), "median": float(np.median(tok_lens)), "max": max(tok_lens)},
            "corr_tokens_duration": corr,
            "stats": data.stats,
        },
        "padding": padding,
        "collate": collate_t,
        "train": train_t,
        "machine": {**info, "load_avg_at_end": load_end},
        "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def render(r: dict) -> str:
    pad, col, tr = r["padding"], r["collate"], r["train"]
    labels = {"bucketed": "steptrain, group_by_length=true (bucketed)",
              "random": "steptrain, group_by_length=false (random = plain PyTorch/HF loop)",
              "hf_length_grouped": "transformers LengthGroupedSampler (padding only)"}
    rows = []
    for k in ("bucketed", "random", "hf_length_grouped"):
        rows.append([
            labels[k], pad[k]["batches"], f"{pad[k]['audio_padding']:.1%}", f"{pad[k]['token_padding']:.1%}",
            f"{col[k]['samples_per_s']:.1f}" if k in col else "-",
            f"{tr[k]['samples_per_s']:.2f}" if k in tr else "-",
            f"{tr[k]['loss_first']:.3f} → {tr[k]['loss_last']:.3f}" if k in tr else "-",
        ])
    out = [markdown_table(["batches", "n", "audio padding", "token padding", "collate samples/s",
                           "train samples/s", "loss first → last"], rows)]
    ratios = [["collate samples/s, bucketed / random", f"{col['bucketed']['samples_per_s'] / col['random']['samples_per_s']:.2f}x"]]
    if tr:
        ratios.append(["train samples/s, bucketed / random",
                       f"{tr['bucketed']['samples_per_s'] / tr['random']['samples_per_s']:.2f}x"])
    ratios.append(["audio padding, bucketed vs random",
                   f"{pad['bucketed']['audio_padding']:.1%} vs {pad['random']['audio_padding']:.1%}"])
    ratios.append(["token padding, bucketed vs random",
                   f"{pad['bucketed']['token_padding']:.1%} vs {pad['random']['token_padding']:.1%}"])
    out.append(markdown_table(["ratio", "value"], ratios))
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
