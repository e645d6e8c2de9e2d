"""Shard bookkeeping: which slice of a whole tensor each tensor-parallel rank holds.

Every parameter carries Megatron's attributes: `tensor_model_parallel` (True for a shard),
`partition_dim`, `partition_stride` and `model_parallel` (what DeepSpeed's gradient-norm code looks
at: `deepspeed.runtime.utils.is_model_parallel_parameter`). A shard with stride k is rank r's slice of
each of k equal blocks of the full tensor along `partition_dim` (the fused q|k|v projection: k = 3, so
each rank holds the q, k and v rows of its own heads).

A shard is always the matching slice of the full (tp = 1) tensor: `take_shard` / `merge_shards` convert,
`init_normal_` draws the full tensor and keeps the slice (so a layout change never changes the model),
`full_state_dict` / `load_full_state_dict` convert whole models.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fwl_scale.parallel.layout import TPContext


def tp_size(tp: TPContext | None) -> int:
    return 1 if tp is None else tp.size


def tp_rank(tp: TPContext | None) -> int:
    return 0 if tp is None else tp.rank


def divide(n: int, tp: TPContext | None, what: str) -> int:
    size = tp_size(tp)
    if n % size:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {size}")
    return n // size


def set_sharded(p: nn.Parameter, tp: TPContext | None, dim: int, stride: int = 1) -> nn.Parameter:
    """Marks `p` as rank tp.rank's shard along `dim` (a no-op marking when tp = 1: replicated)."""
    sharded = tp_size(tp) > 1
    p.tensor_model_parallel = sharded
    p.model_parallel = sharded
    p.partition_dim = dim if sharded else -1
    p.partition_stride = stride if sharded else 1
    p.tp_size = tp_size(tp)
    return p


def set_replicated(p: nn.Parameter, tp: TPContext | None = None) -> nn.Parameter:
    return set_sharded(p, None, -1)


def is_sharded(p: Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def full_shape(p: Tensor) -> torch.Size:
    """The shape of the whole tensor this parameter is a shard of."""
    if not is_sharded(p):
        return p.shape
    shape = list(p.shape)
    shape[p.partition_dim] *= p.tp_size
    return torch.Size(shape)


def take_shard(full: Tensor, dim: int, rank: int, size: int, stride: int = 1) -> Tensor:
    """Rank `rank`'s slice of `full` along `dim` (of each of `stride` blocks)."""
    dim = dim % full.dim()
    n = full.shape[dim]
    if n % (stride * size):
        raise ValueError(f"dim {dim} of a tensor of shape {tuple(full.shape)} does not split into {stride} "
                         f"blocks over {size} ranks")
    blocks = full.unflatten(dim, (stride, n // stride))
    part = n // stride // size
    return blocks.narrow(dim + 1, rank * part, part).flatten(dim, dim + 1)


def merge_shards(shards: list[Tensor], dim: int, stride: int = 1) -> Tensor:
    """Inverse of take_shard: the whole tensor from every rank's shard (in rank order)."""
    dim = dim % shards[0].dim()
    n = shards[0].shape[dim]
    pieces = [s.unflatten(dim, (stride, n // stride)) for s in shards]
    return torch.cat(pieces, dim=dim + 1).flatten(dim, dim + 1)


def shard_of(p: Tensor, full: Tensor) -> Tensor:
    """The slice of a whole tensor that parameter `p` (a shard or replicated) holds on its rank."""
    if not is_sharded(p):
        return full
    return take_shard(full, p.partition_dim, p.tp_rank, p.tp_size, p.partition_stride)


@torch.no_grad()
def init_normal_(p: nn.Parameter, std: float) -> None:
    """Draws the whole tensor from the global generator and keeps this rank's slice: the same seed gives
    the same model at every tp (the RNG advances by the full size on every rank).

    A parameter on the meta device (one a pipeline stage does not hold) still consumes its draw, on the
    CPU generator, so that the parameters a stage does hold get the values of the whole model."""
    device = torch.device("cpu") if p.is_meta else p.device
    full = torch.empty(full_shape(p), device=device, dtype=p.dtype).normal_(mean=0.0, std=std)
    if not p.is_meta:
        p.copy_(shard_of(p, full))


def full_state_dict(model: nn.Module, tp: TPContext | None) -> dict[str, Tensor]:
    """Every parameter (and persistent buffer) as the whole tensor, on every tp rank (all-gather)."""
    params = dict(model.named_parameters())
    out = {}
    for name, t in model.state_dict().items():
        p = params.get(name)
        if p is not None and is_sharded(p) and tp_size(tp) > 1:
            t = t.contiguous()
            shards = [torch.empty_like(t) for _ in range(tp.size)]
            dist.all_gather(shards, t, group=tp.group)
            t = merge_shards(shards, p.partition_dim, p.partition_stride)
        out[name] = t.detach().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Loads whole (tp = 1) tensors into a model of any tp: each rank keeps its slices."""
    params = dict(model.named_parameters())
    local = {}
    for name, t in state.items():
        p = params.get(name)
        local[name] = shard_of(p, t) if p is not None else t
    model.load_state_dict(local)
