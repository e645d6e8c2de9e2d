# shellcheck shell=bash
# Shared body of every launcher (launchers/*.slurm). A launcher sets its #SBATCH resources and a few
# FWL_* settings, then sources this file, which runs `fwl_main "$@"`.
#
# Settings (a launcher gives defaults with `: "${FWL_X:=...}"`, so `sbatch --export=ALL,FWL_X=...` or an
# exported variable overrides them):
#   FWL_CONFIG        config file (relative to FWL_HOME)                           required
#   FWL_GLOBAL_BATCH  sequences per optimizer step; grad_accum is derived from it  (unset: keep config's)
#   FWL_TP FWL_CP FWL_PP  model-parallel degrees; dp is whatever the allocation leaves (unset: config's)
#   FWL_OUT_DIR       run directory (checkpoints, metrics, wandb id)                (unset: config's)
#   FWL_HOME          repository root                                   (default: the sbatch directory)
#   FWL_PYTHON        python interpreter                                            (default: python3)
#   FWL_MODULES       cluster modules to `module load`, e.g. "cuda/12.4 nccl"
#   FWL_SETUP         shell code run first in the batch script, e.g. "source ~/venvs/fwl/bin/activate"
#   FWL_SRUN_ARGS     extra srun arguments, e.g. pyxis "--container-image=... --container-mounts=...";
#                     they come after the launcher's own, so they win (e.g. --cpus-per-task)
#   FWL_LAUNCH_PREFIX command put before python in every task, e.g. "apptainer exec --nv fwl.sif"
#                     (with either of these two set, the layout check runs in a task too: same Python)
#   FWL_RESUME        requeue (default) | chain | none: what to do when training stops early (exit 75)
#   FWL_MAX_RESTARTS  give up after this many requeues of one job (default 100)
#   FWL_SRUN_WAIT     seconds srun waits for the other ranks after the first one exits (default 600)
# Arguments after the launcher's name (`sbatch launchers/fwl_1b.slurm train.lr=1e-4`) are config
# overrides for `fwl train`.
#
# Signal design (see docs/slurm.md): one srun task per rank runs the trainer directly (no torchrun), so
# a signal Slurm sends to the job's steps reaches every rank's Python process unchanged:
#   * time limit: `#SBATCH --signal=USR1@LEAD` sends SIGUSR1 to every task LEAD seconds before the end;
#   * preemption with GraceTime: Slurm sends SIGTERM to the tasks (or our SIGUSR1 with
#     SlurmctldParameters=preempt_send_user_signal);
#   * by hand: `scancel --signal=USR1 JOB` (steps) or `scancel --batch --signal=USR1 JOB` (this shell).
# The trainer treats SIGUSR1 and SIGTERM alike: all ranks agree (all-reduce) on the step to stop at,
# save a checkpoint and exit 75. This shell traps USR1 and TERM and forwards them to srun as SIGUSR1,
# which srun relays to every task: that covers signals aimed at the batch shell only (`B:` or
# `--batch`), and never hands srun a SIGTERM, which srun would turn into SIGKILL of all tasks.
# On exit 75 the job requeues itself (`scontrol requeue`, same job id, log appended) and resumes from
# the checkpoint just written; a job that dies with no warning resumes from its latest periodic one.

readonly FWL_EXIT_REQUEUE=75   # fwl_scale/train/signals.py EXIT_REQUEUE
FWL_SRUN_PID=""

# How every srun task of ours starts, before it execs its command: $1 is FWL_HOME. A task may start
# elsewhere than the batch shell: pyxis (--container-image) starts it in the image's WORKDIR, while the
# config, the data and the out_dir are relative to FWL_HOME. A container that does not mount FWL_HOME
# stops here with a message saying so, rather than with a missing config. (With FWL_LAUNCH_PREFIX this
# runs before the prefix: apptainer, for one, keeps the working directory it is started in.)
# shellcheck disable=SC2016  # expanded by each task's shell, not here
readonly FWL_TASK_CD='cd "$1" 2>/dev/null || {
    echo "fwl launcher: FWL_HOME=$1 does not exist inside the task on ${SLURMD_NODENAME:-$(hostname)}:" \
         "mount it at the same path (pyxis: --container-mounts=$1 in FWL_SRUN_ARGS; apptainer: --bind $1)" >&2
    exit 2
}
shift
'

