#!/usr/bin/env bash
# Tear down the test cluster of slurm/testcluster/start.sh DIR: cancel jobs, stop the daemons
# (TERM, then KILL), kill what is left of the jobs. Always exits 0: it runs after failures too.
dir="$(cd "$1" 2>/dev/null && pwd)" || exit 0
export SLURM_CONF="$dir/slurm.conf"
timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
pids=""
for f in "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
  [ -f "$f" ] && pids="$pids $(cat "$f")"
done
[ -n "$pids" ] && kill -TERM $pids 2>/dev/null
for i in $(seq 1 20); do
  alive=""
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && break
  sleep 0.25
done
[ -n "${alive:-}" ] && kill -KILL $alive 2>/dev/null
# job processes (slurmstepd and their children) that outlived their daemons
pkill -KILL -f "slurmstepd.*$dir" 2>/dev/null
for p in $(pgrep slurmstepd 2>/dev/null); do
  grep -q "$dir" /proc/$p/environ 2>/dev/null && kill -KILL "$p" 2>/dev/null
done
exit 0
