"""Context parallelism: a cp group splits each sequence into contiguous chunks, one per rank.

Two collectives live here, each an autograd.Function because torch.distributed collectives are not
differentiable:

* `exclusive_state_scan`: the FWL state a rank starts from is the segmented exclusive scan of the earlier
  ranks' contributions (docs/design.md §1.4, boundary 3). A rank's contribution is the sums over its
  tokens after its last document start, plus a flag saying whether a document starts on it. Forward:
  one all-gather of every contribution, then the scan. Backward: one all-gather of dL/dS_in, then the
  reverse segmented scan — the gradient a contribution receives from every later rank that still sees it.
  With a forgetting factor λ per contribution (the FWL's decayed sums) the combine is S <- λ^n·S + C_q,
  n the tokens of a rank; the gradient of log λ needs nothing from other ranks (the gathered
  contributions are here already), so it costs no further collective.
  A received state that were detached would give a correct forward and wrong gradients: the tests check
  the gradients against the unsplit model.
* `gather_sequence`: the body's keys and values from every rank of the group (all-gather forward; the
  backward sums the incoming gradients over the group and keeps this rank's slice: a reduce-scatter).

* `broadcast_from_last`: the state after a sequence's last position lives on the last rank; a carried
  state (streaming, training with state carried across segments) is replicated over the group, so the
  next segment's first rank has it. Backward: the ranks' gradients summed onto the last rank.

`CPContext` is what a context-parallel module needs (group, size, rank, how the FWL exchanges its state;
which exchange `auto` picks is the FWL's business: model/fwl/context_parallel.py, choose_exchange).

gloo has no uneven or stacked all-gather: every rank sends one flat tensor of the same size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

EXCHANGES = ("auto", "state", "kv")
# torch >= 2.13 renamed the tensor-in/tensor-out collectives; older versions have only the old names.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CPContext:
    """A context-parallel group: this rank holds tokens [rank·T/size, (rank+1)·T/size) of every
    sequence. `exchange`: how the FWL passes its state across rank boundaries (auto | state | kv)."""

    group: object
    size: int
    rank: int
    exchange: str = "auto"

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise ValueError(f"context-parallel exchange must be one of {EXCHANGES}, got {self.exchange!r}")


def cp_context(parallel_state, exchange: str = "auto") -> CPContext | None:
    """The CPContext of a ParallelState (None when cp = 1)."""
    if parallel_state is None or parallel_state.cp_size == 1:
        return None
    return CPContext(parallel_state.groups["cp"], parallel_state.cp_size, parallel_state.cp_rank, exchange)


def _all_gather_flat(t: Tensor, group) -> list[Tensor]:
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


class _ExclusiveStateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, has_reset_b: Tensor, log_decay: Tensor | None, tokens: int, *contribs: Tensor):
        B = has_reset_b.shape[0]
        shapes = [c.shape for c in contribs]
        sizes = [s[1:].numel() for s in shapes]
        flat = torch.cat([c.reshape(B, -1) for c in contribs], dim=1)
        gathered = _all_gather_flat(torch.cat([flat, has_reset_b.to(flat.dtype).unsqueeze(1)], dim=1), group)
        rank = dist.get_rank(group)
        keep = [1.0 - g[:, -1:] for g in gathered]  # [B, 1]: 1 where no document starts on that rank
        # Per column: λ^tokens of its contribution (1 without decay).
        across = None
        if log_decay is not None:
            per = torch.exp(log_decay.to(flat.dtype) * tokens)
            across = torch.repeat_interleave(per, torch.tensor(sizes, device=per.device))
        state = torch.zeros_like(flat)
        d_state = torch.zeros_like(flat) if across is not None else None  # ∂state/∂log λ, per column
        for q in range(rank):
            if across is None:
                state = state * keep[q] + gathered[q][:, :-1]
            else:
                d_state = keep[q] * across * (d_state + tokens * state)
                state = state * keep[q] * across + gathered[q][:, :-1]
        ctx.group, ctx.rank, ctx.keep, ctx.shapes, ctx.across, ctx.d_state = group, rank, keep, shapes, across, d_state
        return tuple(piece.reshape(shape) for piece, shape in zip(state.split(sizes, dim=1), shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        B = ctx.shapes[0][0]
        flat = torch.cat([g.reshape(B, -1) for g in grads], dim=1)
        gathered = _all_gather_flat(flat, ctx.group)
        # G_r = g_{r+1} + keep_{r+1} λ^n G_{r+1}: later ranks see this rank's sums until a document starts.
        acc = torch.zeros_like(flat)
        for q in range(len(gathered) - 1, ctx.rank, -1):
            acc = gathered[q] + ctx.keep[q] * acc * (ctx.across if ctx.across is not None else 1.0)
        sizes = [s[1:].numel() for s in ctx.shapes]
        pieces = [p.reshape(s) for p, s in zip(acc.split(sizes, dim=1), ctx.shapes)]
        g_decay = None
        if ctx.d_state is not None and ctx.needs_input_grad[2]:
            g_decay = torch.stack([p.sum() for p in (flat * ctx.d_state).split(sizes, dim=1)])
        return (None, None, g_decay, None, *pieces)


def exclusive_state_scan(contribs: list[Tensor], has_reset_b: Tensor, group, log_decay: Tensor | None = None,
                         tokens: int = 0) -> list[Tensor]:
    """Per rank r: S_r = Σ_{q<r, no document start on ranks q+1..r-1} λ^(n·(r-1-q)) C_q (all tensors
    [B, ...]); `log_decay` [len(contribs)]: log λ of each contribution (None: λ = 1), n = `tokens`, the
    tokens every rank holds."""
    return list(_ExclusiveStateScan.apply(group, has_reset_b, log_decay, tokens, *contribs))


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x: Tensor, dim: int):
        ctx.group, ctx.dim, ctx.rank, ctx.size = group, dim, dist.get_rank(group), x.shape[dim]
        return torch.cat(_all_gather_flat(x, group), dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The sum of every rank's gradient, this rank's slice of it: a reduce-scatter (half the traffic
        # of an all-reduce) on the gathered dimension moved to the front.
        front = grad.movedim(ctx.dim, 0).contiguous()
        out = front.new_empty((ctx.size,) + tuple(front.shape[1:]))
        _reduce_scatter_single(out, front, group=ctx.group)
        return None, out.movedim(0, ctx.dim), None


def gather_sequence(x: Tensor, group, dim: int = 1) -> Tensor:
    """Concatenates every rank's chunk along `dim` (rank order = sequence order)."""
    return _GatherSequence.apply(group, x, dim)


