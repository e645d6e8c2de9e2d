"""Sequential fast-weight updates (model.fwl.update=sequential, docs/design.md §1.6): the inner mini-batches of
TTT (Sun et al. 2024) for the FWL.

The forward's positions are cut into inner chunks of b = model.fwl.inner_chunk tokens, aligned to its position
0: [0, b), [b, 2b), ... Chunk c, starting at position s, takes the gradients of its positions at

    θ_c = θ - η ⊙ k_s S_s,

the fast weights of its first position (S_s: the decayed sums of the gradients of every earlier position of
the document, the carried state included, each taken at the weights of its own chunk; k_s its normaliser). A
document that starts inside the chunk has no earlier updates: its positions take their gradients at θ.
Inside the chunk, position i uses θ_i = θ - η ⊙ k_i (λ^(i-s) S_s + Σ_{s<=j<i} λ^(i-1-j) ∇_j(θ_c)): the
parallel FWL's fast pass over the chunk with S_s carried in, its keys and values from the slow pass at θ_c.
The sums after the chunk are the next chunk's S.

So each chunk runs the pieces of layer.py in turn: the slow pass and its hand-written gradient at θ_c
(`slow_pass_at`, `slow_gradients_at`), FastSums over the chunk with S_s carried in, and the fast pass
(`fast_pass`, FastWeightLayer.forward's). θ_c is never built: with the sums S (S_w1 = Σ x_j gh1_jᵀ [d, 4s],
S_w2 = Σ a_j gh2_jᵀ [4s, s], ...) and c = η ⊙ k_s at the positions of the chunk's first document (0 at the
others),

    W1_c x = W1 x - c (x S_w1),   W2_c a = W2 a - c (a S_w2),   W2_cᵀ gh2 = W2ᵀ gh2 - c (gh2 S_w2ᵀ),
    α_c = α - c S_α, ...

Materialising W2_c per batch row would save the two products with S_w2 (W1's is needed either way: the fast
pass starts from W1 x at θ) but could not give a document that starts inside the chunk θ; the products cost
2d·4s + 4·4s·s per token more than the parallel FWL (model/flops.py counts them). Under tensor parallelism
they are sharded like the fast pass's (S_w1, S_b1, S_w2 are this rank's slices of 4s; a S_w2 is a partial
sum that the one all-reduce of W2's output completes). Nothing is detached: the outer loss reaches θ, η, λ
and the body through every chunk, second order included.

A pending position (the last of a forward whose next label is unknown) takes its gradient, once its label
arrives, at the weights of its inner chunk's start: the state carries their update k_s S_s (FWLState.pending_*).
b >= T with no carried state is one chunk at θ: the parallel FWL bit for bit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from fwl_scale.model.fwl.fast_weights import ChunkLayout
from fwl_scale.model.fwl.functional import layer_norm_stats
from fwl_scale.model.fwl.state import COUNTED, FAST_TENSORS, FWLState, count_normalisers
from fwl_scale.model.fwl.sums import FastSums
from fwl_scale.model.vocab import unembedding_input_grad
from fwl_scale.parallel.mappings import copy_to_tp
from fwl_scale.parallel.regions import whole_sequence

if TYPE_CHECKING:
    from fwl_scale.model.fwl.layer import FastWeightLayer, Segment


def step_sizes(layer: "FastWeightLayer", dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """η as FastWeightLayer.forward uses it: (replicated, for the sharded computations, the six in the order of
    FAST_TENSORS with η_W1, η_b1, η_W2 of the sharded ones)."""
    eta, eta_tp = layer.scaled_step_sizes(dtype)
    return eta, eta_tp, torch.cat([eta_tp[:3], eta[3:]])


def start_weights(scale: Tensor | None, start: int, reset_bc: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, C, 6]: k_s per fast tensor (1 with a constant k, already in the sums; 1/n_s or 1/√n_s with normalize=mean
    or sqrt) at
    the positions of the chunk's first document, 0 at those of a document that starts inside the chunk."""
    first_doc = (reset_bc.cumsum(dim=1) == 0).to(dtype)
    k = (scale[:, start].to(dtype) if scale is not None
         else torch.ones(reset_bc.shape[0], len(FAST_TENSORS), dtype=dtype, device=reset_bc.device))
    return k[:, None, :] * first_doc[..., None]


