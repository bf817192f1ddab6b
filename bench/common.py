"""Helpers shared by the benchmarks: machine and version facts, peak matmul FLOP/s, Markdown tables."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def usable_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS tells us)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD extensions that matter for fp32 matmul speed, as /proc/cpuinfo lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
    except OSError:
        pass
    return []


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "simd": cpu_flags(),
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """Short commit of the repository, with "+dirty" when the working tree has changes."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    import torch

    return {
        "steptrain": _version("steptrain"),
        "steptrain_git": git_revision(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "accelerate": _version("accelerate"),
        "datasets": _version("datasets"),
        "tokenizers": _version("tokenizers"),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


def peak_matmul_flops(size: int = 2048, trials: int = 5, reps: int = 3, warmup: int = 2) -> dict:
    """Best achieved fp32 FLOP/s of ``torch.matmul`` on [size, size] x [size, size] with all torch threads.

    Each trial times ``reps`` back-to-back products; the best trial is the machine's "peak" for MFU. The
    median is kept too, as a measure of how noisy (shared) the machine was while measuring.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=torch.float32)
    b = torch.randn(size, size, generator=gen, dtype=torch.float32)
    out = torch.empty(size, size, dtype=torch.float32)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    flop = 2.0 * size**3 * reps
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        rates.append(flop / (time.perf_counter() - t0))
    rates.sort()
    return {
        "size": size,
        "threads": torch.get_num_threads(),
        "trials": trials,
        "reps_per_trial": reps,
        "best_flops": rates[-1],
        "median_flops": rates[len(rates) // 2],
    }


def model_facts(model_dir: str | Path, preset: str) -> dict:
    """Size and shape of the saved model both contenders load (fp32, SDPA attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "preset": preset,
        "vocab_size": cfg.vocab_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_matmul_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        "n_layers": cfg.num_hidden_layers,
        "d_attn": cfg.num_attention_heads * head_dim,
        "hidden_size": cfg.hidden_size,
        "attn_implementation": "sdpa",
        "dtype": "float32",
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return v if isinstance(v, str) else f"{v}"

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_readme_block(readme: Path, start: str, end: str, block: str) -> None:
    """Rewrite the text between the ``start`` and ``end`` marker lines of ``readme`` (warn if absent)."""
    import sys

    text = readme.read_text()
    if start not in text or end not in text:
        print(f"warning: {readme} has no {start} ... {end} block; not updated", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{block}\n{end}{tail}")


def repo_on_path() -> None:
    """`python bench/X.py` puts bench/ on sys.path; the repository root holds steptrain and data_pipelines."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}


def run_in_worker(script: str, tag: str, spec: dict, work: Path) -> dict:
    """Run ``script --worker SPEC`` in a fresh process (one contender, its own threads and imports) and
    return the result JSON it writes, plus wall time and the load average at start."""
    import sys

    spec_path = work / f"{tag}.spec.json"
    spec = {**spec, "out_dir": str(work / f"run-{tag}"), "result_path": str(work / f"{tag}.result.json")}
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{tag}.log"
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)],
                              cwd=ROOT, env={**os.environ, **WORKER_ENV}, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    result = json.loads(Path(spec["result_path"]).read_text())
    return {**result, "wall_s": wall, "load_avg_at_start": load}


def worker_main(spec_path: str, workers: dict) -> None:
    """The ``--worker`` side: run ``workers[spec["framework"]](spec)`` with the spec's thread count."""
    spec = json.loads(Path(spec_path).read_text())
    repo_on_path()
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    result = workers[spec["framework"]](spec)
    result["worker_s"] = time.perf_counter() - t0
    Path(spec["result_path"]).write_text(json.dumps(result))


def write_results(res: dict, out: Path, block: str, readme: Path | None, start: str, end: str) -> None:
    """Results JSON to ``out``, the Markdown block to stdout and (``readme`` given) into the README."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(block)
    print(f"\nresults: {out}  (total {res['total_wall_s']:.0f}s)")
    if readme is not None:
        replace_readme_block(readme, start, end, block)


def run_rounds(script: str, contenders: dict[str, dict], names: list[str], spec: dict, work: Path,
               rounds: int) -> tuple[dict[str, list[dict]], list[str]]:
    """Run every contender in ``names`` once per round, each in a fresh worker process, in ABBA order
    (each one goes first in every other round). Returns the results by contender (one per successful
    round; contenders with none are left out) and the error messages of the runs that failed."""
    import sys

    results: dict[str, list[dict]] = {name: [] for name in names}
    failures: list[str] = []
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"round {r + 1}/{rounds}: running {name} ...", flush=True)
            try:
                out = run_in_worker(script, f"{name}-r{r}", {**spec, **contenders[name]}, work)
                results[name].append(out)
                print(f"  done in {out['wall_s']:.0f}s", flush=True)
            except RuntimeError as e:
                failures.append(str(e))
                print(e, file=sys.stderr, flush=True)
    return {name: rs for name, rs in results.items() if rs}, failures


def timed_window(steps: list[dict], warmup: int, name: str) -> tuple[list[dict], float]:
    """The timed steps and their wall seconds: from the end of the last warmup step (``t_end``) to the
    end of the last step."""
    if len(steps) <= warmup:
        raise RuntimeError(f"{name}: only {len(steps)} steps recorded, warmup is {warmup}")
    timed = steps[warmup:]
    return timed, timed[-1]["t_end"] - steps[warmup - 1]["t_end"]


# --- driver command line and report (bench/sft.py, bench/dpo.py, bench/grpo.py) ----------------------------


def driver_parser(doc: str, quick: dict, full: dict, quick_note: str = "") -> argparse.ArgumentParser:
    """The parser of a benchmark driver with the options every driver starts with: --quick (the ``quick``
    settings), --steps and --warmup (defaults from ``full``, filled in by :func:`resolve_settings`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run{quick_note}: " + json.dumps(quick))
    p.add_argument("--steps", type=int, help=f"timed optimizer steps per contender (default {full['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps before them, >= 1 (default {full['warmup']})")
    return p


def add_round_options(p: argparse.ArgumentParser, full: dict, contenders: dict, threads_also: str = "") -> None:
    """--rounds, --threads (torch threads per contender, ``threads_also`` naming what else uses them) and
    --only of the drivers that run their contenders in ABBA rounds."""
    p.add_argument("--rounds", type=int,
                   help=f"runs per contender, in ABBA order; the best is reported (default {full['rounds']})")
    p.add_argument("--threads", type=int, default=0,
                   help=f"torch threads per contender{threads_also} (default 0: every usable core); on a "
                        "machine shared with other work, 1 is far steadier (see bench/README.md)")
    add_only_option(p, contenders)


def add_only_option(p: argparse.ArgumentParser, contenders: dict) -> None:
    """--only: the contenders to run (read by :func:`chosen_contenders`)."""
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(contenders))


def add_output_options(p: argparse.ArgumentParser, seed: int, results: Path, section: str = "",
                       work_dir_help: str = "keep data, model, logs and metrics.jsonl here (default: temp dir)"
                       ) -> None:
    """--seed, --out (default ``results``), --work-dir, --update-readme (of the ``section`` results block of
    bench/README.md) and the hidden --worker."""
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--out", type=Path, default=results, help=f"results JSON (default {results.relative_to(ROOT)})")
    p.add_argument("--work-dir", type=Path, help=work_dir_help)
    p.add_argument("--update-readme", action="store_true",
                   help=f"rewrite the {section + ' ' if section else ''}results block of bench/README.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def resolve_settings(p: argparse.ArgumentParser, args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Fill the settings not given from ``quick`` (--quick) or ``full`` and check that --warmup, --steps (and
    --rounds, where the driver has it) are >= 1."""
    base = quick if args.quick else full
    for key, default in base.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    counted = ["--warmup", "--steps"] + (["--rounds"] if "rounds" in base else [])
    if any(getattr(args, name[2:]) < 1 for name in counted):
        listed = ", ".join(counted[:-1]) + " and " + counted[-1]
        p.error(f"{listed} must be >= 1 (the timed window starts at the end of the last warmup step)")


def chosen_contenders(p: argparse.ArgumentParser, only: str | None, contenders: dict) -> list[str]:
    """The contenders --only names (all of them without it); an unknown name is a usage error."""
    names = only.split(",") if only else list(contenders)
    unknown = [n for n in names if n not in contenders]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; valid: {', '.join(contenders)}")
    return names


@contextlib.contextmanager
def work_dir(keep: Path | None, prefix: str):
    """The directory a driver builds its data, model and runs in: ``keep`` (--work-dir), left in place, or
    a temporary one (named ``prefix``...), deleted at the end."""
    work = keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def readme_head(res: dict, load_at_end: bool = True) -> list[str]:
    """The first lines of a driver's README block: smoke or full run, the machine (load average at the start
    and, with ``load_at_end``, at the end) and the versions."""
    m, v = res["machine"], res["versions"]
    kind = ("**Smoke run (`--quick`): tiny step counts on a shared machine, not a measurement; to be replaced by "
            "a full run.**" if res["settings"]["quick"] else "Full run.")
    load = f"load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'] or [])}"
    if load_at_end:
        load += f", at end {', '.join(f'{x:.2f}' for x in res.get('load_avg_at_end') or [])}"
    return [
        kind,
        "",
        f"Machine: {m['cpu_model']}, {m['cores_usable']} usable cores ({', '.join(m['simd']) or 'no SIMD flags'}), "
        f"{m['memory_gib']} GiB; {load}.",
        f"Versions: steptrain {v['steptrain']} ({v['steptrain_git']}), torch {v['torch']}, transformers "
        f"{v['transformers']}, trl {v['trl']}, accelerate {v['accelerate']}, datasets {v['datasets']}.",
    ]


# --- worker-side instrumentation (inside a contender's process) -------------------------------------------


class StepCounts:
    """Amounts one optimizer step fed the model, summed over its micro-batches: ``add(key=amount, ...)``
    while the step runs, ``pop()`` when it ends."""

    def __init__(self, *keys: str):
        self.keys = keys
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.keys, 0)

    def add(self, **amounts) -> None:
        for key, value in amounts.items():
            self.totals[key] += value

    def pop(self) -> dict:
        out = self.totals
        self.reset()
        return out


def is_train_record(record: dict) -> bool:
    """A steptrain metrics record of a training step (not an evaluation)."""
    return "loss" in record and "eval/loss" not in record


def clock_steptrain_steps(on_step) -> None:
    """Make steptrain's ``MetricsLogger.log`` call ``on_step(t_end, record)`` for every training step's
    record, just before logging it: ``t_end`` is when that step's optimizer step is done."""
    from steptrain.logging import MetricsLogger

    log = MetricsLogger.log

    def timed_log(self, record):
        if is_train_record(record):
            on_step(time.perf_counter(), record)
        return log(self, record)

    MetricsLogger.log = timed_log


def steptrain_train_metrics(out_dir: str | Path) -> list[dict]:
    """The training-step records of a steptrain run's ``metrics.jsonl``, in order."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if is_train_record(r)]


def trl_step_clock(steps: list[dict], counts: StepCounts, records: dict[int, dict]):
    """A ``TrainerCallback`` that appends ``{"t_end", **counts.pop()}`` to ``steps`` at ``on_step_end`` (the
    optimizer step is done) and keeps every training log (the dicts with "loss") in ``records`` by global step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"t_end": time.perf_counter(), **counts.pop()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records[state.global_step] = dict(logs)

    return StepClock()


def steptrain_config(overrides: list[str]):
    """steptrain's config from ``overrides``, with INFO logging to stderr (the worker's log)."""
    import logging

    from steptrain.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(overrides)


def steptrain_optim_overrides(lr: float, scheduler: str) -> list[str]:
    """AdamW at ``lr`` with ``scheduler``: no warmup, no weight decay, clipping at 1.0."""
    return [
        f"optim.lr={lr}",
        f"optim.scheduler={scheduler}",
        "optim.warmup_ratio=0.0",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
    ]


# The end of every steptrain worker's overrides: on the CPU, from scratch, no progress bar or loggers.
STEPTRAIN_CPU_OVERRIDES = [
    "engine.device=cpu",
    "resume=none",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.plot=false",
    "logging.wandb=disabled",
]


def trl_inputs(spec: dict) -> tuple:
    """What a TRL worker trains on: the dataset (the JSON rows of ``spec["trl_data_file"]``), the tokenizer
    (with its own Step Jinja chat template) and the fp32 SDPA model of ``spec["model_dir"]``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(spec["trl_data_file"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f if line.strip()])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    return dataset, tokenizer, model


def trl_optim_options(lr: float, scheduler: str) -> dict:
    """The TRL arguments matching :func:`steptrain_optim_overrides`."""
    return {
        "learning_rate": lr,
        "lr_scheduler_type": scheduler,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }


# fp32 on the CPU, without activation checkpointing (TRL's default for both is on).
TRL_CPU_FP32_OPTIONS = {"bf16": False, "fp16": False, "activation_checkpointing": False, "use_cpu": True}

# Log every step; no checkpoints, evaluation, reporting, progress bar or dataloader workers.
TRL_RUN_OPTIONS = {
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
}
