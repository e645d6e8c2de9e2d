#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and for trying the launchers.
#
#   tools/slurm_cluster.sh start    install Debian's slurmctld/slurmd/slurm-client/munge if missing, write
#                                   the config, start munged, slurmctld and two slurmds (node1, node2),
#                                   wait until both nodes are idle. Idempotent: a running cluster is kept.
#   tools/slurm_cluster.sh stop     cancel its jobs and stop its daemons (state is kept)
#   tools/slurm_cluster.sh clean    stop, then delete the state directory
#   tools/slurm_cluster.sh status   daemons and sinfo; exit 0 only when both nodes are up
#   tools/slurm_cluster.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/squeue/...)
#
# Everything lives under $FWL_SLURM_DIR (default /tmp/fwl-slurm): its own munge key and socket, the
# slurm.conf, controller state, spool directories, logs and pid files, so it never touches a system
# Slurm or munge. Node names are made resolvable with one marked line in /etc/hosts (removed by stop),
# because the launchers take MASTER_ADDR from SLURM_JOB_NODELIST, as on a real cluster.
# Needs root (slurmd launches jobs as their owner; apt installs the packages).
set -euo pipefail

STATE_DIR=${FWL_SLURM_DIR:-/tmp/fwl-slurm}
NODES=(node1 node2)
# CPUs each node offers to jobs. Both nodes share this machine's cores; more CPUs than cores is fine
# (SlurmdParameters=config_overrides) and lets several small test jobs run at once.
CPUS_PER_NODE=${FWL_SLURM_CPUS:-4}
CTLD_PORT=${FWL_SLURM_PORT:-16817}          # node i listens on CTLD_PORT + i
HOSTS_MARK="# fwl-slurm local cluster"
CONF="$STATE_DIR/slurm.conf"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"
export SLURM_CONF="$CONF"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() {  # alive PIDFILE: the process recorded there is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root to install them"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Debian's postinst scripts would start the system's munged/slurmd/slurmctld (with a config that
    # does not exist yet); a policy-rc.d that answers 101 ("action forbidden") stops that, as in Docker.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from tools/slurm_cluster.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    local ok=1
    apt-get update -qq || { ok=0; log "apt-get update failed (no network to the package mirror?)"; }
    if ((ok)); then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || ok=0
    fi
    ((own_policy)) && rm -f "$policy"
    ((ok)) || die "apt-get install ${missing[*]} failed"
}

write_config() {
    mkdir -p "$STATE_DIR"/{munge,ctld,log,run} "${NODES[@]/#/$STATE_DIR/spool/}"
    chmod 700 "$STATE_DIR/munge"
    local host
    host=$(hostname -s)
    local tmp="$CONF.tmp"
    cat >"$tmp" <<EOF
# Written by tools/slurm_cluster.sh: two slurmds on one host, everything under $STATE_DIR.
ClusterName=fwllocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged; cred_expire also bounds how long a requeued job waits before it may start again
# (default 120 s), kept short so requeue tests run in seconds.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
# No cgroups needed: process tracking through /proc works in containers and VMs alike.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
EOF
    local i=1 node
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + i)) CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN" >>"$tmp"
        i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$tmp"
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    mv "$tmp" "$CONF"
    # Running daemons read the old file: restart them (munged keeps running, jobs are cancelled).
    if alive "$STATE_DIR/run/slurmctld.own.pid"; then
        log "configuration changed: restarting slurmctld and the slurmds"
        stop_slurm
    fi
}

ensure_hosts() {
    local node missing=()
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null || missing+=("$node")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    echo "127.0.0.1 ${missing[*]} $HOSTS_MARK" >>/etc/hosts || die "cannot add ${missing[*]} to /etc/hosts"
}

remove_hosts() {
    grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
    local kept
    kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

start_munge() {
    alive "$STATE_DIR/run/munged.pid" && return 0
    if [[ ! -s "$STATE_DIR/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE_DIR/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCKET"
    # --force: the state directory may sit under a world-writable /tmp, which munged otherwise refuses.
    munged --force --key-file="$STATE_DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE_DIR/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" \
        || die "munged failed to start; see $STATE_DIR/log/munged.log"
    for _ in $(seq 50); do
        munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged is not answering on $MUNGE_SOCKET; see $STATE_DIR/log/munged.log"
}

start_daemon() {  # start_daemon NAME CMD...: run CMD in the foreground mode of the daemon, record its pid
    local name=$1; shift
    local pidfile="$STATE_DIR/run/$name.own.pid"
    alive "$pidfile" && return 0
    setsid "$@" >>"$STATE_DIR/log/$name.stderr" 2>&1 </dev/null &
    echo $! >"$pidfile"
}

wait_idle() {
    local deadline=$((SECONDS + ${FWL_SLURM_START_TIMEOUT:-90})) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
        if [[ -n "$states" ]] && ! grep -qvE ' (idle|mix|alloc)$' <<<"$states" \
            && [[ $(wc -l <<<"$states") -eq ${#NODES[@]} ]]; then
            return 0
        fi
        # A node that registered as down after a restart comes back once told to resume.
        if grep -qE ' (down|drain|fail)' <<<"$states"; then
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    log "nodes not idle after ${FWL_SLURM_START_TIMEOUT:-90}s: ${states:-no answer from slurmctld}"
    tail -n 20 "$STATE_DIR"/log/*.log "$STATE_DIR"/log/*.stderr >&2 || true
    exit 1
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "run as root (slurmd must be able to start jobs)"
    install_packages
    write_config
    ensure_hosts
    start_munge
    start_daemon slurmctld slurmctld -D -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        start_daemon "slurmd-$node" slurmd -D -N "$node" -f "$CONF"
    done
    wait_idle
    log "up: ${NODES[*]} (export SLURM_CONF=$CONF)"
}

stop_pid() {  # stop_pid PIDFILE: TERM, wait, then KILL the one process it names
    local pidfile=$1 pid
    [[ -s "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop_slurm() {
    if alive "$STATE_DIR/run/slurmctld.own.pid"; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
        fi
    fi
    local node
    for node in "${NODES[@]}"; do stop_pid "$STATE_DIR/run/slurmd-$node.own.pid"; done
    stop_pid "$STATE_DIR/run/slurmctld.own.pid"
}

cmd_stop() {
    stop_slurm
    stop_pid "$STATE_DIR/run/munged.pid"
    remove_hosts
    log "stopped"
}

cmd_status() {
    local ok=0 name pidfile
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        pidfile="$STATE_DIR/run/$name.own.pid"
        [[ $name == munged ]] && pidfile="$STATE_DIR/run/munged.pid"
        if alive "$pidfile"; then
            echo "$name: running (pid $(cat "$pidfile"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    if [[ $ok -eq 0 ]]; then
        sinfo -N
        # Up means every node answers and takes jobs.
        [[ $(sinfo -h -N -t idle,mix,alloc -o %N | sort -u | wc -l) -eq ${#NODES[@]} ]] || ok=1
    fi
    return $ok
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    clean) cmd_stop; rm -rf "$STATE_DIR" ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|clean|status|env" >&2; exit 2 ;;
esac
