"""The vocabulary: the unembedding's logits z = U u + c, the per-token cross-entropy and the softmax
input gradient Uᵀ(softmax(z) - onehot(y)) — the one home of every loss over the vocabulary.

Every path uses these functions: the baseline head and the FWL head (VocabLoss), the FWL's inner
gradient (unembedding_input_grad), the pipeline's last stage and evaluation (they run GPT.head), the
Hugging Face wrapper (it runs GPT). The tests' references (model/fwl/naive.py, F.cross_entropy on full
logits) stay independent on purpose.

One function per quantity for every tensor-parallel size: `weight` [V/tp, s] and `bias` [V/tp] are this rank's rows of
the padded vocabulary. Every row is multiplied, the padding's too (global index >= vocab_size), because
a width like 50,257 would send the matmul to slower unaligned kernels; the padding's logits are then set
to −inf, so they take no probability and their rows no gradient. The max, the sum-exp and the label's
logit are reduced over tp. At tp = 1 (tp=None) there is nothing to
reduce and the same function runs as torch's fused cross-entropy and softmax, which keep less for
backward. `u` is already inside the tensor-parallel region
(copy_to_tp of a replicated tensor, or gather_from_sequence of sequence chunks; at tp = 1 the tensor
itself), except in unembedding_input_grad, whose replicated input enters it there.

The per-token functions run over token chunks, each recomputed in backward, so that at most one
[chunk, V] tensor is alive at a time (docs/design.md §1.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fwl_scale import IGNORE_INDEX
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.mappings import (all_reduce_max_, all_reduce_tp, copy_to_tp, gather_from_tp,
                                         reduce_from_tp)
from fwl_scale.parallel.shards import tp_rank, tp_size


def at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _first_row_and_real_rows(weight: Tensor, vocab_size: int, tp: TPContext | None) -> tuple[int, int]:
    """(global index of this rank's first row, how many of its rows are real words, not padding)."""
    start = tp_rank(tp) * weight.shape[0]
    return start, max(0, min(weight.shape[0], vocab_size - start))


def shard_logits(u: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int,
                 tp: TPContext | None) -> Tensor:
    """This rank's logits [N, V/tp] (fp32 or wider), −inf on the padding."""
    _, n_real = _first_row_and_real_rows(weight, vocab_size, tp)
    z = u @ weight.t()
    if bias is not None:
        z = z + bias
    z = at_least_fp32(z)
    if n_real < weight.shape[0]:
        padding = torch.arange(weight.shape[0], device=z.device) >= n_real
        z = z.masked_fill(padding, float("-inf"))
    return z


def _label_in_shard(labels: Tensor, weight: Tensor, vocab_size: int,
                    tp: TPContext | None) -> tuple[Tensor, Tensor]:
    start, n_real = _first_row_and_real_rows(weight, vocab_size, tp)
    local = labels - start
    inside = (local >= 0) & (local < n_real)
    return local.clamp(0, weight.shape[0] - 1), inside


def _softmax_shift(z: Tensor, tp: TPContext | None) -> Tensor:
    """The global max over the vocabulary, detached: softmax and log-sum-exp do not depend on the shift."""
    m = z.detach().amax(dim=-1)
    return all_reduce_max_(m, tp)


def cross_entropy_rows(u: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int,
                       tp: TPContext | None) -> Tensor:
    """Per-token cross-entropy [N] (0 where labels == IGNORE_INDEX), replicated over tp."""
    z = shard_logits(u, weight, bias, vocab_size, tp)
    if tp_size(tp) == 1:
        # The same function with nothing to reduce; the fused kernel keeps one [N, V] tensor for
        # backward where the reductions below keep three (tests/test_plan_memory.py measures the peak).
        return F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    m = _softmax_shift(z, tp)
    # The sum-exp and the label's logit only feed replicated values (the loss): reduce_from suffices.
    sum_exp = reduce_from_tp(torch.exp(z - m.unsqueeze(-1)).sum(dim=-1), tp)
    local, inside = _label_in_shard(labels, weight, vocab_size, tp)
    z_label = z.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    z_label = reduce_from_tp(torch.where(inside, z_label, torch.zeros_like(z_label)), tp)
    loss = torch.log(sum_exp) + m - z_label
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(loss), loss)


