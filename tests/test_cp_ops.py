"""Context-parallel collectives against the unsplit computation, on 2 and 4 gloo processes (float64).

Tolerance 1e-10: float64 round-off; a missing or detached exchange is off by O(1)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fwl_scale.model.fwl.fast_weights import causal_linear_attention
from fwl_scale.parallel.context_parallel import exclusive_state_scan, gather_sequence, local_slice
from tests.distributed import run_distributed

TOL = 1e-10
B, T, DK, DV = 2, 16, 3, 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, d, dtype=torch.float64, generator=g) for d in (DK, DK, DV))
    w = torch.randn(B, T, DV, dtype=torch.float64, generator=g)
    resets = []
    for starts in ([0, 5, 6], [0, 13]):  # row 0: documents start on ranks 0 and 1; row 1: spans ranks
        r = torch.zeros(T, dtype=torch.bool)
        r[starts] = True
        resets.append(r)
    return q, k, v, w, torch.stack(resets)


def _scan_checks(rank: int, world: int, detach: bool) -> None:
    group = dist.group.WORLD
    q, k, v, w, reset = _inputs()
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out_full, _ = causal_linear_attention(*full, reset, chunk_size=4)
    g_full = torch.autograd.grad((out_full * w).sum(), full)

    local = [local_slice(t, group).clone().requires_grad_() for t in (q, k, v)]
    reset_l = local_slice(reset, group)
    _, contribution = causal_linear_attention(*local, reset_l, chunk_size=4)
    (state_in,) = exclusive_state_scan([contribution], reset_l.any(dim=1), group)
    if detach:
        state_in = state_in.detach()
    out, _ = causal_linear_attention(*local, reset_l, state_in, chunk_size=4)
    assert (out - local_slice(out_full, group)).abs().max() < TOL
    # Every rank's loss term; the gradients of a rank's k and v collect the later ranks' terms.
    g = torch.autograd.grad((out * local_slice(w, group)).sum(), local)
    worst = max((a - local_slice(b, group)).abs().max().item() for a, b in zip(g, g_full))
    worst_t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    if detach:
        assert worst_t.item() > 1e-3, "a detached received state must change the gradients"
    else:
        assert worst_t.item() < TOL


def _gather_checks(rank: int, world: int) -> None:
    group = dist.group.WORLD
    x = torch.randn(B, T, DK, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(B, T, DK, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x_local = local_slice(x, group).clone().requires_grad_()
    gathered = gather_sequence(x_local, group)
    assert torch.equal(gathered, x)
    (g,) = torch.autograd.grad((gathered * w).sum() * (rank + 1), [x_local])
    # d/dx of Σ_r (r+1)·(x·w) = w · Σ_r (r+1)
    assert (g - local_slice(w, group) * sum(range(1, world + 1))).abs().max() < TOL


def _all_checks(rank: int, world: int) -> None:
    _scan_checks(rank, world, detach=False)
    _scan_checks(rank, world, detach=True)
    _gather_checks(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_collectives(world):
    run_distributed(world, _all_checks)
