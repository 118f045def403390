# Shared by the slurm/*.sbatch recipes (sourced; not a job script itself).
#
# What it does for a recipe:
#   itr_setup             find the checkout (ITR_ROOT), the Python environment, a free port on the
#                         first node, and the main address (first host of the allocation)
#   itr_parse ARGS...     split `RECIPE [key=value ...] --out DIR [key=value ...]` into
#                         ITR_RECIPE, ITR_OUT and ITR_OVERRIDES
#   itr_train_step        run the training as ONE srun step (one launcher task per node, see
#                         slurm/node.sh), forward the time-limit signal, then requeue the job when
#                         the trainer stopped on a signal (it has checkpointed DIR/last), or exit
#
# Environment knobs (all optional):
#   ITR_ROOT           the itr checkout (default: the submission directory, $SLURM_SUBMIT_DIR)
#   ITR_PYTHON         the Python that has itr installed (default: $ITR_ROOT/.venv/bin/python, else python3)
#   ITR_LAUNCH_CONFIG  accelerate config for the launch (default: launch/multi_node.yaml, or the
#                      DeepSpeed one the recipe names; the same file serves CPU nodes: gloo is chosen there)
#   ITR_PROCS_PER_NODE training processes per node (default: the GPUs of the node, 1 on a CPU node)

itr_die() { echo "[itr-slurm] error: $*" >&2; exit 2; }
itr_log() { echo "[itr-slurm] $*" >&2; }

itr_setup() {
  if [ -z "${ITR_ROOT:-}" ]; then
    ITR_ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
  fi
  [ -f "$ITR_ROOT/slurm/lib.sh" ] && [ -f "$ITR_ROOT/launch/multinode.sh" ] \
    || itr_die "ITR_ROOT=$ITR_ROOT is not an itr checkout: submit from the checkout or export ITR_ROOT"
  export ITR_ROOT
  if [ -z "${ITR_PYTHON:-}" ]; then
    if [ -x "$ITR_ROOT/.venv/bin/python" ]; then ITR_PYTHON="$ITR_ROOT/.venv/bin/python"; else ITR_PYTHON="$(command -v python3)"; fi
  fi
  export ITR_PYTHON
  export PATH="$(dirname "$ITR_PYTHON"):$PATH"   # accelerate, torchrun of that environment
  # main address: the first host of the allocation (the batch shell runs there); a port free on it
  if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)"
  fi
  if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT="$("$ITR_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')"
  fi
  export MASTER_ADDR MASTER_PORT
  export NNODES="${SLURM_NNODES:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  itr_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $NNODES node(s), main $MASTER_ADDR:$MASTER_PORT, python $ITR_PYTHON"
}

itr_parse() {
  ITR_RECIPE=""; ITR_OUT=""; ITR_OVERRIDES=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --out) [ $# -ge 2 ] || itr_die "--out needs a directory"; ITR_OUT="$2"; shift 2 ;;
      --out=*) ITR_OUT="${1#--out=}"; shift ;;
      *=*) ITR_OVERRIDES+=("$1"); shift ;;
      -*) itr_die "unknown option $1 (usage: sbatch $0 RECIPE.yaml --out DIR [key=value ...])" ;;
      *) [ -z "$ITR_RECIPE" ] || itr_die "two recipes given: $ITR_RECIPE and $1"; ITR_RECIPE="$1"; shift ;;
    esac
  done
  [ -n "$ITR_RECIPE" ] || itr_die "no recipe (usage: sbatch $0 RECIPE.yaml --out DIR [key=value ...])"
  [ -f "$ITR_RECIPE" ] || itr_die "recipe $ITR_RECIPE does not exist (relative paths start at $PWD)"
  [ -n "$ITR_OUT" ] || itr_die "--out DIR is required"
}

# Signals. The batch shell is the one that receives `--signal=B:USR1@T`; it passes USR1 on to every
# process of the training step (`scancel --signal=USR1` signals all processes of the job's steps, not
# the batch shell). slurm/node.sh makes the launchers (bash, accelerate, torchrun's agent) ignore USR1,
# so only the trainer processes act on it: they checkpoint DIR/last at the next step and exit 0.
# SIGTERM (partition preemption with PreemptMode=REQUEUE, scancel, the hard time limit) reaches every
# process of the steps from slurm itself, NOT the batch shell (seen with slurm 22.05): slurm/node.sh
# exits 143 then, and the batch shell requeues the job unless it was cancelled.
ITR_SIGNALLED=""
_itr_on_usr1() {
  ITR_SIGNALLED="${ITR_SIGNALLED:-USR1}"
  itr_log "got SIGUSR1: asking the training processes to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID" || itr_log "scancel --signal=USR1 failed"
}
_itr_on_term() {
  ITR_SIGNALLED="TERM"
  itr_log "got SIGTERM (preemption, scancel or the time limit): waiting for the step to checkpoint"
}

