"""`fwl eval CONFIG CKPT --out DIR [--docs FILE...]` and `fwl eval --compare`: documents of every format with the
checkpoint's tokenizer, the methods against direct computations, the breakdown arithmetic against a loop,
bad input leaving the run directory alone, and data-parallel ranks equal to one process."""
from __future__ import annotations

import gzip
import json
import lzma
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fwl_scale.cli import main as fwl_main
from fwl_scale.config import load_config
from fwl_scale.data import train_tokenizer
from fwl_scale.eval.breakdown import (Breakdown, frequency_edges, frequency_ranks, position_bucket,
                                      position_edges)
from fwl_scale.eval.compare import compare_runs
from fwl_scale.eval.docrun import DocEvalOptions, dynamic_warnings, run_document_eval
from fwl_scale.eval.docs import checkpoint_tokenizer
from fwl_scale.eval.perplexity import document_token_losses
from fwl_scale.eval.run import load_for_eval
from fwl_scale.train.loop import Trainer
from tests.corpus import sample_records
from tests.distributed import run_distributed
from tests.train_support import tiny_config


def test_breakdown_against_a_loop():
    T, V = 8, 64
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, 12, (45,), generator=g)  # a small alphabet: many repeats
    losses = torch.rand(44, generator=g, dtype=torch.float64)
    counts = np.random.default_rng(1).integers(0, 100, V)
    ranks = frequency_ranks(counts)
    assert sorted(ranks.tolist()) == list(range(V)) and counts[int(torch.argmin(ranks))] == counts.max()
    bd = Breakdown(T, V, ranks)
    bd.add(doc, losses)
    got = bd.as_dict()
    edges = position_edges(T)
    assert edges[:5] == [(0, 2), (2, 4), (4, 8), (8, 16), (16, 32)]
    for b in got["by_position"]:
        sel = [j for j in range(44) if b["start"] <= j < b["end"]]
        assert b["tokens"] == len(sel)
        if sel:
            assert b["loss"] == pytest.approx(float(losses[sel].mean()), abs=1e-12)
    assert [int(position_bucket(torch.tensor([p]), T)) for p in (0, 1, 2, 7, 8, 15, 16, 40)] == [0, 0, 1, 2, 3, 3, 4, 5]
    seen = [int(doc[j + 1]) in doc[:j + 1].tolist() for j in range(44)]
    for i, b in enumerate(got["by_repetition"]):
        sel = [j for j in range(44) if seen[j] == bool(i)]
        assert b["tokens"] == len(sel) and b["loss"] == pytest.approx(float(losses[sel].mean()), abs=1e-12)
    fe = frequency_edges(V)
    assert fe == [(0, 4), (4, 16), (16, 64)] and frequency_edges(50304) == [(0, 1000), (1000, 10000), (10000, 50304)]
    for (a, b_), b in zip(fe, got["by_frequency"]):
        sel = [j for j in range(44) if a <= int(ranks[doc[j + 1]]) < b_]
        assert b["tokens"] == len(sel)
        if sel:
            assert b["loss"] == pytest.approx(float(losses[sel].mean()), abs=1e-12)
    assert got["tokens"] == 44 and got["loss"] == pytest.approx(float(losses.mean()), abs=1e-12)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny FWL and a tiny baseline checkpoint (2 steps each) and documents in every format."""
    root = tmp_path_factory.mktemp("evaldocs")
    out = {}
    for name, extra in (("fwl", ()), ("base", ("model.fwl.enabled=false",))):
        cfg = tiny_config(root / name, "train.steps=2", *extra)
        assert Trainer(cfg).run() == 0
        out[name] = (root / name, cfg)
    # The built-in test corpus (a fresh clone's) holds out 4 documents: the fifth comes from train.
    recs = sample_records(4, "valid", first=300, spread=500) + sample_records(1, "train", first=300, spread=500)
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(recs[0]["text"])
    with gzip.open(docs / "b.jsonl.gz", "wt") as f:
        for r in recs[1:3]:
            f.write(json.dumps({"text": r["text"]}) + "\n")
    with lzma.open(docs / "c.jsonl.xz", "wt") as f:
        f.write(json.dumps({"text": recs[3]["text"]}) + "\n")
    files = [docs / "a.txt", docs / "b.jsonl.gz", docs / "c.jsonl.xz"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [recs[4]["text"]]}), docs / "d.parquet")
        files.append(docs / "d.parquet")
    except ImportError:
        pass
    return out, [str(f) for f in files]


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(d).rglob("*")) if p.is_file()}


FAST = dict(lrs=[0.0], decays=[0.0], tune_tokens=64, stat_segments=4, progress=False)


def test_documents_of_every_format_and_the_methods(runs, tmp_path, capsys):
    (run_dir, cfg), files = runs[0]["fwl"], runs[1]
    before, data_before = snapshot(run_dir), snapshot(cfg.data.root)
    opts = DocEvalOptions(out=str(tmp_path / "r"), docs=files, **FAST)
    rep = run_document_eval(cfg, run_dir, opts, log=lambda s: None)
    assert snapshot(run_dir) == before and snapshot(cfg.data.root) == data_before
    assert [m["method"] for m in rep["methods"]] == ["slow_head", "fwl_reset", "fwl_carried", "dynamic"]
    n_docs = 4 + (len(files) == 4)
    assert rep["documents"] == n_docs
    tok = checkpoint_tokenizer(cfg)
    model, _ = load_for_eval(cfg, run_dir, torch.device("cpu"))
    texts = [Path(files[0]).read_text()] + [json.loads(l)["text"] for l in gzip.open(files[1], "rt")]
    texts += [json.loads(l)["text"] for l in lzma.open(files[2], "rt")]
    if n_docs == 5:
        import pyarrow.parquet as pq

        texts += pq.read_table(files[3]).column("text").to_pylist()
    docs = [torch.tensor(tok.encode(t) + [tok.eos_id]) for t in texts]
    T = cfg.model.seq_len
    by = {m["method"]: m for m in rep["methods"]}
    for method, carry in (("fwl_reset", False), ("fwl_carried", True)):
        direct = torch.cat([document_token_losses(model, d, T, carry) for d in docs])
        assert by[method]["tokens"] == direct.numel() == sum(d.numel() - 1 for d in docs)
        assert by[method]["loss"] == pytest.approx(float(direct.mean()), abs=1e-9)
        assert sum(b["tokens"] for b in by[method]["by_position"]) == direct.numel()
        assert sum(b["tokens"] for b in by[method]["by_frequency"]) == direct.numel()
    assert by["fwl_reset"]["by_position"][0]["loss"] == pytest.approx(by["fwl_carried"]["by_position"][0]["loss"], abs=1e-9)
    assert abs(by["slow_head"]["loss"] - by["fwl_reset"]["loss"]) > 1e-4
    # Dynamic evaluation with lr 0 (the only grid point) is the model window by window, state reset.
    assert rep["dynamic_tuning"]["chosen"]["lr"] == 0.0
    assert by["dynamic"]["loss"] == pytest.approx(by["fwl_reset"]["loss"], abs=1e-12)
    assert all(m["wall_s"] > 0 and m["flops_per_token"] > 0 for m in rep["methods"])
    assert by["dynamic"]["flops_per_token"] > 3 * by["fwl_reset"]["flops_per_token"]
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["documents_id"] == rep["documents_id"] and (tmp_path / "r" / "report.md").is_file()
    # The cache beside the results: a second run reads the tokenized documents back, same results.
    cached = sorted((tmp_path / "r" / "cache").glob("docs-*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    capsys.readouterr()
    again = run_document_eval(cfg, run_dir, DocEvalOptions(out=str(tmp_path / "r"), docs=files, methods=["fwl_reset"],
                                                           **{**FAST, "progress": True}), log=lambda s: None)
    progress = capsys.readouterr().err.splitlines()
    assert progress[-1] == (f"fwl_reset: {n_docs}/{n_docs} documents, {by['fwl_reset']['tokens']:,} tokens, "
                            + progress[-1].split(" tokens, ")[1])
    assert cached[0].stat().st_mtime_ns == stamp
    assert again["methods"][0]["loss"] == by["fwl_reset"]["loss"] and again["documents_id"] == rep["documents_id"]


def test_bad_input_names_the_file_and_changes_nothing(runs, tmp_path, capsys):
    (run_dir, cfg), files = runs[0]["fwl"], runs[1]
    config = str(run_dir / "config.yaml")
    before = snapshot(run_dir)
    (tmp_path / "x.csv").write_text("text\nhello\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": "some words"}) + "\n" + json.dumps({"text": "  \n"}) + "\n")
    other_tok = tmp_path / "other.model"
    train_tokenizer([r["text"] for r in sample_records(3, "valid")], other_tok, 400)
    cases = [
        (["--docs", str(tmp_path / "x.csv")], "x.csv"),
        (["--docs", str(tmp_path / "e.jsonl")], "e.jsonl: 1 empty documents"),
        (["--docs", str(tmp_path / "missing.txt")], "missing.txt"),
        ([f"data.tokenizer={other_tok}", "--docs", files[0]], "other.model: tokenizer checksum"),
        (["model.d_model=64", "--docs", files[0]], f"checkpoint {run_dir}"),
        (["--docs", files[0], "model.d_model=64"], "put key=value overrides before --docs"),
        (["--docs", files[0], "--methods", "plain"], "plain not available"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        overrides = [a for a in args[:1] if "=" in a]  # overrides go before the options
        rc = fwl_main(["eval", config, str(run_dir), *overrides, "--out", str(out), *args[len(overrides):]])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (args, err)
        assert not (out / "results.json").exists()
        assert snapshot(run_dir) == before
    assert fwl_main(["eval", config, str(run_dir), "--docs", files[0]]) == 2
    assert "--out" in capsys.readouterr().err


def test_compare_baseline_and_fwl(runs, tmp_path):
    (fwl_dir, fwl_cfg), (base_dir, base_cfg) = runs[0]["fwl"], runs[0]["base"]
    files = runs[1][:2]
    for name, (d, cfg) in (("base", (base_dir, base_cfg)), ("fwl", (fwl_dir, fwl_cfg))):
        run_document_eval(cfg, d, DocEvalOptions(out=str(tmp_path / name), docs=files, **FAST), log=lambda s: None)
    c = compare_runs([tmp_path / "base", tmp_path / "fwl"], tmp_path / "cmp")
    assert [(r["run"], r["method"]) for r in c["rows"]] == [
        ("base", "plain"), ("base", "dynamic"), ("fwl", "slow_head"), ("fwl", "fwl_reset"), ("fwl", "fwl_carried"),
        ("fwl", "dynamic")]
    assert c["rows"][0]["gain"] == 0 and c["rows"][1]["wall_vs_dynamic"] == 1.0
    fwl_carried = c["rows"][4]
    assert fwl_carried["gain"] == pytest.approx(c["rows"][0]["loss"] - fwl_carried["loss"])
    for b, ref, g in zip(fwl_carried["by_repetition"], c["rows"][0]["by_repetition"], fwl_carried["gain_by_repetition"]):
        assert g == pytest.approx(ref["loss"] - b["loss"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("| fwl | fwl_carried |") == 3  # the main table and the two gain tables
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][3]["method"] == "fwl_reset"
    for png in ("loss_by_position.png", "gains_by_frequency.png", "gains_by_repetition.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:4] == b"\x89PNG"
    # Results on other documents are refused, naming the file.
    run_document_eval(base_cfg, base_dir, DocEvalOptions(out=str(tmp_path / "other"), docs=files[:1], **FAST),
                      log=lambda s: None)
    with pytest.raises(Exception, match="other documents"):
        compare_runs([tmp_path / "base", tmp_path / "other"], tmp_path / "cmp2")


def _ranks_eval(rank, world, config, run_dir, files, out):
    cfg = load_config(config, [])
    opts = DocEvalOptions(out=out, docs=files, lrs=[1e-3], decays=[0.1], tune_tokens=64, stat_segments=5,
                          progress=False)
    run_document_eval(cfg, run_dir, opts, log=lambda s: None)


def test_ranks_split_documents_equal_to_one_process(runs, tmp_path):
    (run_dir, cfg), files = runs[0]["fwl"], runs[1]
    config = str(run_dir / "config.yaml")
    # The ranks compute with one thread (tests/distributed.py); float32 sums depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _ranks_eval(0, 1, config, str(run_dir), files, str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    run_distributed(2, _ranks_eval, config, str(run_dir), files, str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["documents_id"] == two["documents_id"]
    assert one["dynamic_tuning"]["grid"][0]["loss"] == pytest.approx(two["dynamic_tuning"]["grid"][0]["loss"],
                                                                     rel=1e-12)
    for a, b in zip(one["methods"], two["methods"]):
        assert a["method"] == b["method"] and a["tokens"] == b["tokens"] and a["documents"] == b["documents"]
        # The same per-token losses, added in another order: float64 round-off only.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        for axis in ("by_position", "by_frequency", "by_repetition"):
            for x, y in zip(a[axis], b[axis]):
                assert x["tokens"] == y["tokens"]
                assert (math.isnan(x["loss"]) and math.isnan(y["loss"])) or x["loss"] == pytest.approx(y["loss"], rel=1e-9)


def test_report_warns_of_an_edge_lr_and_a_diverged_dynamic_evaluation():
    """A dynamic evaluation not to trust says so in report.md: the chosen lr at the edge of its grid (the
    screen of issue 22 chose the grid's largest on Persuasion), a loss that is not finite on the scored
    documents (it then diverged on license texts)."""
    grid = [{"lr": lr, "decay": 0.0, "loss": 5.0, "tokens": 10} for lr in (3e-5, 1e-4, 3e-4)]
    report = {"dynamic_tuning": {"grid": grid, "chosen": {"lr": 3e-4}},
              "methods": [{"method": "plain", "loss": 6.3}, {"method": "dynamic", "loss": float("nan")}]}
    text = "\n".join(dynamic_warnings(report))
    assert "the largest of the grid 3e-05, 0.0001, 0.0003" in text and "diverged" in text
    report["dynamic_tuning"]["chosen"]["lr"] = 1e-4
    report["methods"][1]["loss"] = 5.6
    assert dynamic_warnings(report) == []
