"""References for tests: the FWL contract evaluated literally, and the state operator as a loop.

`naive_fwl_logits` builds θ_i = θ - η ⊙ k_i Σ_{j<i} λ^(i-1-j) ∇_F CE_j(θ) explicitly with autograd for every
position i (create_graph=True, so the result is differentiable in θ, η, the unembedding and the input)
and evaluates the slow network with θ_i. It is O(T²) autograd calls: for tiny shapes only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fwl_scale import IGNORE_INDEX
from fwl_scale.model.fwl.fast_weights import accum_dtype
from fwl_scale.model.fwl.layer import FastWeightLayer
from fwl_scale.model.fwl.state import FAST_TENSORS
from fwl_scale.model.fwl.unembedding import UNEMBED_TENSORS


def _slow_logits(layer: FastWeightLayer, x: Tensor, unembed: Tensor, p: dict[str, Tensor]) -> Tensor:
    h1 = x @ p["w1"].t() + p["b1"]
    a = F.relu(h1) ** 2
    h2 = a @ p["w2"].t() + p["b2"]
    if layer.cfg.residual:
        h2 = h2 + x
    xhat = (h2 - h2.mean(-1, keepdim=True)) / torch.sqrt(h2.var(-1, unbiased=False, keepdim=True) + layer.cfg.eps)
    u = p["alpha"] * xhat + p["beta"]
    V = layer.vocab_size
    return u @ p.get("unembedding", unembed)[:V].t() + p.get("out_bias", layer.out_bias)[:V]


def _head_rule(layer: FastWeightLayer):
    """θ, η and λ of the head's fast tensors by name (λ None without a decay), whether k divides by a
    count, and the count's power (1 for mean, 1/2 for sqrt)."""
    theta = {name: getattr(layer, name) for name in FAST_TENSORS}
    eta = dict(zip(FAST_TENSORS, layer.step_scale * layer.step_sizes))
    lam = None if layer.decay_logits is None else dict(zip(FAST_TENSORS, torch.sigmoid(layer.decay_logits)))
    return theta, eta, lam, layer.cfg.normalize != "none", 0.5 if layer.cfg.normalize == "sqrt" else 1.0


def naive_fwl_logits(layer: FastWeightLayer, x_btd: Tensor, unembed: Tensor, labels_bt: Tensor,
                     doc_ids_bt: Tensor | None = None) -> Tensor:
    """Logits [B, T, V] of the slow network at θ_i, position by position:
    θ_i^f = θ^f - η_f k_i^f Σ_{j<i} λ_f^(i-1-j) ∇_f CE_j for each fast tensor f, with λ_f = 1 without a
    decay, k = grad_scale (normalize="none") or 1/n_i^f (1/√n_i^f with "sqrt"), n_i^f = Σ_{j<i} λ_f^(i-1-j) w_j
    the (decayed) count of earlier positions with a loss, 0 when it is 0 (normalize="mean")."""
    B, T, _ = x_btd.shape
    if doc_ids_bt is None:
        doc_ids_bt = torch.zeros(B, T, dtype=torch.long)
    theta, eta, lam, mean, power = _head_rule(layer)
    # A fast unembedding: c and U in the fast set, η = exp(ρ), λ their own.
    members = layer.unembed_members
    if "unembedding" in members:
        # Its use as the unembedding only: a tied embedding also fed the body that made x, and the FWL's
        # step moves the output's U, not the input's (the gradient w.r.t. this copy sees the output alone).
        unembed = unembed.clone()
    theta.update({name: (layer.out_bias if name == "out_bias" else unembed) for name in members})
    eta.update({name: layer.step_scale * torch.exp(layer.unembed_log_step_sizes[UNEMBED_TENSORS.index(name)])
                for name in members})
    if lam is not None:
        lam.update({name: torch.sigmoid(layer.unembed_decay_logits[UNEMBED_TENSORS.index(name)]) for name in members})
    gated = layer.step_gate_weight is not None
    rows_b = []
    for b in range(B):
        x = x_btd[b]
        # step_size="token": token j's gradient of fast tensor f scaled by 2σ(G_f·x_j + g_f).
        gate = 2 * torch.sigmoid(x @ layer.step_gate_weight.t() + layer.step_gate_bias) if gated else None
        ce_raw = F.cross_entropy(_slow_logits(layer, x, unembed, theta), labels_bt[b], ignore_index=IGNORE_INDEX,
                                 reduction="none")
        ce = ce_raw * (1.0 if mean else layer.cfg.grad_scale)
        has_loss = (labels_bt[b] != IGNORE_INDEX).to(x.dtype)
        rows = []
        for i in range(T):
            start = i
            while start > 0 and doc_ids_bt[b, start - 1] == doc_ids_bt[b, i]:
                start -= 1
            theta_i = theta
            if start < i and lam is None and not mean and not gated and not members:
                grads = torch.autograd.grad(ce[start:i].sum(), list(theta.values()), create_graph=True)
                theta_i = {name: theta[name] - eta[name] * g for name, g in zip(FAST_TENSORS, grads)}
            elif start < i:
                theta_i = {}
                for name in theta:
                    ages = torch.arange(i - 1 - start, -1, -1, dtype=x.dtype)  # i-1-j for j = start..i-1
                    weight = lam[name] ** ages if lam is not None else torch.ones_like(ages)
                    gate_f = gate[start:i, FAST_TENSORS.index(name)] if gated else 1.0
                    # unembed_normalize="none": c's and U's sums are plain decayed sums of the unscaled gradients.
                    plain_sum = name in members and layer.cfg.unembed_normalize == "none"
                    loss = weight * gate_f * (ce_raw if plain_sum else ce)[start:i]
                    (g,) = torch.autograd.grad(loss.sum(), [theta[name]], create_graph=True)
                    if mean and not plain_sum:
                        n = (weight * has_loss[start:i]).sum()
                        g = g / n ** power if n > 0 else g * 0
                    theta_i[name] = theta[name] - eta[name] * g
            rows.append(_slow_logits(layer, x[i:i + 1], unembed, theta_i)[0])
        rows_b.append(torch.stack(rows))
    return torch.stack(rows_b)


