"""Where document evaluation runs: the documents split over data-parallel ranks, the model split over
tensor-parallel ranks and pipeline stages as it was trained (`parallel.tp`, `parallel.pp`).

The world is tp × dp × pp with tp fastest and pp slowest, as in training (parallel/layout.py, cp = 1: context
parallelism does not change the model's function and is not used). Every rank of one model (its tp ranks
and stages) reads the same documents and gets the same losses (a pipeline's last stage broadcasts them:
eval/stages.py); the sums of the breakdowns, the tuning losses and the statistics of dynamic evaluation
are added over the data-parallel group only (the ranks that hold the same part of the model), so the
result is that of one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fwl_scale.config import Config
from fwl_scale.eval.stages import StageContext
from fwl_scale.parallel.layout import Layout, TPContext


@dataclass
class EvalRanks:
    rank: int  # this rank's place among the data-parallel ranks: it evaluates documents rank, rank + size, ...
    size: int
    group: object  # the data-parallel group (None: the whole world, or one process)
    tp: TPContext | None = None  # the model's tensor-parallel group (None: the whole model in every rank)
    stage: StageContext | None = None  # this rank's pipeline stage (None: every layer in every rank)

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
        return self.size * (self.tp.size if self.tp is not None else 1) * (self.stage.size if self.stage else 1)

    @property
    def leader(self) -> bool:
        """Rank 0 of the world: it prints and writes."""
        return self.rank == 0 and (self.tp is None or self.tp.rank == 0) and (self.stage is None or self.stage.first)


SINGLE = EvalRanks(0, 1, None)


def eval_ranks(cfg: Config) -> EvalRanks:
    """The layout of this evaluation from the world torch.distributed was started with and the config's
    parallel.tp and parallel.pp (parallel.cp and sequence parallelism do not change the model's function
    and are not used). Creates the process groups: every rank must call it."""
    p = cfg.parallel
    model_ranks = p.tp * p.pp
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if model_ranks > 1:
            raise ValueError(f"fwl eval: parallel.tp={p.tp} × parallel.pp={p.pp} needs {model_ranks} ranks (a "
                             f"launcher: torchrun --nproc-per-node {model_ranks} -m fwl_scale.cli eval ...), or "
                             "parallel.tp=1 parallel.pp=1 (a pipeline checkpoint is read whole; a tensor-parallel "
                             "one needs converting: fwl ckpt convert)")
        return SINGLE
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % model_ranks:
        raise ValueError(f"fwl eval: {world} ranks do not split into models of parallel.tp={p.tp} × "
                         f"parallel.pp={p.pp} ranks")
    if model_ranks == 1:
        return EvalRanks(rank, world, None)
    layout = Layout(tp=p.tp, cp=1, dp=world // model_ranks, pp=p.pp)
    where = layout.coords(rank)
    # new_group is collective: every rank creates every group, in the same order.
    tp_group, _ = _own_group(layout, ("tp",), rank)
    dp_group, _ = _own_group(layout, ("dp",), rank)
    stage = None
    if p.pp > 1:
        pp_group, pp_ranks = _own_group(layout, ("pp",), rank)
        tie_group = None
        if cfg.model.tie_embeddings:
            for ranks in layout.group_ranks(("pp",)):
                g = dist.new_group([ranks[0], ranks[-1]])
                if rank in (ranks[0], ranks[-1]):
                    tie_group = g
        stage = StageContext(pp_group, pp_ranks, where["pp"], tie_group)
    tp = TPContext(tp_group, p.tp, where["tp"]) if p.tp > 1 else None
    return EvalRanks(where["dp"], layout.dp, dp_group, tp, stage)


def _own_group(layout: Layout, axes: tuple[str, ...], rank: int) -> tuple[object, list[int]]:
    """Creates every group along `axes`; returns this rank's (group, its ranks)."""
    own = None
    for ranks in layout.group_ranks(axes):
        g = dist.new_group(ranks)
        if rank in ranks:
            own = (g, ranks)
    assert own is not None
    return own
