"""Where document evaluation runs: the documents split over data-parallel ranks, the model split over
tensor-parallel ranks and pipeline stages as it was trained (`parallel.tp`, `parallel.pp`).

The world is tp × dp × pp with tp fastest and pp slowest: training's Layout with cp = 1 and its groups
(parallel/layout.py: parallel_state; context parallelism does not change the model's function and is not
used). Every rank of one model (its tp ranks and stages) reads the same documents and gets the same losses
(a pipeline's last stage broadcasts them: eval/stages.py); the sums of the breakdowns, the tuning losses and
the statistics of dynamic evaluation are added over the data-parallel group only (the ranks that hold the
same part of the model), so the result is that of one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fwl_scale.config import Config
from fwl_scale.eval.stages import StageContext
from fwl_scale.parallel.layout import GROUP_AXES, Layout, TPContext, parallel_state


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


def start_process_group() -> None:
    """A gloo group when started by a launcher with WORLD_SIZE > 1 (documents split over the ranks; the sums
    exchanged are small CPU tensors, so gloo serves on GPUs too)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


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
    state = parallel_state(layout, rank, ("tp", "dp", "pp") if p.pp > 1 else ("tp", "dp"))
    stage = None
    if p.pp > 1:
        tie_group = None
        if cfg.model.tie_embeddings:  # the first and last stage of each pipeline (new_group is collective)
            for ranks in layout.group_ranks(GROUP_AXES["pp"]):
                g = dist.new_group([ranks[0], ranks[-1]])
                if rank in (ranks[0], ranks[-1]):
                    tie_group = g
        stage = StageContext(state.groups["pp"], state.group_ranks["pp"], state.pp_rank, tie_group)
    return EvalRanks(state.dp_rank, layout.dp, state.groups["dp"], state.tp_context(), stage)
