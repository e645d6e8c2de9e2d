"""The FWL's pure functions that the layer, its sequential form (sequential.py) and the cost models
(model/flops.py, plan/memory.py) share: the LayerNorm's statistics and the choice of the fast pass's form."""
from __future__ import annotations

import torch
from torch import Tensor

from fwl_scale.config import FWLConfig


def layer_norm_stats(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (h - mean) * rstd, rstd


def fast_chunk(cfg: FWLConfig, d_model: int, T: int) -> int:
    """Token chunk of the fast pass for a sequence of T tokens (T = the quadratic form).

    Per token, the quadratic form costs ~T(dk+dv) and the mixed-chunk form ~C(dk+dv) + 2dk·dv for each
    fast dense layer, so `auto` stays quadratic up to T = C + 2dk·dv/(dk+dv) of the larger layer (W1:
    dk = d, dv = 4s) and chunks beyond; bench/bench_fwl_op.py measures the crossover. The whole width
    decides, not a tensor-parallel rank's share, so that every layout computes in the same form."""
    if cfg.form == "quadratic":
        return T
    if cfg.form == "chunked":
        return cfg.chunk_size
    dk, dv = d_model, cfg.hidden_mult * cfg.width
    return T if T <= cfg.chunk_size + 2 * dk * dv / (dk + dv) else cfg.chunk_size
