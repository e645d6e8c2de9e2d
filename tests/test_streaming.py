"""Streaming a stream longer than the body's window, piece by piece, equals the whole pass (float64).

The whole pass: the body on each aligned window of W tokens on its own (positions restarting at each
window — what training on consecutive segments of seq_len sees), their outputs concatenated, and the FWL
over the entire stream in one call. Streaming (StreamingSession): pieces of any size — one token at a
time as in generation, or irregular pieces that cross window boundaries — with the body recomputing its
window from the window's earlier tokens (`context_ids`), the FWL state carried and the last fed token's
gradient pending until the next piece brings its label. Compared: every logit, and the gradient of an
outer loss on all logits w.r.t. every parameter (so the carried state and the pending positions are
differentiated through, not detached).

Tolerance 1e-10 relative to max(1, |reference|): float64 round-off. A pending position dropped, a window
misaligned or a detached state is off by 1e-3 or more (the last test shows the detached case).
"""
from __future__ import annotations

import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import load_config
from fwl_scale.model import StreamingSession, build_model
from fwl_scale.model.fwl import FWLState

TOL = 1e-10
V, W = 50, 8  # vocabulary, body window (= seq_len)
B, N = 2, 29  # rows, stream length: three full windows and a partial one


def make_model(fwl: bool = True, chunk: int = 3):
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", f"model.seq_len={W}",
                             f"model.vocab_size={V}", "model.vocab_multiple=64",
                             f"model.fwl.enabled={str(fwl).lower()}", f"model.fwl.chunk_size={chunk}",
                             "model.fwl.vocab_chunk=7", "model.fwl.grad_scale=0.3"])
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("step_sizes"):
                p.copy_(torch.tensor([0.9, 0.7, 0.8, 0.6, 0.5, 0.4], dtype=p.dtype))
            else:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.ndim == 1 else 0.05))
    return model


def make_stream():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, N), generator=g)
    docs = torch.zeros(B, N, dtype=torch.long)
    docs[0, 13:] = 1  # a document starting inside a window
    docs[1, 16:] = 1  # ... and exactly at a window boundary
    return ids, docs


def whole_pass(model, ids, docs):
    """Logits of the whole stream: the body per aligned window, the FWL over everything at once."""
    h = torch.cat([model.body(ids[:, a:a + W], docs[:, a:a + W]) for a in range(0, N, W)], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(docs[:, 1:] == docs[:, :-1], ids[:, 1:], IGNORE_INDEX)
    bias = None
    if model.fwl is not None:
        h, _ = model.fwl(h, model.unembedding, labels, docs)
        bias = model.fwl.out_bias
    logits = h @ model.unembedding[:V].t()
    return logits + bias[:V] if bias is not None else logits


def streamed(model, ids, docs, pieces: list[int]):
    session = StreamingSession(model, W)
    outs, a = [], 0
    for n in pieces:
        outs.append(session.feed(ids[:, a:a + n], docs[:, a:a + n]))
        a += n
    assert a == N and session.position == N
    return torch.cat(outs, dim=1), session


def grads(model, logits):
    w = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(9))
    params = [p for p in model.parameters()]
    return torch.autograd.grad((logits * w).sum(), params, allow_unused=True)


def worst(a, b) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


PIECES = {
    "one token at a time": [1] * N,
    "irregular, across windows": [3, 5, 1, 7, 2, 6, 4, 1],
    "whole windows": [W, W, W, N - 3 * W],
}