fwl_log() { printf '[fwl-launcher %(%F %T)T job %s] %s\n' -1 "${SLURM_JOB_ID:-?}" "$*"; }
fwl_die() { fwl_log "ERROR: $*" >&2; exit 2; }

fwl_setup_env() {
    if [[ -n "${FWL_MODULES:-}" ]]; then
        # A batch script is no login shell: `module` may still have to be defined.
        local init
        for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh; do
            # shellcheck disable=SC1090
            command -v module >/dev/null 2>&1 || { [[ -f $init ]] && source "$init"; }
        done
        command -v module >/dev/null 2>&1 || fwl_die "FWL_MODULES is set but there is no 'module' command"
        # shellcheck disable=SC2086
        module load $FWL_MODULES || fwl_die "module load $FWL_MODULES failed"
    fi
    if [[ -n "${FWL_SETUP:-}" ]]; then
        eval "$FWL_SETUP" || fwl_die "FWL_SETUP failed: $FWL_SETUP"
    fi
    FWL_PYTHON=${FWL_PYTHON:-python3}
    export PYTHONPATH="$FWL_HOME${PYTHONPATH:+:$PYTHONPATH}"
    # One thread pool per rank sized to its CPUs, not to the whole node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # NCCL says why a collective failed or hangs (which rank, which transport) only at WARN or above, and
    # WARN is quiet on a healthy run. The user's value wins (NCCL_DEBUG=INFO to debug a start-up).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # A job log is not a terminal: a progress-bar line every 30 s rather than every step.
    export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}
}

# Sets FWL_NODES, FWL_TASKS_PER_NODE, FWL_WORLD and FWL_LAYOUT (overrides that pin dp and grad_accum),
# or stops the job with the planner's message before anything is launched.
fwl_plan_layout() {
    FWL_NODES=${SLURM_JOB_NUM_NODES:?not inside a Slurm job}
    FWL_WORLD=${SLURM_NTASKS:?the launcher needs --ntasks-per-node (one task per GPU)}
    if (( FWL_WORLD % FWL_NODES != 0 )); then
        fwl_die "layout does not fit the allocation: $FWL_WORLD tasks over $FWL_NODES nodes is uneven; use --ntasks-per-node"
    fi
    FWL_TASKS_PER_NODE=$(( FWL_WORLD / FWL_NODES ))
    local args=(--config "$FWL_CONFIG" --nodes "$FWL_NODES" --tasks-per-node "$FWL_TASKS_PER_NODE"
                --gpus-per-node "${SLURM_GPUS_ON_NODE:-0}")
    [[ -n "${FWL_GLOBAL_BATCH:-}" ]] && args+=(--global-batch "$FWL_GLOBAL_BATCH")
    local planner=("$FWL_PYTHON" "$FWL_HOME/launchers/plan_layout.py" "${args[@]}" -- "${FWL_OVERRIDES[@]}")
    if [[ -n "${FWL_SRUN_ARGS:-}" || -n "${FWL_LAUNCH_PREFIX:-}" ]]; then
        # Training runs in a container or an environment of its own: check the layout there too, with the
        # Python (and PyYAML) the ranks will have, as one task on one node of the allocation.
        local srun_args=(--nodes=1 --ntasks=1 --ntasks-per-node=1) prefix=()
        # shellcheck disable=SC2206
        [[ -n "${FWL_SRUN_ARGS:-}" ]] && srun_args+=($FWL_SRUN_ARGS)
        # shellcheck disable=SC2206
        [[ -n "${FWL_LAUNCH_PREFIX:-}" ]] && prefix=($FWL_LAUNCH_PREFIX)
        planner=(srun "${srun_args[@]}" bash -c "$FWL_TASK_CD"'exec "$@"' fwl-plan "$FWL_HOME"
                 "${prefix[@]}" "${planner[@]}")
    fi
    local out line
    out=$("${planner[@]}") || fwl_die "stopping before training (see the message above)"
    FWL_LAYOUT=()
    while IFS= read -r line; do
        # Only `key=value` overrides: a container or a prefix may print a banner on stdout as well.
        if [[ $line =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]]; then
            FWL_LAYOUT+=("$line")
        elif [[ -n $line ]]; then
            fwl_log "layout check printed a line that is no override (ignored): $line"
        fi
    done <<<"$out"
}

