"""Collectives over the default torch.distributed process group, shared by the multi-process engines."""

from __future__ import annotations

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
