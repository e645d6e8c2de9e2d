"""The Slurm launchers on a real two-node Slurm cluster (tools/slurm_cluster.sh), end to end.

- `sbatch launchers/tiny.slurm` trains across 2 nodes (2 ranks) and finishes: the reference run;
- a job signalled mid-run (`scancel --signal=USR1`: what `--signal=USR1@lead` does at the time limit)
  checkpoints, requeues itself (same job id) and resumes with no step lost and the reference's losses,
  in the same wandb run;
- a job killed with no warning (SIGKILL to every process, batch shell included) resumes from its last
  periodic checkpoint when resubmitted;
- a job that may not requeue (`--no-requeue`), signalled through its batch shell only
  (`scancel --batch --signal=USR1`), chains a successor (`afterany`) that finishes the run;
- a plain `scancel` stops a job for good (it is not requeued even if the ranks managed to save);
- a launcher whose layout cannot fit its allocation fails before training with a clear message, also when
  that check runs as a job step (in a container's environment);
- a job set up as for a container (FWL_LAUNCH_PREFIX, FWL_SRUN_ARGS), submitted from another directory:
  the layout check runs through the prefix in a one-task step, every task goes to FWL_HOME whatever
  directory it starts in, NCCL_DEBUG=WARN, and srun gets the job's --cpus-per-task.

The scenarios run at the same time (one thread each drives its job: waits for a step, signals, kills,
resubmits), started by one fixture; each test then checks its scenario's outcome. The cluster and what
the Slurm tests share: tests/slurm_support.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.slurm_support import (  # noqa: F401  (slurm_env: the module's cluster fixture)
    ENDED, JOB_TIMEOUT, REPO, hold_at, logged_steps, records_safe, release, slurm_env)
from tests.train_support import records, step_losses, tiny_overrides

pytestmark = pytest.mark.slurm

LAUNCHER = "launchers/tiny.slurm"
STEPS = 100
SAVE_EVERY = 20
EXIT_REQUEUE = 75


def _overrides(out_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(out_dir, f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
                          "train.eval_every=1000", *extra)


class Job:
    """One sbatch submission of a launcher, with its log."""

    def __init__(self, env: dict[str, str], log: Path, args: list[str], sbatch_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, cwd: Path = REPO):
        self.env = dict(env, **(extra_env or {}))
        self.log = log
        out = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_args, str(REPO / LAUNCHER),
                              *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        self.id = out.stdout.strip().split(";")[0]

    def info(self, job_id: str | None = None) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id or self.id], env=self.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        fields: dict[str, str] = {}
        for item in out.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def assert_not_ended(self, waiting_for: str) -> None:
        """Fails at once when the job reached a final state (its accounting is final) while a test still
        waits for an event of it. Transient states are not checked: which of them a poll meets (COMPLETING
        during a requeue, SIGNALING while Slurm delivers a signal) depends on timing."""
        state = self.info()["JobState"]
        assert state not in ENDED, f"job {self.id} is {state} before {waiting_for}; log:\n{self.text()[-4000:]}"

    def wait_done(self, job_id: str | None = None, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        """Waits until the job has ended for good (not pending, running or being requeued)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if info["JobState"] in ENDED:
                return info
            time.sleep(1)
        subprocess.run(["scancel", job_id or self.id], env=self.env, capture_output=True, timeout=30)
        pytest.fail(f"job {job_id or self.id} did not end in {timeout}s; log:\n{self.text()[-4000:]}")

    def wait_step(self, out_dir: Path, step: int, timeout: float = JOB_TIMEOUT) -> int:
        """Waits until the run logged a training step >= `step`; returns the newest step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = logged_steps(out_dir)
            if steps and max(steps) >= step:
                return max(steps)
            self.assert_not_ended(f"step {step}")
            time.sleep(0.2)
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)
        pytest.fail(f"job {self.id} did not reach step {step} in {timeout}s; log:\n{self.text()[-4000:]}")

    def wait_held(self, work: Path, timeout: float = JOB_TIMEOUT) -> None:
        """Waits until a rank holds at the point `hold_at` named."""
        deadline = time.monotonic() + timeout
        while not (work / "release.reached").exists():
            self.assert_not_ended("it reached the hold")
            if time.monotonic() > deadline:
                self.scancel()
                pytest.fail(f"job {self.id} did not reach the hold in {timeout}s; log:\n{self.text()[-4000:]}")
            time.sleep(0.2)

    def wait_stopped(self, out_dir: Path, timeout: float = JOB_TIMEOUT) -> None:
        """Waits until the run logged its stop (the signal reached the ranks and they saved)."""
        deadline = time.monotonic() + timeout
        while not records_safe(out_dir, "stop"):
            assert time.monotonic() < deadline, f"job {self.id} did not stop in {timeout}s; log:\n{self.text()[-4000:]}"
            time.sleep(0.2)

    def scancel(self, *args: str) -> None:
        out = subprocess.run(["scancel", *args, self.id], env=self.env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr

    def pids(self) -> list[int]:
        """The job's processes on both nodes (`scontrol listpids`); [] once slurmd knows none of it."""
        pids = []
        for node in ("node1", "node2"):
            out = subprocess.run(["scontrol", "listpids", self.id, node], env=self.env, capture_output=True,
                                 text=True, timeout=30)
            said = out.stdout + out.stderr
            if out.returncode != 0 and (f"JobId={self.id} does not exist on node {node}" in said
                                        or f"There are no steps for job {self.id} on node {node}" in said):
                continue  # the node runs nothing of the job (any more, or yet)
            assert out.returncode == 0, out.stdout + out.stderr
            pids += [int(line.split()[0]) for line in out.stdout.splitlines()[1:] if line.strip()]
        return pids

    def wait_gone(self, timeout: float = JOB_TIMEOUT) -> None:
        """Waits until no process of the job is left on either node: nothing of it (its batch shell is
        what would `scontrol requeue` it) can act on it any more."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            assert time.monotonic() < deadline, f"job {self.id} still has processes {pids} after {timeout}s"
            time.sleep(0.2)

    def kill_processes(self) -> None:
        """SIGKILL to every process of the job on both nodes (by pid, from `scontrol listpids`)."""
        pids = self.pids()
        assert len(pids) >= 3, f"expected the batch shell and two ranks, got pids {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


@dataclass
class Outcome:
    """What a scenario saw; the test asserts on it."""
    job: Job
    out_dir: Path
    info: dict[str, str] = field(default_factory=dict)
    seen: dict[str, Any] = field(default_factory=dict)


class Scenario(threading.Thread):
    """Drives one job in the background; `outcome()` re-raises in the test whatever went wrong."""

    def __init__(self, fn: Callable[..., Outcome], *args: Any):
        super().__init__(daemon=True, name=fn.__name__)
        self.fn, self.args = fn, args
        self.result: Outcome | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # pytest.fail raises an OutcomeException (a BaseException)
            self.error = e

    def outcome(self) -> Outcome:
        self.join(timeout=3 * JOB_TIMEOUT)
        if self.is_alive():
            pytest.fail(f"scenario {self.name} still running after {3 * JOB_TIMEOUT}s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def run_reference(env: dict[str, str], work: Path) -> Outcome:
    job = Job(env, work / "job.out", _overrides(work / "run"))
    return Outcome(job, work / "run", job.wait_done())


HELD_AT = 15  # the step after which the signalled, killed (+ 2 * SAVE_EVERY) and chained runs are held


def run_signalled(env: dict[str, str], work: Path) -> Outcome:
    # wandb on (offline): the requeued job must continue the same wandb run.
    job = Job(env, work / "job.out", _overrides(work / "run", "train.wandb.enabled=true",
                                                "train.wandb.mode=offline"), extra_env=hold_at(work, HELD_AT))
    job.wait_held(work)
    # Exactly what `#SBATCH --signal=USR1@lead` does before the time limit: SIGUSR1 to the job's steps.
    job.scancel("--signal=USR1")
    job.wait_stopped(work / "run")
    release(work)  # the requeued job passes the same boundary again
    return Outcome(job, work / "run", job.wait_done(), {"step": HELD_AT})


def run_killed(env: dict[str, str], work: Path) -> Outcome:
    out_dir = work / "run"
    job = Job(env, work / "job.out", _overrides(out_dir), extra_env=hold_at(work, 2 * SAVE_EVERY + 5))
    job.wait_held(work)
    # No warning: SIGKILL to every process of the job, batch shell included, as a crashing node or the
    # OOM killer would. (`scancel --signal=KILL` is no such test: Slurm turns it into a cancel, which
    # sends SIGTERM first.) Nothing can save or requeue.
    job.kill_processes()
    killed = job.wait_done(timeout=120)
    latest = (out_dir / "checkpoints" / "latest_complete").read_text().strip()
    killed_at = max(logged_steps(out_dir))
    release(work)
    again = Job(env, work / "job.out", _overrides(out_dir))  # the user resubmits the same launcher
    return Outcome(again, out_dir, again.wait_done(),
                   {"step": 2 * SAVE_EVERY + 5, "killed": killed, "killed_at": killed_at, "latest": latest,
                    "first": job})


def run_chained(env: dict[str, str], work: Path) -> Outcome:
    job = Job(env, work / "job.out", _overrides(work / "run"), sbatch_args=("--no-requeue",),
              extra_env=hold_at(work, HELD_AT))
    job.wait_held(work)
    # The signal reaches the batch shell only; its trap forwards it to every rank through srun.
    job.scancel("--batch", "--signal=USR1")
    job.wait_stopped(work / "run")
    release(work)  # the successor passes the same boundary again
    first = job.wait_done()
    text = job.text()
    lines = [line for line in text.splitlines() if "submitted successor job" in line]
    assert lines, f"no successor was submitted; log:\n{text[-4000:]}"
    successor = lines[0].split("submitted successor job ")[1].split()[0]
    return Outcome(job, work / "run", job.wait_done(successor), {"step": HELD_AT, "first": first,
                                                                  "successor": successor})


def run_time_limited(env: dict[str, str], work: Path) -> Outcome:
    # A run far longer than its 3-minute limit. Slurm itself must warn it (SIGUSR1 60 s before the
    # limit, "up to 60 seconds earlier" by sbatch(1): 60-120 s after the start, after start-up), and the
    # job must checkpoint, requeue and resume on its own. Cancelled once the second run trains.
    out_dir = work / "run"
    job = Job(env, work / "job.out", _overrides(out_dir, "train.steps=100000", "train.save_every=100000"),
              sbatch_args=("--time=3", "--signal=USR1@60"))
    deadline = time.monotonic() + JOB_TIMEOUT
    while not records_safe(out_dir, "start")[1:]:
        job.assert_not_ended("its requeued run started")
        assert time.monotonic() < deadline, f"job {job.id} was not requeued; log:\n{job.text()[-4000:]}"
        time.sleep(1)
    resumed_at = records_safe(out_dir, "start")[1]["step"]
    job.wait_step(out_dir, resumed_at + 5)
    info = job.info()
    job.scancel()
    return Outcome(job, out_dir, info, {"final": job.wait_done()})


def run_cancelled(env: dict[str, str], work: Path) -> Outcome:
    job = Job(env, work / "job.out", _overrides(work / "run"))
    seen = job.wait_step(work / "run", 15)
    job.scancel()
    info = job.wait_done()
    # A requeue shows at once (Restarts counts it, the state leaves CANCELLED); only the job's own batch
    # shell would ask for one. Once none of the job's processes is left, its state is final.
    job.wait_gone()
    return Outcome(job, work / "run", info, {"step": seen, "later": job.info()})


@pytest.fixture(scope="module")
def scenarios(slurm_env, tmp_path_factory) -> dict[str, Scenario]:
    """All training scenarios, started together so that their start-up and requeue waits overlap."""
    fns = {"reference": run_reference, "signalled": run_signalled, "killed": run_killed,
           "chained": run_chained, "cancelled": run_cancelled, "time_limited": run_time_limited}
    return {name: Scenario(fn, slurm_env, tmp_path_factory.mktemp(name)) for name, fn in fns.items()}


def reference_losses(scenarios: dict[str, Scenario]) -> dict[int, float]:
    ref = scenarios["reference"].outcome()
    assert ref.info["JobState"] == "COMPLETED", ref.job.text()[-4000:]
    return step_losses(ref.out_dir)


def assert_same_losses(out_dir: Path, reference: dict[int, float]) -> None:
    losses = step_losses(out_dir)
    for step in range(1, STEPS + 1):
        assert step in losses, f"step {step} missing from {out_dir}/metrics.jsonl"
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), \
            f"step {step}: loss {losses[step]} differs from the uninterrupted run's {reference[step]}"


def train_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in records(out_dir, "train")]


@pytest.mark.parametrize("settings,extra,message", [
    ({"FWL_TP": "4"}, ["model.n_heads=4"],
     "2 node(s) x 1 task(s) = 2 ranks: parallel: world size 2 is not a multiple of tp*cp*pp = 4*1*1 = 4"),
    ({"FWL_GLOBAL_BATCH": "12"}, [],
     "global batch 12 is not a multiple of micro_batch * dp = 4 * 2 = 8 (2 node(s) x 1 task(s)"),
    # FWL_SRUN_ARGS set (as for pyxis): the check runs as a job step, in the environment training will have.
    ({"FWL_GLOBAL_BATCH": "12", "FWL_SRUN_ARGS": "--chdir=/"}, [],
     "global batch 12 is not a multiple of micro_batch * dp = 4 * 2 = 8 (2 node(s) x 1 task(s)"),
], ids=["tp-exceeds-ranks", "global-batch", "global-batch-in-a-step"])
def test_layout_that_cannot_fit_fails_before_training(slurm_env, tmp_path, settings, extra, message):
    out_dir = tmp_path / "run"
    job = Job(slurm_env, tmp_path / "job.out", _overrides(out_dir, *extra), extra_env=settings)
    info = job.wait_done()
    text = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert f"fwl launcher: layout does not fit the allocation: {message}" in text, text
    assert "stopping before training" in text
    # srun's own word on its one task: the check did run as a step, or did not.
    assert ("task 0: Exited with exit code 2" in text) == ("FWL_SRUN_ARGS" in settings), text
    # Nothing was launched: no rank started, no run directory was written.
    assert "[fwl-launcher] rank" not in text
    assert not out_dir.exists()


# FWL_LAUNCH_PREFIX for the test below: records, for every command put behind it, where it starts, what it
# runs and some of its environment, then becomes that command (as `apptainer exec IMAGE` would).
PREFIX_RECORDER = """#!{python}
import json, os, sys
seen = {{"cwd": os.getcwd(), "argv": sys.argv[1:],
         **{{k: os.environ.get(k) for k in ("NCCL_DEBUG", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID",
                                           "SLURM_STEP_NUM_TASKS", "SLURMD_NODENAME", "RANK")}}}}
