"""Issue 22's FWL variants against their references, in float64 (tolerance 1e-10 as in tests/test_fwl.py):
per-token step sizes (model.fwl.step_size=token) against naive_fwl_logits, which scales each token's
gradient by its factor with autograd; the fast unembedding (model.fwl.fast_set: c and U) against the
same reference with c and U in its θ, layer and whole model; segments with a carried state and pending
positions against the whole pass; step_size=token at init equal to step_size=tensor. The sqrt normaliser runs with the other
normalisers in tests/test_fwl_long.py; both run under tensor and context parallelism in
tests/test_tp_model.py and tests/test_cp_model.py.
"""
from __future__ import annotations

import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import ConfigError, FWLConfig, load_config
from fwl_scale.model import build_model
from fwl_scale.model.fwl import FAST_TENSORS, FastWeightLayer, FWLState
from fwl_scale.model.fwl.naive import naive_fwl_logits
from fwl_scale.model.streaming import StreamingSession
from tests.fwl_support import (D, S, V, VPAD, assert_same_gradients, fast_logits, grads_of, make_inputs, make_layer,
                                model_matches_naive, param_names, rel_err, run_segments, seeded)

TOL = 1e-10
SETTINGS = [("none", "none"), ("mean", "none"), ("mean", "learned"), ("sqrt", "learned")]


_seed = pytest.fixture(autouse=True)(seeded)
_rel = rel_err


def _assert_fast_equals_naive(layer, x, U, labels, docs):
    """Logits and every gradient of the fast path against naive_fwl_logits; the reference's result."""
    fast, g_fast = grads_of(lambda: fast_logits(layer, x, U, labels, docs), layer, x, U)
    naive, g_naive = grads_of(lambda: naive_fwl_logits(layer, x, U, labels, docs), layer, x, U)
    assert _rel(fast, naive) < TOL
    for name, a, b in zip(param_names(layer), g_fast, g_naive):
        assert _rel(a, b) < TOL, name
    return naive, g_naive


@pytest.mark.parametrize("normalize, decay", SETTINGS)
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_token_step_sizes_equal_naive(normalize, decay, chunk):
    B, T = 2, 12
    layer = make_layer(chunk, T, residual=chunk == 4, normalize=normalize, decay=decay, step_size="token")
    x, U, labels, docs = make_inputs(B, T)
    labels[1, 3:6] = IGNORE_INDEX
    naive, g_naive = _assert_fast_equals_naive(layer, x, U, labels, docs)
    names = param_names(layer)
    gate_grad = g_naive[names.index("step_gate_weight")]
    assert gate_grad.abs().sum(dim=1).min() > 1e-4  # every fast tensor's factor is learned


@pytest.mark.parametrize("pending", [False, True])
def test_token_step_sizes_in_segments_equal_whole_pass(pending):
    B, T = 2, 14
    layer = make_layer(3, T, normalize="sqrt", decay="learned", step_size="token")
    x, U, labels, docs = make_inputs(B, T)
    labels[:, :] = torch.randint(0, V, (B, T))
    labels[1, 2] = labels[1, 4] = IGNORE_INDEX
    whole, whole_state = layer(x, U, labels, docs, return_state=True)
    seg, seg_state = run_segments(layer, x, U, labels, docs, [3, 5, 9], pending)
    assert _rel(seg, whole) < TOL
    for name in FAST_TENSORS + ("count",):
        assert _rel(getattr(seg_state, name), getattr(whole_state, name)) < TOL, name


def test_token_step_sizes_start_as_tensor_step_sizes():
    """At init the factors are 2σ(0) = 1: the same outputs as step_size=tensor from the same seed."""
    T = 10
    x, U, labels, docs = make_inputs(2, T)
    outs = []
    for step_size in ("tensor", "token"):
        torch.manual_seed(3)
        cfg = FWLConfig(width=S, grad_scale=1.0 / T, init_std=0.5, chunk_size=4, vocab_chunk=5, step_size=step_size,
                        step_size_init=0.5)
        layer = FastWeightLayer(cfg, D, V, VPAD).double()
        outs.append(fast_logits(layer, x, U, labels, docs))
    assert torch.equal(outs[0], outs[1])


