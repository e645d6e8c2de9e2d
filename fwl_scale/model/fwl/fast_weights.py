"""The fast-weight state operator: strictly causal linear attention with document resets and a carried state.

Every fast update of the FWL (docs/design.md §1.1) is a running sum over strictly earlier positions of the same
document, in one of two shapes:

* matrix sums  out_i = Σ_{j<i} (q_i · k_j) v_j   (the rank-one gradients of the fast dense layers), and
* vector sums  out_i = Σ_{j<i} v_j               (biases and the LayerNorm scale and shift).

Both are computed in mixed-chunk form: the sequence is cut into chunks of `chunk_size` tokens; inside a
chunk the matrix sums are a masked quadratic product and the vector sums a cumulative sum, and a state
(the sums of everything earlier in the same document) enters each chunk. One chunk covering the whole
sequence is the quadratic form. The same state crosses segment boundaries (streaming) and rank
boundaries (context parallelism).

`causal_linear_attention` and `causal_cumsum` have the signature of their references in naive.py. Beneath
them, each sum runs in two phases so that a state can be exchanged between them (context parallelism): the
per-chunk totals need only keys and values (`linear_attention_totals`, `cumsum_totals`; they exist after
the FWL's slow pass), `ChunkLayout.final` folds them into the rank's contribution, and the outputs need
the queries and the state that enters (`chunked_linear_attention`, `chunked_cumsum`, given the layout and
the totals). Between ranks, the alternative to a state is attending to the earlier ranks' keys and values
directly (`cross_linear_attention`, the quadratic form across the rank boundary).

`reset_bt[b, t]` is True where position t starts a new document: nothing before t reaches t or later.
Sums are accumulated in at least float32.

Forgetting (`log_decay` = log λ, a 0-dim tensor, differentiable): every sum becomes Σ_{j<i} λ^(i-1-j) ·
(its term j), i.e. S_after_i = λ·S_after_{i-1} + term_i. In mixed-chunk form: inside a chunk the strictly
causal mask carries the weights λ^(i-1-j); the state entering position c of a chunk is λ^c·S_in; a chunk's
total is Σ_j λ^(len-1-j)·term_j (len: the chunk's real tokens); chunk to chunk the state is
λ^len·S + total. Powers are exp(n·log λ) with n >= 0 only, so nothing overflows. The vector sums then
need the C×C weights as a product (2·C·D per token) instead of a cumulative sum.
"""
from __future__ import annotations

import torch
from torch import Tensor


def accum_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _pad_chunks(t: Tensor, n_chunks: int, chunk: int) -> Tensor:
    """[B, T, ...] -> [B, N, C, ...], zero-padded at the end."""
    B, T = t.shape[:2]
    pad = n_chunks * chunk - T
    if pad:
        t = torch.cat([t, t.new_zeros((B, pad) + tuple(t.shape[2:]))], dim=1)
    return t.reshape((B, n_chunks, chunk) + tuple(t.shape[2:]))


