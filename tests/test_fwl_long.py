"""The FWL's remedies for long documents (model.fwl.normalize=mean, model.fwl.decay=learned, and both)
against their references, in float64: the state operator with a forgetting factor against the loop, the
whole FWL and the whole model against naive_fwl_logits (θ_i built with autograd per position), segments
with a carried state and pending positions against the whole pass, the carried state's tensors through
the checkpoint files and an exact resume of training with carried state (data.mode=contiguous), older
checkpoints still loading, and the config's checks.
Context and tensor parallelism with the remedies run in tests/test_cp_model.py and tests/test_tp_model.py.

Tolerance: 1e-10 as in tests/test_fwl.py (float64 round-off; a wrong power of λ or a count off by one
position is off by 1e-3 or more).
"""
from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import ConfigError, config_to_nested, load_config
from fwl_scale.model.fwl.fast_weights import causal_count, causal_cumsum, causal_linear_attention
from fwl_scale.model.fwl import FAST_TENSORS, FWLState
from fwl_scale.model.fwl.naive import naive_causal_cumsum, naive_causal_linear_attention, naive_fwl_logits
from fwl_scale.train.carried import CarriedState
from fwl_scale.checkpoint.native import CheckpointError, CheckpointRef, check_compatible
from fwl_scale.train.loop import Trainer
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.fwl_support import (V, assert_same_gradients, fast_logits, grads_of, make_inputs, make_layer,
                                model_matches_naive, param_names, rel_err, run_segments, seeded)
from tests.train_support import step_losses, tiny_config

TOL = 1e-10
REMEDIES = [("mean", "none"), ("none", "learned"), ("mean", "learned"), ("sqrt", "learned")]


