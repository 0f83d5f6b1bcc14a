#!/usr/bin/env bash
# Turn this machine into a small cluster for tests/cluster (and for trying the launchers):
#   ssh    sshd on a loopback port with a key for the current user; two "nodes" that are
#          two loopback names of this machine (localhost, 127.0.0.2), reached over real ssh
#          (by pdsh for the deepspeed launcher, by mpich's hydra for mpirun).
#   slurm  a one-host Slurm cluster: munged + slurmctld + slurmd, minimal slurm.conf.
#
#   bash tests/cluster/setup.sh ssh|slurm|all   set up (idempotent); prints KEY=VALUE lines
#   bash tests/cluster/setup.sh stop [ssh|slurm] stop sshd / slurmctld + slurmd (munged stays)
#
# Needs root on Debian/Ubuntu with apt reachable: missing packages (openssh-server, pdsh,
# slurm-wlm, munge) are installed with apt-get. When something is missing and cannot be
# installed, prints "SKIP: <reason>" and exits 3 (the tests skip, naming the reason).
# Nothing outside $SEQPAR_CLUSTER_DIR is written except the packages and /run/sshd:
# the ssh client config is a wrapper (STATE/bin/ssh: ssh -F STATE/ssh/config) that the
# caller puts first on PATH, so ~/.ssh is never touched.
#
# Printed for the caller (tests/cluster/conftest.py reads them):
#   PATH_PREPEND=STATE/bin   HOSTFILE=STATE/hostfile   HOSTS=localhost,127.0.0.2
#   SLURM_CONF=STATE/slurm/slurm.conf   SLURM_CPUS=N
#   STARTED=1 when this call started the daemons (the caller may stop them when done)
set -euo pipefail

STATE=${SEQPAR_CLUSTER_DIR:-/tmp/seqpar-cluster}
SSH_PORT=${SEQPAR_CLUSTER_SSH_PORT:-2222}
SLURMCTLD_PORT=${SEQPAR_CLUSTER_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SEQPAR_CLUSTER_SLURMD_PORT:-6818}
WHAT=${1:-all}

skip() { echo "SKIP: $*"; exit 3; }
log() { echo "[cluster setup] $*" >&2; }

need_packages() {  # need_packages PKG... : install the ones missing, or skip
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || skip "packages ${missing[*]} are not installed and installing them needs root"
    command -v apt-get >/dev/null || skip "packages ${missing[*]} are not installed and there is no apt-get"
    log "installing ${missing[*]} with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || skip "apt-get update failed (no package repository reachable)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
            || skip "apt-get could not install ${missing[*]}"
    fi
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS CMD... : until CMD succeeds
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [[ $(date +%s) -lt $deadline ]] || return 1
        sleep 0.5
    done
}

setup_ssh() {
    need_packages openssh-server openssh-client pdsh
    local d=$STATE/ssh user; user=$(id -un)
    mkdir -p "$d" "$STATE/bin" /run/sshd
    chmod 700 "$d"
    [[ -f $d/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$d/host_ed25519" -C seqpar-test-host
    [[ -f $d/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$d/id_ed25519" -C "seqpar-test-$user"
    cp "$d/id_ed25519.pub" "$d/authorized_keys"
    cat > "$d/sshd_config" <<EOF
# sshd for tests/cluster: loopback only, key login only, this user's test key only.
Port $SSH_PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
AllowUsers $user
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
LogLevel ERROR
EOF
    # The client side: what ~/.ssh/config holds on a real cluster, here behind a wrapper.
    cat > "$d/config" <<EOF
Host localhost 127.0.0.1 127.0.0.2
    Port $SSH_PORT
    User $user
    IdentityFile $d/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile $d/known_hosts
    LogLevel ERROR
    BatchMode yes
EOF
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$d/config" > "$STATE/bin/ssh"
    chmod +x "$STATE/bin/ssh"
    /usr/sbin/sshd -t -f "$d/sshd_config" || skip "sshd rejects its test configuration"
    local started=0
    if ! pid_alive "$d/sshd.pid"; then
        started=1
        log "starting sshd on 127.0.0.1:$SSH_PORT and 127.0.0.2:$SSH_PORT"
        /usr/sbin/sshd -f "$d/sshd_config" -E "$d/sshd.log" || skip "sshd did not start (see $d/sshd.log)"
    fi
    for host in localhost 127.0.0.2; do
        wait_for 20 "$STATE/bin/ssh" "$host" true || skip "ssh to $host:$SSH_PORT does not work (see $d/sshd.log)"
    done
    printf 'localhost slots=2\n127.0.0.2 slots=2\n' > "$STATE/hostfile"
    echo "PATH_PREPEND=$STATE/bin"
    echo "HOSTFILE=$STATE/hostfile"
    echo "HOSTS=localhost,127.0.0.2"
    echo "STARTED=$started"
}

setup_slurm() {
    need_packages slurm-wlm munge
    local d=$STATE/slurm node cpus mem
    node=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p "$d/ctld" "$d/slurmd" "$d/log" /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [[ -f /etc/munge/munge.key ]] || /usr/sbin/mungekey --create >&2 2>/dev/null || \
            skip "no /etc/munge/munge.key and mungekey could not create one"
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged --force >&2 2>&1 || /usr/sbin/munged --force >&2 2>&1 || \
            skip "munged did not start"
        wait_for 20 sh -c 'munge -n | unmunge' || skip "munge does not work after starting munged"
    fi
    cat > "$d/slurm.conf" <<EOF
# A one-host Slurm cluster for tests/cluster (no accounting, no cgroups).
ClusterName=seqpartest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$d/ctld
SlurmdSpoolDir=$d/slurmd
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=3600
JobRequeue=1
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    export SLURM_CONF=$d/slurm.conf
    local started=0
    if ! pid_alive "$d/slurmctld.pid"; then
        started=1
        log "starting slurmctld"
        /usr/sbin/slurmctld -f "$SLURM_CONF" >&2 2>&1 || skip "slurmctld did not start (see $d/log/slurmctld.log)"
    fi
    if ! pid_alive "$d/slurmd.pid"; then
        started=1
        log "starting slurmd"
        /usr/sbin/slurmd -f "$SLURM_CONF" >&2 2>&1 || skip "slurmd did not start (see $d/log/slurmd.log)"
    fi
    wait_for 60 sh -c "sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'" || \
        skip "the Slurm node did not become idle: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -1) (see $d/log)"
    echo "SLURM_CONF=$SLURM_CONF"
    echo "SLURM_CPUS=$cpus"
    echo "STARTED=$started"
}

stop() {  # stop ssh|slurm|all
    local pidfile pidfiles=()
    [[ $1 == ssh || $1 == all ]] && pidfiles+=("$STATE/ssh/sshd.pid")
    [[ $1 == slurm || $1 == all ]] && pidfiles+=("$STATE/slurm/slurmd.pid" "$STATE/slurm/slurmctld.pid")
    for pidfile in "${pidfiles[@]}"; do
        if pid_alive "$pidfile"; then kill "$(cat "$pidfile")" && log "stopped $(basename "$pidfile" .pid)"; fi
    done
}

case $WHAT in
    ssh) setup_ssh ;;
    slurm) setup_slurm ;;
    all) setup_ssh; setup_slurm ;;
    stop) stop "${2:-all}" ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) echo "usage: $0 ssh|slurm|all|stop" >&2; exit 2 ;;
esac
