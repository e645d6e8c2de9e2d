"""Context parallelism: a cp group splits each sequence into contiguous chunks, one per rank.

Two collectives live here, each an autograd.Function because torch.distributed collectives are not
differentiable:

* `exclusive_state_scan`: the FWL state a rank starts from is the segmented exclusive scan of the earlier
  ranks' contributions (DESIGN §1, "The state", boundary 3). A rank's contribution is the sums over its
  tokens after its last document start, plus a flag saying whether a document starts on it. Forward:
  one all-gather of every contribution, then the scan. Backward: one all-gather of dL/dS_in, then the
  reverse segmented scan — the gradient a contribution receives from every later rank that still sees it.
  A received state that were detached would give a correct forward and wrong gradients: the tests check
  the gradients against the unsplit model.
* `gather_sequence`: the body's keys and values from every rank of the group (all-gather forward; the
  backward sums the incoming gradients over the group and keeps this rank's slice).

gloo has no uneven or stacked all-gather: every rank sends one flat tensor of the same size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_gather_flat(t: Tensor, group) -> list[Tensor]:
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


class _ExclusiveStateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, has_reset_b: Tensor, *contribs: Tensor):
        B = has_reset_b.shape[0]
        shapes = [c.shape for c in contribs]
        flat = torch.cat([c.reshape(B, -1) for c in contribs], dim=1)
        gathered = _all_gather_flat(torch.cat([flat, has_reset_b.to(flat.dtype).unsqueeze(1)], dim=1), group)
        rank = dist.get_rank(group)
        keep = [1.0 - g[:, -1:] for g in gathered]  # [B, 1]: 1 where no document starts on that rank
        state = torch.zeros_like(flat)
        for q in range(rank):
            state = state * keep[q] + gathered[q][:, :-1]
        ctx.group, ctx.rank, ctx.keep, ctx.shapes = group, rank, keep, shapes
        sizes = [s[1:].numel() for s in shapes]
        return tuple(piece.reshape(shape) for piece, shape in zip(state.split(sizes, dim=1), shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        B = ctx.shapes[0][0]
        flat = torch.cat([g.reshape(B, -1) for g in grads], dim=1)
        gathered = _all_gather_flat(flat, ctx.group)
        # G_r = g_{r+1} + keep_{r+1} G_{r+1}: later ranks see this rank's sums until a document starts.
        acc = torch.zeros_like(flat)
        for q in range(len(gathered) - 1, ctx.rank, -1):
            acc = gathered[q] + ctx.keep[q] * acc
        sizes = [s[1:].numel() for s in ctx.shapes]
        pieces = [p.reshape(s) for p, s in zip(acc.split(sizes, dim=1), ctx.shapes)]
        return (None, None, *pieces)


def exclusive_state_scan(contribs: list[Tensor], has_reset_b: Tensor, group) -> list[Tensor]:
    """Per rank r: S_r = Σ_{q<r, no document start on ranks q+1..r-1} C_q (all tensors [B, ...])."""
    return list(_ExclusiveStateScan.apply(group, has_reset_b, *contribs))


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x: Tensor, dim: int):
        ctx.group, ctx.dim, ctx.rank, ctx.size = group, dim, dist.get_rank(group), x.shape[dim]
        return torch.cat(_all_gather_flat(x, group), dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None


def gather_sequence(x: Tensor, group, dim: int = 1) -> Tensor:
    """Concatenates every rank's chunk along `dim` (rank order = sequence order)."""
    return _GatherSequence.apply(group, x, dim)


def local_slice(t: Tensor, group, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of a full-sequence tensor."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    size = t.shape[dim] // n
    return t.narrow(dim, r * size, size)
