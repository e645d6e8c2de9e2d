"""The fast unembedding (model.fwl.fast_set: out_bias, unembedding; issue 22's hypothesis 5): the output
bias c and the unembedding U take the same step as the FWL's own weights.

Token j's gradient of k·w_j·CE_j at the slow weights is g_j = k w_j (p_j - onehot(y_j)) ∈ R^V for c and
g_j u_jᵀ for U (p_j = softmax(U u_j + c), u_j the slow head's output). Position i then scores with
c_i = c - η_c k_i Σ_{j<i} λ_c^(i-1-j) g_j and U_i = U - η_U k_i Σ_{j<i} λ_U^(i-1-j) g_j u_jᵀ, i.e.

    z_i = U u'_i + c - Σ_{j<i} a_ij g_j,    a_ij = η_c k^c_i λ_c^(i-1-j) + η_U k^U_i λ_U^(i-1-j) (u_j · u'_i)

(plus the carried sums S^c [V] and S^U [V, s] of the previous segment: a unigram cache and, through its
onehot part, Grave et al.'s continuous cache, both learned). The [T, T] weights a_ij are built once; the
vocabulary is walked in chunks of model.fwl.vocab_chunk columns, each recomputed in backward, so no
[B, T, V] tensor is alive at once (the slow softmax needs its log-sum-exp first: one more walk). The
quadratic form over the forward's T tokens costs 2T² per vocabulary column; the slow and fast logits 2s
each (s the head width): at T ≤ s it is the cheaper part.

Single process only for now (tensor, context and pipeline parallelism are refused by config.check_layout).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fwl_scale import IGNORE_INDEX
from fwl_scale.model.fwl.fast_weights import ChunkLayout
from fwl_scale.model.vocab import at_least_fp32

# The fast unembedding's members, in the order of FastWeightLayer.unembed_log_step_sizes.
UNEMBED_TENSORS = ("out_bias", "unembedding")
FAST_SET = ("head",) + UNEMBED_TENSORS


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _slow_lse_chunk(u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.logsumexp(at_least_fp32(u @ weight.t() + bias), dim=-1)


def _gradient_chunk(u: Tensor, lse: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, scale: Tensor,
                    start: int) -> Tensor:
    """g_j for this chunk's columns [B, T, Vc]: k w_j (softmax(U u_j + c) - onehot(y_j))."""
    p = torch.exp(at_least_fp32(u @ weight.t() + bias) - lse.unsqueeze(-1))
    local = labels - start
    inside = (local >= 0) & (local < weight.shape[0]) & (labels != IGNORE_INDEX)
    onehot = torch.zeros_like(p).scatter_(-1, local.clamp(0, weight.shape[0] - 1).unsqueeze(-1),
                                          inside.unsqueeze(-1).to(p.dtype))
    return (p - onehot) * scale.unsqueeze(-1)


def _fast_logits_chunk(u_fast: Tensor, u: Tensor, lse: Tensor, weight: Tensor, bias: Tensor, labels: Tensor,
                       scale: Tensor, attention: Tensor, carried_weight: Tensor, carried_c: Tensor | None,
                       carried_u: Tensor | None, start: int) -> Tensor:
    """z_i for this chunk's columns [B, T, Vc] (fp32)."""
    g = _gradient_chunk(u, lse, weight, bias, labels, scale, start)
    z = at_least_fp32(u_fast @ weight.t() + bias) - attention @ g
    if carried_c is not None:
        z = z - carried_weight[..., 0:1] * carried_c.unsqueeze(1)
    if carried_u is not None:
        z = z - carried_weight[..., 1:2] * (at_least_fp32(u_fast) @ carried_u.transpose(1, 2))
    return z


