"""What a rank meets before training, on CPU and without Slurm (the same on the local Slurm cluster:
tests/test_slurm.py, test_launcher_in_a_container_environment):

- the GPU a node-local rank takes is `local_rank % GPUs it sees`, so a site that binds one GPU per task
  (local rank 3 sees one GPU) works, and LOCAL_RANK then names that GPU for DeepSpeed;
- NCCL_DEBUG=WARN unless the user chose otherwise (the trainer on CUDA, and launchers/common.sh);
- launchers/common.sh: each task goes to FWL_HOME before its command, or stops with a message saying to
  mount it; the layout check runs as a one-task srun step through FWL_LAUNCH_PREFIX when that (or
  FWL_SRUN_ARGS) is set, on the host's Python otherwise, and stops the job with the planner's message.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwl_scale.config import ConfigError
from fwl_scale.device import cuda_device_index, select_cuda_device
from fwl_scale.train.distributed import prepare_environment

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "launchers" / "common.sh"


@pytest.fixture
def environ():
    """os.environ as it was before the test: the code under test writes to it."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("local_rank,count,index", [
    (0, 8, 0), (3, 8, 3), (7, 8, 7),  # every rank of the node sees all its GPUs (--gpus-per-node)
    (0, 1, 0), (3, 1, 0), (7, 1, 0),  # one GPU bound per task: each sees only its own
    (5, 4, 1), (3, 2, 1),             # more ranks than GPUs seen: shared (NCCL refuses that at start-up)
])
def test_cuda_device_index(local_rank, count, index):
    assert cuda_device_index(local_rank, count) == index


def test_cuda_device_index_without_a_gpu_says_so(environ):
    environ["CUDA_VISIBLE_DEVICES"] = ""
    with pytest.raises(ConfigError, match=r"local rank 3 is to train on a GPU but sees none "
                                          r"\(CUDA_VISIBLE_DEVICES=''\)"):
        cuda_device_index(3, 0)
    with pytest.raises(ConfigError, match="LOCAL_RANK=-1"):
        cuda_device_index(-1, 2)


def test_select_cuda_device_with_one_gpu_bound_per_task(environ, monkeypatch):
    """Local rank 3 where CUDA_VISIBLE_DEVICES holds one GPU: device 0 is made current, and LOCAL_RANK
    (DeepSpeed's device ordinal) says 0."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    environ["LOCAL_RANK"] = "3"
    assert select_cuda_device(3) == torch.device("cuda", 0)
    assert current == [0] and environ["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("device,user,want", [
    ("cuda", None, "WARN"), ("cuda", "INFO", "INFO"), ("cpu", None, None)])
def test_nccl_debug_defaults_to_warn_on_cuda(environ, device, user, want):
    environ.update(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    environ.pop("NCCL_DEBUG", None)
    if user is not None:
        environ["NCCL_DEBUG"] = user
    assert prepare_environment(torch.device(device)) == (3, 4, 3)
    assert environ.get("NCCL_DEBUG") == want


def bash(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`script` in bash with launchers/common.sh sourced (it only defines things)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FWL_", "NCCL_"))}
    full.update(env)
    return subprocess.run(["bash", "-c", f"source {COMMON}\n{script}"], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=120)


def test_setup_env_sets_nccl_debug_unless_the_user_did(tmp_path):
    script = "FWL_HOME=$PWD; fwl_setup_env; echo \"$NCCL_DEBUG\""
    assert bash(script, tmp_path).stdout == "WARN\n"
    assert bash(script, tmp_path, NCCL_DEBUG="INFO").stdout == "INFO\n"


def test_task_goes_to_fwl_home_or_says_to_mount_it(tmp_path):
    """FWL_TASK_CD, the start of every srun task: from wherever the task starts (pyxis: the image's
    WORKDIR) to FWL_HOME, or exit 2 naming FWL_HOME and the mount that is missing."""
    home = tmp_path / "home"
    home.mkdir()
    run = bash(f"bash -c \"$FWL_TASK_CD\"'exec \"$@\"' fwl-rank {home} pwd", Path("/"))
    assert run.returncode == 0 and run.stdout == f"{home}\n", run
    run = bash(f"bash -c \"$FWL_TASK_CD\"'exec \"$@\"' fwl-rank {tmp_path}/missing pwd", Path("/"),
               SLURMD_NODENAME="node7")
    assert run.returncode == 2 and not run.stdout, run
    assert (f"fwl launcher: FWL_HOME={tmp_path}/missing does not exist inside the task on node7: mount it at "
            f"the same path (pyxis: --container-mounts={tmp_path}/missing in FWL_SRUN_ARGS") in run.stderr


# srun for the planner tests: records its arguments, then runs the command after its options here, in the
# directory --chdir names if any (as pyxis starts a task in the image's WORKDIR).
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" >"{record}"
while [[ $1 == --* ]]; do
    [[ $1 == --chdir=* ]] && cd "${{1#--chdir=}}"
    shift
done
exec "$@"
"""