def test_unknown_step_size_is_refused():
    with pytest.raises(ConfigError, match="model.fwl.step_size"):
        load_config(None, ["model.fwl.step_size=position"])


# The fast unembedding (model.fwl.fast_set): c and U take the FWL's step, against naive_fwl_logits with
# both in its θ (their gradients by autograd, the logits at θ_i literally).
MEMBERS = [("out_bias",), ("unembedding",), ("out_bias", "unembedding")]


@pytest.mark.parametrize("members", MEMBERS)
@pytest.mark.parametrize("normalize, decay, unembed_normalize", [s + ("head",) for s in SETTINGS]
                         + [("mean", "learned", "none"), ("none", "learned", "none")])
def test_fast_unembedding_equals_naive(members, normalize, decay, unembed_normalize):
    B, T = 2, 12
    layer = make_layer(4, T, residual=True, normalize=normalize, decay=decay, fast_set=("head",) + members,
                       unembed_normalize=unembed_normalize)
    x, U, labels, docs = make_inputs(B, T)
    labels[1, 3:6] = IGNORE_INDEX
    naive, g_naive = _assert_fast_equals_naive(layer, x, U, labels, docs)
    names = param_names(layer)
    eta_grad = g_naive[names.index("unembed_log_step_sizes")]
    for f, member in enumerate(("out_bias", "unembedding")):
        assert (eta_grad[f].abs() > 1e-4) == (member in members), member  # each member's step matters
    # The token losses the trainer uses are the cross-entropy of those logits.
    token_loss = layer.head(x, U, labels, docs)[0]
    ce = torch.nn.functional.cross_entropy(naive.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                           reduction="none").reshape(B, T)
    assert _rel(token_loss, ce) < TOL


def _head_segments(layer, x, U, labels, docs, cuts, pending: bool):
    outs, state = [], None
    bounds = [0] + cuts + [x.shape[1]]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = i == len(bounds) - 2
        pend = labels[:, a - 1] if state is not None and state.pending_x is not None else None
        _, logits, state, _ = layer.head(x[:, a:b], U, labels[:, a:b], docs[:, a:b], state, pend,
                                         pending and not last, True, True)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("normalize, decay, unembed_normalize", [("none", "none", "head"), ("mean", "learned", "head"),
                                                                 ("mean", "learned", "none")])
def test_fast_unembedding_in_segments_equals_whole_pass(pending, normalize, decay, unembed_normalize):
    """The sums of c and U (and their counts) carried across segments, pending positions folded in:
    logits, the final state and every gradient equal to one pass."""
    B, T = 2, 14
    layer = make_layer(3, T, normalize=normalize, decay=decay, fast_set=("head", "out_bias", "unembedding"),
                       unembed_normalize=unembed_normalize)
    x, U, labels, docs = make_inputs(B, T)
    labels[:, :] = torch.randint(0, V, (B, T))
    labels[1, 2] = labels[1, 4] = IGNORE_INDEX
    _, whole, whole_state, _ = layer.head(x, U, labels, docs, return_state=True, return_logits=True)
    seg, seg_state = _head_segments(layer, x, U, labels, docs, [3, 5, 9], pending)
    assert _rel(seg, whole) < TOL
    for name in ("out_bias", "unembedding"):
        assert _rel(seg_state.unembedding_sums[name], whole_state.unembedding_sums[name]) < TOL, name
    if normalize != "none":
        counts = 8 if unembed_normalize == "head" else 6
        assert whole_state.count.shape == (B, counts) and _rel(seg_state.count, whole_state.count) < TOL
    assert_same_gradients(layer, x, U, seg, whole, TOL)