def _loss_parts_chunk(*args) -> tuple[Tensor, Tensor]:
    """(log-sum-exp, the label's logit or 0) of this chunk's columns, per token [B, T]."""
    labels, start = args[5], args[-1]
    z = _fast_logits_chunk(*args)
    local = labels - start
    inside = (local >= 0) & (local < z.shape[-1]) & (labels != IGNORE_INDEX)
    z_label = z.gather(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(z, dim=-1), torch.where(inside, z_label, torch.zeros_like(z_label))


class FastUnembedding:
    """One forward's fast unembedding. `u_slow` [B, T, s]: the slow head's outputs; `scale` [B, T]: k·w_j
    (0 where a label is missing); `reset` [B, T]: document starts; `eta` [2]: η_c, η_U (0 for a member
    outside the fast set); `log_decay` [2] or None; `norm` [B, T, 2]: k_i per member (1/n_i, 1/√n_i) or
    None (a constant k, already in `scale`); `carried` the sums of the previous segment (S^c [B, V],
    S^U [B, V, s]) or None."""

    def __init__(self, u_slow: Tensor, unembed: Tensor, bias: Tensor, labels: Tensor, scale: Tensor, reset: Tensor,
                 eta: Tensor, log_decay: Tensor | None, norm: Tensor | None, carried: dict[str, Tensor] | None,
                 vocab_size: int, vocab_chunk: int, members: tuple[str, ...]):
        self.u, self.labels, self.scale = u_slow, labels, scale
        self.weight, self.bias = unembed[:vocab_size], bias[:vocab_size]
        self.members = members
        self.carried = carried
        self.columns = _chunks(vocab_size, vocab_chunk)
        B, T = labels.shape
        dtype = torch.float32 if u_slow.dtype != torch.float64 else torch.float64
        layout = ChunkLayout(reset, T)
        mask = layout.intra_mask[:, 0].to(dtype)  # [B, T, T]: j < i in the same document
        ages = layout.intra_exponent.to(dtype)  # i-1-j
        positions = torch.arange(T, dtype=dtype, device=reset.device)
        decay = log_decay.to(dtype) if log_decay is not None else torch.zeros(2, dtype=dtype, device=reset.device)
        k = norm.to(dtype) if norm is not None else torch.ones(B, T, 2, dtype=dtype, device=reset.device)
        member = torch.tensor([name in members for name in UNEMBED_TENSORS], dtype=dtype, device=reset.device)
        eta = eta.to(dtype) * member  # a member outside the fast set takes no step
        # a_ij without the (u_j · u'_i) factor of U's part, which depends on the fast pass.
        self.bias_weights = eta[0] * k[..., 0:1] * torch.exp(decay[0] * ages) * mask
        self.unembed_weights = eta[1] * k[..., 1:2] * torch.exp(decay[1] * ages) * mask
        sees = layout.sees_state[:, 0].to(dtype).unsqueeze(-1)  # [B, T, 1]
        self.carried_weight = eta * k * torch.exp(positions[:, None] * decay) * sees  # [B, T, 2]
        # The state after the last position: λ^(T-1-j) for the last document's tokens, λ^T times the
        # carried sums if no document starts here.
        self.tail = (torch.exp(decay * (T - 1 - positions)[:, None]).unsqueeze(0)
                     * layout.in_last_segment[:, 0].to(dtype).unsqueeze(-1))  # [B, T, 2]
        self.keep = torch.exp(decay * T) * (~layout.has_reset).to(dtype)[:, None]  # [B, 2]
        self._lse = None

    def _slow_lse(self) -> Tensor:
        if self._lse is None:
            parts = [self._run(_slow_lse_chunk, self.u, self.weight[a:b], self.bias[a:b]) for a, b in self.columns]
            self._lse = torch.logsumexp(torch.stack(parts), dim=0)
        return self._lse

    @staticmethod
    def _run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)

    def attention(self, u_fast: Tensor) -> Tensor:
        """a_ij [B, T, T] of the fast pass's outputs (one product, shared by every vocabulary chunk)."""
        weights = self.bias_weights
        if "unembedding" in self.members:
            dtype = self.bias_weights.dtype
            weights = weights + self.unembed_weights * (u_fast.to(dtype) @ self.u.to(dtype).transpose(1, 2))
        return weights

    def _chunk_args(self, u_fast: Tensor, attention: Tensor, a: int, b: int) -> tuple:
        carried_c = carried_u = None
        if self.carried is not None:
            carried_c = self.carried["out_bias"][:, a:b] if "out_bias" in self.members else None
            carried_u = self.carried["unembedding"][:, a:b] if "unembedding" in self.members else None
        return (u_fast, self.u, self._slow_lse(), self.weight[a:b], self.bias[a:b], self.labels, self.scale,
                attention, self.carried_weight, carried_c, carried_u, a)

    def token_losses(self, u_fast: Tensor) -> Tensor:
        """Cross-entropy per token [B, T] with the fast unembedding (0 where the label is ignored)."""
        attention = self.attention(u_fast)
        parts = [self._run(_loss_parts_chunk, *self._chunk_args(u_fast, attention, a, b)) for a, b in self.columns]
        lse = torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0)
        z_label = torch.stack([p[1] for p in parts]).sum(dim=0)
        return torch.where(self.labels == IGNORE_INDEX, torch.zeros_like(lse), lse - z_label)

    def logits(self, u_fast: Tensor) -> Tensor:
        """[B, T, V] (evaluation and generation)."""
        attention = self.attention(u_fast)
        return torch.cat([_fast_logits_chunk(*self._chunk_args(u_fast, attention, a, b)) for a, b in self.columns],
                         dim=-1)

    def final(self) -> dict[str, Tensor]:
        """The sums after the last position, by member: S^c [B, V], S^U [B, V, s]."""
        lse = self._slow_lse()
        parts: dict[str, list[Tensor]] = {name: [] for name in self.members}
        for a, b in self.columns:
            g = _gradient_chunk(self.u, lse, self.weight[a:b], self.bias[a:b], self.labels, self.scale, a)
            tail = self.tail.to(g.dtype)
            if "out_bias" in parts:
                parts["out_bias"].append(torch.einsum("btv,bt->bv", g, tail[..., 0]))
            if "unembedding" in parts:
                parts["unembedding"].append(torch.einsum("btv,bt,bts->bvs", g, tail[..., 1], self.u.to(g.dtype)))
        sums = {name: torch.cat(p, dim=1) for name, p in parts.items()}
        if self.carried is not None:
            for name in self.members:
                keep = self.keep[:, UNEMBED_TENSORS.index(name)]
                sums[name] = sums[name] + keep.reshape(-1, *[1] * (sums[name].dim() - 1)) * self.carried[name]
        return sums


def pending_sums(u: Tensor, unembed: Tensor, bias: Tensor, label: Tensor, scale: Tensor, vocab_size: int,
                 members: tuple[str, ...]) -> dict[str, Tensor]:
    """A pending position's terms of S^c and S^U, once its label is known: `u` [B, s], `label`, `scale` [B]."""
    weight, b = unembed[:vocab_size], bias[:vocab_size]
    lse = _slow_lse_chunk(u, weight, b)
    g = _gradient_chunk(u.unsqueeze(1), lse.unsqueeze(1), weight, b, label.unsqueeze(1), scale.unsqueeze(1), 0)[:, 0]
    terms = {"out_bias": g, "unembedding": g.unsqueeze(-1) * u.to(g.dtype).unsqueeze(1)}
    return {name: terms[name] for name in members}