fwl_rendezvous() {
    # The first node of the allocation hosts the rendezvous, as torch.distributed's env:// expects.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n "$MASTER_ADDR" ]] || fwl_die "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
    # A port per job and per incarnation: jobs sharing a node never collide, and a requeued job never
    # meets a socket its previous incarnation left in TIME_WAIT.
    MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 16 + ${SLURM_RESTART_COUNT:-0}) % 40000 ))
    export MASTER_ADDR MASTER_PORT
}

fwl_forward_signal() {  # $1: the signal this shell received
    if [[ -n "$FWL_SRUN_PID" ]]; then
        fwl_log "batch shell got SIG$1: asking every rank to checkpoint and stop (SIGUSR1 via srun)"
        kill -USR1 "$FWL_SRUN_PID" 2>/dev/null
    else
        fwl_log "batch shell got SIG$1 while no training runs"
    fi
    return 0
}

# Runs one task per rank and returns srun's exit status (the highest of the ranks').
fwl_train() {
    local prefix=()
    # shellcheck disable=SC2206
    [[ -n "${FWL_LAUNCH_PREFIX:-}" ]] && prefix=($FWL_LAUNCH_PREFIX)
    # --kill-on-bad-exit=0: a rank that exits first (75, after the checkpoint) must not take down the
    # others while they finish; --wait bounds how long a crashed rank can leave the rest hanging.
    local srun_args=(--ntasks="$FWL_WORLD" --ntasks-per-node="$FWL_TASKS_PER_NODE" --kill-on-bad-exit=0
                     --wait="${FWL_SRUN_WAIT:-600}")
    # Since Slurm 22.05 srun no longer takes the job's --cpus-per-task from SLURM_CPUS_PER_TASK: without
    # it each rank gets (and, with task/affinity or cgroups, is bound to) one CPU.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # shellcheck disable=SC2206
    [[ -n "${FWL_SRUN_ARGS:-}" ]] && srun_args+=($FWL_SRUN_ARGS)  # last: the user's arguments win
    # Each task goes to FWL_HOME, maps Slurm's ids to the variables torch.distributed reads, says where it
    # runs, then becomes the trainer (exec), so signals reach Python directly.
    # shellcheck disable=SC2016  # expanded by each task's shell, not here
    srun "${srun_args[@]}" bash -c "$FWL_TASK_CD"'
         export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
         echo "[fwl-launcher] rank $RANK/$WORLD_SIZE on $SLURMD_NODENAME (local rank $LOCAL_RANK)"
         exec "$@"' fwl-rank "$FWL_HOME" \
        "${prefix[@]}" "$FWL_PYTHON" -m fwl_scale.cli train "$FWL_CONFIG" \
        "${FWL_OVERRIDES[@]}" "${FWL_LAYOUT[@]}" &
    FWL_SRUN_PID=$!
    local rc
    while :; do
        wait "$FWL_SRUN_PID"
        rc=$?
        # `wait` also returns when a trapped signal arrives; bash keeps srun's real status for later.
        kill -0 "$FWL_SRUN_PID" 2>/dev/null || { wait "$FWL_SRUN_PID"; rc=$?; break; }
    done
    FWL_SRUN_PID=""
    return "$rc"
}

