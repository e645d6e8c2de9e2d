"""Collectives over every rank of the job, for decisions all ranks must take together (skip a step,
stop, how many batches to evaluate); in one process they return their input."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _many_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums `t` over all ranks in place and returns it."""
    if _many_ranks():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(n: int, device: torch.device) -> int:
    """The smallest of every rank's `n`."""
    if _many_ranks():
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return n
