"""Helpers shared by the benchmarks: machine and version facts, peak matmul FLOP/s, Markdown tables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
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
    import json
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
    import json

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
    import json

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
    import json

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
