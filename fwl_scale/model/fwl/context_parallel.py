"""The FWL under context parallelism (docs/design.md §1.4, boundary 3): how the running sums cross the ranks
of a context-parallel group, and the state after the last position replicated over the group.

`choose_exchange` is the `auto` rule of docs/design.md §1.5: send whichever of the state (dk·dv per fast
dense layer, fp32) and the keys and values (T_rank·(dk+dv), activation dtype) is smaller. A `RankExchange`
holds what one forward's exchange needs: the cp group, the tp group (the values of W2 enter the
tensor-parallel region), the exchange chosen, and where this rank's positions lie in the sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fwl_scale.model.fwl.fast_weights import ChunkLayout, masked_state
from fwl_scale.model.fwl.state import FAST_TENSORS
from fwl_scale.parallel.context_parallel import (CPContext, broadcast_from_last, exclusive_state_scan,
                                                 gather_sequence)
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.mappings import copy_to_tp


def fwl_exchange_bytes(d_model: int, width: int, hidden: int, tokens_per_rank: int, tp: int = 1,
                       activation_bytes: int = 2, state_bytes: int = 4) -> dict[str, int]:
    """Bytes one rank contributes per sequence (an all-gather delivers (cp-1)× this to every rank).

    state: the six running sums of the FWL block — Σx gh1ᵀ (d × 4s/tp), Σgh1 (4s/tp), Σa gh2ᵀ (4s/tp × s),
    Σgh2, Σgu⊙xhat, Σgu (s each) — in fp32 or wider.
    kv: per token the keys and values they are built from — x (d), gh1 and a (4s/tp each), gh2, gu,
    gu⊙xhat (s each) — in the activation dtype."""
    h = hidden // tp  # the FWL's hidden width (4s) on this tensor-parallel rank
    state = (d_model * h + h + h * width + 3 * width) * state_bytes
    kv = tokens_per_rank * (d_model + 2 * h + 3 * width) * activation_bytes
    return {"state": state, "kv": kv}


def choose_exchange(mode: str, d_model: int, width: int, hidden: int, tokens_per_rank: int, tp: int = 1,
                    activation_bytes: int = 2, state_bytes: int = 4) -> str:
    """`state` or `kv` for `mode` (auto: the one that sends fewer bytes; a tie goes to state). The compute
    crosses over at about the same length: the state form costs ~2·T_rank·dk·dv per rank, attending to
    the earlier ranks' keys ~T_rank·T_earlier·(dk+dv)."""
    if mode != "auto":
        return mode
    b = fwl_exchange_bytes(d_model, width, hidden, tokens_per_rank, tp, activation_bytes, state_bytes)
    return "state" if b["state"] <= b["kv"] else "kv"


@dataclass(frozen=True)
class RankExchange:
    """How one forward's running sums cross the context-parallel ranks: `mode` is `state` or `kv`;
    `reset_bt` [B, T] marks the document starts of the whole sequence, `start` is this rank's first position."""
    cp: CPContext
    tp: TPContext | None
    mode: str
    reset_bt: Tensor
    start: int


def receive_state(cp: CPContext, s_in: dict[str, Tensor] | None, totals: dict[str, Tensor],
                  layout: ChunkLayout, log_decay: Tensor | None) -> dict[str, Tensor]:
    """Exchange `state`: each rank's contribution is its sums after its last document start (the
    first rank's include the carried state), flagged where a document starts on the rank; the
    segmented exclusive scan gives the state entering each rank."""
    # The carried state enters at the first rank (whose scan result is the empty sum, 0). Every rank
    # runs the same ops (times 0 elsewhere) so that the autograd graphs, and with them the order of
    # the collectives in backward, are the same on every rank.
    carried = None
    if s_in is not None:
        keep = 1.0 if cp.rank == 0 else 0.0
        carried = {name: keep * s_in[name].to(totals[name].dtype) for name in FAST_TENSORS}
    decays = [None] * len(FAST_TENSORS) if log_decay is None else [
        layout.decay_weights(a, totals[name].dtype) for name, a in zip(FAST_TENSORS, log_decay)]
    contributions = [layout.final(totals[name], carried[name] if carried else None, dec)
                     for name, dec in zip(FAST_TENSORS, decays)]
    # One collective for the whole block; its backward is the reverse scan.
    scanned = dict(zip(FAST_TENSORS, exclusive_state_scan(contributions, layout.has_reset, cp.group, log_decay,
                                                          layout.T if log_decay is not None else 0)))
    if carried is None:
        return scanned
    return {name: scanned[name] + carried[name] for name in FAST_TENSORS}


