"""`fwl study SPEC --slurm`: the study as a Slurm job array (one task per run, `fwl study SPEC --run
$SLURM_ARRAY_TASK_ID`) and a collection job that starts once every task has ended in any state
(`--dependency=afterany`), `fwl study SPEC --collect`.

The scripts source launchers/common.sh for the project's conventions: FWL_PYTHON, FWL_MODULES,
FWL_SETUP, FWL_LAUNCH_PREFIX, the log format and the requeue on exit 75. A task is one process (no srun):
Slurm's warning goes to the batch shell (`--signal=B:USR1@...`), which forwards SIGUSR1 to the study
process, which forwards it to the trainer; the trainer saves and exits 75, and the task requeues itself.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import fwl_scale
from fwl_scale.study import store
from fwl_scale.study.spec import StudyError, StudySpec

SIGNAL_LEAD_S = 120  # one step plus one checkpoint of a study-sized model fits easily


def fwl_home() -> Path:
    home = Path(fwl_scale.__file__).resolve().parents[1]
    if not (home / "launchers" / "common.sh").is_file():
        raise StudyError(f"--slurm needs the fwl_scale repository (launchers/common.sh), not found under {home}")
    return home


def _head(spec: StudySpec, lines: list[str]) -> str:
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        f"# Written by `fwl study {spec.path} --slurm`; `fwl study {spec.path} --list` shows the runs.",
        *lines,
        "",
        f"FWL_HOME={q(str(fwl_home()))}",
        f': "${{FWL_PYTHON:={q(sys.executable)}}}"',
        'source "$FWL_HOME/launchers/common.sh" \\',
        '    || { echo "fwl study: cannot source launchers/common.sh" >&2; exit 2; }',
        f"cd {q(str(Path.cwd()))} || fwl_die \"cannot cd to the study's working directory\"",
    ])


def array_script(spec: StudySpec) -> str:
    q = shlex.quote
    logs = (spec.out_dir / "logs").resolve()
    spec_path = q(str(spec.path.resolve()))
    head = _head(spec, [
        f"#SBATCH --job-name=fwl_study_{spec.name}",
        f"#SBATCH --array=0-{len(spec.runs) - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/slurm-%A_%a.out",
    ])
    return head + f"""
FWL_STUDY_PID=""
fwl_study_forward() {{  # $1: the signal this shell received
    fwl_log "batch shell got SIG$1: asking the run to checkpoint and stop (SIGUSR1)"
    [[ -n "$FWL_STUDY_PID" ]] && kill -USR1 "$FWL_STUDY_PID" 2>/dev/null
    return 0
}}
trap 'fwl_study_forward USR1' USR1
trap 'fwl_study_forward TERM' TERM
fwl_setup_env
prefix=()
# shellcheck disable=SC2206
[[ -n "${{FWL_LAUNCH_PREFIX:-}}" ]] && prefix=($FWL_LAUNCH_PREFIX)
fwl_log "study {spec.name}: run $SLURM_ARRAY_TASK_ID, restart ${{SLURM_RESTART_COUNT:-0}}"
"${{prefix[@]}}" "$FWL_PYTHON" -m fwl_scale.cli study {spec_path} --run "$SLURM_ARRAY_TASK_ID" &
FWL_STUDY_PID=$!
while :; do
    wait "$FWL_STUDY_PID"
    rc=$?
    # `wait` also returns when a trapped signal arrives; bash keeps the real status for later.
    kill -0 "$FWL_STUDY_PID" 2>/dev/null || {{ wait "$FWL_STUDY_PID"; rc=$?; break; }}
done
if (( rc == FWL_EXIT_REQUEUE )); then
    state=$(fwl_job_field JobState)
    if [[ "$state" == RUNNING ]] && (( ${{SLURM_RESTART_COUNT:-0}} < ${{FWL_MAX_RESTARTS:-100}} )) \\
            && fwl_requeue_self; then
        fwl_log "requeued job $SLURM_JOB_ID; the run resumes from its checkpoint"
    else
        fwl_log "run stopped after a checkpoint, not requeued (job $state); fwl study --slurm again resumes it"
    fi
fi
fwl_log "study {spec.name}: run $SLURM_ARRAY_TASK_ID exited with $rc"
exit "$rc"
"""


def collect_script(spec: StudySpec) -> str:
    logs = (spec.out_dir / "logs").resolve()
    head = _head(spec, [
        f"#SBATCH --job-name=fwl_study_{spec.name}_collect",
        "#SBATCH --ntasks=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}/slurm-collect-%j.out",
    ])
    return head + f"""
fwl_setup_env
exec "$FWL_PYTHON" -m fwl_scale.cli study {shlex.quote(str(spec.path.resolve()))} --collect
"""


def _sbatch(args: list[str]) -> str:
    try:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise StudyError("--slurm: no sbatch command here (submit from a Slurm login node)") from None
    if out.returncode != 0:
        raise StudyError(f"sbatch {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def submit(spec: StudySpec, sbatch_args: list[str]) -> tuple[str, str]:
    """Writes OUT/study.sbatch and OUT/study_collect.sbatch and submits both; returns their job ids.
    `sbatch_args` (partition, account, time, gres, ...) go to both jobs, --array=... only to the array."""
    (spec.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    array_path, collect_path = spec.out_dir / "study.sbatch", spec.out_dir / "study_collect.sbatch"
    store.write_bytes(array_path, array_script(spec).encode())
    store.write_bytes(collect_path, collect_script(spec).encode())
    array_id = _sbatch([*sbatch_args, str(array_path)])
    collect_args, skip = [], False
    for a in sbatch_args:
        if skip or a.startswith(("--array=", "-a")) and a not in ("--array", "-a"):
            skip = False
            continue
        if a in ("--array", "-a"):
            skip = True  # and its value
            continue
        collect_args.append(a)
    collect_id = _sbatch([f"--dependency=afterany:{array_id}", *collect_args, str(collect_path)])
    return array_id, collect_id
