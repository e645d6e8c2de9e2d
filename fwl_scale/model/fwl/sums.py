"""The six running sums of one FWL forward (docs/design.md §1.1): Σ_{j<i} of the per-token gradients of
W1, b1, W2, b2, α, β, read by the fast pass at every position i.

All keys and values exist once the slow pass is done (the gradients are taken at θ), so the sums are
built in one go: each sum's chunk totals, the state entering this rank — the carried state, and under
context parallelism what the earlier ranks hand on (context_parallel.py) — and then, per fast tensor, the update
the fast pass subtracts. Where the sums run (the exchange over cp ranks, the decay, the normaliser) stays
here, so that FastWeightLayer.forward reads as the math.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fwl_scale.model.fwl.context_parallel import RankExchange, receive_keys_values, receive_state
from fwl_scale.model.fwl.fast_weights import (ChunkLayout, chunked_cumsum, chunked_linear_attention,
                                              cross_linear_attention, cumsum_totals, linear_attention_totals,
                                              masked_state)
from fwl_scale.model.fwl.state import FAST_TENSORS


class FastSums:
    """`keys_values`: by fast tensor, (key or None, value) — a dense layer's sum is causal linear
    attention over (key, value), a vector's a plain sum of the values. `s_in`: the carried sums (None
    when nothing is carried). `scale`: [B, T_loc, 6] per-query normalisers 1/n_i (normalize="mean"), or
    None. `need_state`: the sums after the last position will be asked for (`final`). `exchange`: how the
    sums cross context-parallel ranks (None without cp); its `kv` form sends `slow` and `grads` (and the
    per-token step-size factors `gates`, which `keys_values` already holds applied)."""

    def __init__(self, keys_values: dict[str, tuple[Tensor | None, Tensor]], s_in: dict[str, Tensor] | None,
                 layout: ChunkLayout, log_decay: Tensor | None, scale: Tensor | None, dtype: torch.dtype,
                 need_state: bool, exchange: RankExchange | None = None,
                 slow: dict[str, Tensor] | None = None, grads: dict[str, Tensor] | None = None,
                 gates: Tensor | None = None):
        self.keys_values = keys_values
        self.layout = layout
        self.decay = dict(zip(FAST_TENSORS, log_decay)) if log_decay is not None else {}
        self.scale = scale
        self.dtype = dtype
        # The matrix sums' chunk totals (2·dk·dv per token each) serve only a state: one handed on
        # (returned or exchanged) or entering a later chunk. With one chunk and no state asked for they are
        # skipped (the vector sums' totals cost next to nothing).
        self.need_states = need_state or exchange is not None or layout.n_chunks > 1
        self.totals = {name: (linear_attention_totals(k, v, layout, self.decay.get(name)) if k is not None
                              else cumsum_totals(v, layout, self.decay.get(name)))
                       for name, (k, v) in keys_values.items() if k is None or self.need_states}
        self.cross = None
        if exchange is not None and exchange.mode == "state":
            received = receive_state(exchange.cp, s_in, self.totals, layout, log_decay)
        elif exchange is not None:
            received, self.cross = receive_keys_values(exchange, s_in, grads, slow, keys_values["w1"][0], layout,
                                                       self.decay, gates)
        else:
            received = s_in
        self.received = received if received is not None else {}
        self.states: dict[str, Tensor] = {}

    def _normalised(self, name: str, out: Tensor) -> Tensor:
        # k_i = 1/n_i of this fast tensor, per query (the update is linear in the sums).
        if self.scale is not None:
            out = out * self.scale[..., FAST_TENSORS.index(name)].unsqueeze(-1).to(out.dtype)
        return out.to(self.dtype)

    def attend(self, name: str, q: Tensor) -> Tensor:
        """Σ_{j<i} (k_j·q_i) v_j of a fast dense layer's sum, for the queries `q` of this rank's positions."""
        k, v = self.keys_values[name]
        out, self.states[name] = chunked_linear_attention(
            q, k, v, self.layout, self.received.get(name), log_decay=self.decay.get(name),
            totals=self.totals.get(name), need_state=self.need_states)
        if self.cross is not None:
            out = out + cross_linear_attention(q, *self.cross[name], self.cross["q_mask"], self.cross["k_mask"],
                                               self.cross.get("weight_" + name))
        return self._normalised(name, out)

    def cumsum(self, name: str) -> Tensor:
        """Σ_{j<i} v_j of a vector's sum."""
        out, self.states[name] = chunked_cumsum(self.keys_values[name][1], self.layout, self.received.get(name),
                                                log_decay=self.decay.get(name), totals=self.totals[name])
        return self._normalised(name, out)

    def final(self) -> dict[str, Tensor]:
        """The sums after this rank's last position (after every `attend`/`cumsum`)."""
        sums = dict(self.states)
        if self.cross is not None:
            # kv exchange: the matrix sums of the earlier ranks were attended to, never summed.
            no_reset = (~self.layout.has_reset).to(sums["w1"].dtype)[:, None, None]
            for name in ("w1", "w2"):
                sums[name] = sums[name] + no_reset * masked_state(*self.cross[name], self.cross["k_mask"],
                                                                  self.cross.get("end_weight_" + name))
        return sums
