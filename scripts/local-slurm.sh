#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian/Ubuntu, root, no systemd needed), for CI and for trying
# the slurm launcher on a laptop:  scripts/local-slurm.sh start | stop | status
# It installs slurm-wlm and munge, writes /etc/slurm/slurm.conf for this host, starts munged, slurmctld and slurmd,
# and puts a `sacct` shim (answers from squeue) first on PATH via scripts/slurm/, since there is no accounting DB.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf=/etc/slurm/slurm.conf

install() {
  if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
}

write_conf() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="${TOE_SLURM_CPUS:-$(nproc)}"
  mem="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
  mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  cat >"$conf" <<CONF
ClusterName=toeci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs restart after cred_expire seconds (default 120); values below 5 fall back to 120
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=3600
MailProg=/bin/true
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem:-4000} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install
  write_conf
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  alive /run/slurmctld.pid || /usr/sbin/slurmctld
  alive /run/slurmd.pid || /usr/sbin/slurmd
  for _ in $(seq 1 120); do
    state="$(sinfo -h -o %T 2>/dev/null | head -n1)"
    [ "$state" = idle ] || [ "$state" = mixed ] && break
    sleep 0.5
  done
  sinfo
  echo "export PATH=$here/slurm:\$PATH   # the sacct shim"
}

stop() {
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 40); do [ -z "$(squeue -h -t PD,R,CG 2>/dev/null)" ] && break; sleep 0.5; done
  for pid in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if alive "$pid"; then
      kill "$(cat "$pid")"
      for _ in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done
      alive "$pid" && kill -9 "$(cat "$pid")" || true
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