def _scaled(product: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    # An update term of one fast tensor, k_s at its positions, in the activations' dtype (as FastSums returns).
    return (product * weight.unsqueeze(-1).to(product.dtype)).to(dtype)


def slow_pass_at(layer: "FastWeightLayer", x: Tensor, skip: Tensor | None, start: dict[str, Tensor] | None,
                 weight: Tensor | None, eta6: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """FastWeightLayer.slow_pass at the weights θ - η_f ⊙ weight_f ⊙ start_f of each position (`start`: sums
    [B, ...] by fast tensor; `weight` [B, C, 6]; None: at θ, the slow pass itself). Returns the slow pass
    (with α and W2's update for the gradient) and W1 x + b1 at θ, where the fast pass starts."""
    if start is None:
        slow = layer.slow_pass(x, skip)
        return slow, slow["h1"]
    dtype, acc = x.dtype, start["w1"].dtype
    h1_slow = F.linear(x, layer.w1, layer.b1)
    h1 = (h1_slow - eta6[0] * _scaled(x.to(acc) @ start["w1"], weight[..., 0], dtype)
          - eta6[1] * _scaled(start["b1"][:, None], weight[..., 1], dtype))
    r = F.relu(h1)
    a = r * r
    h2 = layer.w2_out(a, eta6[2] * _scaled(a.to(acc) @ start["w2"], weight[..., 2], dtype),
                      eta6[3] * _scaled(start["b2"][:, None], weight[..., 3], dtype))
    if skip is not None:
        h2 = h2 + skip
    xhat, rstd = layer_norm_stats(h2, layer.cfg.eps)
    alpha = layer.alpha - eta6[4] * _scaled(start["alpha"][:, None], weight[..., 4], dtype)
    beta = layer.beta - eta6[5] * _scaled(start["beta"][:, None], weight[..., 5], dtype)
    slow = {"x": x, "r": r, "a": a, "xhat": xhat, "rstd": rstd, "h1": h1, "skip": skip, "u": alpha * xhat + beta,
            "alpha": alpha, "w2_start": start["w2"], "w2_weight": eta6[2] * weight[..., 2]}
    return slow, h1_slow


def slow_gradients_at(layer: "FastWeightLayer", slow: dict[str, Tensor], unembed: Tensor, labels: Tensor,
                      loss_weight: Tensor) -> dict[str, Tensor]:
    """FastWeightLayer.slow_gradients at the weights of `slow_pass_at`: the backward through α_c and W2_c."""
    if "w2_start" not in slow:
        return layer.slow_gradients(slow, unembed, labels, loss_weight)
    k = layer.cfg.grad_scale if layer.cfg.normalize == "none" else 1.0
    gu = unembedding_input_grad(slow["u"], unembed, layer.out_bias, labels, loss_weight * k,
                                layer.vocab_size, layer.cfg.vocab_chunk, layer.tp)
    gxh = slow["alpha"] * gu
    xhat = slow["xhat"]
    gh2 = (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True)) * slow["rstd"]
    gh2_tp = copy_to_tp(gh2, layer.tp)
    s_w2 = slow["w2_start"]
    ga = gh2_tp @ layer.w2 - _scaled(gh2_tp.to(s_w2.dtype) @ s_w2.transpose(1, 2), slow["w2_weight"], gh2.dtype)
    gh1 = ga * 2 * slow["r"]
    return {"gu": gu, "gh2": gh2, "gh2_tp": gh2_tp, "gh1": gh1}


def fast_pass(layer: "FastWeightLayer", x: Tensor, h1_slow: Tensor, skip: Tensor | None, sums: FastSums,
              eta: Tensor, eta_tp: Tensor) -> Tensor:
    """FastWeightLayer.forward's fast pass over one inner chunk: position i with θ_i = θ - η ⊙ (the sums at i)."""
    h1_fast = h1_slow - eta_tp[0] * sums.attend("w1", x) - eta_tp[1] * sums.cumsum("b1")
    a_fast = F.relu(h1_fast).pow(2)
    h2_fast = layer.w2_out(a_fast, eta_tp[2] * sums.attend("w2", a_fast), eta[3] * sums.cumsum("b2"))
    if skip is not None:
        h2_fast = h2_fast + skip
    xhat_fast, _ = layer_norm_stats(h2_fast, layer.cfg.eps)
    return ((layer.alpha - eta[4] * sums.cumsum("alpha")) * xhat_fast
            + (layer.beta - eta[5] * sums.cumsum("beta")))


def sequential_forward(layer: "FastWeightLayer", x_btd: Tensor, x: Tensor, skip: Tensor | None, seg: "Segment",
                       doc_ids_bt: Tensor, unembed: Tensor, state: FWLState | None, pending_labels_b: Tensor | None,
                       last_label_pending: bool, return_state: bool) -> tuple[Tensor, FWLState | None]:
    """FastWeightLayer.forward with update=sequential, from the point where the slow pass starts (`x`: inside the
    tensor-parallel region, `skip`, `seg` as forward makes them). No context parallelism (config.check_layout)."""
    cfg = layer.cfg
    T = x.shape[1]
    sums_in, count_in = layer._incoming_state(state, pending_labels_b, doc_ids_bt[:, 0], unembed, x.dtype)
    log_decay = layer.log_decay()
    acc = torch.promote_types(x.dtype, torch.float32)
    scale, count_out = None, None
    if cfg.normalize in COUNTED:
        scale, count_out = count_normalisers(seg.labels, seg.reset, count_in, log_decay, cfg.chunk_size, acc,
                                             cfg.normalize)
    eta, eta_tp, eta6 = step_sizes(layer, x.dtype)
    outs = []
    for s in range(0, T, cfg.inner_chunk):
        e = min(s + cfg.inner_chunk, T)
        # (One chunk: the tensors themselves, so that the gradients add up in the parallel FWL's order.)
        x_c, skip_c = (x, skip) if e - s == T else (x[:, s:e], skip[:, s:e] if skip is not None else None)
        reset = seg.reset[:, s:e]
        # The slow pass and each token's gradient at the fast weights of the chunk's first position θ_c.
        weight = start_weights(scale, s, reset, acc) if sums_in is not None else None
        slow, h1_slow = slow_pass_at(layer, x_c, skip_c, sums_in, weight, eta6)
        grads = slow_gradients_at(layer, slow, unembed, seg.local_labels[:, s:e], seg.loss_weight[:, s:e])
        # The sums over the chunk, S_s carried in, and the fast pass that reads them.
        need_state = e < T or return_state
        sums = FastSums(layer.keys_values(x_c, slow, grads), sums_in, ChunkLayout(reset, layer.chunk_for(e - s)),
                        log_decay, scale[:, s:e] if scale is not None else None, x.dtype, need_state)
        outs.append(fast_pass(layer, x_c, h1_slow, skip_c, sums, eta, eta_tp))
        last_start, last_weight = sums_in, weight
        sums_in = sums.final() if need_state else None
    u_fast = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if not return_state:
        return u_fast, None
    pending_x, pending = None, {}
    if last_label_pending:
        pending_x = whole_sequence(x_btd, layer.tp)[:, -1]
        pending = {"pending_" + name: pending_update(last_start, last_weight, sums_in, name) for name in FAST_TENSORS}
    return u_fast, FWLState(**sums_in, doc_id=doc_ids_bt[:, -1].clone(), pending_x=pending_x, count=count_out,
                            **pending)


def pending_update(start: dict[str, Tensor] | None, weight: Tensor | None, final: dict[str, Tensor],
                   name: str) -> Tensor:
    """k_s S_s of fast tensor `name` at the last position of the last inner chunk (zero where its document
    starts inside that chunk, or where nothing entered the chunk)."""
    if start is None:
        return torch.zeros_like(final[name])
    w = weight[:, -1, FAST_TENSORS.index(name)]
    return start[name] * w.reshape((-1,) + (1,) * (start[name].dim() - 1)).to(start[name].dtype)


def pending_pass(layer: "FastWeightLayer", x: Tensor, skip: Tensor | None, unembed: Tensor, label: Tensor,
                 weight: Tensor, state: FWLState) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The slow pass and gradient of a carried pending position ([B, 1]) at the weights of its inner chunk's
    start, θ - η ⊙ (the state's pending update)."""
    start = state.pending_update()
    if start is None:
        raise ValueError("FWL update=sequential: the carried state's pending position has no chunk-start update "
                         "(FWLState.pending_*): a state from a model with model.fwl.update=parallel cannot be "
                         "continued")
    ones = torch.ones(x.shape[0], 1, len(FAST_TENSORS), dtype=start["w1"].dtype, device=x.device)
    slow, _ = slow_pass_at(layer, x, skip, start, ones, step_sizes(layer, x.dtype)[2])
    return slow, slow_gradients_at(layer, slow, unembed, label, weight)
