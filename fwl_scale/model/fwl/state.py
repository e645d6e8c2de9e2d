"""The FWL's carried state (docs/design.md §1.4) and the normaliser's count.

FWLState holds the running sums of earlier positions of the current documents: what crosses segment
boundaries (streaming, training with carried state; part of the checkpoint there). With
model.fwl.normalize=mean the update of position i is the mean over the earlier positions with a loss,
k_i = 1/n_i (sqrt: k_i = 1/√n_i, between the mean and the plain sum); n is a running sum like the others (of the loss weights, decayed with each fast tensor's λ
under model.fwl.decay), computed by `count_normalisers` and carried in FWLState.count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fwl_scale import IGNORE_INDEX
from fwl_scale.model.fwl.fast_weights import causal_count

# Order of the learned step sizes in FastWeightLayer.step_sizes (one per fast tensor).
FAST_TENSORS = ("w1", "b1", "w2", "b2", "alpha", "beta")
_UNEMBEDDING_PREFIX = "unembedding_sums."
# none: a constant k; mean: k_i = 1/n_i; sqrt: k_i = 1/√n_i (n_i the count of earlier positions with a loss).
NORMALIZE = ("none", "mean", "sqrt")
# The normalisers that divide by the count: the state carries the count.
COUNTED = ("mean", "sqrt")
DECAY = ("none", "learned")
# tensor: one learned step size per fast tensor; token: times a learned factor of each token (layer.py).
STEP_SIZES = ("tensor", "token")


@dataclass
class FWLState:
    """Running sums of earlier positions of the current document, per batch row (float32 or wider).

    `pending_x` holds the body output of a last position whose label was not known when its segment
    was processed (generation, streaming); it is folded in once the next segment supplies the label.

    Under tensor parallelism the state is sharded like the FWL's weights: w1 [B, d, 4s/tp], b1 [B, 4s/tp]
    and w2 [B, 4s/tp, s] hold this rank's slice of the hidden width; the others are replicated."""

    w1: Tensor  # [B, d, 4s]  Σ x_j gh1_jᵀ
    b1: Tensor  # [B, 4s]     Σ gh1_j
    w2: Tensor  # [B, 4s, s]  Σ a_j gh2_jᵀ
    b2: Tensor  # [B, s]      Σ gh2_j
    alpha: Tensor  # [B, s]   Σ gu_j ⊙ xhat_j
    beta: Tensor  # [B, s]    Σ gu_j
    doc_id: Tensor  # [B] int64: the document these sums belong to
    pending_x: Tensor | None = None  # [B, d]
    # normalize="mean" or "sqrt": [B, 6] the count of the sums' positions with a loss, per fast tensor (decayed with
    # its λ; the six are equal without decay). Replicated under tp and cp.
    count: Tensor | None = None
    # update="sequential" with a pending position: the update k ⊙ S of the fast weights its gradient is taken
    # at, θ - η ⊙ (this), those of the first position of its inner chunk (zero where its document starts
    # after that position); shaped and sharded like the sums of the same name (model/fwl/sequential.py).
    pending_w1: Tensor | None = None
    pending_b1: Tensor | None = None
    pending_w2: Tensor | None = None
    pending_b2: Tensor | None = None
    pending_alpha: Tensor | None = None
    pending_beta: Tensor | None = None
    # A fast unembedding (model.fwl.fast_set): its sums by member, out_bias [B, V] Σ g_j, unembedding
    # [B, V, s] Σ g_j u_jᵀ (model/fwl/unembedding.py); with unembed_normalize="head" count then has 8
    # columns, theirs last.
    unembedding_sums: dict[str, Tensor] | None = None

    def detach(self) -> "FWLState":
        """Truncates backpropagation at this state (training with carried state)."""
        return FWLState.from_tensors({name: t.detach() for name, t in self.tensors().items()})

    def tensors(self) -> dict[str, Tensor]:
        out = {name: getattr(self, name) for name in FAST_TENSORS + ("doc_id",)}
        for name in OPTIONAL_TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name, t in (self.unembedding_sums or {}).items():
            out[_UNEMBEDDING_PREFIX + name] = t
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> "FWLState":
        unembedding = {k[len(_UNEMBEDDING_PREFIX):]: v for k, v in t.items() if k.startswith(_UNEMBEDDING_PREFIX)}
        return cls(**{name: t[name] for name in FAST_TENSORS + ("doc_id",)},
                   **{name: t.get(name) for name in OPTIONAL_TENSORS}, unembedding_sums=unembedding or None)

    def pending_update(self) -> dict[str, Tensor] | None:
        """update="sequential": the pending position's chunk-start update by fast tensor (None: none carried)."""
        if self.pending_w1 is None:
            return None
        return {name: getattr(self, "pending_" + name) for name in FAST_TENSORS}


# The fields of FWLState that may be None.
OPTIONAL_TENSORS = ("pending_x", "count") + tuple("pending_" + name for name in FAST_TENSORS)


def inverse_count(n: Tensor, normalize: str = "mean") -> Tensor:
    """k = 1/n (mean) or 1/√n (sqrt) where n > 0, else 0 (nothing to average before a document's first
    position with a loss); finite for any n > 0, also one a long decay has driven below the smallest
    normal number."""
    n_pos = n.clamp(min=torch.finfo(n.dtype).tiny)
    k = torch.rsqrt(n_pos) if normalize == "sqrt" else 1.0 / n_pos
    return torch.where(n > 0, k, torch.zeros_like(n))


def count_normalisers(labels_bt: Tensor, reset_bt: Tensor, count_in: Tensor | None, log_decay: Tensor | None,
                      chunk: int, dtype: torch.dtype, normalize: str = "mean",
                      n_fast: int = len(FAST_TENSORS)) -> tuple[Tensor, Tensor]:
    """normalize="mean" | "sqrt": k_i = 1/n_i or 1/√n_i per fast tensor for the whole sequence [B, T, 6],
    and the count after its last position [B, 6] (`count_in` [B, 6]: the carried count; `log_decay` [6]
    or None)."""
    w = (labels_bt != IGNORE_INDEX).to(dtype)
    chunk = min(chunk, w.shape[1])
    if log_decay is None:
        n, n_out = causal_count(w, reset_bt, count_in[:, 0] if count_in is not None else None, chunk)
        n, n_out = n.unsqueeze(-1).expand(-1, -1, n_fast), n_out.unsqueeze(-1).expand(-1, n_fast)
    else:
        n, n_out = causal_count(w, reset_bt, count_in, chunk, log_decay)
    return inverse_count(n, normalize), n_out