_itr_job_state() { scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
_itr_mtime() { stat -c %y "$1" 2>/dev/null || echo none; }

# Run "$@" (the per-node launch) as one srun step with one task per node and wait for it, signals included.
itr_step() {
  trap _itr_on_usr1 USR1
  trap _itr_on_term TERM
  srun --nodes="$NNODES" --ntasks-per-node=1 "$ITR_ROOT/slurm/node.sh" "$@" &
  local step=$!
  while :; do
    wait "$step"; ITR_RC=$?
    kill -0 "$step" 2>/dev/null || break      # a trapped signal interrupts `wait`: wait again
  done
  wait "$step"; ITR_RC=$?
  trap - USR1 TERM
}

# The training of ITR_RECIPE into ITR_OUT, resumed from ITR_OUT/last when it exists; requeued when stopped.
itr_train_step() {
  local launch_extra=("$@")   # extra arguments for `accelerate launch` (e.g. DeepSpeed's)
  local resume=()
  if [ -e "$ITR_OUT/last" ]; then
    resume=(train.resume=latest)
    itr_log "$ITR_OUT/last exists: resuming from it"
  fi
  local before; before="$(_itr_mtime "$ITR_OUT/results.json")"
  itr_step "${launch_extra[@]}" -m itr train "$ITR_RECIPE" --out "$ITR_OUT" "${ITR_OVERRIDES[@]}" "${resume[@]}"
  local after; after="$(_itr_mtime "$ITR_OUT/results.json")"
  if [ "$after" != none ] && [ "$after" != "$before" ]; then
    itr_log "training finished: $ITR_OUT/results.json"
    return 0
  fi
  if [ "$ITR_SIGNALLED" = TERM ] || [ "$ITR_RC" = 143 ]; then
    # SIGTERM reached the step: partition preemption (the job is still RUNNING; SLURM only requeues it
    # itself if the batch shell outlives the grace time, so requeue now), the hard time limit (TIMEOUT),
    # or scancel (CANCELLED: stays cancelled). The trainer checkpointed DIR/last on the signal.
    local st; st="$(_itr_job_state)"
    case "$st" in
      RUNNING|TIMEOUT)
        itr_log "step stopped by SIGTERM (job $st): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || itr_die "scontrol requeue $SLURM_JOB_ID failed"
        exit 0 ;;
      *) itr_log "step stopped by SIGTERM (job ${st:-unknown}): not requeueing"; exit 0 ;;
    esac
  fi
  if [ -n "$ITR_SIGNALLED" ] || [ "$ITR_RC" = 0 ]; then
    # USR1 through this shell, or a signal sent to the steps directly (--signal=USR1@T): the trainer
    # checkpointed DIR/last and exited 0 without results.json
    if [ ! -e "$ITR_OUT/last" ]; then
      itr_die "stopped (exit $ITR_RC) before the first checkpoint: not requeueing"
    fi
    itr_log "stopped with a checkpoint in $ITR_OUT/last: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || itr_die "scontrol requeue $SLURM_JOB_ID failed (is the job requeueable? sbatch --requeue)"
    exit 0
  fi
  itr_log "training failed (exit $ITR_RC): not requeueing"
  exit "$ITR_RC"
}

# `itr eval "$@"`, resumable: a state folder (--state, else itr-eval-state-$SLURM_JOB_ID); requeued when a
# signal stopped it: `itr eval` saved its state and exited 75, or USR1 came through this shell (the time limit
# is near; a process still embedding dies of it, and the rerun starts over), or SIGTERM reached the step
# (preemption, the time limit) and the job was not cancelled.
itr_eval_step() {
  local args=("$@")
  case " $* " in *" --state "*|*" --state="*) ;; *) args+=(--state "${ITR_EVAL_STATE:-itr-eval-state-$SLURM_JOB_ID}") ;; esac
  itr_step -m itr eval "${args[@]}"
  [ "$ITR_RC" = 0 ] && exit 0
  if [ "$ITR_RC" = 75 ] || [ "$ITR_SIGNALLED" = USR1 ] || { [ "$ITR_SIGNALLED" = TERM ] && [ "$(_itr_job_state)" != CANCELLED ]; }; then
    itr_log "evaluation stopped by a signal (exit $ITR_RC): requeueing job $SLURM_JOB_ID to resume from its state"
    scontrol requeue "$SLURM_JOB_ID" || itr_die "scontrol requeue $SLURM_JOB_ID failed (sbatch --requeue?)"
    exit 0
  fi
  itr_log "evaluation failed (exit $ITR_RC): not requeueing"
  exit "$ITR_RC"
}