@pytest.mark.parametrize("pieces", list(PIECES), ids=list(PIECES))
@pytest.mark.parametrize("fwl", [True, False], ids=["fwl", "baseline"])
def test_streaming_equals_whole_pass(pieces, fwl):
    model = make_model(fwl)
    ids, docs = make_stream()
    ref = whole_pass(model, ids, docs)
    got, session = streamed(model, ids, docs, PIECES[pieces])
    assert got.shape == (B, N, V)
    assert worst(got, ref) < TOL
    for name, a, b in zip([n for n, _ in model.named_parameters()], grads(model, got), grads(model, ref)):
        assert (a is None) == (b is None), name
        if a is not None:
            assert worst(a, b) < TOL, f"gradient of {name}"
    if fwl:
        # The stream's last token is pending in the state, to be folded in with the next token.
        assert session.state.pending_x is not None and session.state.pending_x.shape == (B, 16)
        # The fast weights matter past the first window: without the carried state the logits differ.
        fresh = [StreamingSession(model, W).feed(ids[:, a:a + W], docs[:, a:a + W]) for a in range(0, N, W)]
        assert (torch.cat(fresh, dim=1) - ref)[:, W:].abs().max() > 1e-3


def test_detached_state_is_caught(monkeypatch):
    """If the session cut the gradient at every piece, the values would agree and the gradients not."""
    model = make_model()
    ids, docs = make_stream()
    ref = whole_pass(model, ids, docs)
    original = StreamingSession._run

    def detaching(self, *args):
        if self.state is not None:
            self.state = FWLState.from_tensors({k: v.detach() for k, v in self.state.tensors().items()})
        return original(self, *args)

    monkeypatch.setattr(StreamingSession, "_run", detaching)
    got, _ = streamed(model, ids, docs, PIECES["irregular, across windows"])
    assert worst(got, ref) < TOL
    errs = [worst(a, b) for a, b in zip(grads(model, got), grads(model, ref)) if a is not None]
    assert max(errs) > 1e-4


def test_streaming_refuses_bad_window():
    with pytest.raises(ValueError, match="window"):
        StreamingSession(make_model(), 0)


def test_stream_position_evaluation_is_the_whole_pass():
    """evaluate_stream_positions (windows of W, state carried, labels known) averages exactly the
    per-token losses of the whole pass, bucket by bucket; without the carried state, of windows alone."""
    from fwl_scale.eval.streaming import evaluate_stream_positions, format_stream_positions

    model = make_model()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, V, (n,), generator=g) for n in (3 * W + 1, 4 * W + 3, 2 * W)]  # the last: too short
    n_windows, buckets = 3, 2
    carried = evaluate_stream_positions(model, docs, W, torch.device("cpu"), n_windows, buckets)
    alone = evaluate_stream_positions(model, docs, W, torch.device("cpu"), n_windows, buckets, carry_state=False)
    assert carried.documents == 2 and carried.edges[:3] == [(0, 4), (4, 8), (8, 12)]
    per_token = []
    for doc in docs[:2]:
        ids, labels = doc[None, :n_windows * W], doc[None, 1:n_windows * W + 1]
        with torch.no_grad():
            logits = whole_pass_known_labels(model, ids, labels)
            per_token.append(torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none"))
            fresh = torch.cat([model(ids[:, a:a + W], labels[:, a:a + W]).token_loss[0]
                               for a in range(0, n_windows * W, W)])
            per_token.append(fresh)
    whole = (per_token[0] + per_token[2]) / 2
    windows_alone = (per_token[1] + per_token[3]) / 2
    for i, (a, b) in enumerate(carried.edges):
        assert abs(carried.loss[i] - whole[a:b].mean().item()) < TOL
        assert abs(alone.loss[i] - windows_alone[a:b].mean().item()) < TOL
    assert len(carried.update_w1) == n_windows and min(carried.update_w1) > 0 and not alone.update_w1
    assert "positions" in format_stream_positions([("carried", carried), ("alone", alone)])


def whole_pass_known_labels(model, ids, labels):
    h = torch.cat([model.body(ids[:, a:a + W], None) for a in range(0, ids.shape[1], W)], dim=1)
    u, _ = model.fwl(h, model.unembedding, labels, None)
    return u @ model.unembedding[:V].t() + model.fwl.out_bias[:V]
