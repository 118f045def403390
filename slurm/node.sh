#!/usr/bin/env bash
# One task per node, started by `srun` from the slurm/*.sbatch recipes: picks the launch (GPUs or CPU)
# and runs launch/multinode.sh, i.e. `accelerate launch` with the machine rank from SLURM_NODEID, the
# main address / port from the batch shell, SLURM_NNODES machines, and one process per GPU.
#
#   slurm/node.sh [accelerate launch options] -m itr train RECIPE --out DIR ...
#
# SIGUSR1 is ignored from here on, and the ignore is inherited through exec by accelerate launch /
# torchrun's agent: slurm signals EVERY process of a step (`--signal=USR1@T`, `scancel --signal=USR1`),
# and the agents do not handle USR1, so they would die of it and take the step down while the
# workers are still writing their checkpoint. The trainer installs its own USR1 handler, so the
# workers still get it.
# SIGTERM (preemption, scancel, the hard time limit) also reaches every process of the step. torchrun's
# agent passes it on to the workers (which checkpoint and exit 0) and then fails with a SignalException;
# this script then exits 143 so that the batch shell knows the step was TERMinated, not broken.
set -uo pipefail
trap '' USR1
got_term=""
trap 'got_term=1' TERM
root="${ITR_ROOT:?slurm/node.sh runs from the sbatch recipes (ITR_ROOT unset)}"
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)"
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$gpus" -gt 0 ]; then
  gpus="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
fi
if [ "$gpus" -gt 0 ]; then
  export PROCS_PER_NODE="${ITR_PROCS_PER_NODE:-$gpus}"
else
  # CPU node: DDP over gloo (the trainer picks it when no GPU is visible), 1 process unless told
  export PROCS_PER_NODE="${ITR_PROCS_PER_NODE:-1}"
  export DS_ACCELERATOR=cpu
fi
export ACCELERATE_CONFIG="${ITR_LAUNCH_CONFIG:-${ACCELERATE_CONFIG:-$root/launch/multi_node.yaml}}"
export MACHINE_RANK="${SLURM_NODEID:-0}"
export NUM_MACHINES="${SLURM_NNODES:-1}"
echo "[itr-slurm] $(hostname) node ${MACHINE_RANK}/${NUM_MACHINES}: ${gpus} GPU(s), ${PROCS_PER_NODE} process(es), config ${ACCELERATE_CONFIG}" >&2
"$root/launch/multinode.sh" "$@" &
pid=$!
while :; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break   # a trapped signal interrupts `wait`: wait again
done
wait "$pid"; rc=$?
if [ -n "$got_term" ]; then
  echo "[itr-slurm] $(hostname) node ${MACHINE_RANK}: the step got SIGTERM (launcher exit $rc)" >&2
  exit 143
fi
exit "$rc"
