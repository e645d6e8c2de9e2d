"""`fwl study`: a 2-variant × 1-seed × 2-arm study end to end (the table equals the runs' own metrics),
resumable (a second invocation reruns nothing; a run whose result is gone is evaluated again without
training again), bad specs fail with the variant's or key's name and leave the results alone, a variant
that fails while running is reported while the others' results are kept, the collection never replaces
a collection with fewer results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fwl_scale.cli import main as fwl_main
from fwl_scale.config import load_config
from fwl_scale.data import eval_documents, prepare_data, valid_batches
from fwl_scale.eval.perplexity import evaluate_batches
from fwl_scale.eval.run import load_for_eval
from fwl_scale.eval.streaming import evaluate_stream_positions
from fwl_scale.study import report, store
from fwl_scale.study.spec import load_spec
from fwl_scale.signal_points import TEST_HOLD_ENV
from tests.train_support import REPO, fwl_command, fwl_env, need_corpus, records, run_fwl, tiny_overrides

# 3 steps with a validation at the last; one layer: seconds per run.
COMMON = [o for o in tiny_overrides("unused") if not o.startswith("train.out_dir=")] + [
    "model.n_layers=1", "train.steps=3", "train.eval_every=3", "train.log_every=1"]
VARIANTS = {"plain": {}, "residual": {"fwl": ["model.fwl.residual=true"]}}


def write_spec(path: Path, out_dir: Path, variants: dict | None = None, **extra) -> Path:
    spec = {"name": "t", "arms": {"fwl": "configs/tiny.yaml", "baseline": "configs/base_tiny.yaml"},
            "common": COMMON, "variants": variants or VARIANTS, "seeds": [1], "eval_batches": 2,
            "out_dir": str(out_dir), **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file of a study's directory."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


def copy_study(src: Path, dst: Path, variants: dict | None = None) -> Path:
    shutil.copytree(src / "out", dst / "out")
    return write_spec(dst / "spec.yaml", dst / "out", variants)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    need_corpus()
    work = tmp_path_factory.mktemp("study")
    spec = write_spec(work / "spec.yaml", work / "out")
    proc = run_fwl("study", str(spec), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


def test_study_end_to_end_table_equals_the_runs_metrics(finished):
    out = finished / "out"
    summary = json.loads((out / "study.json").read_text())
    md = (out / "study.md").read_text()
    assert (out / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The residual variant changes the FWL only: its baseline is plain's run, trained once.
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["plain-baseline-s1", "plain-fwl-s1", "residual-fwl-s1"]
    assert summary["complete"] == ["plain-fwl-s1", "plain-baseline-s1", "residual-fwl-s1"]
    assert summary["failed"] == [] and summary["missing"] == []
    groups = {(g["variant"], g["arm"]): g for g in summary["groups"]}
    assert sorted(groups) == [("plain", "baseline"), ("plain", "fwl"), ("residual", "baseline"), ("residual", "fwl")]
    run_of = {("plain", "fwl"): "plain-fwl-s1", ("plain", "baseline"): "plain-baseline-s1",
              ("residual", "fwl"): "residual-fwl-s1", ("residual", "baseline"): "plain-baseline-s1"}
    for key, g in groups.items():
        run_dir = out / "runs" / run_of[key]
        trained = records(run_dir, "valid")[-1]  # the trainer's own validation at its last step
        evaluated = json.loads((out / "evals" / f"{run_of[key]}.json").read_text())["valid"]
        assert trained["step"] == 3 and g["seeds"] == [1]
        assert g["val_loss"]["mean"] == evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-6)
        assert g["val_ppl"]["mean"] == evaluated["perplexity"]
        assert [b["mean"] for b in g["bucket_loss"]] == evaluated["bucket_loss"]
        assert evaluated["bucket_loss"] == pytest.approx(trained["bucket_loss"], rel=1e-6)
        assert g["tokens_per_s"]["mean"] == pytest.approx(
            statistics.fmean(r["tokens_per_s"] for r in records(run_dir, "train")), rel=1e-12)
        assert f"{g['val_ppl']['mean']:.3f}" in md and f"{g['val_loss']['mean']:.4f}" in md
    for variant in VARIANTS:
        fwl, base = groups[(variant, "fwl")], groups[(variant, "baseline")]
        slow = json.loads((out / "evals" / f"{run_of[(variant, 'fwl')]}.slow.json").read_text())["valid"]
        assert fwl["slow_head_loss"]["mean"] == slow["loss"]
        assert fwl["slow_head_gap"] == pytest.approx(slow["loss"] - base["val_loss"]["mean"], abs=1e-12)
        assert summary["fwl_vs_baseline_ppl"][variant] == pytest.approx(
            fwl["val_ppl"]["mean"] / base["val_ppl"]["mean"], rel=1e-12)
        assert f"| {variant} | {summary['fwl_vs_baseline_ppl'][variant]:.4f} |" in md
        # The step sizes are the checkpoint's, in the order w1 b1 w2 b2 alpha beta, moved from their init.
        cfg = load_config(REPO / "configs" / "tiny.yaml", COMMON + VARIANTS[variant].get("fwl", []))
        model, _ = load_for_eval(cfg, out / "runs" / run_of[(variant, "fwl")], torch.device("cpu"))
        assert list(fwl["step_sizes"]) == ["w1", "b1", "w2", "b2", "alpha", "beta"]
        assert [s["mean"] for s in fwl["step_sizes"].values()] == model.fwl.step_sizes.detach().tolist()
        assert all(abs(s["mean"] - 0.01) > 1e-4 for s in fwl["step_sizes"].values())
    assert "| residual | baseline | 1/1 (= plain) |" in md


def test_slow_head_loss_is_the_model_with_its_step_sizes_at_zero(finished):
    out = finished / "out"
    result = json.loads((out / "results" / "plain-fwl-s1.json").read_text())
    cfg = load_config(REPO / "configs" / "tiny.yaml", COMMON)
    model, _ = load_for_eval(cfg, out / "runs" / "plain-fwl-s1", torch.device("cpu"))
    batches = valid_batches(cfg, prepare_data(cfg, log=lambda *a: None), cfg.train.eval_batches, 0, 1)
    full = evaluate_batches(model, batches, cfg.train.position_buckets, torch.device("cpu"))
    model.fwl.step_scale = 0.0
    slow = evaluate_batches(model, batches, cfg.train.position_buckets, torch.device("cpu"))
    assert result["valid"]["loss"] == pytest.approx(full.loss, rel=1e-6)
    assert result["slow_head"]["loss"] == pytest.approx(slow.loss, rel=1e-6)
    assert abs(slow.loss - full.loss) > 1e-5  # the fast updates do change the loss


def test_second_invocation_reruns_nothing(finished):
    out = finished / "out"
    before = snapshot(out)
    proc = run_fwl("study", str(finished / "spec.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training" not in proc.stdout and "3/3 runs finished" in proc.stdout
    after = snapshot(out)
    collection = {"study.md", "study.json", "loss_by_position.png"}
    assert {k: v for k, v in after.items() if k not in collection} == \
           {k: v for k, v in before.items() if k not in collection}
    assert (out / "study.json").read_text().count('"complete"') == 1


def test_long_docs_added_to_a_finished_study_stream_without_training_again(finished, tmp_path):
    """A spec that gains long_docs after its runs finished: each result gains the streamed documents (equal
    to evaluate_stream_positions on the checkpoint), no step is trained again, and the verdict is the
    windows' comparison of the means."""
    spec = copy_study(finished, tmp_path)
    spec_data = yaml.safe_load(spec.read_text())
    spec_data["long_docs"] = {"windows": 3, "documents": 2}
    spec.write_text(yaml.safe_dump(spec_data, sort_keys=False))
    out = tmp_path / "out"
    steps = {name: len(records(out / "runs" / name, "train")) for name in ("plain-fwl-s1", "plain-baseline-s1")}
    proc = run_fwl("study", str(spec))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training" not in proc.stdout
    assert steps == {name: len(records(out / "runs" / name, "train")) for name in steps}
    results = {name: json.loads((out / "results" / f"{name}.json").read_text()) for name in steps}
    for name, arm_config in (("plain-fwl-s1", "tiny.yaml"), ("plain-baseline-s1", "base_tiny.yaml")):
        cfg = load_config(REPO / "configs" / arm_config, COMMON)
        model, _ = load_for_eval(cfg, out / "runs" / name, torch.device("cpu"))
        modes = results[name]["long_docs"]["modes"]
        assert results[name]["long_docs"]["spec"] == {"windows": 3, "documents": 2}
        assert sorted(modes) == (["state carried", "windows alone"] if "fwl" in name else ["windows alone"])
        for mode, streamed in modes.items():
            docs = [d for d in eval_documents(cfg, prepare_data(cfg, log=lambda *a: None))
                    if d.numel() >= 3 * cfg.model.seq_len + 1][:2]
            assert len(docs) == 2 == streamed["documents"]
            ref = evaluate_stream_positions(model, docs, cfg.model.seq_len, torch.device("cpu"), 3, 1,
                                            carry_state=mode == "state carried")
            assert streamed["loss"] == pytest.approx(ref.loss, rel=1e-6) and len(ref.loss) == 3
    verdict = json.loads((out / "study.json").read_text())["long_docs"]["plain"]
    carried = results["plain-fwl-s1"]["long_docs"]["modes"]["state carried"]["loss"]
    reset = results["plain-fwl-s1"]["long_docs"]["modes"]["windows alone"]["loss"]
    base = results["plain-baseline-s1"]["long_docs"]["modes"]["windows alone"]["loss"]
    assert verdict["windows"] == 3
    assert verdict["carried_le_reset"] == sum(c <= r for c, r in zip(carried, reset))
    assert verdict["carried_lt_baseline"] == sum(c < b for c, b in zip(carried, base))
    assert verdict["worst_vs_baseline"] == pytest.approx(max(c - b for c, b in zip(carried, base)), abs=1e-12)
    assert verdict["ppl_ratio"]["reset"] == pytest.approx(np.exp(np.mean(reset) - np.mean(base)), rel=1e-12)
    assert (out / "long_docs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| plain | 3 | {verdict['carried_le_reset']}/3 | {verdict['carried_lt_baseline']}/3 |" in \
        (out / "study.md").read_text()


def test_lost_result_collect_refuses_then_the_run_is_evaluated_again_without_training(finished, tmp_path):
    spec = copy_study(finished, tmp_path)
    out = tmp_path / "out"
    collected = (out / "study.json").read_bytes()
    (out / "results" / "plain-baseline-s1.json").rename(tmp_path / "moved.json")
    proc = run_fwl("study", str(spec), "--collect")
    assert proc.returncode == 2
    assert "not replacing it with fewer" in proc.stderr and "plain-baseline-s1" in proc.stderr, proc.stderr
    assert (out / "study.json").read_bytes() == collected
    train_records = len(records(out / "runs" / "plain-baseline-s1", "train"))
    proc = run_fwl("study", str(spec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The trainer found its finished checkpoint: no step trained again; the evaluation gives the same loss.
    assert len(records(out / "runs" / "plain-baseline-s1", "train")) == train_records
    again = json.loads((out / "results" / "plain-baseline-s1.json").read_text())
    assert again["valid"] == json.loads((tmp_path / "moved.json").read_text())["valid"]
    assert json.loads((out / "study.json").read_text())["complete"] == ["plain-fwl-s1", "plain-baseline-s1",
                                                                        "residual-fwl-s1"]


@pytest.mark.parametrize("change,message", [
    ({"seed": [1]}, "spec.yaml: unknown key 'seed' (known: name, arms, common,"),
    ({"arms": {"fwl": "configs/nope.yaml"}}, "spec.yaml: arms.fwl: no such config file configs/nope.yaml"),
    ({"arms": {"fast": "configs/tiny.yaml"}}, "spec.yaml: arms: unknown key 'fast'"),
    ({"variants": {}}, "spec.yaml: variants: needs at least one named variant"),
    ({"variants": {"plain": {}, "wide": {"fwl": ["model.fwl.widht=64"]}}},
     "variant 'wide' (arm fwl, seed 1): configs/tiny.yaml: unknown key model.fwl.widht"),
    ({"variants": {"plain": {}, "odd": ["model.n_heads=3"]}},
     "variant 'odd' (arm fwl, seed 1): configs/tiny.yaml: model.n_heads: must divide model.d_model"),
    ({"variants": {"plain": {}, "both": {"fwl": [], "base": []}}}, "variant 'both': unknown key 'base'"),
    ({"variants": {"bad/name": {}}}, "variant 'bad/name': a variant name is letters"),
    ({"variants": {"s": ["train.seed=3"]}}, "variant 's': train.seed is set by the study"),
    ({"variants": {"off": ["model.fwl.enabled=false"]}}, "variant 'off': arm fwl needs model.fwl.enabled=true"),
    ({"seeds": []}, "spec.yaml: seeds: expected a non-empty list of integers"),
    ({"long_docs": {"windows": 0}}, "spec.yaml: long_docs.windows: expected an integer >= 1, got 0"),
    ({"variants": {"sweep": {"seeds": [2, 2]}}}, "variant 'sweep': seeds: [2, 2] repeats a seed"),
], ids=["unknown-key", "missing-config", "unknown-arm", "no-variants", "unknown-override", "invalid-override",
        "unknown-variant-key", "variant-name", "reserved-override", "arm-mismatch", "no-seeds", "long-docs-windows",
        "variant-seeds"])
def test_bad_spec_is_named_and_leaves_the_results_alone(finished, tmp_path, capsys, monkeypatch, change, message):
    monkeypatch.chdir(REPO)  # the spec's config paths are relative to the working directory
    out = finished / "out"
    before = snapshot(out)
    spec = yaml.safe_load((finished / "spec.yaml").read_text())
    spec.update(change)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert fwl_main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert snapshot(out) == before


def test_failing_variant_is_reported_while_the_others_complete(finished, tmp_path):
    # A tokenizer that does not exist passes the config's validation and fails when training starts.
    variants = {**VARIANTS, "broken": {"fwl": ["data.tokenizer=/nonexistent/tokenizer.model"]}}
    spec = copy_study(finished, tmp_path, variants)
    out = tmp_path / "out"
    before = {k: v for k, v in snapshot(out).items() if k.startswith(("results/", "runs/"))}
    proc = run_fwl("study", str(spec))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = out / "logs" / "broken-fwl-s1.log"
    assert f"run broken-fwl-s1 (variant broken) failed in train" in proc.stderr and str(log) in proc.stderr
    assert "/nonexistent/tokenizer.model: no such tokenizer model" in log.read_text()
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # the finished runs are untouched
    summary = json.loads((out / "study.json").read_text())
    assert summary["complete"] == ["plain-fwl-s1", "plain-baseline-s1", "residual-fwl-s1"]
    assert [f["run"] for f in summary["failed"]] == ["broken-fwl-s1"] and summary["missing"] == []
    md = (out / "study.md").read_text()
    assert "| broken | fwl | 0/1, **failed**: broken-fwl-s1 |" in md
    assert "| broken | baseline | 1/1 (= plain) |" in md
    assert f"- `broken-fwl-s1` (variant broken): train: fwl train exited with 2; log `{log}`" in md


def test_stop_signal_checkpoints_exits_75_and_the_next_invocation_resumes(tmp_path):
    need_corpus()
    steps, held = 10, 5
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "out", arms={"baseline": "configs/base_tiny.yaml"},
                      variants={"long": [f"train.steps={steps}", "train.eval_every=1000", "train.save_every=1000"]})
    run_dir = tmp_path / "out" / "runs" / "long-baseline-s1"
    # The trainer waits after step 5 (the test hook, passed on by the study) until a stop signal arrives:
    # the signal lands at a known step however slow the machine, and the run cannot finish first.
    release = tmp_path / "release"
    proc = subprocess.Popen(fwl_command("study", str(spec)), cwd=REPO,
                            env=fwl_env(**{TEST_HOLD_ENV: f"step@{held + 1}:{release}"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not Path(f"{release}.reached").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the trainer never reached the hold after step 5"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # to the study, which forwards it to the trainer
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, output
    assert "stopped (SIGUSR1) during long-baseline-s1" in output
    stop = records(run_dir, "stop")
    assert len(stop) == 1 and stop[0]["step"] == held
    assert not (tmp_path / "out" / "results" / "long-baseline-s1.json").exists()
    again = run_fwl("study", str(spec))
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in records(run_dir, "start")] == [0, stop[0]["step"]]
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, steps + 1))
    assert json.loads((tmp_path / "out" / "study.json").read_text())["complete"] == ["long-baseline-s1"]


def test_a_variant_with_its_own_seeds_adds_only_those_runs(tmp_path, monkeypatch):
    """A sweep point at one seed beside the chosen settings at three: the runs, and each row's count."""
    monkeypatch.chdir(REPO)
    variants = {"plain": {}, "lr6e-3": {"fwl": ["train.lr=6e-3"], "baseline": ["train.lr=6e-3"], "seeds": [2]}}
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tmp_path / "out", variants=variants, seeds=[1, 2, 3]))
    assert [r.name for r in spec.runs] == ["plain-fwl-s1", "plain-baseline-s1", "plain-fwl-s2", "plain-baseline-s2",
                                           "plain-fwl-s3", "plain-baseline-s3", "lr6e-3-fwl-s2",
                                           "lr6e-3-baseline-s2"]
    assert spec.variant_seeds == {"plain": [1, 2, 3], "lr6e-3": [2]}
    c = report.collect(spec)
    assert {(g["variant"], g["arm"]): g["runs"] for g in c.summary["groups"]} == {
        ("plain", "fwl"): 3, ("plain", "baseline"): 3, ("lr6e-3", "fwl"): 1, ("lr6e-3", "baseline"): 1}


