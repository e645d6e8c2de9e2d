"""The cache methods of `fwl eval --out` (fwl_scale/eval/cache.py): each cache's probability of the label
against a plain Python loop over the whole document on a tiny random model in float64 (p_model and the
hidden states read by another route: the logits and a hook on the unembedding's input), weight 0 equal to
the plain method bit for bit, the cache carried across windows, tuning on the tuning documents only, and
the command end to end on tiny checkpoints with `--compare`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fwl_scale.cli import main as fwl_main
from fwl_scale.eval import docrun
from fwl_scale.eval.cache import CacheEvaluator, CacheSettings, cache_flops_per_token, tune_cache
from fwl_scale.eval.compare import compare_runs
from fwl_scale.eval.docrun import DocEvalOptions, run_document_eval
from fwl_scale.eval.docs import checkpoint_tokenizer, validation_documents
from fwl_scale.eval.methods import forward_flops_per_token
from fwl_scale.eval.perplexity import document_token_losses
from fwl_scale.eval.run import load_for_eval
from fwl_scale.train.loop import Trainer
from tests.corpus import sample_records
from tests.test_eval_dynamic import T, tiny_model
from tests.train_support import tiny_config

V = 64


def doc_of(n: int, seed: int, alphabet: int = 12) -> torch.Tensor:
    """A small alphabet: many repeats, so the caches matter."""
    return torch.randint(0, alphabet, (n,), generator=torch.Generator().manual_seed(seed))


def model_by_another_route(model, doc: torch.Tensor, carry: bool) -> tuple[list[float], list[torch.Tensor]]:
    """p_model(y_i) from the logits' softmax and h_i from a hook on the unembedding's input, window by window
    (the FWL's state carried when `carry`)."""
    seen: list[torch.Tensor] = []
    hook = model.vocab_loss.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    p_model: list[float] = []
    state = None
    try:
        with torch.no_grad():
            for a in range(0, doc.numel() - 1, T):
                ids, lab = doc[a:a + T][None], doc[a + 1:a + T + 1][None]
                ids = ids[:, :lab.shape[1]]
                kw = {"fwl_state": state, "return_state": True} if carry else {}
                out = model(ids, lab, torch.zeros_like(ids), return_logits=True, **kw)
                state = out.fwl_state
                probs = torch.softmax(out.logits[0].double(), -1)
                p_model += [float(probs[t, lab[0, t]]) for t in range(lab.shape[1])]
    finally:
        hook.remove()
    return p_model, [h for window in seen for h in window[0].double()]


def unigram_loop(labels: list[int], p_model: list[float], w: float, decay: float) -> list[float]:
    counts = [0.0] * V
    losses = []
    for y, pm in zip(labels, p_model):
        total = sum(counts)
        p = (1 - w) * pm + w * counts[y] / total if total > 0 else pm
        losses.append(-math.log(p))
        counts = [decay * c for c in counts]
        counts[y] += 1.0
    return losses


def continuous_loop(labels: list[int], p_model: list[float], hidden: list[torch.Tensor], w: float, theta: float,
                    length: int) -> list[float]:
    losses = []
    for i, (y, pm) in enumerate(zip(labels, p_model)):
        js = range(max(0, i - length), i)
        if not js:
            losses.append(-math.log(pm))
            continue
        scores = {j: theta * sum(float(a) * float(b) for a, b in zip(hidden[j].tolist(), hidden[i].tolist()))
                  for j in js}
        top = max(scores.values())
        z = sum(math.exp(s - top) for s in scores.values())
        p_cache = sum(math.exp(s - top) for j, s in scores.items() if labels[j] == y) / z
        losses.append(-math.log((1 - w) * pm + w * p_cache))
    return losses


CASES = [(False, "plain"), (True, "fwl_carried")]


@pytest.mark.parametrize("fwl,_on", CASES)
def test_unigram_cache_equals_a_loop_over_the_whole_document(fwl, _on):
    model = tiny_model(fwl)
    doc = doc_of(3 * T + 1, 1)  # three windows: the cache is carried from one to the next
    p_model, _ = model_by_another_route(model, doc, carry=fwl)
    labels = doc[1:].tolist()
    for w, decay in ((0.3, 0.9), (0.1, 1.0), (0.9, 0.5)):
        ev = CacheEvaluator(model, CacheSettings("unigram_cache", weight=w, decay=decay), T, V, carry_state=fwl)
        got = ev.document(doc)
        ref = unigram_loop(labels, p_model, w, decay)
        assert got.dtype == torch.float64 and got.numel() == 3 * T
        assert got.tolist() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # A cache restarted in every window differs from the 2nd window on: the counts really were carried.
    per_window = sum((unigram_loop(labels[a:a + T], p_model[a:a + T], 0.3, 0.9) for a in range(0, 3 * T, T)), [])
    ev = CacheEvaluator(model, CacheSettings("unigram_cache", weight=0.3, decay=0.9), T, V, carry_state=fwl)
    got = ev.document(doc).tolist()
    assert got[:T] == pytest.approx(per_window[:T], rel=1e-10)
    assert max(abs(a - b) for a, b in zip(got[T:], per_window[T:])) > 1e-3


@pytest.mark.parametrize("fwl,_on", CASES)
@pytest.mark.parametrize("length", [5, 2048])
def test_continuous_cache_equals_a_loop_over_the_whole_document(fwl, _on, length):
    model = tiny_model(fwl)
    doc = doc_of(3 * T + 1, 2)
    p_model, hidden = model_by_another_route(model, doc, carry=fwl)
    width = model.cfg.fwl_width if fwl else model.cfg.d_model
    assert len(hidden) == 3 * T and hidden[0].shape == (width,)
    labels = doc[1:].tolist()
    for w, theta in ((0.2, 0.5), (0.5, 0.0), (0.9, 0.1)):
        ev = CacheEvaluator(model, CacheSettings("continuous_cache", weight=w, theta=theta, length=length), T, V,
                            carry_state=fwl)
        got = ev.document(doc)
        ref = continuous_loop(labels, p_model, hidden, w, theta, length)
        assert got.dtype == torch.float64 and got.numel() == 3 * T
        assert got.tolist() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # Restarted in every window it differs: the hidden states of earlier windows were kept.
    per_window = sum((continuous_loop(labels[a:a + T], p_model[a:a + T], hidden[a:a + T], 0.2, 0.5, length)
                      for a in range(0, 3 * T, T)), [])
    ev = CacheEvaluator(model, CacheSettings("continuous_cache", weight=0.2, theta=0.5, length=length), T, V,
                        carry_state=fwl)
    assert max(abs(a - b) for a, b in zip(ev.document(doc).tolist()[T:], per_window[T:])) > 1e-3


@pytest.mark.parametrize("fwl,_on", CASES)
def test_weight_zero_is_the_plain_method_exactly(fwl, _on):
    model = tiny_model(fwl)
    doc = doc_of(3 * T - 2, 3)  # a short last window
    plain = document_token_losses(model, doc, T, carry_state=fwl)
    for settings in (CacheSettings("unigram_cache", weight=0.0, decay=0.99),
                     CacheSettings("continuous_cache", weight=0.0, theta=1.0, length=4)):
        got = CacheEvaluator(model, settings, T, V, carry_state=fwl).document(doc)
        assert torch.equal(got, plain), settings
        assert torch.equal(CacheEvaluator(model, settings, T, V, fwl).document(doc, max_tokens=10), plain[:10])


def test_tuning_takes_the_best_grid_point_of_the_tuning_documents():
    model = tiny_model(True)
    docs = [doc_of(2 * T + 3, 4), doc_of(T + 1, 5)]
    ev = CacheEvaluator(model, CacheSettings("continuous_cache", length=6), T, V, carry_state=True)
    got = tune_cache(ev, [0.0, 0.2, 0.6], [0.1, 1.0], docs, max_tokens=12, reduce=lambda t: t)
    assert [(g["weight"], g["theta"]) for g in got.grid] == [(w, t) for w in (0.0, 0.2, 0.6) for t in (0.1, 1.0)]
    for g in got.grid:
        s = CacheSettings("continuous_cache", weight=g["weight"], theta=g["theta"], length=6)
        losses = torch.cat([CacheEvaluator(model, s, T, V, True).document(d, 12) for d in docs])
        assert g["tokens"] == losses.numel() == 12 + T  # the second has T predicted tokens
        assert g["loss"] == pytest.approx(float(losses.mean()), rel=1e-12)
    best = min(got.grid, key=lambda g: g["loss"])
    assert (got.settings.weight, got.settings.theta, got.settings.length) == (best["weight"], best["theta"], 6)
    with pytest.raises(ValueError, match="weight w must be in"):
        tune_cache(ev, [1.5], [0.1], docs)
    with pytest.raises(ValueError, match="decay"):
        CacheSettings("unigram_cache", decay=0.0)


def test_flops_of_the_caches():
    s = CacheSettings("continuous_cache", length=100)
    assert cache_flops_per_token(s, 32) == 2 * 100 * 32 + 4 * 100
    assert 0 < cache_flops_per_token(CacheSettings("unigram_cache"), 32) < 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny FWL and a tiny baseline checkpoint (2 steps each, as tests/test_eval_docs.py makes them) and a
    document file."""
    root = tmp_path_factory.mktemp("evalcache")
    out = {}
    for name, extra in (("fwl", ()), ("base", ("model.fwl.enabled=false",))):
        cfg = tiny_config(root / name, "train.steps=2", *extra)
        assert Trainer(cfg).run() == 0
        out[name] = (root / name, cfg)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": r["text"]}) + "\n"
                            for r in sample_records(2, "train", first=300, spread=500)))
    return out, str(docs)


def test_tuning_never_reads_the_scored_documents(runs, tmp_path, monkeypatch):
    """The validation documents scored: the first (the tuning document) is left out of them, and the caches'
    tuning reads the model's windows of it alone."""
    (run_dir, cfg), _ = runs[0]["fwl"], runs[1]
    read: list[torch.Tensor] = []
    real_tune = docrun.tune_cache

    def spy(evaluator, *args, **kwargs):
        real = evaluator.model_windows
        evaluator.model_windows = lambda doc, *a: (read.append(doc.clone()), real(doc, *a))[1]
        try:
            return real_tune(evaluator, *args, **kwargs)
        finally:
            del evaluator.model_windows

    monkeypatch.setattr(docrun, "tune_cache", spy)
    rep = run_document_eval(cfg, run_dir, DocEvalOptions(
        out=str(tmp_path / "r"), methods=["unigram_cache", "continuous_cache"], tune_docs=1, tune_tokens=40,
        max_tokens=40, cache_weights=[0.1], cache_decays=[0.9, 1.0], cache_thetas=[0.5], cache_length=16,
        progress=False), log=lambda s: None)
    valid = list(validation_documents(cfg, checkpoint_tokenizer(cfg)))
    assert len(valid) >= 2 and len(read) == 2  # the one tuning document, once per cache
    assert all(torch.equal(d, valid[0]) for d in read)
    assert rep["documents"] == len(valid) - 1  # scored: the others
    assert not any(torch.equal(valid[0], d) for d in valid[1:])
    assert {m["method"] for m in rep["methods"]} == {"unigram_cache", "continuous_cache"}
    assert rep["cache_tuning"]["unigram_cache"]["tune_documents"] == 1


def test_leave_out_tune_docs_scores_the_documents_a_tuned_evaluation_scores(runs, tmp_path):
    """Without a tuned method every validation document is scored; with leave_out_tune_docs the same ones as
    an evaluation with a cache (the same documents_id), so an FWL's methods alone pair with its baseline's."""
    (run_dir, cfg), _ = runs[0]["fwl"], runs[1]
    common = dict(tune_docs=1, tune_tokens=40, max_tokens=40, cache_weights=[0.1], cache_decays=[1.0],
                  progress=False)
    reps = {name: run_document_eval(cfg, run_dir, DocEvalOptions(out=str(tmp_path / name), methods=methods,
                                                                 leave_out_tune_docs=leave_out, **common),
                                    log=lambda s: None)
            for name, methods, leave_out in (("tuned", ["unigram_cache"], False), ("all", ["fwl_carried"], False),
                                             ("left_out", ["fwl_carried"], True))}
    valid = list(validation_documents(cfg, checkpoint_tokenizer(cfg)))
    assert reps["all"]["documents"] == len(valid) and reps["left_out"]["documents"] == len(valid) - 1
    assert reps["left_out"]["documents_id"] == reps["tuned"]["documents_id"] != reps["all"]["documents_id"]


def test_command_end_to_end_and_compare(runs, tmp_path, capsys):
    (runs_, docs) = runs
    grids = ["--cache-weight", "0,0.3", "--cache-decay", "0.9,1", "--cache-theta", "0.1,1", "--cache-length", "16",
             "--tune-tokens", "64", "--max-tokens", "96"]
    for name, first in (("base", "plain"), ("fwl", "fwl_carried")):
        run_dir, cfg = runs_[name]
        out = tmp_path / name
        rc = fwl_main(["eval", str(run_dir / "config.yaml"), str(run_dir), "--out", str(out), "--docs", docs,
                       "--methods", f"{first},unigram_cache,continuous_cache", *grids])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads((out / "results.json").read_text())
        by = {m["method"]: m for m in rep["methods"]}
        assert list(by) == [first, "unigram_cache", "continuous_cache"]
        model, _ = load_for_eval(cfg, run_dir, torch.device("cpu"))
        tok = checkpoint_tokenizer(cfg)
        texts = [json.loads(line)["text"] for line in open(docs)]
        documents = [torch.tensor(tok.encode(t) + [tok.eos_id]) for t in texts]
        fwd = forward_flops_per_token(cfg.model)
        width = cfg.model.fwl_width if cfg.model.fwl.enabled else cfg.model.d_model
        for method in ("unigram_cache", "continuous_cache"):
            chosen = rep["cache_tuning"][method]["chosen"]
            assert by[method]["cache"] == chosen and len(rep["cache_tuning"][method]["grid"]) == 4
            settings = CacheSettings(**chosen)
            direct = torch.cat([CacheEvaluator(model, settings, cfg.model.seq_len, cfg.model.vocab_size,
                                               cfg.model.fwl.enabled).document(d, 96) for d in documents])
            assert by[method]["tokens"] == direct.numel() == by[first]["tokens"]
            assert by[method]["loss"] == pytest.approx(float(direct.mean()), rel=1e-9)
            assert by[method]["flops_per_token"] == fwd + cache_flops_per_token(settings, width)
            assert by[method]["wall_s"] > 0
        assert by["continuous_cache"]["cache"]["length"] == 16 and "decay" not in by["continuous_cache"]["cache"]
        report = (out / "report.md").read_text()
        assert f"| unigram_cache | {by['unigram_cache']['loss']:.4f} |" in report
        assert f"unigram_cache: on {first}'s distribution, chosen weight w" in report
        assert "continuous_cache: on" in report and "L = 16 positions" in report
    c = compare_runs([tmp_path / "base", tmp_path / "fwl"], tmp_path / "cmp")
    assert [(r["run"], r["method"]) for r in c["rows"]] == [
        ("base", "plain"), ("base", "unigram_cache"), ("base", "continuous_cache"),
        ("fwl", "fwl_carried"), ("fwl", "unigram_cache"), ("fwl", "continuous_cache")]
    assert (tmp_path / "cmp" / "compare.md").read_text().count("| fwl | continuous_cache |") == 3
    # Bad grids are refused before anything is written.
    run_dir, _ = runs_["fwl"]
    for args, needle in ((["--cache-weight", "1.5"], "weight w must be in [0, 1]"),
                         (["--cache-theta", "a,b"], "--cache-theta 'a,b'"),
                         (["--cache-decay", "0"], "decay δ must be in (0, 1]")):
        out = tmp_path / "bad"
        rc = fwl_main(["eval", str(run_dir / "config.yaml"), str(run_dir), "--out", str(out), "--docs", docs,
                       "--methods", "unigram_cache,continuous_cache", *args])
        assert rc == 2 and needle in capsys.readouterr().err, args
        assert not out.exists()
