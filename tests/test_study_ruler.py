"""`fwl study` with rulers (spec key `rulers`: `fwl eval --out` of every run on named documents): a 1-variant ×
2-seed × 2-arm study whose ruler table equals what the runs' own eval JSON files give (means, sample stds,
gains over the baseline's plain paired by seed, perplexity spreads), both arms scoring the same documents;
a ruler added to a finished study measured without training again; pairing only runs on the same
documents; a ruler that fails on a finished run reported while its result is kept; bad rulers refused with
the key's name."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from fwl_scale.cli import main as fwl_main
from fwl_scale.eval.names import RESULTS
from fwl_scale.study import report
from fwl_scale.study.spec import load_spec
from tests.corpus import sample_records
from tests.test_study import snapshot, write_spec
from tests.train_support import REPO, need_corpus, records, run_fwl

RUNS = ["plain-fwl-s1", "plain-baseline-s1", "plain-fwl-s2", "plain-baseline-s2"]
# Validation documents after the tuning one, short: seconds per evaluation. The FWL arm tunes nothing, so
# only --leave-out-tune-docs makes it score the documents the baseline's dynamic evaluation and cache do.
VALID = {"methods": {"fwl": ["fwl_carried", "fwl_reset", "slow_head"],
                     "baseline": ["plain", "dynamic", "unigram_cache"]},
         "args": ["--max-docs", 2, "--max-tokens", 64, "--tune-tokens", 32, "--stat-segments", 2,
                  "--dynamic-lr", "1e-4,1e-3", "--dynamic-decay", 0, "--cache-weight", 0.1, "--cache-decay", 0.99]}


def ruler_spec(work: Path, out: Path, rulers: dict) -> Path:
    return write_spec(work / "spec.yaml", out, variants={"plain": {}}, seeds=[1, 2], rulers=rulers)


@pytest.fixture(scope="module")
def ruled(tmp_path_factory):
    need_corpus()
    work = tmp_path_factory.mktemp("ruler")
    spec = ruler_spec(work, work / "out", {"valid": VALID})
    proc = run_fwl("study", str(spec), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def eval_json(out: Path, ruler: str, run: str) -> dict:
    return json.loads((out / "rulers" / ruler / run / RESULTS).read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.array(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1))


def check_ruler_table(out: Path, ruler: str, methods: dict[str, list[str]]) -> dict:
    """The collected table of `ruler` against the eval JSON files of its runs, computed here independently."""
    summary = json.loads((out / "study.json").read_text())
    table = summary["rulers"][ruler]["variants"]["plain"]
    md = (out / "study.md").read_text()
    evals = {run: eval_json(out, ruler, run) for run in RUNS}
    loss = {(run.split("-")[1], int(run[-1])): {m["method"]: m for m in e["methods"]} for run, e in evals.items()}
    for arm, names in methods.items():
        assert table["arms"][arm]["seeds"] == [1, 2]
        for method in names:
            got = table["arms"][arm]["methods"][method]
            values = [loss[(arm, seed)][method]["loss"] for seed in (1, 2)]
            assert (got["loss"]["mean"], got["loss"]["std"]) == pytest.approx(mean_std(values), rel=1e-12)
            assert got["ppl"]["std"] == pytest.approx(mean_std([math.exp(v) for v in values])[1], rel=1e-12)
            assert got["gflops_per_token"]["mean"] == pytest.approx(
                loss[(arm, 1)][method]["flops_per_token"] / 1e9, rel=1e-12)
            if (arm, method) == ("baseline", "plain"):
                assert method not in table["gains"].get(arm, {})
                continue
            gains = [loss[("baseline", seed)]["plain"]["loss"] - loss[(arm, seed)][method]["loss"] for seed in (1, 2)]
            gain = table["gains"][arm][method]
            assert (gain["mean"], gain["std"]) == pytest.approx(mean_std(gains), rel=1e-9, abs=1e-12)
            assert gain["n"] == 2 and gain["seeds"] == [1, 2]
            assert f"| plain | {arm} | {method} | 2/2 | {got['loss']['mean']:.4f} ± " \
                   f"{got['loss']['std']:.4f} | {got['ppl']['std']:.3f} | {gain['mean']:+.4f} ± {gain['std']:.4f} " \
                   f"(n 2) |" in md
    return table


def test_ruler_table_equals_the_runs_eval_json(ruled):
    out = ruled / "out"
    summary = json.loads((out / "study.json").read_text())
    assert summary["complete"] == RUNS and summary["failed"] == [] and summary["failed_measurements"] == []
    evals = {run: eval_json(out, "valid", run) for run in RUNS}
    # Both arms scored the same documents: the 2 after the tuning document, though only the baseline tunes.
    assert len({e["documents_id"] for e in evals.values()}) == 1 and {e["documents"] for e in evals.values()} == {2}
    assert [m["method"] for m in evals["plain-fwl-s1"]["methods"]] == VALID["methods"]["fwl"]
    assert [m["method"] for m in evals["plain-baseline-s2"]["methods"]] == VALID["methods"]["baseline"]
    for run in RUNS:  # the result keeps each method's loss and cost as the eval JSON has them
        kept = json.loads((out / "results" / f"{run}.json").read_text())["rulers"]["valid"]
        assert kept["documents_id"] == evals[run]["documents_id"]
        assert kept["spec"]["methods"] == VALID["methods"][run.split("-")[1]]
        assert kept["spec"]["args"] == [str(a) for a in VALID["args"]]
        for m in evals[run]["methods"]:
            assert kept["methods"][m["method"]]["loss"] == m["loss"]
            assert kept["methods"][m["method"]]["wall_s"] == m["wall_s"]
    table = check_ruler_table(out, "valid", VALID["methods"])
    dynamic = table["gains"]["baseline"]["dynamic"]["mean"]
    for arm, per in table["gains"].items():
        for method, g in per.items():
            assert table["share_of_dynamic"][arm][method] == pytest.approx(g["mean"] / dynamic, rel=1e-12)
    carried = [m["loss"] for r in ("plain-fwl-s1", "plain-fwl-s2") for m in evals[r]["methods"]
               if m["method"] == "fwl_carried"]
    plain = [m["loss"] for r in ("plain-baseline-s1", "plain-baseline-s2") for m in evals[r]["methods"]
             if m["method"] == "plain"]
    ratio = mean_std(np.exp(carried).tolist())[1] / mean_std(np.exp(plain).tolist())[1]
    assert table["ppl_std_ratio"] == pytest.approx(ratio, rel=1e-9)
    md = (out / "study.md").read_text()
    assert "### Ruler `valid`" in md and f"| {table['ppl_std_ratio']:.3f} |" in md


def test_a_ruler_added_to_a_finished_study_is_measured_without_training_again(ruled, tmp_path):
    shutil.copytree(ruled / "out", tmp_path / "out")
    out = tmp_path / "out"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": r["text"]}) + "\n"
                            for r in sample_records(2, "train", first=300, spread=500)))
    added = {"methods": {"fwl": ["fwl_carried"], "baseline": ["plain"]}, "args": ["--docs", str(docs),
                                                                                 "--max-tokens", "48"]}
    spec = ruler_spec(tmp_path, out, {"valid": VALID, "docs": added})
    steps = {run: len(records(out / "runs" / run, "train")) for run in RUNS}
    valid_before = snapshot(out / "rulers" / "valid")
    proc = run_fwl("study", str(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training" not in proc.stdout and proc.stdout.count(": ruler docs (") == 4
    assert "ruler valid" not in proc.stdout and snapshot(out / "rulers" / "valid") == valid_before
    assert steps == {run: len(records(out / "runs" / run, "train")) for run in RUNS}
    check_ruler_table(out, "docs", added["methods"])
    check_ruler_table(out, "valid", VALID["methods"])  # kept as it was
    assert {eval_json(out, "docs", run)["documents"] for run in RUNS} == {2}
    again = run_fwl("study", str(spec))
    assert again.returncode == 0 and ": ruler " not in again.stdout, again.stdout[-2000:]


def test_gains_pair_only_runs_that_scored_the_same_documents(ruled, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    shutil.copytree(ruled / "out", tmp_path / "out")
    out = tmp_path / "out"
    path = out / "results" / "plain-fwl-s2.json"
    result = json.loads(path.read_text())
    result["rulers"]["valid"]["documents_id"] = "other documents"
    path.write_text(json.dumps(result))
    c = report.collect(load_spec(ruler_spec(tmp_path, out, {"valid": VALID})))
    table = c.summary["rulers"]["valid"]["variants"]["plain"]
    assert table["unpaired"] == ["fwl s2"]
    assert {m: g["seeds"] for m, g in table["gains"]["fwl"].items()} == {m: [1] for m in VALID["methods"]["fwl"]}
    assert table["gains"]["baseline"]["dynamic"]["seeds"] == [1, 2]
    s1 = {m["method"]: m["loss"] for r in ("plain-fwl-s1", "plain-baseline-s1")
          for m in eval_json(out, "valid", r)["methods"]}
    assert table["gains"]["fwl"]["fwl_carried"]["mean"] == s1["plain"] - s1["fwl_carried"]
    assert "Not paired with the baseline's plain (scored other documents, documents_id differs): plain: fwl s2" in \
        (out / "study.md").read_text()


def test_a_ruler_that_fails_on_a_finished_run_is_reported_and_the_result_kept(ruled, tmp_path):
    shutil.copytree(ruled / "out", tmp_path / "out")
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": ""}) + "\n")  # an empty document: fwl eval refuses it
    spec = ruler_spec(tmp_path, out, {"valid": VALID, "broken": {"methods": {"baseline": ["plain"]},
                                                                 "args": ["--docs", str(bad)]}})
    results = {run: (out / "results" / f"{run}.json").read_text() for run in RUNS}
    proc = run_fwl("study", str(spec))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run plain-baseline-s1 (variant plain) failed in ruler broken: fwl eval --out exited with 2" in proc.stderr
    assert {run: (out / "results" / f"{run}.json").read_text() for run in RUNS} == results
    summary = json.loads((out / "study.json").read_text())
    assert summary["complete"] == RUNS
    assert [(f["run"], f["stage"]) for f in summary["failed_measurements"]] == [
        ("plain-baseline-s1", "ruler broken"), ("plain-baseline-s2", "ruler broken")]
    md = (out / "study.md").read_text()
    assert "- `plain-baseline-s1` (variant plain): ruler broken: fwl eval --out exited with 2" in md
    assert summary["rulers"]["broken"]["variants"]["plain"]["arms"]["baseline"]["seeds"] == []


@pytest.mark.parametrize("ruler,message", [
    ({"methods": ["fwl_carried", "magic"]}, "rulers.r.methods: unknown method 'magic' (fwl eval --out's methods: "
                                            "plain, dynamic, slow_head"),
    ({"methods": {"fwl": ["plain"]}}, "rulers.r.methods.fwl: plain is not a method of the fwl arm"),
    ({"methods": ["fwl_carried"]}, "rulers.r.methods: fwl_carried is not a method of the baseline arm (its "
                                   "methods: plain, dynamic, unigram_cache, continuous_cache); give each arm its own"),
    ({"methods": {"base": ["plain"]}}, "rulers.r.methods: unknown key 'base' (an arm: fwl, baseline)"),
    ({"methods": {"fwl": []}}, "rulers.r.methods.fwl: expected a non-empty list of method names"),
    ({"methods": {"baseline": ["plain", "plain"]}}, "rulers.r.methods.baseline: ['plain', 'plain'] repeats a method"),
    ({"method": ["dynamic"]}, "rulers.r: unknown key 'method' (known: methods, args)"),
    ({"args": ["--max-tokens", "8"]}, "rulers.r.methods: expected a list of fwl eval methods"),
    ({"methods": ["dynamic"], "args": ["--out", "x"]}, "rulers.r.args: --out is set by the study"),
    ({"methods": ["dynamic"], "args": ["--stream"]}, "rulers.r.args: --stream belongs to another mode of fwl eval"),
    ({"methods": ["dynamic"], "args": ["--docs", "nope.jsonl"]}, "rulers.r.args: --docs: no such file nope.jsonl"),
    ([], "rulers.r: expected a mapping with keys methods, args"),
], ids=["unknown-method", "baseline-method-for-fwl", "fwl-method-for-both", "unknown-arm", "no-methods",
        "repeated", "unknown-key", "methods-missing", "study-set-arg", "other-mode-arg", "missing-docs",
        "not-a-mapping"])
def test_bad_ruler_is_refused_naming_the_key(tmp_path, capsys, monkeypatch, ruler, message):
    monkeypatch.chdir(REPO)  # the spec's config paths are relative to the working directory
    spec = ruler_spec(tmp_path, tmp_path / "out", {"r": ruler})
    assert fwl_main(["study", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()