with open(os.path.join({calls!r}, "prefix.%d.json" % os.getpid()), "w") as f:
    json.dump(seen, f)
os.execvp(sys.argv[1], sys.argv[1:])
"""

# An srun put first on PATH (through FWL_SETUP): records its arguments, NUL-separated, then runs Slurm's.
SRUN_RECORDER = """#!/bin/bash
printf '%s\\0' "$@" >"{calls}/srun.$$"
exec {srun} "$@"
"""


def test_launcher_in_a_container_environment(slurm_env, tmp_path):
    """The launcher set up as for a container, submitted from a directory that is not the repository:
    FWL_LAUNCH_PREFIX is a recorder (tests/test_slurm.py PREFIX_RECORDER), FWL_SRUN_ARGS=--chdir=/ starts
    every task in / as pyxis starts it in the image's WORKDIR, and the job has 2 CPUs per task."""
    calls, bin_dir, elsewhere = tmp_path / "calls", tmp_path / "bin", tmp_path / "elsewhere"
    for d in (calls, bin_dir, elsewhere):
        d.mkdir()
    prefix = tmp_path / "prefix.py"
    prefix.write_text(PREFIX_RECORDER.format(python=sys.executable, calls=str(calls)))
    srun = bin_dir / "srun"
    srun.write_text(SRUN_RECORDER.format(calls=calls, srun=shutil.which("srun")))
    for exe in (prefix, srun):
        exe.chmod(0o755)
    out_dir = tmp_path / "run"
    env = dict(slurm_env, FWL_HOME=str(REPO), FWL_LAUNCH_PREFIX=str(prefix), FWL_SRUN_ARGS="--chdir=/",
               FWL_SETUP=f"export PATH={bin_dir}:$PATH")
    env.pop("NCCL_DEBUG", None)  # the launcher's default is under test
    job = Job(env, tmp_path / "job.out", _overrides(out_dir, "train.steps=3"), sbatch_args=("--cpus-per-task=2",),
              cwd=elsewhere)
    info = job.wait_done()
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["WorkDir"] == str(elsewhere), info  # really submitted from elsewhere
    assert train_steps(out_dir) == [1, 2, 3]

    seen = [json.loads(f.read_text()) for f in sorted(calls.glob("prefix.*.json"))]
    planner = [c for c in seen if any(a.endswith("launchers/plan_layout.py") for a in c["argv"])]
    ranks = [c for c in seen if c["argv"][1:4] == ["-m", "fwl_scale.cli", "train"]]
    assert len(planner) == 1 and len(ranks) == 2 and len(seen) == 3, seen
    # The layout check ran through the prefix, as a one-task job step (not in the batch shell).
    assert planner[0]["SLURM_STEP_ID"] is not None and planner[0]["SLURM_STEP_NUM_TASKS"] == "1", planner
    assert sorted((c["RANK"], c["SLURMD_NODENAME"]) for c in ranks) == [("0", "node1"), ("1", "node2")], ranks
    for c in planner + ranks:
        assert c["cwd"] == str(REPO), c  # srun started it in /; it went to FWL_HOME
        assert c["NCCL_DEBUG"] == "WARN", c
    for c in ranks:
        assert c["SLURM_CPUS_PER_TASK"] == "2", c

    sruns = [f.read_bytes().decode().split("\0")[:-1] for f in sorted(calls.glob("srun.*"))]
    assert len(sruns) == 2, sruns
    plan_srun, train_srun = sorted(sruns, key=lambda a: "--nodes=1" not in a)
    assert {"--nodes=1", "--ntasks=1", "--chdir=/"} <= set(plan_srun), plan_srun
    assert {"--ntasks=2", "--cpus-per-task=2", "--chdir=/"} <= set(train_srun), train_srun
    # The user's srun arguments come after the launcher's, so that theirs win.
    assert train_srun.index("--chdir=/") > train_srun.index("--cpus-per-task=2"), train_srun


