#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (munged, slurmctld, slurmd, all as root), for the
# SLURM launcher's test (tests/test_slurm.py) and for trying `hydra/launcher=slurm` by hand.
#
#   sudo scripts/slurm_single_node.sh start    # config, munge key, daemons; waits until the node is idle
#   sudo scripts/slurm_single_node.sh status   # the daemons and `sinfo`
#   sudo scripts/slurm_single_node.sh stop     # stops the daemons this script started (by their pid files)
#   export SLURM_CONF=/var/tmp/negstudy-slurm/slurm.conf   # then sbatch/squeue/sinfo/scancel use it
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge packages (scripts/setup.sh installs them
# when it can). Everything lives under $NEGSTUDY_SLURM_DIR (default /var/tmp/negstudy-slurm): the
# slurm.conf, the munge key and socket, pid files, logs (slurmctld.log, slurmd.log, munged.log) and
# the spool; nothing under /etc is touched. Partition "debug" (default), no GPUs, no accounting
# (sacct needs slurmdbd: use squeue/scontrol), select/cons_tres with CR_CPU: one task per CPU.
# `start` is idempotent (a running, idle cluster is left alone) and exits non-zero with the reason
# on its last line when the cluster cannot start.
set -uo pipefail

DIR=${NEGSTUDY_SLURM_DIR:-/var/tmp/negstudy-slurm}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
NODE=$(hostname -s)

say() { echo "slurm_single_node: $*"; }
fail() { echo "slurm_single_node: cannot start: $*" >&2; exit 1; }
abort() { stop >/dev/null; fail "$@"; }  # a failed start leaves no daemon of ours running

alive() {  # alive <pidfile>: the process of the pid file runs
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() {
  SLURM_CONF=$CONF timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1
}

stop() {
  local name pidfile pid
  for name in slurmd slurmctld munged; do
    pidfile=$DIR/$name.pid
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
      say "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

status() {
  local name up=0
  for name in munged slurmctld slurmd; do
    if alive "$DIR/$name.pid"; then say "$name running (pid $(cat "$DIR/$name.pid"))"; else say "$name not running"; up=1; fi
  done
  [ "$up" = 0 ] && SLURM_CONF=$CONF sinfo
  return $up
}

write_conf() {
  local cpus mem
  cpus=$(nproc --all)
  mem=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MiB, a bit under what is free
  cat > "$CONF" <<EOF
# Written by scripts/slurm_single_node.sh: a single-node cluster on $NODE.
ClusterName=negstudy
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
SlurmctldPort=${NEGSTUDY_SLURMCTLD_PORT:-6817}
SlurmdPort=${NEGSTUDY_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  [ "$(id -u)" = 0 ] || fail "needs root (the daemons run as root here); run it with sudo"
  local b
  for b in munged slurmctld slurmd sinfo sbatch; do
    command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$b" >/dev/null 2>&1 \
      || fail "$b is not installed (apt-get install slurmctld slurmd slurm-client munge)"
  done
  export PATH=$PATH:/usr/sbin
  if alive "$DIR/munged.pid" && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" \
     && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; then
    say "already running: node $NODE $(node_state); export SLURM_CONF=$CONF"
    return 0
  fi
  stop >/dev/null  # a half-started cluster: start afresh
  local port
  for port in "${NEGSTUDY_SLURMCTLD_PORT:-6817}" "${NEGSTUDY_SLURMD_PORT:-6818}"; do
    if command -v ss >/dev/null 2>&1 && [ -n "$(ss -ltnH "sport = :$port" 2>/dev/null)" ]; then
      fail "port $port is in use by another process (another SLURM on this machine?); stop it, or set NEGSTUDY_SLURMCTLD_PORT/NEGSTUDY_SLURMD_PORT"
    fi
  done
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge" || fail "cannot create $DIR"
  chmod 700 "$DIR/munge" "$DIR/state"
  chmod 755 "$DIR"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom > "$DIR/munge/munge.key") || fail "cannot write the munge key"
  fi
  chmod 400 "$DIR/munge/munge.key"
  write_conf
  export SLURM_CONF=$CONF

  munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
    --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed" 2>>"$DIR/munged.log" \
    || abort "munged did not start: $(tail -1 "$DIR/munged.log")"
  for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done
  [ -S "$SOCKET" ] || abort "munged made no socket at $SOCKET: $(tail -1 "$DIR/munged.log")"

  # -i: start even if the state an earlier start saved cannot be read (job ids go on from it)
  slurmctld -i -f "$CONF" >>"$DIR/slurmctld.log" 2>&1 || abort "slurmctld did not start: $(tail -1 "$DIR/slurmctld.log")"
  slurmd -f "$CONF" >>"$DIR/slurmd.log" 2>&1 || abort "slurmd did not start: $(tail -1 "$DIR/slurmd.log")"

  local state="" deadline=$((SECONDS + ${NEGSTUDY_SLURM_WAIT:-60}))
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) say "node $NODE $state ($(nproc --all) CPUs); export SLURM_CONF=$CONF"; return 0 ;;
      down*|drain*|fail*|"") ;;
    esac
    alive "$DIR/slurmctld.pid" || abort "slurmctld exited: $(tail -1 "$DIR/slurmctld.log")"
    alive "$DIR/slurmd.pid" || abort "slurmd exited: $(tail -1 "$DIR/slurmd.log")"
    sleep 0.5
  done
  abort "node $NODE is '${state:-unknown}', not idle, after ${NEGSTUDY_SLURM_WAIT:-60} s (logs in $DIR)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status  (state in $DIR)" >&2; exit 2 ;;
esac