def softmax_input_grad_rows(u: Tensor, labels: Tensor, scale: Tensor, weight: Tensor, bias: Tensor | None,
                            vocab_size: int, tp: TPContext | None) -> Tensor:
    """scale·Uᵀ(softmax(U u + c) - onehot(y)) [N, s], replicated over tp, as differentiable ops (the
    FWL's slow gradient is differentiated again by the outer loss). The sum-exp is consumed by this
    rank's probabilities only, so its all-reduce is differentiable both ways (all_reduce_tp); Uᵀgz is a
    sum of per-rank parts (reduce_from_tp)."""
    z = shard_logits(u, weight, bias, vocab_size, tp)
    if tp_size(tp) == 1:
        # As in cross_entropy_rows: softmax keeps only its output for backward.
        p = torch.softmax(z, dim=-1).to(u.dtype)
        return (p @ weight - weight[labels.clamp(min=0)]) * scale.unsqueeze(-1)
    m = _softmax_shift(z, tp)
    e = torch.exp(z - m.unsqueeze(-1))
    p = (e / all_reduce_tp(e.sum(dim=-1, keepdim=True), tp)).to(u.dtype)
    local, inside = _label_in_shard(labels, weight, vocab_size, tp)
    label_rows = weight[local] * inside.unsqueeze(-1).to(u.dtype)
    g = reduce_from_tp(p @ weight - label_rows, tp)
    return g * scale.unsqueeze(-1)


def _over_token_chunks(fn, chunk: int, per_token: tuple[Tensor, ...], shared: tuple) -> Tensor:
    """Applies a vocabulary-sized function to token chunks, recomputing each chunk in backward so at
    most one [chunk, V] tensor is alive at a time. (Under tensor parallelism the chunk's collectives run
    again in the recomputation, in the same order on every rank.)"""
    outs = []
    for s in range(0, per_token[0].shape[0], chunk):
        args = [t[s:s + chunk] for t in per_token]
        if torch.is_grad_enabled():
            outs.append(checkpoint(fn, *args, *shared, use_reentrant=False))
        else:
            outs.append(fn(*args, *shared))
    return torch.cat(outs)


def unembedding_input_grad(u_btd: Tensor, weight: Tensor, bias: Tensor | None, labels_bt: Tensor,
                           scale_bt: Tensor, vocab_size: int, chunk: int, tp: TPContext | None = None) -> Tensor:
    """scale·Uᵀ(softmax(U u + c) - onehot(y)) per token [B, T, s], in token chunks; `u_btd` replicated
    (it enters the tensor-parallel region here), the result replicated."""
    B, T, D = u_btd.shape
    per_token = (copy_to_tp(u_btd, tp).reshape(B * T, D), labels_bt.reshape(-1), scale_bt.reshape(-1))
    g = _over_token_chunks(softmax_input_grad_rows, chunk, per_token, (weight, bias, vocab_size, tp))
    return g.reshape(B, T, D)


def token_cross_entropy(u_btd: Tensor, weight: Tensor, bias: Tensor | None, labels_bt: Tensor,
                        vocab_size: int, chunk: int, tp: TPContext | None = None) -> Tensor:
    """Per-token cross-entropy [B, T] (0 at ignored positions), in token chunks; `u_btd` inside the
    tensor-parallel region, the result replicated."""
    B, T, D = u_btd.shape
    per_token = (u_btd.reshape(B * T, D), labels_bt.reshape(-1))
    return _over_token_chunks(cross_entropy_rows, chunk, per_token, (weight, bias, vocab_size, tp)).reshape(B, T)


def vocab_logits(u: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int,
                 tp: TPContext | None) -> Tensor:
    """The whole logits [..., V] (the padding cut off), replicated over tp; in u's dtype."""
    local = u @ weight.t()
    if bias is not None:
        local = local + bias
    return gather_from_tp(local, tp, dim=-1)[..., :vocab_size]


class VocabLoss(nn.Module):
    """Per-token cross-entropy (and, if asked, the logits) of the unembedding U u + c.

    A module of its own, without parameters of its own, so that DeepSpeed ZeRO-3 can gather the tied
    unembedding (and the FWL's output bias) for its forward *and* its backward: the losses are computed
    in token chunks recomputed during backward, which under ZeRO-3 needs those parameters gathered
    again (the engine builder registers them as this module's external parameters:
    GPT.zero3_external_parameters)."""

    def __init__(self, vocab_size: int, vocab_chunk: int, tp: TPContext | None):
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab_chunk = vocab_chunk
        self.tp = tp

    def forward(self, u: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """`u` [B, T, s] inside the tensor-parallel region; `weight`/`bias` this rank's vocabulary rows."""
        token_loss = token_cross_entropy(u, weight, bias, labels, self.vocab_size, self.vocab_chunk, self.tp)
        logits = vocab_logits(u, weight, bias, self.vocab_size, self.tp) if return_logits else None
        return token_loss, logits
