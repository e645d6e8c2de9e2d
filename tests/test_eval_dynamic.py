"""Dynamic evaluation (fwl_scale/eval/dynamic.py) against hand-written updates in float64: scoring before
updating, one SGD and one RMS step, parameter subsets, documents that never leak into each other."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fwl_scale.config import load_config
from fwl_scale.eval.perplexity import document_token_losses
from fwl_scale.eval.dynamic import (DynamicEvaluator, DynamicSettings, mean_squared_gradients,
                                    select_parameters, tune, windows)
from fwl_scale.model import build_model
from fwl_scale.model.streaming import StreamingSession
from tests.model_support import perturb

T = 8


def tiny_model(fwl: bool, tied: bool = True, extra: tuple[str, ...] = ()) -> torch.nn.Module:
    cfg = load_config(None, ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", f"model.seq_len={T}",
                             "model.vocab_size=64", "model.vocab_multiple=8", "model.fwl.chunk_size=4",
                             f"model.fwl.enabled={str(fwl).lower()}", f"model.tie_embeddings={str(tied).lower()}",
                             *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu").double()
    perturb(model)
    return model.eval()


def doc_of(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def plain_losses(model, doc, segment):
    out = []
    with torch.no_grad():
        for a in range(0, doc.numel() - 1, segment):
            ids, lab = doc[a:a + segment][None], doc[a + 1:a + segment + 1][None]
            ids = ids[:, :lab.shape[1]]
            out.append(model(ids, lab, torch.zeros_like(ids)).token_loss.flatten())
    return torch.cat(out)


@pytest.mark.parametrize("fwl", [False, True])
def test_one_sgd_step_equals_hand_written_update(fwl):
    model = tiny_model(fwl)
    doc = doc_of(2 * T + 1, 1)
    lr, decay = 0.3, 0.1
    ev = DynamicEvaluator(model, DynamicSettings("sgd", lr, decay, T, "all"))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    # By hand: the gradient of the first segment's mean loss at θ0, one step, then the second segment.
    ref = tiny_model(fwl)
    ids, lab = doc[:T][None], doc[1:T + 1][None]
    loss = ref(ids, lab, torch.zeros_like(ids)).loss
    # Every parameter but the FWL's update rule (step sizes, forgetting factors), which stays as trained.
    params = [p for n, p in ref.named_parameters() if not n.endswith(("step_sizes", "decay_logits"))]
    assert len(params) == len(list(ref.parameters())) - (1 if fwl else 0)  # the step sizes (model.fwl.decay=none)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.copy_(p - lr * g)  # θ0 − θ is zero at the first step: the decay term adds nothing yet
    with torch.no_grad():
        seg2 = ref(doc[T:2 * T][None], doc[T + 1:][None], torch.zeros(1, T, dtype=torch.long)).token_loss.flatten()

    got = ev.document(doc)
    assert got.dtype == torch.float64 and got.numel() == 2 * T
    # The first segment is scored with θ0 (score first, then update): exactly the plain model's losses.
    torch.testing.assert_close(got[:T], plain_losses(tiny_model(fwl), doc, T)[:T], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[T:], seg2, rtol=0, atol=1e-12)
    for n, p in model.named_parameters():  # the model is θ0 again afterwards
        assert torch.equal(p, theta0[n]), n


def test_rms_step_and_decay_by_hand():
    model = tiny_model(False)
    doc = doc_of(3 * T + 1, 2)
    segs = list(windows(doc_of(4 * T + 1, 3), T))[:3]
    ms = mean_squared_gradients(model, "head", segs)
    names = [n for n, _ in select_parameters(model, "head")]
    assert set(ms) == set(names)
    sq = {n: torch.zeros_like(p) for n, p in select_parameters(model, "head")}
    for ids, lab in segs:  # MS by hand: the mean over segments of the squared gradient of the mean loss
        grads = torch.autograd.grad(model(ids, lab, torch.zeros_like(ids)).loss, [p for _, p in select_parameters(model, "head")])
        for n, g in zip(names, grads):
            sq[n] += g ** 2 / 3
    for n in names:
        torch.testing.assert_close(ms[n], sq[n], rtol=1e-12, atol=0)
    s = DynamicSettings("rms", 0.01, 0.5, T, "head", eps=1e-3)
    ev = DynamicEvaluator(model, s, ms)

    ref = tiny_model(False)
    params = dict(ref.named_parameters())
    theta0 = {n: params[n].detach().clone() for n in names}
    rms = {n: ms[n].sqrt() for n in names}
    mean_rms = sum(float(r.sum()) for r in rms.values()) / sum(r.numel() for r in rms.values())
    losses = []
    for a in (0, T, 2 * T):
        ids, lab = doc[a:a + T][None], doc[a + 1:a + T + 1][None]
        out = ref(ids, lab, torch.zeros_like(ids))
        losses.append(out.token_loss.detach().flatten())
        grads = torch.autograd.grad(out.loss, [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                p = params[n]
                rate = torch.clamp(0.5 * rms[n] / mean_rms, max=1.0)
                p.copy_(p - 0.01 * g / (rms[n] + 1e-3 * rms[n].mean()) + rate * (theta0[n] - p))
    got = ev.document(doc)
    torch.testing.assert_close(got, torch.cat(losses), rtol=0, atol=1e-12)


def test_subsets_update_only_their_parameters():
    model = tiny_model(True, tied=False)
    head = {n for n, _ in select_parameters(model, "head")}
    last = {n for n, _ in select_parameters(model, "last")}
    every = {n for n, _ in model.named_parameters()}
    assert head and all(n.startswith(("norm_f.", "fwl.", "lm_head.")) for n in head)
    assert head < last < every and all(n.startswith("blocks.1.") for n in last - head)
    assert not any(n.startswith("embed.") for n in head)  # untied: the input embedding is not the head
    tied = tiny_model(True, tied=True)
    assert "embed.weight" in {n for n, _ in select_parameters(tied, "head")}

    # Updating only the head: a step taken by hand on the head alone gives the same second segment.
    doc = doc_of(2 * T + 1, 4)
    got = DynamicEvaluator(model, DynamicSettings("sgd", 0.5, 0.0, T, "head")).document(doc)
    ref = tiny_model(True, tied=False)
    named = [(n, p) for n, p in ref.named_parameters() if n in head]
    out = ref(doc[:T][None], doc[1:T + 1][None], torch.zeros(1, T, dtype=torch.long))
    grads = torch.autograd.grad(out.loss, [p for _, p in named])
    with torch.no_grad():
        for (_, p), g in zip(named, grads):
            p.sub_(0.5 * g)
        seg2 = ref(doc[T:2 * T][None], doc[T + 1:][None], torch.zeros(1, T, dtype=torch.long)).token_loss.flatten()
    torch.testing.assert_close(got[T:], seg2, rtol=0, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_documents_never_leak_into_each_other():
    model = tiny_model(True)
    a, b = doc_of(3 * T + 1, 5), doc_of(2 * T + 5, 6)
    s = DynamicSettings("sgd", 1.0, 0.0, T, "all")
    alone = DynamicEvaluator(model, s).document(b)
    ev = DynamicEvaluator(model, s)
    after_a = [ev.document(a), ev.document(b)][1]
    assert torch.equal(alone, after_a)
    # ...while inside a document the updates do change later segments (lr 1 is far from a no-op).
    assert not torch.allclose(alone[T:], plain_losses(model, b, T)[T:])


def test_tune_picks_the_best_grid_point():
    model = tiny_model(False)
    docs = [doc_of(4 * T + 1, 7), doc_of(3 * T + 1, 8)]
    res = tune(model, DynamicSettings("sgd", segment=T), [0.0, 0.5, 50.0], [0.0], docs, None)
    losses = {g["lr"]: g["loss"] for g in res.grid}
    assert res.settings.lr == min(losses, key=losses.get)
    assert res.grid[0]["tokens"] == 7 * T
    # lr 0 is the plain model: its tuning loss is the plain token-weighted loss.
    plain = torch.cat([plain_losses(model, d, T) for d in docs])
    assert losses[0.0] == pytest.approx(float(plain.mean()), abs=1e-12)


RECIPE = ("model.fwl.residual=true", "model.fwl.normalize=mean", "model.fwl.decay=learned")


@pytest.mark.parametrize("fwl,extra", [(False, ()), (True, ()), (True, RECIPE)])
def test_short_segments_without_updates_are_the_windowed_evaluation(fwl, extra):
    # Segments of 3 inside windows of T = 8: the key/value cache and the FWL state carried inside the
    # window give exactly the whole window's scores (the state restarts with every window, as in fwl_reset).
    model = tiny_model(fwl, extra=extra)
    doc = doc_of(2 * T + 6, 9)
    got = DynamicEvaluator(model, DynamicSettings("sgd", 0.0, 0.0, 3, "all", window=T)).document(doc)
    torch.testing.assert_close(got, document_token_losses(model, doc, T), rtol=0, atol=1e-12)


def streamed_reference(model, doc, segment, window, lr, decay):
    """Dynamic evaluation with segments inside windows, by hand: for each segment a fresh StreamingSession
    replays the window's earlier segments, each with the weights it was scored with (no gradient), then
    scores this one with the current weights (full logits, F.cross_entropy), and one SGD step is taken."""
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    losses = []
    for w in range(0, doc.numel() - 1, window):
        ids_w, lab_w = doc[w:w + window + 1][:-1], doc[w + 1:w + window + 1]
        ids_w = ids_w[:lab_w.numel()]
        seen = []  # (weights, segment ids) of the window so far
        for a in range(0, ids_w.numel(), segment):
            session = StreamingSession(model, window)
            now = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for weights, ids in seen:
                    model.load_state_dict(weights, strict=False)
                    session.feed(ids)
                model.load_state_dict(now, strict=False)
            ids, lab = ids_w[a:a + segment][None], lab_w[a:a + segment]
            token = F.cross_entropy(session.feed(ids)[0].double(), lab, reduction="none")
            losses.append(token.detach())
            grads = torch.autograd.grad(token.mean(), list(params.values()))
            with torch.no_grad():
                for (n, p), g in zip(params.items(), grads):
                    p.copy_(p - lr * g + decay * (theta0[n] - p))
            seen.append((now, ids))
    return torch.cat(losses)


@pytest.mark.parametrize("tied", [True, False])
def test_short_segments_sgd_equal_a_streamed_reference(tied):
    model = tiny_model(False, tied=tied)
    doc = doc_of(2 * T + 4, 10)  # two windows, the second one short; segments of 3: 3, 3, 2 per window
    got = DynamicEvaluator(model, DynamicSettings("sgd", 0.5, 0.1, 3, "all", window=T)).document(doc)
    ref = streamed_reference(tiny_model(False, tied=tied), doc, 3, T, 0.5, 0.1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # The updates matter: the scores differ from the model without them after the first segment.
    assert not torch.allclose(got[3:], document_token_losses(model, doc, T)[3:], atol=1e-3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"segment \(9\) must be 1 to the body's window \(8\)"):
        DynamicSettings(segment=9, window=8)
    with pytest.raises(ValueError, match="variant 'adam'"):
        DynamicSettings("adam")
    with pytest.raises(ValueError, match="parameters 'middle'"):
        DynamicSettings(params="middle")
    with pytest.raises(ValueError, match="needs the mean squared"):
        DynamicEvaluator(tiny_model(False), DynamicSettings("rms", segment=T))
