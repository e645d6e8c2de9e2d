"""Sequential fast-weight updates (model.fwl.update=sequential, docs/design.md §1.6; model/fwl/sequential.py)
against their reference, in float64: values and every gradient against naive_sequential_fwl_logits (each
position's gradient taken with autograd at the explicit weights of its inner chunk's first position) for
several inner chunks with documents starting inside them, with and without the long-document remedies and
the residual head; an inner chunk of the whole window against the parallel FWL bit for bit; segments with a
carried state (and pending positions) against one forward over the whole document; the model training with
it; the config's checks. Tensor parallelism runs in tests/test_tp_model.py, the FLOP count in
tests/test_flops.py, the pre-flight refusal of context parallelism in tests/test_cli.py.

Tolerance: 1e-10 relative to max(1, |reference|), as in tests/test_fwl.py (float64 round-off; taking a
chunk's gradients at θ instead of θ_c is off by 1, a detached state by 1e-2 or more).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fwl_scale.config import ConfigError, load_config
from fwl_scale.model.fwl import FAST_TENSORS, FWLState
from fwl_scale.model.fwl.naive import naive_sequential_fwl_logits
from fwl_scale.model.fwl.sums import FastSums
from fwl_scale.train.loop import Trainer
from tests.fwl_support import (V, fast_logits, grads_of, make_inputs, make_layer, param_names, rel_err, run_segments,
                                seeded)
from tests.train_support import step_losses, tiny_config

TOL = 1e-10
T = 12
OPTIONS = [("none", "none"), ("mean", "none"), ("none", "learned"), ("mean", "learned"), ("sqrt", "learned")]


_seed = pytest.fixture(autouse=True)(seeded)
_rel = rel_err


def sequential_layer(inner_chunk: int, T: int, residual: bool = False, normalize: str = "none",
                     decay: str = "none", chunk: int = 2):
    """tests/fwl_support's layer with update=sequential; the fast pass inside an inner chunk runs in chunks of
    `chunk` (the mixed-chunk form inside each inner chunk, too)."""
    layer = make_layer(chunk, T, residual, normalize, decay)
    layer.cfg = dataclasses.replace(layer.cfg, update="sequential", inner_chunk=inner_chunk)
    return layer


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("normalize, decay", OPTIONS)
@pytest.mark.parametrize("inner_chunk", [1, 3, 4, T])
def test_sequential_equals_naive_values_and_gradients(inner_chunk, normalize, decay, residual):
    """make_inputs puts document starts at 5 and 9 of row 0: inside an inner chunk of 3 (3..5) and of 4 (4..7,
    8..11), on the start of one of 3 (9); labels ignored at 2 of row 0 and the last of row 1."""
    B = 2
    layer = sequential_layer(inner_chunk, T, residual, normalize, decay)
    x, U, labels, docs = make_inputs(B, T)
    fast, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    naive, g_naive = grads_of(lambda: naive_sequential_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    assert _rel(fast, naive) < TOL
    for name, a, b in zip(param_names(layer), g_fast, g_naive):
        assert _rel(a, b) < TOL, name
    if inner_chunk < T:
        # The option matters: the parallel FWL (every gradient at θ) is far from it.
        parallel = make_layer(2, T, residual, normalize, decay)
        parallel.load_state_dict(layer.state_dict())
        assert (fast_logits(parallel, x, U, labels, docs) - fast).abs().max() > 1e-2


@pytest.mark.parametrize("normalize, decay", OPTIONS)
@pytest.mark.parametrize("inner_chunk", [T, T + 5])
def test_inner_chunk_of_the_window_is_the_parallel_fwl_bit_for_bit(inner_chunk, normalize, decay):
    B = 2
    x, U, labels, docs = make_inputs(B, T)
    layer = sequential_layer(inner_chunk, T, True, normalize, decay, chunk=4)
    results = []
    for update in ("parallel", "sequential"):
        layer.cfg = dataclasses.replace(layer.cfg, update=update)
        results.append(grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U))
        _, state = layer(x, U, labels, docs, return_state=True)
        results.append(state)
    (par, g_par), par_state, (seq, g_seq), seq_state = results
    assert torch.equal(par, seq)
    for name, a, b in zip(param_names(layer), g_par, g_seq):
        assert torch.equal(a, b), name
    for name in FAST_TENSORS + ("count",):
        if getattr(par_state, name) is not None:
            assert torch.equal(getattr(par_state, name), getattr(seq_state, name)), name


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("normalize, decay", [("none", "none"), ("mean", "learned"), ("sqrt", "learned")])
@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("inner_chunk, cuts", [(1, [3, 5, 9]), (3, [6, 12, 15]), (4, [8, 12])])
def test_segments_with_carried_state_equal_whole_forward(inner_chunk, cuts, pending, normalize, decay, residual):
    """Segments whose lengths are multiples of the inner chunk: each segment's first chunk starts from the
    carried state's fast weights, as the whole forward's chunk there does; with `pending`, each segment's last
    label arrives with the next segment, and that position's gradient is taken at its chunk's start weights
    (carried in the state). Documents start on a cut (12) and inside chunks (5 of row 0, 13 of row 1)."""
    B, T = 2, 20
    layer = sequential_layer(inner_chunk, T, residual, normalize, decay)
    x, U, labels, docs = make_inputs(B, T)
    labels[:, :] = torch.randint(0, V, (B, T))  # pending labels are real tokens
    docs[0, 12:] = 3
    docs[1, 13:] = 4
    whole, whole_state = layer(x, U, labels, docs, return_state=True)
    seg, seg_state = run_segments(layer, x, U, labels, docs, cuts, pending)
    assert _rel(seg, whole) < TOL
    for name in FAST_TENSORS + ("count",):
        if getattr(whole_state, name) is not None:
            assert _rel(getattr(seg_state, name), getattr(whole_state, name)) < TOL, name
    w = torch.randn_like(whole)
    names = ["x", "U", *(n for n, _ in layer.named_parameters())]
    wrt = [x, U, *layer.parameters()]
    g_whole = torch.autograd.grad((whole * w).sum(), wrt)
    g_seg = torch.autograd.grad((seg * w).sum(), wrt)
    for name, a, b in zip(names, g_whole, g_seg):
        assert _rel(a, b) < TOL, name


def test_pending_update_is_carried_and_required():
    layer = sequential_layer(3, 8)
    x, U, labels, docs = make_inputs(2, 8)
    _, state = layer(x[:, :6], U, labels[:, :6], docs[:, :6], last_label_pending=True, return_state=True)
    assert state.pending_update() is not None and state.pending_w1.shape == state.w1.shape
    again = FWLState.from_tensors(state.detach().tensors())
    for name in FAST_TENSORS:
        assert torch.equal(getattr(again, "pending_" + name), getattr(state, "pending_" + name))
    # A pending position without its chunk-start update (a state of update=parallel) is refused.
    parallel_state = dataclasses.replace(state, **{"pending_" + name: None for name in FAST_TENSORS})
    with pytest.raises(ValueError, match="update=sequential"):
        layer(x[:, 6:], U, labels[:, 6:], docs[:, 6:], state=parallel_state, pending_labels_b=labels[:, 5])


def test_detached_chunk_state_is_caught(monkeypatch):
    """The gradient check against the reference must fail if the state handed from chunk to chunk were detached
    (the second-order path through θ_c)."""
    layer = sequential_layer(4, T)
    x, U, labels, docs = make_inputs(2, T)
    _, g_naive = grads_of(lambda: naive_sequential_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    original = FastSums.final
    monkeypatch.setattr(FastSums, "final", lambda self: {k: v.detach() for k, v in original(self).items()})
    _, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    assert max(_rel(a, b) for a, b in zip(g_fast, g_naive)) > 1e-4


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="model.fwl.update: must be parallel or sequential"):
        load_config(None, ["model.fwl.update=serial"])
    with pytest.raises(ConfigError, match="model.fwl.inner_chunk: must be > 0"):
        load_config(None, ["model.fwl.update=sequential", "model.fwl.inner_chunk=0"])
    with pytest.raises(ConfigError, match=r"model.fwl.update: sequential .*\(parallel.cp=2\)"):
        load_config(None, ["model.fwl.update=sequential", "parallel.cp=2"])
    # Without the FWL there is nothing to refuse.
    load_config(None, ["model.fwl.update=sequential", "parallel.cp=2", "model.fwl.enabled=false"])
    # torch.compile would unroll the chunk loop into one graph (config.check_layout); one chunk is the parallel FWL.
    with pytest.raises(ConfigError, match=r"train.compile: not supported with model.fwl.update=sequential \(16 inner"):
        load_config(None, ["model.fwl.update=sequential", "train.compile=true"])
    load_config(None, ["model.fwl.update=sequential", "model.fwl.inner_chunk=256", "train.compile=true"])


@pytest.mark.parametrize("mode", ["packed", "contiguous"])
def test_model_trains_with_sequential_updates(tmp_path, mode):
    """The tiny model (tests/train_support.py: T = 32) with inner chunks of 8 and the recipe of configs/tiny.yaml
    trains: finite losses that fall; in contiguous mode with the state carried from micro-batch to micro-batch."""
    cfg = tiny_config(tmp_path, "model.fwl.update=sequential", "model.fwl.inner_chunk=8", "model.fwl.residual=true",
                      "model.fwl.normalize=mean", "model.fwl.decay=learned", f"data.mode={mode}", "train.steps=12")
    trainer = Trainer(cfg)
    assert trainer.run() == 0
    losses = step_losses(tmp_path)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert sum(list(losses.values())[-3:]) < sum(list(losses.values())[:3])
    if mode == "contiguous":
        assert trainer.carried.state is not None and trainer.carried.state.pending_x is None
