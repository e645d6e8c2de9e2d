"""The fast FWL against its references, in float64.

Tolerance: 1e-10 absolute on values and gradients whose magnitudes are O(1..10) — float64 round-off of
a few hundred operations, far below any real discrepancy (a wrong mask or a detached term shows up at
1e-3 or more).
"""
from __future__ import annotations

import pytest
import torch

from fwl_scale.model.fwl.fast_weights import causal_cumsum, causal_linear_attention
from fwl_scale.model.fwl import FAST_TENSORS, FastWeightLayer, FWLState
from fwl_scale.model.fwl.naive import naive_causal_cumsum, naive_causal_linear_attention, naive_fwl_logits
from tests.fwl_support import V, fast_logits, grads_of, make_inputs, make_layer, run_segments

TOL = 1e-10


@pytest.fixture(autouse=True)
def _float64():
    torch.manual_seed(0)
    yield


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])
def test_linear_attention_matches_loop(chunk):
    B, T, dk, dv = 2, 11, 3, 4
    q = torch.randn(B, T, dk, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, dk, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, dv, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(B, dk, dv, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 4] = reset[0, 5] = reset[1, 9] = True
    out, st = causal_linear_attention(q, k, v, reset, s0, chunk_size=chunk)
    ref, ref_st = naive_causal_linear_attention(q, k, v, reset, s0)
    assert (out - ref).abs().max() < TOL and (st - ref_st).abs().max() < TOL
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum() + st.sum(), [q, k, v, s0])
    g_ref = torch.autograd.grad((ref * w).sum() + ref_st.sum(), [q, k, v, s0])
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < TOL


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_cumsum_matches_loop(chunk):
    B, T, dv = 2, 10, 5
    v = torch.randn(B, T, dv, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(B, dv, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 0] = reset[1, 3] = reset[0, 7] = True
    out, st = causal_cumsum(v, reset, s0, chunk_size=chunk)
    ref, ref_st = naive_causal_cumsum(v, reset, s0)
    assert (out - ref).abs().max() < TOL and (st - ref_st).abs().max() < TOL


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_fast_fwl_equals_naive_values_and_gradients(chunk, residual):
    B, T = 2, 12
    layer = make_layer(chunk, T, residual)
    x, U, labels, docs = make_inputs(B, T)
    fast, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    naive, g_naive = grads_of(lambda: naive_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    assert (fast - naive).abs().max() < TOL
    names = ["x", "U"] + list(FAST_TENSORS) + ["out_bias", "step_sizes"]
    for name, a, b in zip(names, g_fast, g_naive):
        assert (a - b).abs().max() < TOL * max(1.0, b.abs().max().item()), name
    # The fast weights really adapt: positions late in a document differ from the slow network.
    slow_layer = make_layer(chunk, T, residual)
    slow_layer.load_state_dict(layer.state_dict())
    slow_layer.step_scale = 0.0  # the slow head alone
    slow = fast_logits(slow_layer, x, U, labels, docs)
    assert (slow - fast)[1, 1:].abs().max() > 1e-3
    # ... and never at a document's first position (nothing earlier in that document).
    assert (slow - fast)[0, [0, 5, T - 3]].abs().max() < TOL


def test_detached_second_order_path_is_caught(monkeypatch):
    """The gradient check above must fail if the slow-pass gradients were detached."""
    B, T = 2, 8
    layer = make_layer(4, T)
    x, U, labels, docs = make_inputs(B, T)
    _, g_naive = grads_of(lambda: naive_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    original = FastWeightLayer.slow_gradients

    def detached(self, *args, **kwargs):
        return {k: v.detach() for k, v in original(self, *args, **kwargs).items()}

    monkeypatch.setattr(FastWeightLayer, "slow_gradients", detached)
    fast, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    worst = max((a - b).abs().max().item() for a, b in zip(g_fast, g_naive))
    assert worst > 1e-4


def test_outputs_do_not_depend_on_batch_mates():
    T = 10
    layer = make_layer(4, T)
    x, U, labels, docs = make_inputs(3, T)
    together = fast_logits(layer, x, U, labels, docs)
    alone = fast_logits(layer, x[1:2], U, labels[1:2], docs[1:2])
    assert (together[1:2] - alone).abs().max() < TOL


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("chunk", [2, 16])
def test_segments_with_carried_state_equal_whole_pass(pending, chunk, residual):
    B, T = 2, 14
    layer = make_layer(chunk, T, residual)
    x, U, labels, docs = make_inputs(B, T)
    labels[:, :] = torch.randint(0, V, (B, T))  # pending labels are real tokens
    whole, whole_state = layer(x, U, labels, docs, return_state=True)
    cuts = [3, 5, 9]  # a document boundary (5) falls on a cut, another (11) inside a segment
    seg, seg_state = run_segments(layer, x, U, labels, docs, cuts, pending)
    assert (whole - seg).abs().max() < TOL
    for name in FAST_TENSORS:
        assert (getattr(whole_state, name) - getattr(seg_state, name)).abs().max() < TOL, name
    w = torch.randn_like(whole)
    # Every input that can carry a gradient: x, U and each of the layer's parameters.
    names = ["x", "U", *(n for n, _ in layer.named_parameters())]
    wrt = [x, U, *layer.parameters()]
    g_whole = torch.autograd.grad((whole * w).sum(), wrt, allow_unused=True)
    g_seg = torch.autograd.grad((seg * w).sum(), wrt, allow_unused=True)
    assert g_whole[0] is not None and g_whole[1] is not None
    for name, a, b in zip(names, g_whole, g_seg):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max() < TOL, name


def test_pending_position_needs_its_label():
    layer = make_layer(4, 8)
    x, U, labels, docs = make_inputs(2, 8)
    _, state = layer(x[:, :4], U, labels[:, :4], docs[:, :4], last_label_pending=True, return_state=True)
    assert state.pending_x is not None
    with pytest.raises(ValueError, match="pending"):
        layer(x[:, 4:], U, labels[:, 4:], docs[:, 4:], state=state)


def test_state_round_trips_through_tensors():
    layer = make_layer(4, 8)
    x, U, labels, docs = make_inputs(2, 8)
    _, state = layer(x, U, labels, docs, last_label_pending=True, return_state=True)
    again = FWLState.from_tensors(state.detach().tensors())
    assert again.pending_x is not None and torch.equal(again.w1, state.w1)
