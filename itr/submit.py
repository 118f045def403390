"""``itr submit``: the same training as ``itr train``, submitted through submitit.

    itr submit RECIPE.yaml [key=value ...] --out DIR --cluster slurm --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 24:00:00 [--sweep train.seed=0,1,2]

- One task per rank (``--tasks-per-node``, default: the GPUs per node, 1 on CPU nodes); each task
  joins the process group through submitit's ``TorchDistributedEnvironment`` (env:// variables),
  and the trainer runs in it exactly as under ``accelerate launch`` (gloo on CPUs, NCCL on GPUs).
- Preemption and time limits: submitit asks SLURM for ``USR2`` ``--signal-delay`` seconds before the
  limit. Every rank turns it into the trainer's stop signal (``SIGUSR1``); the trainer checkpoints
  ``DIR/last`` at the next step on all ranks and returns, then rank 0 hands over to submitit:
  :meth:`TrainJob.checkpoint` gives the same training with ``train.resume=latest``, submitit pickles
  it and requeues the job, which resumes mid-epoch where it stopped. ``SIGTERM`` (partition
  preemption with ``PreemptMode=REQUEUE``, ``scancel``) also checkpoints; the job is not requeued
  from here then (SLURM requeues a preempted job by itself; a ``scancel`` stays a cancel).
- ``--sweep KEY=V1,V2,...`` submits a job array, one element per value, into ``DIR/KEY=V``
  (``--sweep recipe=A.yaml,B.yaml`` sweeps recipes).
- ``--cluster`` is explicit (submitit's auto-detection picks slurm whenever ``srun`` is on PATH):
  ``slurm``, ``local`` (subprocesses on this machine, one node) or ``debug`` (in this process).

Recipes and overrides are loaded and validated before anything is submitted, so an unknown key
or a missing recipe fails here and not in the queue.
"""
import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from itr.errors import ConfigError, ItrError

try:  # submitit is the `slurm` extra: only `itr submit` needs it
    import submitit
    from submitit.helpers import Checkpointable as _Base
except ImportError:  # pragma: no cover
    submitit = None
    _Base = object


class SubmitError(ItrError):
    """A submission that cannot be made (bad option, submitit missing, sbatch refused it)."""


RESUME = "train.resume=latest"


def _with_resume(overrides):
    return [o for o in overrides if not o.startswith("train.resume=")] + [RESUME]


def _slurm_job_state(job_id):
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else None


class TrainJob(_Base):
    """The submitted callable: ``TrainJob()(recipe, overrides, out)`` trains one run in one task."""

    def __call__(self, recipe_path, overrides, out):
        from itr.config import load_recipe
        from itr.train import train

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # one task per rank: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for env://
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        overrides = list(overrides)
        if (Path(out) / "last").exists() and RESUME not in overrides:
            overrides = _with_resume(overrides)
        recipe = load_recipe(recipe_path, overrides)
        print(f"[itr-submit] {env}: {recipe_path} -> {out} {' '.join(overrides)}", flush=True)

        received = []

        def to_trainer(signum, frame):
            # submitit's preemption / timeout signal -> the trainer's stop signal (it checkpoints at the
            # next step on every rank, then train() returns None)
            received.append(signum)
            signal.raise_signal(signal.SIGUSR1)

        import itr.train as trainer

        seen = []

        class RecordingStop(trainer.Stop):  # which signal stopped the trainer: TERM is not requeued here
            def _handler(self, signum, frame):
                seen.append(signum)
                super()._handler(signum, frame)

        usr = submitit.JobEnvironment._usr_sig()
        previous = signal.signal(usr, to_trainer)
        stop_class, trainer.Stop = trainer.Stop, RecordingStop
        try:
            results = train(recipe, out)
        finally:
            signal.signal(usr, previous)
            trainer.Stop = stop_class
        if results is not None:
            return results
        # stopped by a signal, DIR/last written by every rank
        if received or signal.SIGTERM not in seen:  # the timeout signal, or SIGUSR1
            requeue = True
        else:
            # SIGTERM: partition preemption (the job is still RUNNING; SLURM requeues it by itself only if
            # the job outlives the grace time, so requeue now), the hard time limit (TIMEOUT) or scancel
            # (CANCELLED: it stays cancelled)
            requeue = env.cluster == "slurm" and _slurm_job_state(env.raw_job_id) in ("RUNNING", "TIMEOUT")
        return self._stopped(env, out, requeue)

    def _stopped(self, env, out, requeue):
        if not requeue:
            print(f"[itr-submit] stopped by SIGTERM with a checkpoint in {out}/last; the job was cancelled: "
                  f"not requeueing", flush=True)
            sys.exit(-1)  # no result pickle: the job is not over
        if env.global_rank != 0:
            # rank 0 requeues the job, which ends this task too; do not report a result meanwhile
            time.sleep(600)
            sys.exit(-1)
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        paths = env.paths
        delayed = DelayedSubmission.load(paths.submitted_pickle)
        print(f"[itr-submit] checkpointed {out}/last: requeueing job {env.job_id}", flush=True)
        # submitit's own path: checkpoint() -> pickle -> scontrol requeue -> exit
        SignalHandler(env, paths, delayed).checkpoint_and_try_requeue(submitit.JobEnvironment._usr_sig())
        sys.exit(-1)  # not reached: the handler exits

    def checkpoint(self, recipe_path, overrides, out):
        """The same training, resumed from DIR/last (submitit calls this on preemption / timeout)."""
        return submitit.helpers.DelayedSubmission(type(self)(), recipe_path, _with_resume(overrides), out)


