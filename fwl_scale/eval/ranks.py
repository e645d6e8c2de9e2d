"""Where document evaluation runs: the documents split over data-parallel ranks, the model split over
tensor-parallel ranks as it was trained (`parallel.tp`).

The world is tp × dp with tp fastest, as in training (the ranks of one model are consecutive). Every rank
of a tensor-parallel group reads the same documents and computes the same losses; the sums of the
breakdowns, the tuning losses and the statistics of dynamic evaluation are added over the data-parallel
group only (the ranks that hold the same shards), so the result is that of one process. Pipeline
stages are not evaluated as such: a pp checkpoint is converted first (the message says how).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fwl_scale.config import Config
from fwl_scale.parallel.layout import TPContext


@dataclass
class EvalRanks:
    rank: int  # this rank's place among the data-parallel ranks: it evaluates documents rank, rank + size, ...
    size: int
    group: object  # the data-parallel group (None: the whole world, or one process)
    tp: TPContext | None = None  # the model's tensor-parallel group (None: the whole model in every rank)

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the data-parallel ranks, in place (a CPU tensor: the group is gloo)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max(self, x: float) -> float:
        """The largest `x` of every rank of the world (the slowest rank's wall time)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([x], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return float(t)
        return x

    def share(self, items: list) -> list:
        return items[self.rank::self.size]

    @property
    def world(self) -> int:
        return self.size * (self.tp.size if self.tp is not None else 1)

    @property
    def leader(self) -> bool:
        """Rank 0 of the world: it prints and writes."""
        return self.rank == 0 and (self.tp is None or self.tp.rank == 0)


SINGLE = EvalRanks(0, 1, None)


def eval_ranks(cfg: Config) -> EvalRanks:
    """The layout of this evaluation from the world torch.distributed was started with and the config's
    parallel.tp (parallel.cp and sequence parallelism do not change the model's function and are not
    used; pp is refused). Creates the process groups: every rank must call it."""
    p = cfg.parallel
    if p.pp > 1:
        raise ValueError(f"fwl eval: the model is split over parallel.pp={p.pp} pipeline stages; evaluation runs "
                         "the whole model per rank or tensor-parallel. Convert the checkpoint first (fwl ckpt "
                         "convert CKPT NEW_RUN_DIR) and evaluate NEW_RUN_DIR with parallel.pp=1 (and any parallel.tp)")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if p.tp > 1:
            raise ValueError(f"fwl eval: parallel.tp={p.tp} needs {p.tp} ranks (a launcher: torchrun "
                             f"--nproc-per-node {p.tp} -m fwl_scale.cli eval ...), or parallel.tp=1 with a "
                             "converted checkpoint")
        return SINGLE
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % p.tp:
        raise ValueError(f"fwl eval: {world} ranks do not split into tensor-parallel groups of parallel.tp={p.tp}")
    if p.tp == 1:
        return EvalRanks(rank, world, None)
    tp_group = dp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    for k in range(world // p.tp):
        g = dist.new_group(list(range(k * p.tp, (k + 1) * p.tp)))
        if rank // p.tp == k:
            tp_group = g
    for t in range(p.tp):
        g = dist.new_group(list(range(t, world, p.tp)))
        if rank % p.tp == t:
            dp_group = g
    return EvalRanks(rank // p.tp, world // p.tp, dp_group, TPContext(tp_group, p.tp, rank % p.tp))
