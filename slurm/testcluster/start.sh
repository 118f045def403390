#!/usr/bin/env bash
# A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd "nodes"
# (node1, node2) on 127.0.0.1, all state under DIR. Installs Debian's slurm packages if missing.
#
#   slurm/testcluster/start.sh DIR        # prints `export SLURM_CONF=DIR/slurm.conf` on success
#   slurm/testcluster/stop.sh DIR
#
# The daemons run in their own mount namespace, where /etc/hosts also maps node1/node2 to
# 127.0.0.1 (jobs inherit it; the machine's /etc/hosts is not touched), so that
# `scontrol show hostnames` gives names torch can resolve. Partitions: `debug` (default),
# `low` (preemptable: requeue after a 10 s grace) and `urgent` (preempts `low`).
set -euo pipefail
dir="$(mkdir -p "$1" && cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"

need=""
for b in slurmctld slurmd munged sbatch; do command -v "$b" >/dev/null || need=1; done
if [ -n "$need" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >"$dir/apt.log" 2>&1 \
    || { apt-get update >>"$dir/apt.log" 2>&1 && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >>"$dir/apt.log" 2>&1; } \
    || { echo "cannot install slurm (see $dir/apt.log)" >&2; exit 1; }
fi

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ctld_port=$(port); n1=$(port); n2=$(port)
mkdir -p "$dir/state" "$dir/spool-node1" "$dir/spool-node2" "$dir/munge"
chmod 755 "$dir" "$dir/munge"
# munge: a fresh key, its own socket
dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" 2>/dev/null
chmod 400 "$dir/munge/munge.key"
mem=$(awk '/MemTotal/ {print int($2/1024/2)}' /proc/meminfo)
cat >"$dir/slurm.conf" <<CONF
ClusterName=itrtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$n1 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$n2 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=low Nodes=node1,node2 MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=urgent Nodes=node1,node2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
{ grep -v -E '\snode[12]$' /etc/hosts || true; echo "127.0.0.1 node1"; echo "127.0.0.1 node2"; } >"$dir/hosts"

# Everything starts inside a private mount namespace with $dir/hosts bound over /etc/hosts.
unshare --mount --propagation private bash -c "
  set -e
  mount --bind '$dir/hosts' /etc/hosts
  munged --socket='$dir/munge/munge.sock' --key-file='$dir/munge/munge.key' --pid-file='$dir/munge/munged.pid' \
         --log-file='$dir/munge/munged.log' --seed-file='$dir/munge/munge.seed' --force
  export SLURM_CONF='$dir/slurm.conf'
  slurmctld -i -f '$dir/slurm.conf'
  slurmd -N node1 -f '$dir/slurm.conf'
  slurmd -N node2 -f '$dir/slurm.conf'
"
echo "$ctld_port" >"$dir/ports"
export SLURM_CONF="$dir/slurm.conf"
for i in $(seq 1 60); do
  if sinfo -h -o '%T %D' 2>/dev/null | grep -q -E '^idle 2$'; then
    echo "export SLURM_CONF=$dir/slurm.conf"
    exit 0
  fi
  sleep 0.5
done
echo "the test cluster did not come up in 30 s; logs in $dir" >&2
sinfo >&2 || true
tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd-node*.log >&2 || true
exit 1