# ----------------------------------------------------------------------------- command line

def add_parser(sub):
    s = sub.add_parser("submit", help="submit `itr train` through submitit (SLURM, local or debug), "
                                      "with checkpoint-and-requeue and job-array sweeps")
    s.add_argument("recipe", help="recipe YAML (see recipes/)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5")
    s.add_argument("--out", required=True, help="run directory (a sweep: one DIR/KEY=VALUE per element)")
    s.add_argument("--cluster", required=True, choices=["slurm", "local", "debug"],
                   help="slurm: sbatch; local: subprocesses here; debug: in this process")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU nodes)")
    s.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes (ranks) per node, one per task (default: --gpus-per-node, 1 on CPU nodes)")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--mem-gb", type=int, default=None)
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--time", default="24:00:00", help="time limit: minutes, or [D-]HH:MM[:SS]")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues")
    s.add_argument("--max-timeouts", type=int, default=20, help="requeues after time limits before giving up")
    s.add_argument("--name", default="itr", help="job name")
    s.add_argument("--folder", default=None, help="submitit's folder: pickles and logs (default: OUT/submitit)")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a job array over these values (repeat for the product); KEY may be `recipe`")
    s.add_argument("--array-parallelism", type=int, default=64, help="sweep elements running at once")
    s.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm constraint=a100 --slurm exclusive=")
    s.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    s.set_defaults(fn=main)
    return s


def parse_time(text):
    """Minutes from SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds round up)."""
    t = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", t)
    if not m:
        raise SubmitError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, parts = int(m.group(1) or 0), [int(x) for x in m.group(2).split(":")]
    if m.group(1) is None:
        h, mi, sec = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
    else:
        h, mi, sec = (parts + [0, 0])[:3]
    minutes = days * 24 * 60 + h * 60 + mi + (1 if sec else 0)
    if minutes < 1:
        raise SubmitError(f"--time {text!r} is shorter than a minute")
    return minutes


def sweep_elements(recipe, overrides, out, sweeps):
    """[(recipe, overrides, out_dir, label)] for the product of the sweeps (one element without)."""
    import itertools

    axes = []
    for sw in sweeps:
        if "=" not in sw:
            raise SubmitError(f"--sweep {sw!r}: use KEY=V1,V2,...")
        key, values = sw.split("=", 1)
        vals = [v for v in values.split(",")]
        if not key or not vals or any(v == "" for v in vals):
            raise SubmitError(f"--sweep {sw!r}: use KEY=V1,V2,... (no empty values)")
        if len(set(vals)) != len(vals):
            raise SubmitError(f"--sweep {sw!r}: repeated value")
        axes.append([(key, v) for v in vals])
    if not axes:
        return [(recipe, list(overrides), Path(out), None)]
    elements = []
    for combo in itertools.product(*axes):
        r, ov, parts = recipe, list(overrides), []
        for key, v in combo:
            if key == "recipe":
                r = v
                parts.append(f"recipe={Path(v).stem}")
            else:
                ov.append(f"{key}={v}")
                parts.append(f"{key}={v}")
        elements.append((r, ov, Path(out).joinpath(*parts), ",".join(parts)))
    return elements


def validate(elements):
    """Load every element's recipe with its overrides: unknown keys, bad values, missing files fail now."""
    from itr.config import load_recipe

    recipes = []
    for r, ov, _, label in elements:
        try:
            recipes.append(load_recipe(r, ov))
        except ConfigError as e:
            raise ConfigError(f"{e}" + (f" (sweep element {label})" if label else "")) from None
    return recipes