_seed = pytest.fixture(autouse=True)(seeded)
_rel = rel_err


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_decayed_state_operator_matches_loop(chunk):
    """Matrix sums, vector sums and counts with λ = 0.7, document resets and an incoming state; values,
    the state after the last position, and the gradients of every input including log λ."""
    B, T, dk, dv = 2, 11, 3, 4
    q, k = (torch.randn(B, T, dk, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, dv, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(B, dk, dv, dtype=torch.float64, requires_grad=True)
    log_decay = torch.tensor(0.7, dtype=torch.float64).log().requires_grad_()
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 4] = reset[0, 5] = reset[1, 9] = True
    ins = [q, k, v, s0, log_decay]
    w = torch.randn(B, T, dv, dtype=torch.float64)

    out, st = causal_linear_attention(q, k, v, reset, s0, chunk_size=chunk, log_decay=log_decay)
    ref, ref_st = naive_causal_linear_attention(q, k, v, reset, s0, log_decay=log_decay)
    assert _rel(out, ref) < TOL and _rel(st, ref_st) < TOL
    g = torch.autograd.grad((out * w).sum() + st.sum(), ins)
    g_ref = torch.autograd.grad((ref * w).sum() + ref_st.sum(), ins)
    for name, a, b in zip("q k v state log_decay".split(), g, g_ref):
        assert _rel(a, b) < TOL, name
    assert g_ref[-1].abs() > 1e-3  # λ matters

    out, st = causal_cumsum(v, reset, s0[:, 0], chunk_size=chunk, log_decay=log_decay)
    ref, ref_st = naive_causal_cumsum(v, reset, s0[:, 0], log_decay=log_decay)
    assert _rel(out, ref) < TOL and _rel(st, ref_st) < TOL
    g = torch.autograd.grad((out * w).sum() + st.sum(), [v, s0, log_decay])
    g_ref = torch.autograd.grad((ref * w).sum() + ref_st.sum(), [v, s0, log_decay])
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < TOL

    weights = (torch.rand(B, T) > 0.3).to(torch.float64)
    n0 = torch.tensor([3.0, 0.5], dtype=torch.float64)
    for decay in (None, log_decay):
        n, n_out = causal_count(weights, reset, n0, chunk, decay)
        ref, ref_st = naive_causal_cumsum(weights[..., None], reset, n0[:, None], log_decay=decay)
        assert _rel(n, ref[..., 0]) < TOL and _rel(n_out, ref_st[:, 0]) < TOL
    g = torch.autograd.grad((n * w[..., 0]).sum() + n_out.sum(), [log_decay])
    g_ref = torch.autograd.grad((ref[..., 0] * w[..., 0]).sum() + ref_st.sum(), [log_decay])
    assert _rel(g[0], g_ref[0]) < TOL
    # Several λ at once (the FWL's six counts share one layout): each column is that λ's count.
    decays = torch.stack([log_decay, log_decay.detach() * 3])
    n0s = torch.stack([n0, n0 * 2], dim=-1)
    n, n_out = causal_count(weights, reset, n0s, chunk, decays)
    for f in range(2):
        ref, ref_st = causal_count(weights, reset, n0s[:, f], chunk, decays[f])
        assert _rel(n[..., f], ref) < TOL and _rel(n_out[:, f], ref_st) < TOL


def test_decay_powers_stay_finite_far_past_the_chunk():
    """λ^(i-1-j) only ever with i-1-j >= 0: a small λ over long chunks underflows to 0, never overflows."""
    B, T = 1, 600
    v = torch.randn(B, T, 2, dtype=torch.float32)
    reset = torch.zeros(B, T, dtype=torch.bool)
    out, st = causal_cumsum(v, reset, chunk_size=512, log_decay=torch.tensor(0.01).log())
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    assert (out[0, 1:] - v[0, :-1]).abs().max() < 0.05  # λ = 0.01: essentially the previous term alone


@pytest.mark.parametrize("normalize, decay", REMEDIES)
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_fast_fwl_equals_naive_with_remedy(normalize, decay, chunk):
    B, T = 2, 12
    layer = make_layer(chunk, T, normalize=normalize, decay=decay)
    x, U, labels, docs = make_inputs(B, T)
    labels[1, 3:6] = IGNORE_INDEX  # a stretch without losses: the count stays put (or decays)
    fast, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    naive, g_naive = grads_of(lambda: naive_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    assert _rel(fast, naive) < TOL
    for name, a, b in zip(param_names(layer), g_fast, g_naive):
        assert _rel(a, b) < TOL, name
    if decay == "learned":
        assert g_naive[-1].abs().min() > 1e-4  # every λ gets a sizeable gradient


def test_mean_update_is_the_mean_gradient():
    """normalize=mean, no decay: the fast update of position i is the mean of the earlier gradients,
    so feeding the same position twice as often changes nothing (with a constant k it doubles)."""
    T = 8
    layer = make_layer(4, T, normalize="mean")
    x, U, _, _ = make_inputs(2, T)
    labels = torch.full((1, T), 3)
    x_rep = x[:1, :1].detach().expand(1, T, -1).contiguous()
    docs = torch.zeros(1, T, dtype=torch.long)
    logits = fast_logits(layer, x_rep, U, labels, docs)
    assert (logits[0, 2:] - logits[0, 1]).abs().max() < TOL
    assert (logits[0, 1] - logits[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("normalize, decay", REMEDIES)
@pytest.mark.parametrize("pending", [False, True])
def test_segments_with_remedy_equal_whole_pass(normalize, decay, pending):
    B, T = 2, 14
    layer = make_layer(3, T, normalize=normalize, decay=decay)
    x, U, labels, docs = make_inputs(B, T)
    labels[:, :] = torch.randint(0, V, (B, T))
    labels[1, 2] = labels[1, 4] = IGNORE_INDEX  # 4: a cut's last label, ignored (counts nothing when it arrives)
    whole, whole_state = layer(x, U, labels, docs, return_state=True)
    seg, seg_state = run_segments(layer, x, U, labels, docs, [3, 5, 9], pending)
    assert _rel(seg, whole) < TOL
    for name in FAST_TENSORS + (("count",) if normalize != "none" else ()):
        assert _rel(getattr(seg_state, name), getattr(whole_state, name)) < TOL, name
    assert (whole_state.count is None) == (normalize == "none")
    assert_same_gradients(layer, x, U, seg, whole, TOL)


def test_carried_count_round_trips_and_is_required():
    layer = make_layer(4, 8, normalize="mean", decay="learned")
    x, U, labels, docs = make_inputs(2, 8)
    _, state = layer(x, U, labels, docs, last_label_pending=True, return_state=True)
    assert state.count.shape == (2, len(FAST_TENSORS))
    again = FWLState.from_tensors(state.detach().tensors())
    assert torch.equal(again.count, state.count) and again.pending_x is not None
    # The next position's update scale: 1/count (what streaming reports the fast update with).
    assert torch.equal(layer.update_scale(state), 1.0 / state.count)
    no_count = FWLState.from_tensors({k: v for k, v in state.detach().tensors().items() if k != "count"})
    with pytest.raises(ValueError, match="normalize=mean"):
        layer(x, U, labels, docs, state=no_count, pending_labels_b=labels[:, 0])


@pytest.mark.parametrize("normalize", ["mean", "sqrt"])
def test_counted_update_stays_bounded_over_32_windows(normalize):
    """Streaming 32 windows with the state carried, past any training length: the count stays below
    1/(1 - λ) and each fast update k·S (the carried sums times the next position's scale) below its
    bound G·n^(1-p) (p = 1 for mean, 1/2 for sqrt; G the largest per-token gradient norm of the window,
    n the count): S is a λ-weighted sum of gradients of norm <= G whose weights add up to n."""
    T, windows = 8, 32
    layer = make_layer(4, T, normalize=normalize, decay="learned")
    lam_max = torch.sigmoid(layer.decay_logits).max().item()
    power = 1.0 if normalize == "mean" else 0.5
    state, g_max, first_count = None, torch.zeros(len(FAST_TENSORS), dtype=torch.float64), None
    with torch.no_grad():
        for _ in range(windows):
            x, U, labels, _ = make_inputs(2, T)
            docs = torch.zeros(2, T, dtype=torch.long)
            slow = layer.slow_pass(x, x if layer.cfg.residual else None)
            weight = (labels != IGNORE_INDEX).to(x.dtype)
            kv = layer.keys_values(x, slow, layer.slow_gradients(slow, U, labels, weight))
            norms = [(v.norm(dim=-1) * (k.norm(dim=-1) if k is not None else 1.0)).max() for k, v in kv.values()]
            g_max = torch.maximum(g_max, torch.stack(norms))
            _, state = layer(x, U, labels, docs, state=state, return_state=True)
            n = state.count
            first_count = n if first_count is None else first_count
            assert (n <= 1.0 / (1.0 - lam_max) + 1e-9).all()
            scale = layer.update_scale(state)
            for f, name in enumerate(FAST_TENSORS):
                for b in range(2):
                    update = (getattr(state, name)[b] * scale[b, f]).norm()
                    assert update <= g_max[f] * n[b, f] ** (1 - power) * (1 + 1e-9), (name, update, g_max[f])
    assert (state.count > first_count).all()  # carried over all 32 windows, never reset


def test_sqrt_needs_a_decay():
    with pytest.raises(ConfigError, match=re.escape("model.fwl.decay")):
        load_config(None, ["model.fwl.normalize=sqrt"])
    assert load_config(None, ["model.fwl.normalize=sqrt", "model.fwl.decay=learned"]).model.fwl.normalize == "sqrt"


def test_mean_refuses_a_gradient_scale():
    with pytest.raises(ConfigError, match=re.escape("model.fwl.grad_scale")):
        load_config(None, ["model.fwl.normalize=mean", "model.fwl.grad_scale=0.5"])
    assert load_config(None, ["model.fwl.normalize=mean", "model.fwl.decay=learned"]).model.fwl.decay == "learned"


@pytest.mark.parametrize("normalize, decay", REMEDIES)
def test_model_head_with_remedy_matches_naive(normalize, decay):
    """The whole model (tests/test_model.py's naive-head check) with the remedy on: logits, loss and every
    parameter's gradient (body, FWL, λ) through the fast path and through the reference."""
    names = model_matches_naive(f"model.fwl.normalize={normalize}", f"model.fwl.decay={decay}",
                                "model.fwl.decay_init=0.7")
    assert ("fwl.decay_logits" in names) == (decay == "learned")


def test_carried_training_state_keeps_the_count(tmp_path):
    """Training with carried state (train/carried.py) saves and restores the count with the sums, also
    when the checkpoint is resumed at another data-parallel size (rows reassembled)."""
    layer = make_layer(4, 8, normalize="mean", decay="learned")
    x, U, labels, docs = make_inputs(2, 8)
    _, state = layer(x, U, labels, docs, return_state=True)
    saved = [CarriedState(True, micro_batch=1, dp_rank=r, dp_size=2) for r in range(2)]
    for r, c in enumerate(saved):
        c.state = FWLState.from_tensors({k: v[r:r + 1] for k, v in state.detach().tensors().items()})
        c.save(tmp_path)
    whole = CarriedState(True, micro_batch=2)
    whole.load(tmp_path, torch.device("cpu"))
    assert torch.equal(whole.state.count, state.count) and torch.equal(whole.state.w1, state.w1)


def test_checkpoints_from_before_the_remedies_still_load(tmp_path):
    """A checkpoint written before model.fwl.normalize/decay existed was trained with their defaults: it
    is compatible with a config at the defaults, and refused (naming the field) with a remedy on."""
    cfg = load_config(None, [])
    old = config_to_nested(cfg)["model"]
    for name in ("normalize", "decay", "decay_init"):
        del old["fwl"][name]
    ref = CheckpointRef(tmp_path, "step_00000001", {"step": 1, "model": old})
    check_compatible(ref, cfg)
    with pytest.raises(CheckpointError, match=re.escape("model.fwl.decay")):
        check_compatible(ref, load_config(None, ["model.fwl.decay=learned"]))


def test_training_with_carried_state_and_remedies_resumes_exactly(tmp_path):
    """data.mode=contiguous with both remedies: the trainer carries the state (count included) from
    micro-batch to micro-batch, saves it with the checkpoint, and a resumed run repeats the
    uninterrupted one's losses bit for bit."""
    common = ("data.mode=contiguous", "train.steps=4", "parallel.grad_accum=2", "parallel.micro_batch=2",
              "train.warmup_steps=1", "train.eval_every=1000", "model.fwl.normalize=mean",
              "model.fwl.decay=learned")
    assert Trainer(tiny_config(tmp_path / "whole", *common)).run() == 0
    uninterrupted = step_losses(tmp_path / "whole")

    def stop_after_two(trainer, stats):
        if trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "run"
    first = Trainer(tiny_config(out, *common), after_step=stop_after_two)
    assert first.run() == EXIT_REQUEUE
    resumed = Trainer(tiny_config(out, *common))
    assert resumed.carried.state.count is not None
    assert torch.equal(resumed.carried.state.count, first.carried.state.count)
    assert resumed.run() == 0
    assert step_losses(out) == uninterrupted
