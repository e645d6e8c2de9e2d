"""The parallel layout: ranks arranged as tp × cp × dp × pp (tp fastest) and their process groups.

A global rank is `tp_rank + tp·(cp_rank + cp·(dp_rank + dp·pp_rank))` (docs/design.md §3.4): the ranks of one
tensor-parallel group are consecutive (on one node, where the bandwidth is), pipeline stages are the
slowest axis. With cp = 1 this is DeepSpeed's `PipeModelDataParallelTopology` order (pipe, data, model),
so the pipeline engine's own groups coincide with ours.

`plan_layout(cfg, world_size)` validates a layout without touching torch.distributed (so a launcher can
fail before any process starts); `init_parallel_state(cfg)` creates every group. All ranks must create
every group in the same order (torch.distributed.new_group is collective), which it does.

The returned `ParallelState` also answers DeepSpeed's `mpu` questions (model-parallel = tp × pp, data-
parallel = dp × cp: context-parallel ranks hold the same parameters, so their gradients are reduced
together with the data-parallel ones).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.distributed as dist

from fwl_scale.config import Config, ConfigError, check_layout

AXES = ("tp", "cp", "dp", "pp")  # fastest first


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    def coords(self, rank: int) -> dict[str, int]:
        """The (tp, cp, dp, pp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        out = {}
        for a in AXES:
            n = getattr(self, a)
            out[a] = rank % n
            rank //= n
        return out

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        coords = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
        rank, stride = 0, 1
        for a in AXES:
            rank += coords[a] * stride
            stride *= getattr(self, a)
        return rank

    def group_ranks(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every group that varies along `axes` with the other coordinates fixed (ranks ascending; groups
        ordered by their first rank, the order in which every rank creates them)."""
        unknown = set(axes) - set(AXES)
        if unknown:
            raise ValueError(f"unknown axes {sorted(unknown)}; known: {AXES}")
        fixed = [a for a in AXES if a not in axes]
        groups = []
        for f in itertools.product(*(range(getattr(self, a)) for a in fixed)):
            base = dict(zip(fixed, f))
            ranks = []
            for v in itertools.product(*(range(getattr(self, a)) for a in axes)):
                ranks.append(self.rank_of(**base, **dict(zip(axes, v))))
            groups.append(sorted(ranks))
        return sorted(groups)


    def deepspeed_topology(self):
        """DeepSpeed's PipeModelDataParallelTopology for this layout (for the pipeline engine, which
        builds its groups from it and takes no mpu): model = tp, data = cp × dp (context-parallel
        ranks reduce gradients with the data-parallel ones), pipe = pp — the same rank order as ours."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # only pp > 1 uses DeepSpeed's

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.cp * self.dp)


def plan_layout(cfg: Config, world_size: int, source: str = "config") -> Layout:
    """Validates `cfg` (Config.validate, config.check_layout) for `world_size` ranks and returns the
    layout. Errors name the field."""
    cfg.validate(source)
    dp = check_layout(cfg, world_size, source)
    p = cfg.parallel
    return Layout(tp=p.tp, cp=p.cp, dp=dp, pp=p.pp)


@dataclass
class TPContext:
    """What a tensor-parallel module needs: its group, its place in it, and whether the norm and
    residual regions are sequence-parallel."""

    group: object
    size: int
    rank: int
    sequence_parallel: bool = False


# Groups created by init_parallel_state, in this order on every rank.
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("cp", "dp"),  # gradient reduction (context-parallel ranks share the parameters)
    "tp_pp": ("tp", "pp"),  # "model parallel" in DeepSpeed/Megatron's sense (gradient-norm reduction)
}


@dataclass
class ParallelState:
    layout: Layout
    rank: int
    sequence_parallel: bool = False
    groups: dict[str, object] = field(default_factory=dict)  # name -> ProcessGroup (None: single process)
    group_ranks: dict[str, list[int]] = field(default_factory=dict)

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    tp_rank = property(lambda self: self.coords["tp"])
    cp_rank = property(lambda self: self.coords["cp"])
    dp_rank = property(lambda self: self.coords["dp"])
    pp_rank = property(lambda self: self.coords["pp"])
    tp_size = property(lambda self: self.layout.tp)
    cp_size = property(lambda self: self.layout.cp)
    dp_size = property(lambda self: self.layout.dp)
    pp_size = property(lambda self: self.layout.pp)

    def tp_context(self) -> TPContext | None:
        """None when tp = 1 (the model is then exactly the single-process one)."""
        if self.layout.tp == 1:
            return None
        return TPContext(self.groups["tp"], self.layout.tp, self.tp_rank, self.sequence_parallel)

    # --- DeepSpeed's mpu interface -------------------------------------------------------------
    def get_model_parallel_group(self):
        return self.groups["tp_pp"]

    def get_model_parallel_rank(self) -> int:
        return self.group_ranks["tp_pp"].index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_tensor_model_parallel_group(self):
        return self.groups["tp"]

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.group_ranks["tp"][0]

    def get_data_parallel_group(self):
        return self.groups["dp_cp"]

    def get_data_parallel_rank(self) -> int:
        return self.group_ranks["dp_cp"].index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp * self.layout.cp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.group_ranks["dp_cp"])

    def get_pipe_parallel_group(self):
        return self.groups["pp"]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp


def init_parallel_state(cfg: Config, world_size: int | None = None, rank: int | None = None,
                        source: str = "config") -> ParallelState:
    """Validates the layout for this world and creates the groups (tp, cp, dp, pp, dp×cp, tp×pp).

    torch.distributed must be initialised when the world has more than one rank; every rank calls this
    with the same config."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if initialised and world_size != dist.get_world_size():
        raise ConfigError(f"{source}: world size {world_size} given, torch.distributed has "
                          f"{dist.get_world_size()} ranks")
    layout = plan_layout(cfg, world_size, source)
    if world_size > 1 and not initialised:
        raise ConfigError(f"{source}: parallel layout of {world_size} ranks needs torch.distributed to be "
                          "initialised first")
    # Sequence parallelism splits the sequence over the tp group: with tp = 1 it is a no-op (as in Megatron).
    return parallel_state(layout, rank, GROUP_AXES, cfg.parallel.sequence_parallel and layout.tp > 1)


def parallel_state(layout: Layout, rank: int, names: Iterable[str], sequence_parallel: bool = False) -> ParallelState:
    """This rank's ParallelState in `layout` with the groups `names` (keys of GROUP_AXES) created in that
    order (None groups without torch.distributed). Collective: every rank calls it with the same
    arguments. Training creates every group (init_parallel_state); evaluation only those it uses."""
    initialised = dist.is_available() and dist.is_initialized()
    state = ParallelState(layout=layout, rank=rank, sequence_parallel=sequence_parallel)
    for name in names:
        for ranks in layout.group_ranks(GROUP_AXES[name]):
            group = dist.new_group(ranks) if initialised else None
            if rank in ranks:
                state.groups[name] = group
                state.group_ranks[name] = ranks
    return state
