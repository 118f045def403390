#!/usr/bin/env bash
# Multi-node launch: one call per machine; fills the machine rank, main address, machine count and
# processes per machine from the environment, then runs `accelerate launch` with them.
#
#   launch/multinode.sh -m itr train RECIPE.yaml --out DIR [key=value ...]
#
# Environment (the first one set wins):
#   machine rank         MACHINE_RANK, NODE_RANK, SLURM_NODEID                          (default 0)
#   main address         MAIN_ADDR, MASTER_ADDR, first host of $SLURM_JOB_NODELIST       (default 127.0.0.1)
#   number of machines   NUM_MACHINES, NNODES, SLURM_NNODES                              (default 1)
#   processes / machine  PROCS_PER_NODE, GPUS_PER_NODE, SLURM_GPUS_ON_NODE, GPUs seen by nvidia-smi (default 1)
#   port                 MAIN_PORT, MASTER_PORT                                          (default 29500)
#   accelerate config    ACCELERATE_CONFIG                                               (default launch/multi_node.yaml;
#                        use launch/deepspeed_zero*.yaml for DeepSpeed)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rank="${MACHINE_RANK:-${NODE_RANK:-${SLURM_NODEID:-0}}}"
nodes="${NUM_MACHINES:-${NNODES:-${SLURM_NNODES:-1}}}"
addr="${MAIN_ADDR:-${MASTER_ADDR:-}}"
if [ -z "$addr" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
  addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
addr="${addr:-127.0.0.1}"
per="${PROCS_PER_NODE:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}"
if [ -z "$per" ]; then
  per="$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l) || echo 0)"
  [ "$per" -gt 0 ] 2>/dev/null || per=1
fi
port="${MAIN_PORT:-${MASTER_PORT:-29500}}"
config="${ACCELERATE_CONFIG:-$here/multi_node.yaml}"
echo "[multinode] machine $rank of $nodes, $per process(es) each, main $addr:$port, config $config" >&2
exec accelerate launch --config_file "$config" --num_machines "$nodes" --machine_rank "$rank" \
  --num_processes "$((nodes * per))" --main_process_ip "$addr" --main_process_port "$port" "$@"