class ChunkLayout:
    """Segment bookkeeping shared by every sum of one call: which positions share a document inside
    each chunk, which positions still see the incoming state, and which positions make up the
    state handed to the next chunk."""

    def __init__(self, reset_bt: Tensor, chunk_size: int):
        B, T = reset_bt.shape
        self.T = T
        self.chunk = min(chunk_size, T)
        self.n_chunks = -(-T // self.chunk)
        reset = _pad_chunks(reset_bt, self.n_chunks, self.chunk)  # padding never resets
        seg = torch.cumsum(reset.to(torch.int64), dim=-1)  # [B, N, C]; 0 = still in the incoming document
        self.sees_state = (seg == 0)  # [B, N, C]
        self.in_last_segment = (seg == seg[..., -1:])  # positions whose sums leave the chunk
        self.chunk_resets = reset.any(dim=-1)  # [B, N]
        idx = torch.arange(self.chunk, device=reset_bt.device)
        strictly_earlier = idx[None, :] < idx[:, None]  # [C(i), C(j)]
        self.intra_mask = strictly_earlier & (seg[..., :, None] == seg[..., None, :])  # [B, N, C, C]
        # Position of the segment start at or before each position (0 when the segment began before the chunk).
        start = torch.where(reset, idx.expand_as(reset), torch.zeros_like(reset, dtype=torch.int64))
        self.segment_start = torch.cummax(start, dim=-1).values  # [B, N, C]
        # Exponents of the decay weights: i-1-j inside a chunk (j < i), len-1-j to the chunk's end.
        self.lengths = torch.full((self.n_chunks,), self.chunk, dtype=torch.int64, device=reset_bt.device)
        self.lengths[-1] = T - (self.n_chunks - 1) * self.chunk
        self.positions = idx
        self.intra_exponent = (idx[:, None] - 1 - idx[None, :]).clamp(min=0)  # [C, C]
        self.tail_exponent = self.lengths[:, None] - 1 - idx[None, :]  # [N, C]; < 0 only in the padding

    def decay_weights(self, log_decay: Tensor, dtype: torch.dtype) -> "DecayWeights":
        return DecayWeights(self, log_decay.to(dtype))

    @property
    def has_reset(self) -> Tensor:
        """[B]: a document starts somewhere in this call (the flag of a context-parallel contribution)."""
        return self.chunk_resets.any(dim=1)

    def _carry(self, local_total: Tensor, decay: "DecayWeights | None") -> Tensor:
        """[B, N]: what multiplies the running state across each chunk (0 at a document start, λ^len)."""
        keep = (~self.chunk_resets).to(local_total.dtype)
        return keep if decay is None else keep * decay.across

    def final(self, local_total: Tensor, state_in: Tensor | None, decay: "DecayWeights | None" = None) -> Tensor:
        """The state after the last position only (a rank's contribution when state_in is None)."""
        carry = self._carry(local_total, decay)
        shape = (local_total.shape[0],) + (1,) * (local_total.dim() - 2)
        running = state_in if state_in is not None else torch.zeros_like(local_total[:, 0])
        for n in range(self.n_chunks):
            running = running * carry[:, n].reshape(shape) + local_total[:, n]
        return running

    def scan(self, local_total: Tensor, state_in: Tensor | None,
             decay: "DecayWeights | None" = None) -> tuple[Tensor, Tensor]:
        """Segmented exclusive scan over chunks: the state entering each chunk, and the final state."""
        carry = self._carry(local_total, decay)
        shape = (local_total.shape[0],) + (1,) * (local_total.dim() - 2)
        running = state_in if state_in is not None else torch.zeros_like(local_total[:, 0])
        entering = []
        for n in range(self.n_chunks):
            entering.append(running)
            running = running * carry[:, n].reshape(shape) + local_total[:, n]
        return torch.stack(entering, dim=1), running


class DecayWeights:
    """The powers of λ one call needs, as exp(n·log λ) with n >= 0: `intra` [C, C] = λ^(i-1-j) (used
    under the strictly causal mask only), `entering` [C] = λ^c (the incoming state at position c),
    `tail` [N, C] = λ^(len-1-j) (0 in the padding), `across` [N] = λ^len."""

    def __init__(self, layout: ChunkLayout, log_decay: Tensor):
        dtype = log_decay.dtype
        self.intra = torch.exp(log_decay * layout.intra_exponent.to(dtype))
        self.entering = torch.exp(log_decay * layout.positions.to(dtype))
        tail = torch.exp(log_decay * layout.tail_exponent.clamp(min=0).to(dtype))
        self.tail = tail * (layout.tail_exponent >= 0).to(dtype)
        self.across = torch.exp(log_decay * layout.lengths.to(dtype))


def _tail_weights(layout: ChunkLayout, dtype: torch.dtype, log_decay: Tensor | None) -> Tensor:
    """[B, N, C, 1]: which positions' terms leave their chunk, and with what weight (λ^(len-1-j))."""
    w = layout.in_last_segment.to(dtype)
    if log_decay is not None:
        w = w * layout.decay_weights(log_decay, dtype).tail
    return w.unsqueeze(-1)


def linear_attention_totals(k_btk: Tensor, v_btv: Tensor, layout: ChunkLayout,
                            log_decay: Tensor | None = None) -> Tensor:
    """Per chunk, Σ λ^(len-1-j) k_j v_jᵀ over the chunk's last document segment (λ = 1 without
    `log_decay`): [B, N, dk, dv] (accumulation dtype)."""
    dtype = accum_dtype(k_btk, v_btv)
    N, C = layout.n_chunks, layout.chunk
    k = _pad_chunks(k_btk.to(dtype), N, C) * _tail_weights(layout, dtype, log_decay)
    return torch.einsum("bnck,bncv->bnkv", k, _pad_chunks(v_btv.to(dtype), N, C))


def cumsum_totals(v_btd: Tensor, layout: ChunkLayout, log_decay: Tensor | None = None) -> Tensor:
    """Per chunk, Σ λ^(len-1-j) v_j over the chunk's last document segment: [B, N, D] (accumulation dtype)."""
    dtype = accum_dtype(v_btd)
    v = _pad_chunks(v_btd.to(dtype), layout.n_chunks, layout.chunk)
    return (v * _tail_weights(layout, dtype, log_decay)).sum(dim=2)


def causal_linear_attention(q_btk: Tensor, k_btk: Tensor, v_btv: Tensor, reset_bt: Tensor,
                            state_bkv: Tensor | None = None, log_decay: Tensor | None = None,
                            chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """out_i = Σ_{j<i, same document} λ^(i-1-j) (q_i·k_j) v_j + [no reset in 0..i] λ^i q_i·S_in
    (λ = exp(log_decay), 1 without it), in chunks of `chunk_size` tokens.

    Returns (out [B, T, dv], state_out [B, dk, dv]) where state_out = Σ k_j v_jᵀ over the last document
    (plus S_in when no reset happened); naive.naive_causal_linear_attention is the reference."""
    return chunked_linear_attention(q_btk, k_btk, v_btv, ChunkLayout(reset_bt, chunk_size), state_bkv,
                                    log_decay=log_decay)


def chunked_linear_attention(q_btk: Tensor, k_btk: Tensor, v_btv: Tensor, layout: ChunkLayout,
                             state_bkv: Tensor | None = None, log_decay: Tensor | None = None,
                             totals: Tensor | None = None, need_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """causal_linear_attention's second phase, for a layout shared by several sums. `totals`:
    linear_attention_totals(k, v, layout), if computed already. With one chunk, only the state terms that
    matter run (2·dk·dv per token each): the incoming state's only with one (not q·0), the totals only
    with `need_state` (else state_out is None) — the quadratic form of a whole window needs neither, an
    inner chunk of model.fwl.update=sequential one or both."""
    dtype = accum_dtype(q_btk, k_btk, v_btv)
    N, C = layout.n_chunks, layout.chunk
    q = _pad_chunks(q_btk.to(dtype), N, C)
    k = _pad_chunks(k_btk.to(dtype), N, C)
    v = _pad_chunks(v_btv.to(dtype), N, C)
    decay = layout.decay_weights(log_decay, dtype) if log_decay is not None else None
    scores = torch.einsum("bnik,bnjk->bnij", q, k) * layout.intra_mask
    if decay is not None:
        scores = scores * decay.intra
    out = torch.einsum("bnij,bnjv->bniv", scores, v)
    state_in = state_bkv.to(dtype) if state_bkv is not None else None
    if N == 1:
        state_out = None
        if need_state:
            local_total = totals if totals is not None else linear_attention_totals(k_btk, v_btv, layout, log_decay)
            state_out = layout.final(local_total, state_in, decay)
        if state_in is None:
            return out.reshape(q.shape[0], N * C, -1)[:, : layout.T], state_out
        entering = state_in.unsqueeze(1)
    else:
        local_total = totals if totals is not None else linear_attention_totals(k_btk, v_btv, layout, log_decay)
        entering, state_out = layout.scan(local_total, state_in, decay)
    q_seen = q * layout.sees_state.unsqueeze(-1).to(dtype)
    if decay is not None:
        q_seen = q_seen * decay.entering.unsqueeze(-1)
    out = out + torch.einsum("bnck,bnkv->bncv", q_seen, entering)
    return out.reshape(q.shape[0], N * C, -1)[:, : layout.T], state_out


def causal_cumsum(v_btd: Tensor, reset_bt: Tensor, state_bd: Tensor | None = None,
                  log_decay: Tensor | None = None, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """out_i = Σ_{j<i, same document} λ^(i-1-j) v_j + [no reset in 0..i] λ^i S_in (λ = 1 without
    `log_decay`); state_out = the same sum after the last position."""
    return chunked_cumsum(v_btd, ChunkLayout(reset_bt, chunk_size), state_bd, log_decay=log_decay)


def chunked_cumsum(v_btd: Tensor, layout: ChunkLayout, state_bd: Tensor | None = None,
                   log_decay: Tensor | None = None, totals: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """causal_cumsum's second phase, for a layout shared by several sums (`totals`: cumsum_totals(v, layout),
    if computed already)."""
    dtype = accum_dtype(v_btd)
    N, C = layout.n_chunks, layout.chunk
    v = _pad_chunks(v_btd.to(dtype), N, C)
    decay = layout.decay_weights(log_decay, dtype) if log_decay is not None else None
    if decay is None:
        exclusive = torch.cumsum(v, dim=2) - v  # [B, N, C, D], chunk-local so it stays precise
        at_start = torch.gather(exclusive, 2, layout.segment_start.unsqueeze(-1).expand_as(exclusive))
        out = exclusive - at_start
    else:
        # A running sum that is multiplied by λ at every step has no cumsum form that cannot overflow
        # (λ^-j): the weights λ^(i-1-j) under the mask, as a product.
        out = torch.einsum("bnij,bnjd->bnid", layout.intra_mask.to(dtype) * decay.intra, v)
    local_total = totals if totals is not None else cumsum_totals(v_btd, layout, log_decay)
    state_in = state_bd.to(dtype) if state_bd is not None else None
    entering, state_out = layout.scan(local_total, state_in, decay)
    seen = layout.sees_state.to(dtype)
    if decay is not None:
        seen = seen * decay.entering
    out = out + entering.unsqueeze(2) * seen.unsqueeze(-1)
    return out.reshape(v.shape[0], N * C, -1)[:, : layout.T], state_out


def causal_count(w_bt: Tensor, reset_bt: Tensor, count_b: Tensor | None = None, chunk_size: int = 256,
                 log_decay: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """n_i = Σ_{j<i, same document} λ^(i-1-j) w_j + [no reset in 0..i] λ^i n_in: causal_cumsum of one
    scalar per position ([B, T] -> [B, T], state [B]). With a decay its weights are applied elementwise:
    a scalar per token is elementwise work, not a product worth a matmul (the FLOP count leaves it out).
    `log_decay` of shape [F]: F counts at once, one per λ, sharing one layout (n [B, T, F], state and
    `count_b` [B, F]) — the FWL's six; one at a time they cost an eighth of its evaluation."""
    if log_decay is None:
        out, state = causal_cumsum(w_bt.unsqueeze(-1), reset_bt, None if count_b is None else count_b[:, None],
                                   chunk_size=chunk_size)
        return out[..., 0], state[:, 0]
    layout = ChunkLayout(reset_bt, chunk_size)
    dtype = accum_dtype(w_bt)
    single = log_decay.dim() == 0
    ld = log_decay.reshape(-1).to(dtype)  # [F]
    B, N, C = w_bt.shape[0], layout.n_chunks, layout.chunk
    w = _pad_chunks(w_bt.to(dtype), N, C)  # [B, N, C]
    # The powers of DecayWeights, one row per λ.
    intra = torch.exp(ld[:, None, None] * layout.intra_exponent.to(dtype))  # [F, C, C]
    tail = (torch.exp(ld[:, None, None] * layout.tail_exponent.clamp(min=0).to(dtype))
            * (layout.tail_exponent >= 0).to(dtype))  # [F, N, C]
    across = torch.exp(layout.lengths.to(dtype)[:, None] * ld)  # [N, F]
    entering_w = torch.exp(layout.positions.to(dtype)[:, None] * ld)  # [C, F]
    out = torch.einsum("bnij,fij,bnj->bnif", layout.intra_mask.to(dtype), intra, w)
    local_total = torch.einsum("bnc,fnc->bnf", w * layout.in_last_segment.to(dtype), tail)
    keep = (~layout.chunk_resets).to(dtype)  # [B, N]
    F = ld.numel()
    running = count_b.to(dtype).reshape(B, -1).expand(B, F) if count_b is not None else w.new_zeros(B, F)
    entering = []
    for n in range(N):
        entering.append(running)
        running = running * keep[:, n, None] * across[n] + local_total[:, n]
    out = out + torch.stack(entering, dim=1)[:, :, None] * layout.sees_state.to(dtype)[..., None] * entering_w
    out = out.reshape(B, N * C, -1)[:, : layout.T]
    return (out[..., 0], running[:, 0]) if single else (out, running)


def cross_linear_attention(q_btk: Tensor, k_bsk: Tensor, v_bsv: Tensor, q_mask_bt: Tensor,
                           k_mask_bs: Tensor, weight_ts: Tensor | None = None) -> Tensor:
    """out_i = [q_mask_i] Σ_j [k_mask_j] w_ij (q_i·k_j) v_j: queries attending to another block of keys
    (earlier ranks' tokens, all of them earlier than every query), in the accumulation dtype; w = 1
    without `weight_ts` (a forgetting factor's λ^(i-1-j))."""
    dtype = accum_dtype(q_btk, k_bsk, v_bsv)
    q = q_btk.to(dtype) * q_mask_bt.unsqueeze(-1).to(dtype)
    k = k_bsk.to(dtype) * k_mask_bs.unsqueeze(-1).to(dtype)
    scores = torch.einsum("btk,bsk->bts", q, k)
    if weight_ts is not None:
        scores = scores * weight_ts.to(dtype)
    return torch.einsum("bts,bsv->btv", scores, v_bsv.to(dtype))


def masked_state(k_bsk: Tensor | None, v_bsv: Tensor, k_mask_bs: Tensor, weight_s: Tensor | None = None) -> Tensor:
    """Σ_j [k_mask_j] w_j k_j v_jᵀ (or Σ_j [k_mask_j] w_j v_j when `k_bsk` is None), in the accumulation
    dtype; w = 1 without `weight_s`."""
    dtype = accum_dtype(v_bsv) if k_bsk is None else accum_dtype(k_bsk, v_bsv)
    mask = k_mask_bs.to(dtype)
    if weight_s is not None:
        mask = mask * weight_s.to(dtype)
    v = v_bsv.to(dtype) * mask.unsqueeze(-1)
    if k_bsk is None:
        return v.sum(dim=1)
    return torch.einsum("bsk,bsv->bkv", k_bsk.to(dtype), v)
