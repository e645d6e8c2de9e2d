"""Shared pieces of the float64 FWL tests (test_fwl.py, test_fwl_long.py): a small layer whose every
fast term matters numerically, inputs with document boundaries and ignored labels, the outer loss whose
gradients are compared, and segment-by-segment runs with a carried state."""
from __future__ import annotations

import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import FWLConfig, load_config
from fwl_scale.model import build_model
from fwl_scale.model.fwl import FAST_TENSORS, FastWeightLayer
from fwl_scale.model.fwl.naive import naive_fwl_logits

D, S, V, VPAD = 6, 6, 13, 16


def make_layer(chunk: int, T: int, residual: bool = False, normalize: str = "none",
               decay: str = "none", step_size: str = "tensor", fast_set: tuple[str, ...] = ("head",),
               unembed_normalize: str = "head") -> FastWeightLayer:
    cfg = FWLConfig(width=S, grad_scale=1.0 / T, init_std=0.5, chunk_size=chunk, vocab_chunk=5, form="chunked",
                    residual=residual, normalize=normalize, decay=decay, decay_init=0.8, step_size=step_size,
                    fast_set=list(fast_set), unembed_normalize=unembed_normalize)
    layer = FastWeightLayer(cfg, D, V, VPAD).double()
    with torch.no_grad():
        # Large, distinct step sizes so that every fast term matters numerically.
        layer.step_sizes.copy_(torch.tensor([0.9, 0.7, 0.8, 0.6, 0.5, 0.4]))
        for p in (layer.b1, layer.b2, layer.beta, layer.out_bias):
            p.normal_(std=0.3)
        layer.alpha.add_(torch.randn_like(layer.alpha) * 0.3)
        if layer.decay_logits is not None:
            # λ between about 0.6 and 0.9, distinct per fast tensor: the decay changes every sum.
            layer.decay_logits.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8, 1.2]))
        if layer.unembed_log_step_sizes is not None:
            layer.unembed_log_step_sizes.copy_(torch.tensor([0.3, -0.5]))  # η_c ≈ 1.35, η_U ≈ 0.61
        if layer.unembed_decay_logits is not None:
            layer.unembed_decay_logits.copy_(torch.tensor([0.7, 1.4]))
        if layer.step_gate_weight is not None:
            # Per-token factors 2σ(G x + g) far from 1 and different per token and fast tensor.
            layer.step_gate_weight.normal_(std=0.7)
            layer.step_gate_bias.normal_(std=0.5)
    return layer


def make_inputs(B: int, T: int):
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    U = torch.nn.Parameter(torch.randn(VPAD, S, dtype=torch.float64))
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = IGNORE_INDEX
    labels[1, T - 1] = IGNORE_INDEX
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 5:] = 1  # a document starts inside the sequence
    docs[0, T - 3:] = 2  # and another one near the end
    return x, U, labels, docs


def fast_logits(layer, x, U, labels, docs):
    if layer.unembed_members:  # the logits of a fast unembedding are the FWL's own
        return layer.head(x, U, labels, docs, return_logits=True)[1]
    u, _ = layer(x, U, labels, docs)
    return u @ U[:V].t() + layer.out_bias[:V]


def param_names(layer) -> list[str]:
    """What grads_of differentiates: the input, the unembedding, every FWL parameter."""
    names = ["x", "U"] + list(FAST_TENSORS) + ["out_bias", "step_sizes"]
    names += ["step_gate_weight", "step_gate_bias"] if layer.step_gate_weight is not None else []
    names += ["unembed_log_step_sizes"] if layer.unembed_log_step_sizes is not None else []
    names += ["unembed_decay_logits"] if layer.unembed_decay_logits is not None else []
    return names + (["decay_logits"] if layer.decay_logits is not None else [])


def grads_of(fn, layer, x, U):
    """Gradients of a fixed random outer loss of the logits w.r.t. every input that can carry one."""
    torch.manual_seed(1)
    logits = fn()
    weights = torch.randn_like(logits)
    loss = (logits * weights).sum() + (logits ** 2).sum() * 0.01
    params = [x, U] + [getattr(layer, n) for n in param_names(layer)[2:]]
    return logits, torch.autograd.grad(loss, params)


def run_segments(layer, x, U, labels, docs, cuts, pending: bool):
    """Processes [0:c1], [c1:c2], ... carrying the state; with `pending`, each segment's last label is
    withheld and supplied by the next segment (as in generation)."""
    outs, state = [], None
    bounds = [0] + cuts + [x.shape[1]]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = i == len(bounds) - 2
        kwargs = {}
        if state is not None and state.pending_x is not None:
            kwargs["pending_labels_b"] = labels[:, a - 1]
        u, state = layer(x[:, a:b], U, labels[:, a:b], docs[:, a:b], state=state,
                         last_label_pending=pending and not last, return_state=True, **kwargs)
        outs.append(u)
    return torch.cat(outs, dim=1), state


def assert_same_gradients(layer, x, U, out, ref, tol: float) -> None:
    """The gradients of one random weighting of `out` and of `ref` (two computations of the same logits,
    e.g. segments and the whole pass) w.r.t. every input that can carry one are equal within `tol`."""
    w = torch.randn_like(ref)
    params = [x, U] + [getattr(layer, n) for n in param_names(layer)[2:]]
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    g_out = torch.autograd.grad((out * w).sum(), params)
    for name, a, b in zip(param_names(layer), g_out, g_ref):
        assert rel_err(a, b) < tol, name


def rel_err(a, b) -> float:
    """Largest difference relative to the reference's scale (at least 1): the float64 tests' measure."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def seeded():
    """An autouse fixture body: every test starts from the same global seed."""
    torch.manual_seed(0)
    yield


def packed_batch_with_ignored_label() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, doc ids, labels) [2, 12] over a vocabulary of 50: row 1 holds a second document from position 7,
    and label (0, 4) is ignored, the cases a model-against-reference check has to cover."""
    ids = torch.randint(0, 50, (2, 12))
    docs = torch.zeros(2, 12, dtype=torch.long)
    docs[1, 7:] = 3
    labels = ids.roll(-1, 1)
    labels[0, 4] = IGNORE_INDEX
    return ids, docs, labels


def model_matches_naive(*overrides: str, tol: float = 1e-10) -> list[str]:
    """The whole model at a tiny shape (V = 50, T = 12, a document starting at 7 in row 1, an ignored
    label) against naive_fwl_logits: logits, the loss, and every parameter's gradient (body, FWL, the
    unembedding) through the fast path and through the reference. Returns the parameter names."""
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.seq_len=12",
                             "model.vocab_size=50", "model.vocab_multiple=64", "model.fwl.chunk_size=4",
                             "model.fwl.vocab_chunk=7", "model.fwl.step_size_init=0.5", *overrides])
    model = build_model(cfg.model).double()
    ids, docs, labels = packed_batch_with_ignored_label()
    out = model(ids, labels, docs, return_logits=True)
    ref = naive_fwl_logits(model.fwl, model.body(ids, docs), model.unembedding, labels, docs)
    assert rel_err(out.logits, ref) < tol, overrides
    ce = torch.nn.functional.cross_entropy(ref.reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert abs(out.loss.item() - ce.item()) < tol, overrides
    names = [n for n, _ in model.named_parameters()]
    g_fast = torch.autograd.grad(out.loss, list(model.parameters()))
    g_ref = torch.autograd.grad(ce, list(model.parameters()))
    for name, a, b in zip(names, g_fast, g_ref):
        assert rel_err(a, b) < tol, (overrides, name)
    return names