def test_collection_over_seeds_is_mean_and_sample_std_and_names_what_is_missing(tmp_path, monkeypatch):
    """The aggregation alone, on results written by hand (three seeds, one missing, one failed)."""
    monkeypatch.chdir(REPO)
    spec = load_spec(write_spec(tmp_path / "spec.yaml", tmp_path / "out", seeds=[1, 2, 3]))
    assert [r.name for r in spec.runs] == ["plain-fwl-s1", "plain-baseline-s1", "plain-fwl-s2", "plain-baseline-s2",
                                           "plain-fwl-s3", "plain-baseline-s3", "residual-fwl-s1", "residual-fwl-s2",
                                           "residual-fwl-s3"]
    rng = np.random.default_rng(0)
    written = {}
    for run in spec.runs:
        if run.name in ("plain-baseline-s3", "residual-fwl-s2", "residual-fwl-s3"):
            continue  # not run (residual-fwl-s2 fails below)
        loss, buckets = float(rng.uniform(4, 6)), rng.uniform(4, 6, size=4).tolist()
        written[run.name] = {
            "run": run.name, "variant": run.variant, "arm": run.arm, "seed": run.seed,
            "valid": {"loss": loss, "perplexity": float(np.exp(loss)), "bucket_edges": [[0, 8], [8, 16], [16, 24],
                      [24, 32]], "bucket_loss": buckets},
            "slow_head": {"loss": loss + 0.1} if run.arm == "fwl" else None,
            "step_sizes": dict(zip(["w1", "b1", "w2", "b2", "alpha", "beta"], rng.uniform(0, 1, 6).tolist()))
            if run.arm == "fwl" else None,
            "tokens_per_s": float(rng.uniform(1000, 2000))}
        store.write_json(store.result_path(spec, run), written[run.name])
    failed = next(r for r in spec.runs if r.name == "residual-fwl-s2")
    store.write_json(store.failure_path(spec, failed), {"run": failed.name, "variant": "residual", "stage": "train",
                                                        "detail": "fwl train exited with 3", "log": "L"})
    c = report.collect(spec)
    groups = {(g["variant"], g["arm"]): g for g in c.summary["groups"]}

    def ref(variant: str, arm: str, get) -> tuple[float, float]:
        """Mean and sample std in float64 numpy; residual's baseline rows are plain's baseline runs."""
        source = "plain" if (variant, arm) == ("residual", "baseline") else variant
        values = np.array([get(r) for r in written.values() if r["variant"] == source and r["arm"] == arm],
                          dtype=np.float64)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    for (variant, arm), g in groups.items():
        for key, get in [("val_loss", lambda r: r["valid"]["loss"]), ("val_ppl", lambda r: r["valid"]["perplexity"]),
                         ("tokens_per_s", lambda r: r["tokens_per_s"])]:
            assert (g[key]["mean"], g[key]["std"]) == pytest.approx(ref(variant, arm, get), rel=1e-12), \
                (variant, arm, key)
        for b in range(4):
            assert (g["bucket_loss"][b]["mean"], g["bucket_loss"][b]["std"]) == pytest.approx(
                ref(variant, arm, lambda r: r["valid"]["bucket_loss"][b]), rel=1e-12)
        if arm == "fwl":
            assert g["slow_head_loss"]["mean"] == pytest.approx(ref(variant, arm, lambda r: r["slow_head"]["loss"])[0])
            assert g["slow_head_gap"] == pytest.approx(g["slow_head_loss"]["mean"]
                                                       - groups[(variant, "baseline")]["val_loss"]["mean"], abs=1e-12)
            assert g["step_sizes"]["beta"]["mean"] == pytest.approx(
                ref(variant, arm, lambda r: r["step_sizes"]["beta"])[0])
    assert groups[("plain", "fwl")]["seeds"] == [1, 2, 3] and groups[("plain", "baseline")]["seeds"] == [1, 2]
    assert groups[("residual", "fwl")]["seeds"] == [1] and groups[("residual", "fwl")]["failed"] == ["residual-fwl-s2"]
    assert c.summary["fwl_vs_baseline_ppl"]["plain"] == pytest.approx(
        groups[("plain", "fwl")]["val_ppl"]["mean"] / groups[("plain", "baseline")]["val_ppl"]["mean"], rel=1e-12)
    assert c.missing == ["plain-baseline-s3", "residual-fwl-s3"]
    md = (tmp_path / "out" / "study.md").read_text()
    g = groups[("plain", "fwl")]
    assert f"| plain | fwl | 3/3 | {g['val_ppl']['mean']:.3f} ± {g['val_ppl']['std']:.3f} |" in md
    assert "| residual | fwl | 1/3, **failed**: residual-fwl-s2 |" in md
    assert "Not run yet: `plain-baseline-s3`, `residual-fwl-s3`" in md
    assert (tmp_path / "out" / "loss_by_position.png").is_file()