def make_executor(a, folder, n_jobs):
    if submitit is None:
        raise SubmitError("submitit is not installed: pip install submitit (or pip install -e .[slurm])")
    if a.nodes < 1:
        raise SubmitError(f"--nodes must be >= 1, got {a.nodes}")
    if a.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0, got {a.gpus_per_node}")
    tasks = a.tasks_per_node if a.tasks_per_node is not None else max(a.gpus_per_node, 1)
    if tasks < 1:
        raise SubmitError(f"--tasks-per-node must be >= 1, got {tasks}")
    timeout_min = parse_time(a.time)
    if a.cluster != "slurm" and a.nodes > 1:
        raise SubmitError(f"--cluster {a.cluster} runs on this machine only: --nodes must be 1")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=a.cluster, slurm_max_num_timeout=a.max_timeouts)
    params = dict(name=a.name, timeout_min=timeout_min, nodes=a.nodes, tasks_per_node=tasks,
                  gpus_per_node=a.gpus_per_node, stderr_to_stdout=True)
    if a.cpus_per_task:
        params["cpus_per_task"] = a.cpus_per_task
    if a.mem_gb:
        params["mem_gb"] = a.mem_gb
    if a.cluster == "slurm":
        extra = {}
        for kv in a.slurm:
            k, _, v = kv.partition("=")
            if not k:
                raise SubmitError(f"--slurm {kv!r}: use KEY=VALUE")
            extra[k.replace("-", "_")] = v
        extra.setdefault("requeue", True)
        extra.setdefault("open_mode", "append")  # the log of a requeued job continues
        params.update(slurm_signal_delay_s=a.signal_delay, slurm_additional_parameters=extra,
                      slurm_array_parallelism=a.array_parallelism)
        if a.gpus_per_node == 0:
            params.pop("gpus_per_node")  # clusters without GRES refuse --gpus-per-node=0
        if a.partition:
            params["slurm_partition"] = a.partition
        if a.account:
            params["slurm_account"] = a.account
        if a.qos:
            params["slurm_qos"] = a.qos
    ex.update_parameters(**params)
    return ex, tasks


def tracking_info(recipe):
    from itr.tracking import default_uri

    uri = recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    return uri, recipe.tracking.experiment, recipe.tracking.enabled


def prepare_tracking(recipe):
    """Create the MLflow experiment of a local sqlite store before the jobs start: jobs of an array that
    start together on a fresh database race on its schema (seen: `table _alembic_tmp_experiments already
    exists`) and fall back to their local journals. A sweep's run (the parent of its members) is created here
    too. Returns the experiment id (None if not created here)."""
    uri, name, enabled = tracking_info(recipe)
    if not (enabled and uri.startswith("sqlite:///")):
        return None
    from itr.tracking import connect, ensure_experiment, sweep_name, sweep_parent

    client = connect(uri)
    exp_id = ensure_experiment(client, name, uri)
    if sweep_name(recipe.tracking):
        sweep_parent(client, exp_id, sweep_name(recipe.tracking))
    return exp_id


def submit(a):
    """Validate, submit, print what was submitted; returns the submitit jobs."""
    parse_time(a.time)  # option errors before any recipe or MLflow work
    overrides = list(a.overrides)
    base = validate([(a.recipe, overrides, None, None)])[0]
    if base.tracking.enabled and not base.tracking.uri:
        # log where we say: the default store is relative to the working directory of the submission
        overrides.append(f"tracking.uri={tracking_info(base)[0]}")
    if a.sweep and base.tracking.enabled and not (base.tracking.sweep or os.environ.get("ITR_SWEEP")):
        overrides.append(f"tracking.sweep={Path(a.out).name}-{time.strftime('%Y%m%d-%H%M%S')}")  # one parent run
    elements = sweep_elements(a.recipe, overrides, Path(a.out).resolve(), a.sweep)
    recipes = validate(elements)
    experiments = {tracking_info(r)[:2]: prepare_tracking(r) for r in recipes}
    folder = Path(a.folder).resolve() if a.folder else Path(a.out).resolve() / "submitit"
    ex, tasks = make_executor(a, folder, len(elements))
    calls = [(str(Path(r).resolve()), ov, str(out)) for r, ov, out, _ in elements]
    try:
        if len(calls) == 1:
            jobs = [ex.submit(TrainJob(), *calls[0])]
        else:
            with ex.batch():
                jobs = [ex.submit(TrainJob(), *c) for c in calls]
    except Exception as e:  # sbatch refused it: a bad partition, account, time ...
        if type(e).__name__ in ("FailedJobError", "FailedSubmissionError", "CalledProcessError", "FileNotFoundError"):
            raise SubmitError(f"submission failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
        raise
    world = a.nodes * tasks
    print(f"[itr-submit] {len(jobs)} job(s) on {a.cluster}: {a.nodes} node(s) x {tasks} task(s) "
          f"(world size {world}), time limit {parse_time(a.time)} min", flush=True)
    for job, (r, ov, out, label), rec in zip(jobs, elements, recipes):
        uri, exp, enabled = tracking_info(rec)
        print(f"job {job.job_id}" + (f"  [{label}]" if label else ""), flush=True)
        print(f"  out:    {out}", flush=True)
        print(f"  log:    {job.paths.stdout}", flush=True)
        exp_id = experiments.get((uri, exp))
        print(f"  mlflow: {uri} experiment {exp!r}" + (f" (id {exp_id})" if exp_id else "") if enabled else "  mlflow: disabled (tracking.enabled=false)",
              flush=True)
    if a.wait:
        for job, (_, _, out, label) in zip(jobs, elements):
            res = job.result()
            test = (res or {}).get("test") or {}
            print(f"job {job.job_id} done: {out}" + (f"  test rsum {test['rsum']:.1f}" if "rsum" in test else ""),
                  flush=True)
    return jobs


def main(a):
    submit(a)