def naive_sequential_fwl_logits(layer: FastWeightLayer, x_btd: Tensor, unembed: Tensor, labels_bt: Tensor,
                                doc_ids_bt: Tensor | None = None, inner_chunk: int | None = None) -> Tensor:
    """Logits [B, T, V] of model.fwl.update=sequential (docs/design.md §1.6), position by position with explicit
    weights: position j's gradient g_j = ∇ k CE_j is taken with autograd at the weights of the first position s
    of its inner chunk (chunks of `inner_chunk` tokens from position 0; θ itself when j's document starts after
    s), and position i is evaluated at θ_i^f = θ^f - η_f k_i^f Σ_{j<i, same document} λ_f^(i-1-j) g_j^f, k as
    in naive_fwl_logits. Each θ_s is therefore one SGD step built from gradients at earlier θ_s': a loop of
    per-chunk steps, differentiable throughout (create_graph=True)."""
    B, T, _ = x_btd.shape
    b = inner_chunk if inner_chunk is not None else layer.cfg.inner_chunk
    if doc_ids_bt is None:
        doc_ids_bt = torch.zeros(B, T, dtype=torch.long)
    theta, eta, lam, mean, power = _head_rule(layer)
    k_const = 1.0 if mean else layer.cfg.grad_scale
    rows_b = []
    for b_row in range(B):
        x, docs = x_btd[b_row], doc_ids_bt[b_row]
        has_loss = (labels_bt[b_row] != IGNORE_INDEX).to(x.dtype)
        grads: list[dict[str, Tensor]] = []  # g_j by fast tensor
        chunk_start_weights: dict[int, dict[str, Tensor]] = {}
        rows = []
        for i in range(T):
            start = i
            while start > 0 and docs[start - 1] == docs[i]:
                start -= 1
            # θ_i from the gradients of the earlier positions of the document.
            theta_i = {}
            for name in FAST_TENSORS:
                g, n = torch.zeros_like(theta[name]), x.new_zeros(())
                for j in range(start, i):
                    w = lam[name] ** (i - 1 - j) if lam is not None else 1.0
                    g, n = g + w * grads[j][name], n + w * has_loss[j]
                if mean:
                    g = g / n ** power if n > 0 else g * 0
                theta_i[name] = theta[name] - eta[name] * g
            if i % b == 0:
                chunk_start_weights[i] = theta_i
            rows.append(_slow_logits(layer, x[i:i + 1], unembed, theta_i)[0])
            # Position i's own gradient, at the weights of its chunk's first position s (θ for another document).
            s = i - i % b
            at = chunk_start_weights[s] if s >= start else theta
            ce = F.cross_entropy(_slow_logits(layer, x[i:i + 1], unembed, at), labels_bt[b_row, i:i + 1],
                                 ignore_index=IGNORE_INDEX, reduction="sum") * k_const * has_loss[i]
            g_i = torch.autograd.grad(ce, [at[name] for name in FAST_TENSORS], create_graph=True, allow_unused=True,
                                      materialize_grads=True)
            grads.append(dict(zip(FAST_TENSORS, g_i)))
        rows_b.append(torch.stack(rows))
    return torch.stack(rows_b)


def naive_causal_linear_attention(q_btk: Tensor, k_btk: Tensor, v_btv: Tensor, reset_bt: Tensor,
                                  state_bkv: Tensor | None = None,
                                  log_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: explicit position-by-position loop over the definition (tests only): position i reads
    the state S, then S <- λ·S + k_i v_iᵀ (λ = exp(log_decay), 1 without it)."""
    B, T, _ = q_btk.shape
    dtype = accum_dtype(q_btk, k_btk, v_btv)
    outs = []
    state_out = []
    for b in range(B):
        S = state_bkv[b].to(dtype) if state_bkv is not None else torch.zeros(
            k_btk.shape[-1], v_btv.shape[-1], dtype=dtype)
        rows = []
        for i in range(T):
            if reset_bt[b, i]:
                S = torch.zeros_like(S)
            rows.append(q_btk[b, i].to(dtype) @ S)
            if log_decay is not None:
                S = torch.exp(log_decay.to(dtype)) * S
            S = S + torch.outer(k_btk[b, i].to(dtype), v_btv[b, i].to(dtype))
        outs.append(torch.stack(rows))
        state_out.append(S)
    return torch.stack(outs), torch.stack(state_out)


def naive_causal_cumsum(v_btd: Tensor, reset_bt: Tensor, state_bd: Tensor | None = None,
                        log_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference of causal_cumsum: the loop above with a key and a query of 1 (S [B, 1, D])."""
    ones = torch.ones(v_btd.shape[:2] + (1,), dtype=v_btd.dtype, device=v_btd.device)
    out, state = naive_causal_linear_attention(ones, ones, v_btd, reset_bt,
                                               state_bd.unsqueeze(1) if state_bd is not None else None, log_decay)
    return out, state[:, 0]