# A FWL_LAUNCH_PREFIX that prints a banner on stdout before it runs the command, as some containers do.
BANNER_PREFIX = """#!/bin/bash
echo "== a container banner =="
echo "ran: $*" >"{record}"
exec "$@"
"""


def plan(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """fwl_plan_layout for 2 nodes x 1 task, in the batch shell's directory (FWL_HOME), with a fake srun on
    PATH and the banner prefix available; returns the run (FWL_LAYOUT on stdout as `LAYOUT line` lines), srun's
    record and the prefix's record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun_record, prefix_record = tmp_path / "srun.args", tmp_path / "prefix.ran"
    (bin_dir / "srun").write_text(FAKE_SRUN.format(record=srun_record))
    (bin_dir / "srun").chmod(0o755)
    prefix = tmp_path / "prefix.sh"
    prefix.write_text(BANNER_PREFIX.format(record=prefix_record))
    prefix.chmod(0o755)
    env = {k: str(prefix) if v == "PREFIX" else v for k, v in env.items()}
    run = bash('FWL_OVERRIDES=(train.steps=5); fwl_plan_layout; printf "LAYOUT %s\\n" "${FWL_LAYOUT[@]}"', REPO,
               PATH=f"{bin_dir}:{os.environ['PATH']}", FWL_HOME=str(REPO), FWL_CONFIG="configs/tiny.yaml",
               FWL_PYTHON=sys.executable, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_JOB_ID="7", **env)
    return run, srun_record, prefix_record


def layout(run: subprocess.CompletedProcess) -> list[str]:
    return [line.removeprefix("LAYOUT ") for line in run.stdout.splitlines() if line.startswith("LAYOUT ")]


def test_planner_runs_on_the_host_without_a_container(tmp_path):
    run, srun_record, prefix_record = plan(tmp_path, FWL_GLOBAL_BATCH="16")
    assert run.returncode == 0, run.stderr
    assert layout(run) == ["parallel.dp=2", "parallel.grad_accum=1"]
    assert not srun_record.exists() and not prefix_record.exists()


@pytest.mark.parametrize("env", [{"FWL_LAUNCH_PREFIX": "PREFIX"},
                                 {"FWL_LAUNCH_PREFIX": "PREFIX", "FWL_SRUN_ARGS": "--chdir=/"}])
def test_planner_runs_as_a_one_task_step_through_the_prefix(tmp_path, env):
    run, srun_record, prefix_record = plan(tmp_path, FWL_GLOBAL_BATCH="16", **env)
    assert run.returncode == 0, run.stderr
    assert layout(run) == ["parallel.dp=2", "parallel.grad_accum=1"]  # the banner is no override: logged
    assert "layout check printed a line that is no override (ignored): == a container banner ==" in run.stdout
    srun_args = srun_record.read_text().splitlines()
    assert srun_args[:3] == ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1"], srun_args
    assert ("--chdir=/" in srun_args) == ("FWL_SRUN_ARGS" in env)  # started in /, went to FWL_HOME
    assert prefix_record.read_text().startswith(f"ran: {sys.executable} {REPO}/launchers/plan_layout.py ")


def test_planner_in_a_step_still_stops_the_job_with_its_message(tmp_path):
    run, srun_record, _ = plan(tmp_path, FWL_GLOBAL_BATCH="12", FWL_SRUN_ARGS="--chdir=/")
    assert run.returncode == 2 and srun_record.exists()
    assert "fwl launcher: layout does not fit the allocation: global batch 12 is not a multiple" in run.stderr
    assert "stopping before training" in run.stderr
    assert run.stdout == "", run.stdout