def test_two_node_job_trains_and_finishes(scenarios):
    ref = scenarios["reference"].outcome()
    text = ref.job.text()
    assert ref.info["JobState"] == "COMPLETED" and ref.info["ExitCode"] == "0:0", text[-4000:]
    assert ref.info["NumNodes"] == "2" and ref.info["NodeList"] == "node[1-2]", ref.info
    assert "rank 0/2 on node1" in text and "rank 1/2 on node2" in text, text[-4000:]
    assert "training finished" in text
    start = records(ref.out_dir, "start")
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["resumed_from"] is None
    assert train_steps(ref.out_dir) == list(range(1, STEPS + 1))
    complete = (ref.out_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert complete == f"step_{STEPS:08d}"


def test_signalled_job_checkpoints_requeues_and_resumes_exactly(scenarios):
    run = scenarios["signalled"].outcome()
    text = run.job.text()
    assert run.info["JobState"] == "COMPLETED" and run.info["ExitCode"] == "0:0", text[-4000:]
    assert run.info["Restarts"] == "1", run.info
    assert f"requeued job {run.job.id}" in text and "start: restart 1," in text, text[-4000:]

    stops = records(run.out_dir, "stop")
    assert len(stops) == 1 and stops[0]["reason"] == "SIGUSR1", stops
    stop_step = stops[0]["step"]
    assert stop_step == HELD_AT  # signalled while held after that step
    starts = records(run.out_dir, "start")
    assert [s["step"] for s in starts] == [0, stop_step]
    assert starts[1]["resumed_from"].endswith(f"step_{stop_step:08d}")
    # No step lost or repeated: stopped right after a saved step, resumed at the next one.
    assert train_steps(run.out_dir) == list(range(1, STEPS + 1))
    assert_same_losses(run.out_dir, reference_losses(scenarios))

    run_id = (run.out_dir / "wandb_run_id").read_text().strip()
    wandb_runs = sorted(p.name for p in (run.out_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{run_id}") for name in wandb_runs), wandb_runs


def test_job_killed_without_warning_resumes_from_periodic_checkpoint(scenarios):
    run = scenarios["killed"].outcome()
    killed, killed_at, latest = run.seen["killed"], run.seen["killed_at"], run.seen["latest"]
    assert killed["JobState"] == "FAILED" and killed["Restarts"] == "0", killed
    assert killed_at == run.seen["step"] - 1  # killed while held at the end of that step, before its log line
    assert not records(run.out_dir, "stop")  # no warning: the trainer never got to save on its own
    resume_step = int(latest.removeprefix("step_"))
    assert resume_step % SAVE_EVERY == 0 and 2 * SAVE_EVERY <= resume_step <= killed_at

    assert run.info["JobState"] == "COMPLETED", run.job.text()[-4000:]
    starts = records(run.out_dir, "start")
    assert [s["step"] for s in starts] == [0, resume_step]
    assert starts[1]["resumed_from"].endswith(latest)
    # The steps after the checkpoint ran twice (killed, then resumed): the same losses both times.
    assert train_steps(run.out_dir) == list(range(1, killed_at + 1)) + list(range(resume_step + 1, STEPS + 1))
    redone = [r["loss"] for r in records(run.out_dir, "train") if resume_step < r["step"] <= killed_at]
    n = killed_at - resume_step
    assert redone[:n] == pytest.approx(redone[n:], rel=1e-6)
    assert_same_losses(run.out_dir, reference_losses(scenarios))


def test_job_that_cannot_requeue_chains_a_successor(scenarios):
    run = scenarios["chained"].outcome()
    first, successor = run.seen["first"], run.seen["successor"]
    text = run.job.text()
    assert first["ExitCode"] == f"{EXIT_REQUEUE}:0" and first["Restarts"] == "0", text[-4000:]
    assert "batch shell got SIGUSR1: asking every rank to checkpoint" in text
    assert "scontrol requeue refused" in text
    assert run.info["JobState"] == "COMPLETED", text[-4000:]
    assert run.info["StartTime"] >= first["EndTime"], (run.info, first)  # afterany: once the first ended
    assert f"job {successor}] training finished" in text  # the successor appended to the same log
    stop_step = records(run.out_dir, "stop")[0]["step"]
    assert stop_step == HELD_AT  # signalled while held after that step
    assert [s["step"] for s in records(run.out_dir, "start")] == [0, stop_step]
    assert train_steps(run.out_dir) == list(range(1, STEPS + 1))
    assert_same_losses(run.out_dir, reference_losses(scenarios))


def test_scancel_stops_the_job_for_good(scenarios):
    run = scenarios["cancelled"].outcome()
    text = run.job.text()
    assert run.info["JobState"] == "CANCELLED" and run.info["Restarts"] == "0", text[-4000:]
    # Still cancelled once nothing of the job is left that could requeue it.
    assert run.seen["later"]["JobState"] == "CANCELLED" and run.seen["later"]["Restarts"] == "0"
    assert len(records(run.out_dir, "start")) == 1
    assert max(train_steps(run.out_dir)) < STEPS
    assert f"requeued job {run.job.id}" not in text
    # The ranks may save on Slurm's SIGTERM and exit 75 before its SIGKILL; the batch script, if it gets
    # that far, must still not requeue a cancelled job.
    if "training stopped early after a checkpoint" in text:
        assert "not requeueing" in text, text[-4000:]


def test_time_limit_warning_checkpoints_and_requeues(scenarios):
    run = scenarios["time_limited"].outcome()
    text = run.job.text()
    # Requeued by its own script after Slurm's warning, before the limit: never TIMEOUT.
    assert run.info["JobState"] == "RUNNING" and run.info["Restarts"] == "1", run.info
    assert f"requeued job {run.job.id}" in text and "start: restart 1," in text, text[-4000:]
    stops = records(run.out_dir, "stop")  # (a second one: our final scancel, which it also survives)
    assert stops and stops[0]["reason"] == "SIGUSR1", stops  # nobody but Slurm signalled it
    starts = records(run.out_dir, "start")
    assert [s["step"] for s in starts] == [0, stops[0]["step"]]
    assert starts[1]["resumed_from"].endswith(f"step_{stops[0]['step']:08d}")
    steps = train_steps(run.out_dir)
    assert steps[: stops[0]["step"]] == list(range(1, stops[0]["step"] + 1))
    assert steps[stops[0]["step"]] == stops[0]["step"] + 1  # resumed at the next step
    assert run.seen["final"]["JobState"] == "CANCELLED"
