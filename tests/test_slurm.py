"""The Slurm launchers on a real two-node Slurm cluster (tools/slurm_cluster.sh), end to end.

- `sbatch launchers/tiny.slurm` trains across 2 nodes (2 ranks) and finishes: the reference run;
- a job signalled mid-run (`scancel --signal=USR1`: what `--signal=USR1@lead` does at the time limit)
  checkpoints, requeues itself (same job id) and resumes with no step lost and the reference's losses,
  in the same wandb run;
- a job killed with no warning (SIGKILL to every process, batch shell included) resumes from its last
  periodic checkpoint when resubmitted;
- a job that may not requeue (`--no-requeue`), signalled through its batch shell only
  (`scancel --batch --signal=USR1`), chains a successor (`afterany`) that finishes the run;
- a launcher whose layout cannot fit its allocation fails before training with a clear message.

The cluster is started here (root, Debian packages installed on demand). The tests skip only when it
cannot be installed or started for lack of root or a package mirror; FWL_REQUIRE_SLURM=1 (CI) turns
that into a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train_support import need_corpus, records, step_losses, tiny_overrides

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
LAUNCHER = "launchers/tiny.slurm"
STEPS = 100
SAVE_EVERY = 20
EXIT_REQUEUE = 75


def _unavailable(reason: str) -> None:
    if os.environ.get("FWL_REQUIRE_SLURM") == "1":
        pytest.fail(f"FWL_REQUIRE_SLURM=1 but the local Slurm cluster is unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    """Starts the local cluster (idempotent) and returns the environment for sbatch/squeue/scancel."""
    need_corpus()
    state_dir = os.environ.get("FWL_SLURM_DIR", "/tmp/fwl-slurm")
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and os.geteuid() != 0:
        _unavailable("Slurm is not installed and installing it needs root")
    if not installed and not shutil.which("apt-get"):
        _unavailable("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, FWL_SLURM_DIR=state_dir)
    proc = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = proc.stderr.strip()[-2000:]
        if "apt-get" in message and not installed:  # no package mirror: the one acceptable reason to skip
            _unavailable(f"cannot install Slurm: {message}")
        pytest.fail(f"tools/slurm_cluster.sh start failed:\n{message}")
    env["SLURM_CONF"] = f"{state_dir}/slurm.conf"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", FWL_PYTHON=shutil.which("python3") or "python3")
    # Tokenizer and shards once, before any job: two jobs must not build them at the same time.
    prep = subprocess.run(["python3", "-m", "fwl_scale.cli", "data", "shards", "configs/tiny.yaml",
                           *_overrides(tmp_path_factory.mktemp("prep"))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr[-3000:]
    return env


def _overrides(out_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(out_dir, f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
                          "train.eval_every=1000", *extra)


class Job:
    """One sbatch submission of a launcher, with its log."""

    def __init__(self, env: dict[str, str], log: Path, args: list[str], sbatch_args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None):
        self.env = dict(env, **(extra_env or {}))
        self.log = log
        out = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_args, LAUNCHER, *args],
                             cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        self.id = out.stdout.strip().split(";")[0]

    def info(self, job_id: str | None = None) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id or self.id], env=self.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        fields = {}
        for item in out.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_done(self, timeout: float = 240, job_id: str | None = None) -> dict[str, str]:
        """Waits until the job has ended for good (not pending, running or being requeued)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        self.cancel()
        pytest.fail(f"job {job_id or self.id} did not end in {timeout}s; log:\n{self.text()[-4000:]}")

    def wait_step(self, out_dir: Path, step: int, timeout: float = 180) -> int:
        """Waits until the run logged a training step >= `step`; returns the newest step."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [r["step"] for r in records(out_dir, "train")]
            if steps and max(steps) >= step:
                return max(steps)
            state = self.info()["JobState"]
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), \
                f"job {self.id} is {state} before step {step}; log:\n{self.text()[-4000:]}"
            time.sleep(0.2)
        self.cancel()
        pytest.fail(f"job {self.id} did not reach step {step} in {timeout}s; log:\n{self.text()[-4000:]}")

    def scancel(self, *args: str) -> None:
        out = subprocess.run(["scancel", *args, self.id], env=self.env, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr

    def kill_processes(self) -> None:
        """SIGKILL to every process of the job on both nodes (by pid, from `scontrol listpids`)."""
        pids = []
        for node in ("node1", "node2"):
            out = subprocess.run(["scontrol", "listpids", self.id, node], env=self.env, capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            pids += [int(line.split()[0]) for line in out.stdout.splitlines()[1:] if line.strip()]
        assert len(pids) >= 3, f"expected the batch shell and two ranks, got pids {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, capture_output=True, timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


def train_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in records(out_dir, "train")]


def assert_same_losses(out_dir: Path, reference: dict[int, float], steps: range) -> None:
    losses = step_losses(out_dir)
    for step in steps:
        assert step in losses, f"step {step} missing from {out_dir}/metrics.jsonl"
        assert losses[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), \
            f"step {step}: loss {losses[step]} differs from the uninterrupted run's {reference[step]}"


@pytest.fixture(scope="module")
def reference(slurm_env, tmp_path_factory) -> tuple[Path, Job]:
    """The uninterrupted run, submitted once; the tests below compare their losses with it."""
    work = tmp_path_factory.mktemp("ref")
    out_dir = work / "run"
    job = Job(slurm_env, work / "job.out", _overrides(out_dir))
    return out_dir, job


@pytest.mark.parametrize("settings,extra,message", [
    ({"FWL_TP": "4"}, ["model.n_heads=4"],
     "2 node(s) x 1 task(s) = 2 ranks is not a multiple of tp*cp*pp = 4*1*1 = 4"),
    ({"FWL_GLOBAL_BATCH": "12"}, [],
     "global batch 12 is not a multiple of micro_batch * dp = 4 * 2 = 8 (2 node(s) x 1 task(s)"),
], ids=["tp-exceeds-ranks", "global-batch"])
def test_layout_that_cannot_fit_fails_before_training(slurm_env, reference, tmp_path, settings, extra, message):
    # (`reference` only so that the reference run is already training meanwhile)
    out_dir = tmp_path / "run"
    job = Job(slurm_env, tmp_path / "job.out", _overrides(out_dir, *extra), extra_env=settings)
    info = job.wait_done(timeout=60)
    text = job.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert f"fwl launcher: layout does not fit the allocation: {message}" in text, text
    assert "stopping before training" in text
    # Nothing was launched: no rank started, no run directory was written.
    assert "[fwl-launcher] rank" not in text
    assert not out_dir.exists()


def test_two_node_job_trains_and_finishes(reference):
    out_dir, job = reference
    info = job.wait_done()
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert "rank 0/2 on node1" in text and "rank 1/2 on node2" in text, text[-4000:]
    assert "training finished" in text
    start = records(out_dir, "start")
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["resumed_from"] is None
    assert train_steps(out_dir) == list(range(1, STEPS + 1))
    complete = (out_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert complete == f"step_{STEPS:08d}"


def test_signalled_job_checkpoints_requeues_and_resumes_exactly(slurm_env, reference, tmp_path):
    ref_dir, ref_job = reference
    out_dir = tmp_path / "run"
    # wandb on (offline): the requeued job must continue the same wandb run.
    job = Job(slurm_env, tmp_path / "job.out", _overrides(out_dir, "train.wandb.enabled=true",
                                                           "train.wandb.mode=offline"))
    seen = job.wait_step(out_dir, 15)
    assert seen < STEPS - 10, f"the run was too fast to be signalled mid-run (step {seen})"
    # Exactly what `#SBATCH --signal=USR1@lead` does before the time limit: SIGUSR1 to the job steps.
    job.scancel("--signal=USR1")
    info = job.wait_done()
    text = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert info["Restarts"] == "1", info
    assert f"requeued job {job.id}" in text and "restart 1," in text, text[-4000:]

    stops = records(out_dir, "stop")
    assert len(stops) == 1
    stop_step = stops[0]["step"]
    assert seen <= stop_step < STEPS
    starts = records(out_dir, "start")
    assert [s["step"] for s in starts] == [0, stop_step]
    assert starts[1]["resumed_from"].endswith(f"step_{stop_step:08d}")
    # No step lost or repeated: stopped right after a saved step, resumed at the next one.
    assert train_steps(out_dir) == list(range(1, STEPS + 1))
    ref_job.wait_done()
    assert_same_losses(out_dir, step_losses(ref_dir), range(1, STEPS + 1))

    run_id = (out_dir / "wandb_run_id").read_text().strip()
    wandb_runs = sorted(p.name for p in (out_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{run_id}") for name in wandb_runs), wandb_runs


def test_job_killed_without_warning_resumes_from_periodic_checkpoint(slurm_env, reference, tmp_path):
    ref_dir, ref_job = reference
    out_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    job = Job(slurm_env, log, _overrides(out_dir))
    seen = job.wait_step(out_dir, 2 * SAVE_EVERY + 5)
    assert seen < STEPS, f"the run was too fast to be killed mid-run (step {seen})"
    # No warning: SIGKILL to every process of the job, batch shell included, as a crashing node or the
    # OOM killer would. (`scancel --signal=KILL` is no such test: Slurm turns it into a cancel, which
    # sends SIGTERM first.) Nothing can save or requeue.
    job.kill_processes()
    info = job.wait_done(timeout=60)
    assert info["JobState"] != "COMPLETED" and info["Restarts"] == "0", info
    killed_at = max(train_steps(out_dir))
    assert killed_at < STEPS and not records(out_dir, "stop")
    latest = (out_dir / "checkpoints" / "latest_complete").read_text().strip()
    resume_step = int(latest.removeprefix("step_"))
    assert resume_step % SAVE_EVERY == 0 and SAVE_EVERY * 2 <= resume_step <= killed_at

    again = Job(slurm_env, log, _overrides(out_dir))  # the user resubmits the same launcher
    info = again.wait_done()
    assert info["JobState"] == "COMPLETED", again.text()[-4000:]
    starts = records(out_dir, "start")
    assert [s["step"] for s in starts] == [0, resume_step]
    assert starts[1]["resumed_from"].endswith(latest)
    # The steps after the checkpoint ran twice (killed, then resumed) and the last attempt counts.
    assert train_steps(out_dir) == list(range(1, killed_at + 1)) + list(range(resume_step + 1, STEPS + 1))
    ref_job.wait_done()
    assert_same_losses(out_dir, step_losses(ref_dir), range(1, STEPS + 1))
    redone = [r for r in records(out_dir, "train") if resume_step < r["step"] <= killed_at]
    first, second = redone[: killed_at - resume_step], redone[killed_at - resume_step:]
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in second], rel=1e-6)


def test_job_that_cannot_requeue_chains_a_successor(slurm_env, reference, tmp_path):
    ref_dir, ref_job = reference
    out_dir = tmp_path / "run"
    job = Job(slurm_env, tmp_path / "job.out", _overrides(out_dir), sbatch_args=("--no-requeue",))
    job.wait_step(out_dir, 15)
    # The signal reaches the batch shell only; its trap forwards it to every rank through srun.
    job.scancel("--batch", "--signal=USR1")
    info = job.wait_done()
    text = job.text()
    assert info["ExitCode"] == f"{EXIT_REQUEUE}:0" and info["Restarts"] == "0", text[-4000:]
    assert "batch shell got SIGUSR1: asking every rank to checkpoint" in text
    assert "scontrol requeue refused" in text
    successor = next(line.split("submitted successor job ")[1].split()[0]
                     for line in text.splitlines() if "submitted successor job" in line)
    succ_info = job.wait_done(job_id=successor)
    assert succ_info["JobState"] == "COMPLETED", job.text()[-4000:]
    assert succ_info["StartTime"] >= info["EndTime"], (succ_info, info)  # afterany: only once it ended
    stop_step = records(out_dir, "stop")[0]["step"]
    assert [s["step"] for s in records(out_dir, "start")] == [0, stop_step]
    assert train_steps(out_dir) == list(range(1, STEPS + 1))
    ref_job.wait_done()
    assert_same_losses(out_dir, step_losses(ref_dir), range(1, STEPS + 1))
    # The successor appended to the same log.
    assert f"job {successor}] training finished" in job.text()