def local_slice(t: Tensor, group, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of a full-sequence tensor."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    size = t.shape[dim] // n
    return t.narrow(dim, r * size, size)


class _BroadcastFromLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *tensors: Tensor):
        ctx.group = group
        ctx.is_last = dist.get_rank(group) == dist.get_world_size(group) - 1
        ctx.shapes = [t.shape for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors]).contiguous()
        group = group if group is not None else dist.group.WORLD
        src = dist.get_global_rank(group, dist.get_world_size(group) - 1)
        dist.broadcast(flat, src=src, group=group)
        sizes = [s.numel() for s in ctx.shapes]
        return tuple(p.reshape(s) for p, s in zip(flat.split(sizes), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        flat = torch.cat([g.reshape(-1) for g in grads]).contiguous()
        dist.all_reduce(flat, group=ctx.group)
        if not ctx.is_last:
            flat = torch.zeros_like(flat)
        sizes = [s.numel() for s in ctx.shapes]
        return (None, *(p.reshape(s) for p, s in zip(flat.split(sizes), ctx.shapes)))


def broadcast_from_last(tensors: list[Tensor], group) -> list[Tensor]:
    """Every rank gets the last rank's tensors (all of one dtype; other ranks pass same-shaped
    placeholders). Backward: the sum of every rank's gradient goes to the last rank's inputs."""
    return list(_BroadcastFromLast.apply(group, *tensors))


@torch.no_grad()
def gather_along_sequence(t: Tensor, group, dim: int = 1) -> Tensor:
    """Every rank's chunk concatenated along `dim`, not differentiable (evaluation: per-token losses of
    the whole sequence on every rank)."""
    return torch.cat(_all_gather_flat(t, group), dim=dim)
