"""The local two-node Slurm cluster the Slurm tests run on (tools/slurm_cluster.sh), and what they share:
the cluster fixture, job-state polling, the metrics a running job has written so far.

The cluster is started here (root; Debian packages installed on demand). The tests skip only when Slurm
cannot be installed (no root, no apt, no package mirror); FWL_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fwl_scale.signal_points import TEST_HOLD_ENV
from tests.train_support import need_corpus, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
JOB_TIMEOUT = 420  # seconds; generous: up to five jobs share two CPU cores with whatever else runs


def unavailable(reason: str) -> None:
    if os.environ.get("FWL_REQUIRE_SLURM") == "1":
        pytest.fail(f"FWL_REQUIRE_SLURM=1 but the local Slurm cluster is unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Starts the local cluster (idempotent) and returns the environment for sbatch/squeue/scancel."""
    need_corpus()
    state_dir = os.environ.get("FWL_SLURM_DIR", "/tmp/fwl-slurm")
    # One cluster per host at a time: another copy of the suite (a second checkout tested at the same time)
    # would reconfigure, restart or stop it under this module's jobs. Its module waits for this one's end.
    with open(f"{state_dir}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _cluster(state_dir, tmp_path_factory)


def _cluster(state_dir: str, tmp_path_factory) -> Iterator[dict[str, str]]:
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and os.geteuid() != 0:
        unavailable("Slurm is not installed and installing it needs root")
    if not installed and not shutil.which("apt-get"):
        unavailable("Slurm is not installed and there is no apt-get to install it")
    # Four CPUs per node: up to four of the 1-CPU-per-node test jobs run at once.
    env = dict(os.environ, FWL_SLURM_DIR=state_dir, FWL_SLURM_CPUS="4")
    # A cluster someone already runs is left running; one started here is stopped at the end.
    was_running = installed and subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True,
                                               timeout=60).returncode == 0
    proc = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = proc.stderr.strip()[-2000:]
        if "apt-get" in message and not installed:  # no package mirror: the one acceptable reason to skip
            unavailable(f"cannot install Slurm: {message}")
        pytest.fail(f"tools/slurm_cluster.sh start failed:\n{message}")
    try:
        env["SLURM_CONF"] = f"{state_dir}/slurm.conf"
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        env.update(OMP_NUM_THREADS="1", FWL_PYTHON=sys.executable)
        # Tokenizer and shards once, before any job: two jobs must not build them at the same time.
        prep = subprocess.run([sys.executable, "-m", "fwl_scale.cli", "data", "shards", "configs/tiny.yaml",
                               *tiny_overrides(tmp_path_factory.mktemp("prep"))], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert prep.returncode == 0, prep.stderr[-3000:]
        yield env
    finally:
        if not was_running:
            subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def records_safe(out_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Records of metrics.jsonl, read while the run may be appending (a torn last line is skipped)."""
    path = out_dir / "metrics.jsonl"
    found = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("kind") == kind:
                found.append(r)
    return found


def logged_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in records_safe(out_dir, "train")]


def hold_at(work: Path, step: int) -> dict[str, str]:
    """Environment that makes every rank wait at the end of step `step` (the test hook in
    fwl_scale/train/signals.py) until it gets a stop signal or the test calls `release`: a signal or a
    kill lands at a known step, however fast or slow the run and the signal's delivery are."""
    return {TEST_HOLD_ENV: f"step@{step + 1}:{work / 'release'}"}


def release(work: Path) -> None:
    (work / "release").touch()


def array_states(env: dict[str, str], job_id: str) -> dict[str, dict[str, str]]:
    """`scontrol show job` of a job array: fields per task (ArrayTaskId), or of a plain job under ''."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    tasks = {}
    for line in out.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        tasks[fields.get("ArrayTaskId", "")] = fields
    return tasks