def test_state_with_unembedding_sums_round_trips():
    layer = make_layer(4, 8, normalize="mean", decay="learned", fast_set=("head", "out_bias", "unembedding"),
                       unembed_normalize="head")
    x, U, labels, docs = make_inputs(2, 8)
    _, _, state, _ = layer.head(x, U, labels, docs, last_label_pending=True, return_state=True)
    again = FWLState.from_tensors(state.detach().tensors())
    for name in ("out_bias", "unembedding"):
        assert torch.equal(again.unembedding_sums[name], state.unembedding_sums[name])
    assert again.unembedding_sums["unembedding"].shape == (2, V, S)
    plain = make_layer(4, 8, normalize="mean", decay="learned")
    _, plain_state = plain(x, U, labels, docs, return_state=True)
    with pytest.raises(ValueError, match="no sums of"):
        layer.head(x, U, labels, docs, plain_state)


@pytest.mark.parametrize("normalize, decay", [("none", "learned"), ("sqrt", "learned")])
def test_model_with_fast_unembedding_matches_naive(normalize, decay):
    """The whole model, tied and untied: logits, loss and every parameter's gradient."""
    for tie in ("true", "false"):
        model_matches_naive(f"model.fwl.normalize={normalize}", f"model.fwl.decay={decay}", "model.fwl.decay_init=0.7",
                            "model.fwl.fast_set=[head,out_bias,unembedding]", "model.fwl.vocab_chunk=16",
                            f"model.tie_embeddings={tie}", "model.fwl.width=16")


def test_fast_unembedding_refuses_layouts_and_options():
    fast = "model.fwl.fast_set=[head,out_bias]"
    decay = "model.fwl.decay=learned"
    load_config(None, [fast, decay])  # the default unembed_normalize=none with its decay
    for override in ("parallel.tp=2", "parallel.cp=2", "parallel.pp=2", "parallel.zero_stage=3"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [fast, decay, override, "model.n_layers=2"])
    with pytest.raises(ConfigError, match="model.fwl.step_size"):
        load_config(None, [fast, decay, "model.fwl.step_size=token"])
    with pytest.raises(ConfigError, match="model.fwl.fast_set"):
        load_config(None, ["model.fwl.fast_set=[out_bias]"])
    with pytest.raises(ConfigError, match="model.fwl.decay"):  # an unnormalised cache needs its decay
        load_config(None, [fast, "model.fwl.decay=none"])
    with pytest.raises(ConfigError, match="model.fwl.update"):  # not built together yet
        load_config(None, [fast, decay, "model.fwl.update=sequential"])
    with pytest.raises(ConfigError, match="model.fwl.update"):
        load_config(None, ["model.fwl.step_size=token", "model.fwl.update=sequential"])


def test_generation_stream_with_fast_unembedding_equals_whole_pass():
    """Token by token through StreamingSession (generation): the sums of c and U stay pending and carried,
    the logits equal one pass over the stream; reordering rows (beam search) reorders the sums too."""
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.seq_len=8",
                             "model.vocab_size=50", "model.vocab_multiple=64", "model.fwl.step_size_init=0.5",
                             "model.fwl.normalize=mean", "model.fwl.decay=learned",
                             "model.fwl.fast_set=[head,out_bias,unembedding]"])
    model = build_model(cfg.model).double()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        whole = model(ids, ids.roll(-1, 1), return_logits=True).logits
        session = StreamingSession(model, window=8)
        steps = torch.cat([session.feed(ids[:, i:i + 1]) for i in range(8)], dim=1)
    assert _rel(steps[:, :-1], whole[:, :-1]) < TOL  # the last label is unknown to the stream
    sums = session.state.unembedding_sums
    swapped = {k: v.flip(0) for k, v in sums.items()}
    session.select_rows(torch.tensor([1, 0]))
    for name in sums:
        assert torch.equal(session.state.unembedding_sums[name], swapped[name])
