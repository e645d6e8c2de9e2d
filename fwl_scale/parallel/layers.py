"""Tensor-parallel layers on plain nn.Parameters (so ZeRO can shard them); each marks its parameters'
shards (parallel/shards.py).

At tp = 1 (tp=None) each layer runs exactly the ops of its torch.nn counterpart and has the same
parameter names, so a state dict saved at tp = 1 loads unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.mappings import (copy_to_tp, gather_from_sequence, reduce_from_tp,
                                         reduce_scatter_to_sequence)
from fwl_scale.parallel.shards import divide, set_replicated, set_sharded, tp_rank, tp_size


def _tag_rank(p: nn.Parameter, tp: TPContext | None) -> None:
    p.tp_rank = tp_rank(tp)


# --- layers ------------------------------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """y_r = x W_rᵀ + b_r: the output features split over tp (stride > 1: a fused projection whose
    `stride` blocks are each split). The input is replicated (enters through copy_to_tp) or, under
    sequence parallelism, a sequence chunk (gathered; the backward reduce-scatters)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TPContext | None = None,
                 stride: int = 1, device=None, dtype=None):
        super().__init__()
        self.tp = tp
        if out_features % (stride * tp_size(tp)):
            raise ValueError(f"output width {out_features} does not split into {stride} blocks over "
                             f"{tp_size(tp)} tensor-parallel ranks")
        local = out_features // tp_size(tp)
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        set_sharded(self.weight, tp, 0, stride)
        _tag_rank(self.weight, tp)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype))
            set_sharded(self.bias, tp, 0, stride)
            _tag_rank(self.bias, tp)

    def enter(self, x: Tensor) -> Tensor:
        if self.tp is not None and self.tp.sequence_parallel:
            return gather_from_sequence(x, self.tp)
        return copy_to_tp(x, self.tp)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.enter(x), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r W_rᵀ + b: the input features split over tp, the partial products summed (all-reduce,
    or reduce-scatter to sequence chunks under sequence parallelism), the bias added once after."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tp: TPContext | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.tp = tp
        local = divide(in_features, tp, "row-parallel input width")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        set_sharded(self.weight, tp, 1)
        _tag_rank(self.weight, tp)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            set_replicated(self.bias)
            _tag_rank(self.bias, tp)

    def forward(self, x: Tensor) -> Tensor:
        if tp_size(self.tp) == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.tp.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.tp)
            # The bias meets only this rank's tokens: its gradient is a per-rank part, summed in autograd.
            return y + copy_to_tp(self.bias, self.tp) if self.bias is not None else y
        y = reduce_from_tp(y, self.tp)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows of the (padded) vocabulary split over tp; each rank looks up the ids it holds, zeros for the
    rest, and the partial embeddings are summed (all-reduce, or reduce-scatter to sequence chunks)."""

    def __init__(self, num_embeddings: int, dim: int, tp: TPContext | None = None, device=None, dtype=None):
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        local = divide(num_embeddings, tp, "padded vocabulary")
        self.vocab_start = tp_rank(tp) * local
        self.weight = nn.Parameter(torch.empty(local, dim, device=device, dtype=dtype))
        set_sharded(self.weight, tp, 0)
        _tag_rank(self.weight, tp)

    def forward(self, ids: Tensor) -> Tensor:
        if tp_size(self.tp) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.tp.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.tp)
        return reduce_from_tp(out, self.tp)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose parameters, under sequence parallelism, see only this rank's tokens: their
    gradients are per-rank parts and are all-reduced over tp inside autograd (ZeRO-2/3 consume .grad
    during backward, so nothing may be summed afterwards)."""

    def __init__(self, dim: int, eps: float, tp: TPContext | None = None, device=None, dtype=None):
        super().__init__(dim, eps=eps, device=device, dtype=dtype)
        self.tp = tp
        for p in self.parameters():
            set_replicated(p)
            _tag_rank(p, tp)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if self.tp is not None and self.tp.sequence_parallel:
            w, b = copy_to_tp(w, self.tp), copy_to_tp(b, self.tp)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no shift (Llama's): x / sqrt(mean(x²) + eps) · w.
    Its weight is handled under sequence parallelism as LayerNorm's."""

    def __init__(self, dim: int, eps: float, tp: TPContext | None = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.tp = tp
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        set_replicated(self.weight)
        _tag_rank(self.weight, tp)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.tp is not None and self.tp.sequence_parallel:
            w = copy_to_tp(w, self.tp)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)