fwl_job_field() {  # fwl_job_field NAME: one field of `scontrol show job` for this job
    scontrol show job -o "$SLURM_JOB_ID" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

fwl_requeue_self() {  # requeues this job; succeeds when Slurm took the requeue
    scontrol requeue "$SLURM_JOB_ID" && return 0
    # A requeue SIGTERMs the job's processes at once, scontrol's own too when it has not exited yet: its
    # status then may say failure while the job is already on its way back (seen under load: a requeued
    # job logged "not requeued").
    # Only a job still RUNNING was really refused.
    [[ "$(fwl_job_field JobState)" != RUNNING ]]
}

fwl_chain_successor() {
    # The batch script Slurm runs is a copy of the launcher; submitting it again keeps its #SBATCH block.
    # What may have been given on the sbatch command line is carried over explicitly; the successor
    # appends to this job's log, so one file tells the whole chain.
    local script="$0" succ args=()
    args+=(--dependency="afterany:$SLURM_JOB_ID" --job-name="$SLURM_JOB_NAME" --nodes="$FWL_NODES"
           --ntasks-per-node="$FWL_TASKS_PER_NODE" --open-mode=append)
    [[ -n "${SLURM_JOB_PARTITION:-}" ]] && args+=(--partition="$SLURM_JOB_PARTITION")
    [[ -n "${SLURM_JOB_ACCOUNT:-}" ]] && args+=(--account="$SLURM_JOB_ACCOUNT")
    local field
    field=$(fwl_job_field StdOut); [[ -n "$field" ]] && args+=(--output="$field")
    field=$(fwl_job_field StdErr); [[ -n "$field" ]] && args+=(--error="$field")
    field=$(fwl_job_field TimeLimit); [[ -n "$field" && "$field" != UNLIMITED ]] && args+=(--time="$field")
    succ=$(sbatch --parsable "${args[@]}" "$script" "$@") || return 1
    fwl_log "submitted successor job $succ (starts after $SLURM_JOB_ID ends, resumes from the checkpoint)"
}

fwl_main() {
    FWL_HOME=${FWL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f "$FWL_HOME/launchers/plan_layout.py" ]] \
        || fwl_die "FWL_HOME=$FWL_HOME is not the fwl_scale repository; submit from its root or set FWL_HOME"
    cd "$FWL_HOME" || fwl_die "cannot cd to $FWL_HOME"
    : "${FWL_CONFIG:?the launcher must set FWL_CONFIG}"
    [[ -f "$FWL_CONFIG" ]] || fwl_die "config $FWL_CONFIG not found under $FWL_HOME"
    # Catch the signals before anything slow runs, so an early one is not lost.
    trap 'fwl_forward_signal USR1' USR1
    trap 'fwl_forward_signal TERM' TERM

    FWL_OVERRIDES=()
    [[ -n "${FWL_TP:-}" ]] && FWL_OVERRIDES+=("parallel.tp=$FWL_TP")
    [[ -n "${FWL_CP:-}" ]] && FWL_OVERRIDES+=("parallel.cp=$FWL_CP")
    [[ -n "${FWL_PP:-}" ]] && FWL_OVERRIDES+=("parallel.pp=$FWL_PP")
    [[ -n "${FWL_OUT_DIR:-}" ]] && FWL_OVERRIDES+=("train.out_dir=$FWL_OUT_DIR")
    FWL_OVERRIDES+=("$@")   # the user's overrides win over the launcher's settings

    fwl_log "start: restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, config $FWL_CONFIG ${FWL_OVERRIDES[*]}"
    fwl_setup_env
    fwl_plan_layout
    fwl_rendezvous
    fwl_log "rendezvous $MASTER_ADDR:$MASTER_PORT; layout ${FWL_LAYOUT[*]}"

    local rc=0
    fwl_train || rc=$?
    case "$rc" in
        0)
            fwl_log "training finished"
            exit 0 ;;
        "$FWL_EXIT_REQUEUE")
            fwl_log "training stopped early after a checkpoint (exit $rc)"
            # `scancel` (and the end of the time limit) also sends SIGTERM, and the ranks may well save
            # and exit 75 before Slurm's SIGKILL; but `scontrol requeue` would happily revive a
            # cancelled job. Only a job still RUNNING was asked to stop and come back.
            local state
            state=$(fwl_job_field JobState)
            if [[ "$state" != RUNNING ]]; then
                fwl_log "job is $state (cancelled or ended by Slurm): not requeueing; resubmit to resume"
                exit "$rc"
            fi
            if (( ${SLURM_RESTART_COUNT:-0} >= ${FWL_MAX_RESTARTS:-100} )); then
                fwl_log "already restarted ${SLURM_RESTART_COUNT} times (FWL_MAX_RESTARTS); not requeueing"
                exit "$rc"
            fi
            case "${FWL_RESUME:-requeue}" in
                requeue)
                    if fwl_requeue_self; then
                        fwl_log "requeued job $SLURM_JOB_ID; it resumes from the checkpoint"
                        exit "$rc"
                    fi
                    fwl_log "scontrol requeue refused (job not requeueable here?); chaining a successor instead"
                    fwl_chain_successor "$@" || fwl_log "ERROR: could not submit a successor"
                    ;;
                chain) fwl_chain_successor "$@" || fwl_log "ERROR: could not submit a successor" ;;
                none) fwl_log "FWL_RESUME=none: resubmit the same launcher to resume" ;;
                *) fwl_log "ERROR: unknown FWL_RESUME=${FWL_RESUME} (requeue|chain|none)" ;;
            esac
            exit "$rc" ;;
        *)
            fwl_log "training failed (exit $rc); resubmit to resume from the latest complete checkpoint"
            exit "$rc" ;;
    esac
}
