"""Studies on the local Slurm cluster (tests/slurm_support.py): `fwl study SPEC --slurm` as a job array
with a collection job, and issue 12's scaling ladder end to end through it (grid -> array -> fit)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm_support import (  # noqa: F401  (slurm_env: the module's cluster fixture)
    ENDED, JOB_TIMEOUT, REPO, array_states, hold_at, release, slurm_env)
from tests.train_support import records, tiny_overrides

pytestmark = pytest.mark.slurm


def submit_study(env: dict[str, str], spec: Path, extra_env: dict[str, str] | None = None) -> tuple[str, str]:
    """`fwl study SPEC --slurm`; returns the array's and the collection job's ids."""
    proc = subprocess.run([sys.executable, "-m", "fwl_scale.cli", "study", str(spec), "--slurm", "--sbatch-args",
                           "--time=10"], cwd=REPO, env=dict(env, **(extra_env or {})), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return (proc.stdout.split("submitted job array ")[1].split()[0],
            proc.stdout.split("collection job ")[1].split()[0])


def wait_ended(env: dict[str, str], job_id: str, deadline: float) -> dict[str, str]:
    while (state := array_states(env, job_id)[""])["JobState"] not in ENDED:
        assert time.monotonic() < deadline, f"job {job_id} did not end: {state}"
        time.sleep(1)
    return state


def common_overrides() -> list[str]:
    return [o for o in tiny_overrides("unused") if not o.startswith("train.out_dir=")]


def train_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in records(out_dir, "train")]


def test_study_runs_as_a_job_array_then_collects(slurm_env, tmp_path):
    """One array task per run (FWL and baseline), then the collection job (afterany) writes the table from
    their results. The FWL run's task is signalled mid-training through its batch shell (what
    `--signal=B:USR1@...` does before the time limit), while held after step 5 by the test hook: the study
    forwards the signal to the trainer, which saves; the task requeues itself and the run resumes where it
    stopped."""
    out = tmp_path / "out"
    steps = 20
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "slurm", "arms": {"fwl": "configs/tiny.yaml", "baseline": "configs/base_tiny.yaml"},
        "common": common_overrides() + ["train.steps=3", "train.eval_every=3"],
        "variants": {"plain": {"fwl": [f"train.steps={steps}", "train.save_every=100000"]}},
        "seeds": [1], "out_dir": str(out)}))
    # The baseline's 3 steps never reach the hold; the FWL run waits there for the signal.
    array_id, collect_id = submit_study(slurm_env, spec, hold_at(tmp_path, 5))
    assert "#SBATCH --array=0-1" in (out / "study.sbatch").read_text()
    fwl_dir = out / "runs" / "plain-fwl-s1"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (tmp_path / "release.reached").exists():
        assert time.monotonic() < deadline, "the FWL run did not reach the hold after step 5"
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array_id}_0"], env=slurm_env,
                               capture_output=True, text=True, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    while not records(fwl_dir, "stop"):
        assert time.monotonic() < deadline, "the FWL run did not stop after the signal"
        time.sleep(0.2)
    release(tmp_path)
    state = wait_ended(slurm_env, collect_id, deadline)
    tasks = array_states(slurm_env, array_id)
    logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("slurm-*.out")))
    assert sorted(tasks) == ["0", "1"], tasks
    for task in tasks.values():
        assert task["JobState"] == "COMPLETED" and task["ExitCode"] == "0:0", logs[-4000:]
    assert tasks["0"]["Restarts"] == "1" and tasks["1"]["Restarts"] == "0", tasks
    assert "batch shell got SIGUSR1" in logs and "the run resumes from its checkpoint" in logs, logs[-4000:]
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", logs[-4000:]
    assert "study slurm: run 0 exited with 0" in logs and "study slurm: run 1 exited with 0" in logs
    stops = records(fwl_dir, "stop")
    assert len(stops) == 1 and stops[0]["reason"] == "SIGUSR1" and stops[0]["step"] == 5, stops
    assert [r["step"] for r in records(fwl_dir, "start")] == [0, 5]
    assert train_steps(fwl_dir) == list(range(1, steps + 1))  # resumed right after the saved step
    summary = json.loads((out / "study.json").read_text())
    assert summary["complete"] == ["plain-fwl-s1", "plain-baseline-s1"] and not summary["failed"]
    for group in summary["groups"]:
        result = json.loads((out / "results" / f"plain-{group['arm']}-s1.json").read_text())
        trained = records(out / "runs" / f"plain-{group['arm']}-s1", "valid")[-1]
        assert group["val_loss"]["mean"] == result["valid"]["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert "| plain | fwl | 1/1 |" in (out / "study.md").read_text()


def test_scaling_ladder_runs_as_a_job_array_then_fits(slurm_env, tmp_path):
    """Issue 12's mini ladder at 2 sizes x 2 budgets x {FWL, baseline}, 2-4 steps each: `fwl scaling grid`
    -> `fwl study --slurm` (8 array tasks + collection) -> `fwl scaling fit`, whose points are the runs'
    own validations (N of each size, D = the steps' tokens)."""
    out = tmp_path / "out"
    tokens_per_step = 4 * 32  # tiny_overrides: micro_batch 4, seq_len 32
    grid = tmp_path / "ladder.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "ladder", "arms": {"fwl": "configs/tiny.yaml", "baseline": "configs/base_tiny.yaml"},
        "common": common_overrides(),
        "sizes": {"s32": ["model.d_model=32", "model.n_layers=1", "model.n_heads=2"],
                  "s48": ["model.d_model=48", "model.n_layers=2", "model.n_heads=2"]},
        "tokens": [2 * tokens_per_step, 4 * tokens_per_step], "seeds": [1], "eval_batches": 2,
        "out_dir": str(out)}))
    grid_cmd = [sys.executable, "-m", "fwl_scale.cli", "scaling", "grid", str(grid)]
    proc = subprocess.run(grid_cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = tmp_path / "ladder.study.yaml"
    array_id, collect_id = submit_study(slurm_env, spec)
    assert "#SBATCH --array=0-7" in (out / "study.sbatch").read_text()
    state = wait_ended(slurm_env, collect_id, time.monotonic() + 2 * JOB_TIMEOUT)
    logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("slurm-*.out")))
    tasks = array_states(slurm_env, array_id)
    assert sorted(tasks) == [str(i) for i in range(8)], tasks
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values()), logs[-4000:]
    assert state["JobState"] == "COMPLETED", logs[-4000:]
    fit_cmd = [sys.executable, "-m", "fwl_scale.cli", "scaling", "fit", str(spec)]
    proc = subprocess.run(fit_cmd, cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "scaling.json").read_text())
    # Two sizes are too few to fit either law: each arm says so, naming what it needs and what it got.
    assert (out / "scaling.png").stat().st_size > 0
    for arm in ("fwl", "baseline"):
        sizes = sorted({p["n"] for p in report["points"] if p["arm"] == arm})
        assert report["arms"][arm]["L(N)"]["error"] == (f"fit: L(N) has 3 parameters and needs >= 3 distinct "
                                                        f"sizes, got {sizes}")
        assert "needs >= 5 points over >= 2 sizes" in report["arms"][arm]["L(N,D)"]["error"]
    points = {(p["arm"], p["variant"].split("-")[0], p["d"]): p for p in report["points"]}
    assert set(points) == {(arm, size, k * tokens_per_step) for arm in ("fwl", "baseline")
                           for size in ("s32", "s48") for k in (2, 4)}
    for (arm, size, d), p in points.items():
        run_dir = out / "runs" / f"{p['variant']}-{arm}-s1"
        assert p["loss"] == pytest.approx(records(run_dir, "valid")[-1]["loss"], rel=1e-6)
        assert train_steps(run_dir) == list(range(1, d // tokens_per_step + 1))
    largest = 4 * tokens_per_step
    assert points[("fwl", "s48", largest)]["n"] > points[("fwl", "s32", largest)]["n"]
