"""Where training metrics go: metrics.jsonl (always), TensorBoard, W&B (offline unless asked), a
progress bar, and a loss-curve PNG at the end. Only the main rank writes anything.

metrics.jsonl holds one JSON object per optimizer step (``{"step", "loss", "lr", "tokens", ...}``) and
one per evaluation (``{"step", "eval/loss", ...}``). On resume, lines past the checkpoint's step are
dropped, so the file of a killed-and-resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("steptrain")

METRICS = "metrics.jsonl"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (the rest belong to the part of a run being redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, logging_cfg, cfg, *, enabled: bool, total_steps: int, start_step: int):
        self.dir = Path(output_dir)
        self.cfg = logging_cfg
        self.enabled = enabled
        self.path = self.dir / METRICS
        self.tb = self.wandb = self.bar = None
        self._t_last = time.perf_counter()
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self._file = self.path.open("a")
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1)
        if logging_cfg.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=logging_cfg.wandb_project,
                dir=str(self.dir),
                mode=logging_cfg.wandb,
                config=OmegaConf.to_container(cfg, resolve=True),
                resume="allow",
                id=_wandb_id(self.dir),
            )
        if logging_cfg.progress_bar and sys.stderr.isatty():  # in a log file, plain lines read better
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, leave=True)

    def log(self, record: dict) -> None:
        """Write one record (must contain ``step``) everywhere."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if "loss" in record and self.bar is not None:
            self.bar.update(step - self.bar.n)
            if step % self.cfg.log_every == 0:
                extra = {"reward": f"{record['reward']:.4f}"} if "reward" in record else {}  # RL recipes
                self.bar.set_postfix(
                    loss=f"{record['loss']:.4f}", **extra, lr=f"{record['lr']:.2e}",
                    tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                )
        elif "loss" in record and step % self.cfg.log_every == 0:
            reward = f" reward {record['reward']:.4f}" if "reward" in record else ""
            log.info("step %d loss %.4f%s lr %.2e", step, record["loss"], reward, record["lr"])
        if any(k.startswith("eval/") for k in record):
            msg = format_metrics({k: v for k, v in scalars.items() if k.startswith("eval/")})
            (self.bar.write if self.bar is not None else log.info)(f"step {step}: {msg}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.cfg.plot:
            from steptrain.logging.plot import plot_losses

            plot_losses(self.path, self.dir / "loss.png")


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _wandb_id(output_dir: Path) -> str:
    """A stable run id per output_dir, so a resumed run continues the same W&B run."""
    path = output_dir / ".wandb_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
