#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests and for trying
# `srun` / `sbatch` by hand: Debian's slurmctld + slurmd + munge (installed by
# scripts/setup.sh), a slurm.conf generated for this host in $AUTOPART_SLURM
# (default /tmp/autopart-slurm), daemons run as root.
#
#   scripts/slurm.sh start    # idempotent: starts munged, slurmctld, slurmd; waits for the node
#   scripts/slurm.sh env      # prints `export SLURM_CONF=...` (eval it to use srun/sbatch)
#   scripts/slurm.sh status   # sinfo
#   scripts/slurm.sh stop
#
# The node advertises 8 CPUs (so that tests may start more tasks than there
# are cores) and MpiDefault=none, as Debian ships it: plain `srun` then
# starts processes without PMI, and Open MPI needs `srun --mpi=pmix`.
set -euo pipefail

dir="${AUTOPART_SLURM:-/tmp/autopart-slurm}"
conf="$dir/slurm.conf"
host="$(hostname -s)"

say() { echo "[slurm] $*" >&2; }

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat >"$conf.tmp" <<EOF
ClusterName=autopart
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
MinJobAge=30
NodeName=$host CPUs=8 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  mv "$conf.tmp" "$conf"
}

start() {
  for b in munged slurmctld slurmd srun sinfo; do
    command -v "$b" >/dev/null || { say "error: $b not found: run scripts/setup.sh (it installs slurmctld, slurmd, slurm-client, munge)"; exit 1; }
  done
  write_conf
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chmod 400 /etc/munge/munge.key
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  if ! pgrep -x munged >/dev/null; then
    say "starting munged"
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged 9>&- || munged --force 9>&-
    else
      munged --force 9>&-
    fi
  fi
  export SLURM_CONF="$conf"
  if ! pgrep -x slurmctld >/dev/null; then
    say "starting slurmctld ($conf)"
    slurmctld -f "$conf" 9>&-
  fi
  if ! pgrep -x slurmd >/dev/null; then
    say "starting slurmd"
    slurmd -f "$conf" 9>&-
  fi
  for _ in $(seq 1 60); do
    if timeout 5 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      say "ready: $(timeout 5 sinfo -h -o '%N %c CPUs %T')"
      return 0
    fi
    # A node left down by an earlier run comes back.
    timeout 5 scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  say "error: the node did not become idle; see $dir/log/"
  sinfo >&2 || true
  tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  # Gone before returning, so that a start right after starts them afresh.
  for _ in $(seq 1 30); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 1
  done
  say "stopped slurmd and slurmctld (munged left running)"
}

case "${1:-}" in
  start)
    # Tests start it concurrently: one at a time.
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    flock 9
    start
    ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  status) SLURM_CONF="$conf" sinfo ;;
  *) sed -n 2,15p "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
