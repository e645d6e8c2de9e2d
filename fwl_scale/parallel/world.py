"""Collectives over every rank of the job, for decisions all ranks must take together (skip a step,
stop, how many batches to evaluate); in one process they return their input."""
from __future__ import annotations

from datetime import timedelta

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


class LongWait:
    """A decision all ranks take after one of them worked for long (rank 0 preparing the data): a gloo
    group of its own with its own timeout, created by every rank before the work starts. On the job's
    group the waiting ranks would sit in a collective that its timeout ends (NCCL aborts the job)."""

    def __init__(self, timeout_s: float):
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if _many_ranks()
                      else None)

    def any(self, flag: bool) -> bool:
        """True when `flag` is set on any rank; waits for every rank, then releases the group."""
        if self.group is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        finally:
            dist.destroy_process_group(self.group)
            self.group = None
        return float(t.item()) > 0
