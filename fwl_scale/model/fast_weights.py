"""The fast-weight state operator: strictly causal linear attention with document resets and a carried state.

Every fast update of the FWL (docs/design.md §1.1) is a running sum over strictly earlier positions of the same
document, in one of two shapes:

* matrix sums  out_i = Σ_{j<i} (q_i · k_j) v_j   (the rank-one gradients of the fast dense layers), and
* vector sums  out_i = Σ_{j<i} v_j               (biases and the LayerNorm scale and shift).

Both are computed in mixed-chunk form: the sequence is cut into chunks of `chunk_size` tokens; inside a
chunk the matrix sums are a masked quadratic product and the vector sums a cumulative sum, and a state
(the sums of everything earlier in the same document) enters each chunk. One chunk covering the whole
sequence is the quadratic form. The same state crosses segment boundaries (streaming) and, later, rank
boundaries (context parallelism).

Each sum runs in two phases so that a state can be exchanged between them (context parallelism): the
per-chunk totals need only keys and values (`linear_attention_totals`, `cumsum_totals`; they exist after
the FWL's slow pass), `ChunkLayout.final` folds them into the rank's contribution, and the outputs need
the queries and the state that enters (`causal_linear_attention(..., totals=...)`). Between ranks, the
alternative to a state is attending to the earlier ranks' keys and values directly
(`cross_linear_attention`, the quadratic form across the rank boundary).

`reset_bt[b, t]` is True where position t starts a new document: nothing before t reaches t or later.
Sums are accumulated in at least float32.
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

    @property
    def has_reset(self) -> Tensor:
        """[B]: a document starts somewhere in this call (the flag of a context-parallel contribution)."""
        return self.chunk_resets.any(dim=1)

    def final(self, local_total: Tensor, state_in: Tensor | None) -> Tensor:
        """The state after the last position only (a rank's contribution when state_in is None)."""
        keep = (~self.chunk_resets).to(local_total.dtype)
        shape = (local_total.shape[0],) + (1,) * (local_total.dim() - 2)
        running = state_in if state_in is not None else torch.zeros_like(local_total[:, 0])
        for n in range(self.n_chunks):
            running = running * keep[:, n].reshape(shape) + local_total[:, n]
        return running

    def scan(self, local_total: Tensor, state_in: Tensor | None) -> tuple[Tensor, Tensor]:
        """Segmented exclusive scan over chunks: the state entering each chunk, and the final state."""
        keep = (~self.chunk_resets).to(local_total.dtype)
        shape = (local_total.shape[0],) + (1,) * (local_total.dim() - 2)
        running = state_in if state_in is not None else torch.zeros_like(local_total[:, 0])
        entering = []
        for n in range(self.n_chunks):
            entering.append(running)
            running = running * keep[:, n].reshape(shape) + local_total[:, n]
        return torch.stack(entering, dim=1), running


def linear_attention_totals(k_btk: Tensor, v_btv: Tensor, layout: ChunkLayout) -> Tensor:
    """Per chunk, Σ k_j v_jᵀ over the chunk's last document segment: [B, N, dk, dv] (accumulation dtype)."""
    dtype = accum_dtype(k_btk, v_btv)
    N, C = layout.n_chunks, layout.chunk
    k = _pad_chunks(k_btk.to(dtype), N, C) * layout.in_last_segment.unsqueeze(-1).to(dtype)
    return torch.einsum("bnck,bncv->bnkv", k, _pad_chunks(v_btv.to(dtype), N, C))


def cumsum_totals(v_btd: Tensor, layout: ChunkLayout) -> Tensor:
    """Per chunk, Σ v_j over the chunk's last document segment: [B, N, D] (accumulation dtype)."""
    dtype = accum_dtype(v_btd)
    v = _pad_chunks(v_btd.to(dtype), layout.n_chunks, layout.chunk)
    return (v * layout.in_last_segment.unsqueeze(-1).to(dtype)).sum(dim=2)


def causal_linear_attention(q_btk: Tensor, k_btk: Tensor, v_btv: Tensor, reset_bt: Tensor,
                            state_bkv: Tensor | None = None, chunk_size: int = 256,
                            layout: ChunkLayout | None = None,
                            totals: Tensor | None = None, need_state: bool = True) -> tuple[Tensor, Tensor | None]:
    """out_i = Σ_{j<i, same document} (q_i·k_j) v_j + [no reset in 0..i] q_i·S_in.

    Returns (out [B, T, dv], state_out [B, dk, dv]) where state_out = Σ k_j v_jᵀ over the last document
    (plus S_in when no reset happened). `totals`: linear_attention_totals(k, v, layout), if computed
    already. `need_state=False` with one chunk and no incoming state (the quadratic form of a whole
    window): state_out is None, and neither the totals nor the (zero) state term are computed — 4·dk·dv
    per token of work for nothing."""
    layout = layout or ChunkLayout(reset_bt, chunk_size)
    dtype = accum_dtype(q_btk, k_btk, v_btv)
    N, C = layout.n_chunks, layout.chunk
    q = _pad_chunks(q_btk.to(dtype), N, C)
    k = _pad_chunks(k_btk.to(dtype), N, C)
    v = _pad_chunks(v_btv.to(dtype), N, C)
    scores = torch.einsum("bnik,bnjk->bnij", q, k) * layout.intra_mask
    out = torch.einsum("bnij,bnjv->bniv", scores, v)
    if not need_state and N == 1 and state_bkv is None:
        return out.reshape(q.shape[0], N * C, -1)[:, : layout.T], None
    local_total = totals if totals is not None else linear_attention_totals(k_btk, v_btv, layout)
    state_in = state_bkv.to(dtype) if state_bkv is not None else None
    entering, state_out = layout.scan(local_total, state_in)
    q_seen = q * layout.sees_state.unsqueeze(-1).to(dtype)
    out = out + torch.einsum("bnck,bnkv->bncv", q_seen, entering)
    return out.reshape(q.shape[0], N * C, -1)[:, : layout.T], state_out


def causal_cumsum(v_btd: Tensor, reset_bt: Tensor, state_bd: Tensor | None = None, chunk_size: int = 256,
                  layout: ChunkLayout | None = None, totals: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """out_i = Σ_{j<i, same document} v_j + [no reset in 0..i] S_in; state_out = Σ over the last document."""
    layout = layout or ChunkLayout(reset_bt, chunk_size)
    dtype = accum_dtype(v_btd)
    N, C = layout.n_chunks, layout.chunk
    v = _pad_chunks(v_btd.to(dtype), N, C)
    exclusive = torch.cumsum(v, dim=2) - v  # [B, N, C, D], chunk-local so it stays precise
    at_start = torch.gather(exclusive, 2, layout.segment_start.unsqueeze(-1).expand_as(exclusive))
    out = exclusive - at_start
    local_total = totals if totals is not None else cumsum_totals(v_btd, layout)
    state_in = state_bd.to(dtype) if state_bd is not None else None
    entering, state_out = layout.scan(local_total, state_in)
    out = out + entering.unsqueeze(2) * layout.sees_state.unsqueeze(-1).to(dtype)
    return out.reshape(v.shape[0], N * C, -1)[:, : layout.T], state_out


def cross_linear_attention(q_btk: Tensor, k_bsk: Tensor, v_bsv: Tensor, q_mask_bt: Tensor,
                           k_mask_bs: Tensor) -> Tensor:
    """out_i = [q_mask_i] Σ_j [k_mask_j] (q_i·k_j) v_j: queries attending to another block of keys
    (earlier ranks' tokens, all of them earlier than every query), in the accumulation dtype."""
    dtype = accum_dtype(q_btk, k_bsk, v_bsv)
    q = q_btk.to(dtype) * q_mask_bt.unsqueeze(-1).to(dtype)
    k = k_bsk.to(dtype) * k_mask_bs.unsqueeze(-1).to(dtype)
    return torch.einsum("bts,bsv->btv", torch.einsum("btk,bsk->bts", q, k), v_bsv.to(dtype))


def masked_state(k_bsk: Tensor | None, v_bsv: Tensor, k_mask_bs: Tensor) -> Tensor:
    """Σ_j [k_mask_j] k_j v_jᵀ (or Σ_j [k_mask_j] v_j when `k_bsk` is None), in the accumulation dtype."""
    dtype = accum_dtype(v_bsv) if k_bsk is None else accum_dtype(k_bsk, v_bsv)
    v = v_bsv.to(dtype) * k_mask_bs.unsqueeze(-1).to(dtype)
    if k_bsk is None:
        return v.sum(dim=1)
    return torch.einsum("bsk,bsv->bkv", k_bsk.to(dtype), v)
