"""Collectives over the default torch.distributed process group, shared by the multi-process engines."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessGroupCollectives:
    """barrier / all_reduce / close for an engine whose ranks share the default process group."""

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=OPS[op])
        return tensor

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def one_process_env() -> None:
    """Without a launcher (no RANK in the environment), describe a one-process job to torch.distributed."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
