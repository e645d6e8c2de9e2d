"""Where the model's tensors live under tensor, sequence and context parallelism, and the helpers the model
calls at the edge of a tensor-parallel region (enter_tp_region, whole_sequence) and to find which parallel
contexts it is built with (tp_context_of, cp_context_of). The math (model/gpt.py, model/fwl.py) calls
these and knows nothing else of placement; docs/design.md §3.2-3.3 gives the reasons.

The FWL under tensor parallelism (a TPContext):
* W1 (and b1) column-parallel over the hidden width 4s, W2 row-parallel; b2, alpha, beta, the step
  sizes replicated; the unembedding U and its bias c vocabulary-parallel (model/vocab.py).
* Every use of a replicated tensor by a sharded computation enters through copy_to_tp (backward
  all-reduce): x as W1's input, key and query; gh2 as W2's fast value and as the input of W2ᵀgh2; u as
  the input of the inner softmax; the step sizes and forgetting factors of W1, b1 and W2 (their
  gradients are sums of per-rank parts, so they are all-reduced inside autograd, where ZeRO-2/3 expect
  them).
* The partial dot products a_j·a'_i of each rank sum exactly, so one all-reduce serves W2's slow product
  and its fast update together; b2 and η_b2·Σgh2 are added once, after it (FastWeightLayer.w2_out).
* The inner softmax's max and sum-exp are all-reduced (the sum-exp differentiably both ways), Uᵀgz is
  all-reduced.
* Under sequence parallelism the input x arrives as this rank's sequence chunk and is all-gathered like
  any column-parallel input (enter_tp_region). Everything after W2 (LayerNorm, alpha, beta, the running
  sums of width s) is replicated over the full sequence; the output u' is replicated [B, T, s].

The FWL under context parallelism (a CPContext, orthogonal to tp): each rank holds a contiguous chunk of
every sequence ([B, T/cp, d], under sequence parallelism [B, T/(cp·tp), d]); labels and document ids are
the whole sequence on every rank; u' is this rank's chunk. After the slow pass every key and value of
the six running sums exists, so the state entering the rank is exchanged once for the whole block before
any fast computation (model/fwl/sums.py, model/fwl/context_parallel.py):
* `state`: each rank's contribution is its sums after its last document start (the first rank's include
  a carried state), flagged where a document starts on it; one `exclusive_state_scan` (segmented
  exclusive scan, reverse scan in backward) gives every rank its entering state;
* `kv`: one all-gather of the keys and values (x, gh1, a, gh2, gu, gu⊙xhat); the vector sums of the
  earlier ranks' tokens in the continuing document are summed, the fast dense layers attend to those
  tokens directly (the quadratic form across the boundary);
* `auto`: whichever sends fewer bytes per rank (state dk·dv in fp32 vs T_rank·(dk+dv) activations).
A returned state is the last rank's, broadcast over the group (replicated over cp).

The body (gpt.py, blocks.py) is Megatron's: attention split by heads (with grouped-query attention q and
k|v each split by heads, tp dividing n_kv_heads, so a rank's query heads meet their own key/value heads), the MLP column/row-parallel (with
model.mlp = swiglu the gate and up projections both column-parallel from one copy of their input, down
row-parallel), the tied embedding vocabulary-parallel, the residual stream in sequence chunks under
sequence parallelism; the norms (LayerNorm or RMSNorm) and learned position embeddings replicated, their
gradients all-reduced inside autograd under sequence parallelism (each rank sees its chunk's tokens);
under context parallelism attention all-gathers every rank's keys and values.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from fwl_scale.parallel.context_parallel import CPContext, cp_context
from fwl_scale.parallel.layout import ParallelState, TPContext
from fwl_scale.parallel.mappings import copy_to_tp, gather_from_sequence, gather_from_tp


def enter_tp_region(x: Tensor, tp: TPContext | None) -> Tensor:
    """A replicated activation (under sequence parallelism: this rank's sequence chunk) as the input of
    a sharded computation: the whole sequence, whose gradient is summed over tp in backward."""
    if tp is not None and tp.sequence_parallel:
        return gather_from_sequence(x, tp)
    return copy_to_tp(x, tp)


def whole_sequence(x: Tensor, tp: TPContext | None) -> Tensor:
    """The replicated whole sequence outside the tensor-parallel region (its gradient not summed over
    tp): under sequence parallelism gathered with a backward that keeps this rank's part."""
    if tp is not None and tp.sequence_parallel:
        return gather_from_tp(x, tp, dim=1)
    return x


def cp_context_of(parallel, exchange: str) -> CPContext | None:
    """The context-parallel part of `parallel` (see tp_context_of), None at cp = 1."""
    if isinstance(parallel, ParallelState):
        return cp_context(parallel, exchange)
    if isinstance(parallel, CPContext):
        return parallel if parallel.size > 1 else None
    return None


def tp_context_of(parallel) -> TPContext | None:
    """The tensor-parallel part of `parallel`: a ParallelState, a TPContext, a CPContext (none) or a bare
    process group (no sequence parallelism); None at tp = 1."""
    if parallel is None:
        return None
    if isinstance(parallel, ParallelState):
        return parallel.tp_context()
    if isinstance(parallel, TPContext):
        return parallel if parallel.size > 1 else None
    if isinstance(parallel, CPContext):
        return None
    size = dist.get_world_size(parallel)
    return TPContext(parallel, size, dist.get_rank(parallel), False) if size > 1 else None
