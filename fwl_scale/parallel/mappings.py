"""Megatron's tensor-parallel mappings as autograd Functions (torch.distributed is not differentiable).

Convention (the whole of tensor parallelism rests on it): a tensor is either *replicated* over the tp
group — the same value on every rank, and after backward the same, complete gradient on every rank — or
*sharded* — each rank holds its own slice and the gradient of that slice. A replicated tensor that is
used by a sharded computation receives only this rank's part of its gradient from that use, so it must
enter through `copy_to_tp` (forward identity, backward all-reduce). A sum of per-rank partial results
leaves through `reduce_from_tp` (forward all-reduce, backward identity: everything downstream is
replicated). A replicated tensor produced by a reduction but consumed by sharded computations (the inner
softmax's sum-exp in the FWL) goes through `all_reduce_tp`, whose backward all-reduces as well —
Megatron's reduce-from alone would drop the other ranks' gradient contributions on that second-order path.

Sequence parallelism (Megatron SP): between the tensor-parallel regions the activations are split along
the sequence (dim 1); `gather_from_sequence` enters a column-parallel region (backward reduce-scatter,
replacing copy_to_tp), `reduce_scatter_to_sequence` leaves a row-parallel one (replacing reduce_from_tp).

Every function takes a `TPContext` (or None) and is the identity when tp = 1, so the single-process model
runs exactly the ops it always did. Collectives never modify a tensor that autograd may share: they
work on a copy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fwl_scale.parallel.layout import TPContext


# torch >= 2.13 renamed the tensor-in/tensor-out collectives; older versions (pyproject allows 2.4) have
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _active(tp: TPContext | None) -> bool:
    return tp is not None and tp.size > 1


def _all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    return out


def _all_gather(t: Tensor, dim: int, group, size: int) -> Tensor:
    front = t.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0],) + tuple(front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(t: Tensor, dim: int, group, size: int) -> Tensor:
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"reduce-scatter over {size} tensor-parallel ranks: dim {dim} has {n} entries, "
                         f"not a multiple of {size}")
    front = t.movedim(dim, 0).contiguous()
    out = front.new_empty((n // size,) + tuple(front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _split(t: Tensor, dim: int, rank: int, size: int) -> Tensor:
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"splitting over {size} tensor-parallel ranks: dim {dim} has {n} entries, "
                         f"not a multiple of {size}")
    return t.narrow(dim, rank * (n // size), n // size).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.tp.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp.group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_reduce(x, tp.group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.tp.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _split(x, dim, tp.rank, tp.size)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.tp.group, ctx.tp.size), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _all_gather(x, dim, tp.group, tp.size)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.tp.rank, ctx.tp.size), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _all_gather(x, dim, tp.group, tp.size)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.dim, ctx.tp.group, ctx.tp.size), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, dim):
        ctx.tp, ctx.dim = tp, dim
        return _reduce_scatter(x, dim, tp.group, tp.size)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.dim, ctx.tp.group, ctx.tp.size), None, None


def copy_to_tp(x: Tensor, tp: TPContext | None) -> Tensor:
    """Replicated -> used by sharded computations. Forward identity; backward all-reduce (sum)."""
    return _CopyToTP.apply(x, tp) if _active(tp) else x


def reduce_from_tp(x: Tensor, tp: TPContext | None) -> Tensor:
    """Per-rank partial sums -> replicated result. Forward all-reduce; backward identity."""
    return _ReduceFromTP.apply(x, tp) if _active(tp) else x


def all_reduce_tp(x: Tensor, tp: TPContext | None) -> Tensor:
    """Per-rank partial sums -> a replicated result that sharded computations consume. Forward and
    backward all-reduce (= reduce_from_tp followed by copy_to_tp)."""
    return _AllReduceTP.apply(x, tp) if _active(tp) else x


def scatter_to_tp(x: Tensor, tp: TPContext | None, dim: int = -1) -> Tensor:
    """Replicated -> this rank's slice along `dim`. Backward all-gather."""
    return _ScatterToTP.apply(x, tp, dim) if _active(tp) else x


def gather_from_tp(x: Tensor, tp: TPContext | None, dim: int = -1) -> Tensor:
    """Slices along `dim` -> the replicated whole. Backward: this rank's slice of the gradient."""
    return _GatherFromTP.apply(x, tp, dim) if _active(tp) else x


def scatter_to_sequence(x: Tensor, tp: TPContext | None, dim: int = 1) -> Tensor:
    """Replicated full sequence -> this rank's chunk of it (backward all-gather)."""
    return scatter_to_tp(x, tp, dim)


def gather_from_sequence(x: Tensor, tp: TPContext | None, dim: int = 1) -> Tensor:
    """Sequence chunks -> the full sequence as the input of a column-parallel (sharded) computation.
    Backward reduce-scatter: sums the ranks' partial gradients and keeps this rank's chunk."""
    return _GatherFromSequence.apply(x, tp, dim) if _active(tp) else x


def reduce_scatter_to_sequence(x: Tensor, tp: TPContext | None, dim: int = 1) -> Tensor:
    """Per-rank partial sums over the full sequence -> this rank's chunk of the sum. Backward all-gather."""
    return _ReduceScatterToSequence.apply(x, tp, dim) if _active(tp) else x


def all_reduce_max_(t: Tensor, tp: TPContext | None) -> Tensor:
    """In-place, non-differentiable max over the group (softmax shifts: the result does not depend on
    the shift, so no gradient flows through it)."""
    if _active(tp):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp.group)
    return t