def receive_keys_values(exchange: RankExchange, s_in: dict[str, Tensor] | None, grads: dict[str, Tensor],
                        slow: dict[str, Tensor], x: Tensor, layout: ChunkLayout,
                        decay: dict[str, Tensor], gates: Tensor | None = None
                        ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor]]:
    """Exchange `kv`: every rank's keys and values in one all-gather (backward: one all-reduce of
    their gradients); this rank keeps the earlier ranks' tokens of the document it continues. The
    vector sums become the entering state at once; the fast dense layers attend to those keys
    (cross_linear_attention) instead of building dk·dv states. With a decay (`decay`: log λ by fast
    tensor) an earlier token j reaches this rank's position start + t with weight λ^(start+t-1-j),
    the carried state with λ^(start+t). `gates` [B, T_loc, 6] (step_size="token"): each token's
    factor per fast tensor, sent with the pieces and applied to the values here."""
    cp, tp, reset_bt, start = exchange.cp, exchange.tp, exchange.reset_bt, exchange.start
    gu = grads["gu"]
    pieces = [x, grads["gh1"], slow["a"], grads["gh2"], gu, gu * slow["xhat"]]
    if gates is not None:
        pieces.append(gates.to(x.dtype))
    widths = [p.shape[-1] for p in pieces]
    gathered = gather_sequence(torch.cat(pieces, dim=-1), cp.group)[:, :start].split(widths, dim=-1)
    xp, gh1p, ap, gh2p, gup, guxhp = gathered[:6]
    # The values of each fast tensor (b1 and W1 share gh1, unless each token's factors tell them apart).
    # W2's enters the tensor-parallel region first, as in FastWeightLayer.keys_values: its factor
    # scales a partial product there, so its gradient must stay a per-rank part.
    values = dict(zip(FAST_TENSORS, (gh1p, gh1p, copy_to_tp(gh2p, tp), gh2p, guxhp, gup)))
    if gates is not None:
        values = {name: v * gathered[6][..., f:f + 1] for f, (name, v) in enumerate(values.items())}
    # Global segment index (0: the carried state's document goes on); the earlier tokens that reach
    # this rank are those of the segment this rank starts in.
    seg = torch.cumsum(reset_bt.to(torch.int64), dim=1)
    seg_here = seg[:, start]
    k_mask = seg[:, :start] == seg_here[:, None]
    # This rank's tokens before its first document start see the earlier ranks.
    q_mask = torch.cumsum(reset_bt[:, start:start + layout.T].to(torch.int64), dim=1) == 0
    sees_carried = (seg_here == 0)
    dtype = torch.promote_types(x.dtype, torch.float32)
    j = torch.arange(start, device=x.device, dtype=dtype)

    def powers(name, exponent):  # λ^exponent of this fast tensor (None: no decay)
        return torch.exp(decay[name].to(dtype) * exponent) if name in decay else None

    received: dict[str, Tensor] = {}
    for name in ("b1", "b2", "alpha", "beta"):
        received[name] = masked_state(None, values[name], k_mask, powers(name, start - 1 - j))
    if s_in is not None:
        for name in FAST_TENSORS:
            carried = s_in[name] * sees_carried.reshape((-1,) + (1,) * (s_in[name].dim() - 1)).to(s_in[name].dtype)
            if name in decay:
                carried = carried * powers(name, float(start)).to(carried.dtype)
            received[name] = received[name] + carried if name in received else carried
    cross = {"w1": (xp, values["w1"]), "w2": (ap, values["w2"]), "q_mask": q_mask, "k_mask": k_mask}
    if decay:
        t = torch.arange(layout.T, device=x.device, dtype=dtype)
        for name in ("w1", "w2"):
            cross["weight_" + name] = powers(name, start + t[:, None] - 1 - j[None, :])
            cross["end_weight_" + name] = powers(name, start + layout.T - 1 - j)
    return received, cross


def replicate_last(cp: CPContext, sums: dict[str, Tensor], pending_x: Tensor | None
                   ) -> tuple[dict[str, Tensor], Tensor | None]:
    """The state after the sequence's last position (the last rank's) on every rank of the group."""
    tensors = [sums[name] for name in FAST_TENSORS]
    dtype = tensors[0].dtype
    if pending_x is not None:
        tensors.append(pending_x.to(dtype))
    out = broadcast_from_last(tensors, cp.group)
    new_pending = out[len(FAST_TENSORS)].to(pending_x.dtype) if pending_x is not None else None
    return dict(zip(FAST_TENSORS, out[: len(FAST_TENSORS)])), new_pending
