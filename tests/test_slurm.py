"""The slurm/ recipes and `itr submit` on a REAL 2-node SLURM cluster on localhost (slurm/testcluster).

Trainings are tiny (tiny_data); what is checked is the plumbing: ranks over 2 nodes, the distributed
evaluation job, preemption / time-limit signals -> checkpoint -> requeue -> resume with the weights of
an uninterrupted run (bitwise), submitit jobs, arrays and their MLflow runs.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from itr.logs import read_log

from conftest import ROOT, run_itr, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
STEPS = 100  # 2 epochs x 800 pairs / batch 16
CUT = 10  # interrupt once DIR/last holds this step or later


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """slurm/testcluster on localhost for the whole session; always torn down (stop.sh)."""
    d = tmp_path_factory.mktemp("slurm")
    try:
        p = subprocess.run([str(ROOT / "slurm" / "testcluster" / "start.sh"), str(d)], capture_output=True,
                           text=True, errors="replace", timeout=180)
        ok, why = p.returncode == 0, (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        ok, why = False, f"start.sh timed out: {e}"
    if not ok:
        subprocess.run([str(ROOT / "slurm" / "testcluster" / "stop.sh"), str(d)], timeout=60)
        if os.geteuid() == 0:  # root can install and run slurm: a cluster that does not start is a failure
            pytest.fail(f"the SLURM test cluster did not start:\n{why}")
        pytest.skip(f"no SLURM test cluster (not root, so slurm cannot be installed/started here): {why[-300:]}")
    env = {"SLURM_CONF": str(d / "slurm.conf"), "ITR_ROOT": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # sbatch / squeue / scontrol and the jobs they start (sbatch exports the environment)
    try:
        yield {"dir": d, "env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run([str(ROOT / "slurm" / "testcluster" / "stop.sh"), str(d)], timeout=90)


@pytest.fixture
def slurm_env(cluster):
    return cluster


def sh(*cmd, timeout=30, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def sbatch(*args):
    return sh("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def state(job):
    out = sh("squeue", "-h", "-t", "all", "-j", job, "-o", "%T", check=False).stdout.split()
    return out[0] if out else "GONE"


def wait_job(job, log=None, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = state(job)
        if s in DONE or s == "GONE":
            return s
        time.sleep(1)
    text = read_log(log, tail=4000, missing_ok=True) if log else ""
    raise AssertionError(f"job {job} still {state(job)} after {timeout} s\n{text}")


def wait_step(out, k, job, log, timeout=120):
    """Wait until the run in ``out`` has checkpointed step >= k (train.checkpoint_every=5)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((Path(out) / "last" / "itr.json").read_text())["train_state"]["global_step"] >= k:
                return
        except (OSError, ValueError, KeyError):
            pass
        if state(job) in DONE:
            break
        time.sleep(0.2)
    raise AssertionError(f"{out} never reached step {k} (job {job}: {state(job)})\n{read_log(log, tail=4000)}")


@contextlib.contextmanager
def step_delay(seconds="0.15"):
    """Jobs submitted inside sleep this long after each step (ITR_STEP_DELAY, exported by sbatch):
    100 tiny steps otherwise finish in ~3 s, before a signal sent at step CUT can land."""
    os.environ["ITR_STEP_DELAY"] = seconds
    try:
        yield
    finally:
        del os.environ["ITR_STEP_DELAY"]


def overrides(data, **extra):
    return tiny_overrides(data, **{"train.batch_size": 16, "train.checkpoint_every": 5, **extra})


def assert_same_weights(a_dir, b_dir):
    a = load_file(str(Path(a_dir) / "last" / "model.safetensors"))
    b = load_file(str(Path(b_dir) / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs between {a_dir} and {b_dir}"


def meta(out):
    return json.loads((Path(out) / "last" / "itr.json").read_text())


@pytest.fixture(scope="module")
def reference(cluster, tiny_data, tmp_path_factory):
    """An uninterrupted 2-node run through slurm/multinode.sbatch (gloo, one rank per node)."""
    d = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, ITR_CACHE=str(d / "cache"))
    log = d / "job.log"
    p = subprocess.run(["sbatch", "--parsable", "-o", str(log), str(ROOT / "slurm" / "multinode.sbatch"), str(DEMO),
                        *overrides(tiny_data), "train.world_size=2", "tracking.enabled=false", "--out", str(d / "run")],
                       capture_output=True, text=True, errors="replace", env=env, cwd=d, timeout=30)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    deadline = time.time() + 150
    while time.time() < deadline and state(job) not in DONE | {"GONE"}:
        time.sleep(1)
    text = read_log(log, missing_ok=True)
    assert (d / "run" / "results.json").is_file(), f"job {job}: {state(job)}\n{errors_first(text)}"
    return {"dir": d / "run", "log": text}


def errors_first(text):
    """itr's own error lines, then the log's tail: rank 1's gloo traceback otherwise buries rank 0's cause."""
    mine = [line for line in text.splitlines() if "itr " in line and "error" in line.lower()]
    return "\n".join(mine[:20]) + "\n...\n" + text[-4000:]


def test_multinode_recipe_trains_over_two_nodes_and_the_eval_recipe_evaluates_it(slurm_env, reference, tiny_data,
                                                                                  tmp_path):
    res = json.loads((reference["dir"] / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_step"] == STEPS
    assert "node 0/2" in reference["log"] and "node 1/2" in reference["log"]
    assert meta(reference["dir"])["world_size"] == 2
    # the distributed evaluation job: itr eval under accelerate launch on both nodes
    log = tmp_path / "eval.log"
    job = sbatch("-N", "2", "-o", log, ROOT / "slurm" / "eval.sbatch", reference["dir"] / "best", "--data", tiny_data,
                 "--split", "test", "--json", tmp_path / "test.json")
    assert wait_job(job, log, timeout=120) in ("COMPLETED", "GONE"), read_log(log, tail=4000)
    text = read_log(log)
    assert "2 ranks" in text, text[-3000:]
    assert json.loads((tmp_path / "test.json").read_text())["rsum"] == pytest.approx(res["test"]["rsum"])


def test_a_preempted_multinode_job_requeues_and_ends_with_the_weights_of_an_uninterrupted_run(
        slurm_env, reference, tiny_data, tmp_path):
    """Partition preemption (PreemptMode=REQUEUE): SIGTERM -> checkpoint -> SLURM requeues -> resume."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    with step_delay():
        job = sbatch("-N", "2", "-p", "low", "--exclusive", "-o", log, ROOT / "slurm" / "multinode.sbatch", DEMO,
                     *overrides(tiny_data), "train.world_size=2", "tracking.enabled=false", "--out", out)
    wait_step(out, CUT, job, log)
    urgent = sbatch("-N", "2", "-p", "urgent", "--exclusive", "-o", tmp_path / "urgent.log", "--wrap", "sleep 1")
    assert wait_job(urgent, timeout=60) in ("COMPLETED", "GONE")
    assert wait_job(job, log, timeout=150) in ("COMPLETED", "GONE"), read_log(log, tail=5000)
    text = read_log(log)
    stopped = re.search(r"stopped by signal (\d+) at step (\d+)", text)
    assert stopped and int(stopped.group(1)) == 15, text[-5000:]  # SIGTERM
    assert CUT <= int(stopped.group(2)) < STEPS
    assert f"step {stopped.group(2)}" in re.search(r"resumed from .*", text).group(0)
    assert json.loads((out / "results.json").read_text())["global_step"] == STEPS
    assert_same_weights(reference["dir"], out)


def test_an_evaluation_stopped_by_the_time_limit_signal_requeues_and_resumes_to_the_same_metrics(
        slurm_env, reference, tiny_data, tmp_path):
    """slurm/eval.sbatch: USR1 through the batch shell mid-evaluation -> state saved, exit 75 -> requeue -> the
    rerun skips the finished tiles and reports what an uninterrupted evaluation reports."""
    res = json.loads((reference["dir"] / "results.json").read_text())
    log, state_dir, out = tmp_path / "eval.log", tmp_path / "state", tmp_path / "test.json"
    with step_delay("0.3"):  # 39 tiles of 16 x 16: ~12 s, time for the signal to land mid-run
        job = sbatch("-o", log, ROOT / "slurm" / "eval.sbatch", reference["dir"] / "best", "--data", tiny_data,
                     "--split", "test", "--chunk-size", 16, "--state", state_dir, "--state-every", 0, "--json", out)
    deadline = time.time() + 120
    while not (state_dir / "state-rank0.npz").is_file():
        assert time.time() < deadline and state(job) not in DONE, f"no state written\n{read_log(log, tail=4000)}"
        time.sleep(0.2)
    sh("scancel", "--batch", "--signal=USR1", job)
    assert wait_job(job, log, timeout=180) in ("COMPLETED", "GONE"), read_log(log, tail=5000)
    text = read_log(log)
    assert "stopped by signal 10" in text and f"requeueing job {job}" in text, text[-5000:]
    assert "resuming the evaluation from" in text, text[-5000:]
    assert json.loads(out.read_text())["rsum"] == pytest.approx(res["test"]["rsum"])


def submit(*args):
    p = run_itr("submit", *map(str, args), timeout=60)
    jobs = re.findall(r"^job (\S+)", p.stdout, re.M)
    assert jobs, p.stdout
    return jobs, p.stdout


def _runs(db):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["itr"], output_format="list")
    return [r for r in runs if r.data.tags.get("itr.kind") != "sweep"]  # a sweep's own run holds no training


@pytest.fixture(scope="module")
def interrupted(cluster, reference, tiny_data, tmp_path_factory):
    """Two runs stopped mid-training by a time-limit signal, side by side (they share the nodes):

    - slurm/train.sbatch (one node, 2 processes): `--signal=B:USR1@T` goes to the batch shell only;
      `scancel --batch --signal=USR1` is exactly that delivery;
    - `itr submit --nodes 2`: submitit's `--signal=USR2@delay` goes to every task; `scancel --signal=USR2`
      is that delivery (what submitit's job._interrupt(timeout=True) sends).
    """
    d = tmp_path_factory.mktemp("interrupted")
    saved_cache, os.environ["ITR_CACHE"] = os.environ.get("ITR_CACHE"), str(d / "cache")
    t = {"out": d / "sbatch", "log": d / "sbatch.log"}
    s = {"out": d / "submit", "db": d / "mlflow.db"}
    os.environ["ITR_PROCS_PER_NODE"] = "2"
    try:
        with step_delay():
            t["job"] = sbatch("-o", t["log"], ROOT / "slurm" / "train.sbatch", DEMO, *overrides(tiny_data),
                              "train.world_size=2", "tracking.enabled=false", "--out", t["out"])
    finally:
        del os.environ["ITR_PROCS_PER_NODE"]
    with step_delay():
        (s["job"],), s["stdout"] = submit(DEMO, *overrides(tiny_data), "train.world_size=2",
                                          f"tracking.uri=sqlite:///{s['db']}", "--out", s["out"], "--cluster",
                                          "slurm", "--nodes", "2", "--time", "10")
    s["log"] = s["out"] / "submitit" / f"{s['job']}_0_log.out"
    for run, how in ((t, ["--batch", "--signal=USR1"]), (s, ["--signal=USR2"])):
        wait_step(run["out"], CUT, run["job"], run["log"])
        sh("scancel", *how, run["job"])
    for run in (t, s):
        run["state"] = wait_job(run["job"], run["log"], timeout=180)
        run["text"] = read_log(run["log"])
    if saved_cache is None:
        os.environ.pop("ITR_CACHE", None)
    else:
        os.environ["ITR_CACHE"] = saved_cache
    return {"sbatch": t, "submit": s}


def test_the_time_limit_signal_reaches_the_trainer_through_the_batch_shell_and_the_job_requeues(
        slurm_env, reference, interrupted):
    """The single-node recipe, 2 processes on one (CPU) node: the same world size, so the same weights."""
    run = interrupted["sbatch"]
    job, text, out = run["job"], run["text"], run["out"]
    assert run["state"] in ("COMPLETED", "GONE"), text[-5000:]
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text, text[-5000:]
    stopped = re.search(r"stopped by signal (\d+) at step (\d+)", text)
    assert stopped and int(stopped.group(1)) == 10, text[-5000:]  # SIGUSR1, in the trainer
    assert "restart 1" in text and f"step {stopped.group(2)}" in re.search(r"resumed from .*", text).group(0)
    assert json.loads((out / "results.json").read_text())["global_step"] == STEPS
    assert_same_weights(reference["dir"], out)


def test_itr_submit_on_two_nodes_checkpoints_requeues_on_the_timeout_signal_and_logs_to_mlflow(
        slurm_env, reference, interrupted):
    run = interrupted["submit"]
    job, text, out, db = run["job"], run["text"], run["out"], run["db"]
    assert f"sqlite:///{db}" in run["stdout"] and "experiment 'itr'" in run["stdout"]
    assert "world size 2" in run["stdout"] and str(run["log"]) in run["stdout"]
    assert run["state"] in ("COMPLETED", "GONE"), text[-5000:]
    assert f"requeueing job {job}" in text and "Requeued job" in text, text[-5000:]
    assert "resumed from" in text
    res = json.loads((out / "results.json").read_text())
    assert res["global_step"] == STEPS and res["world_size"] == 2
    assert_same_weights(reference["dir"], out)
    runs = _runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == res["run_id"]


def test_itr_submit_a_single_job_and_a_sweep_array_finish_and_log_to_mlflow(slurm_env, tiny_data, tmp_path):
    db = tmp_path / "mlflow.db"
    common = [*tiny_overrides(tiny_data, **{"train.epochs": 1}), f"tracking.uri=sqlite:///{db}", "--cluster", "slurm",
              "--time", "10"]
    (single,), _ = submit(DEMO, *common, "--out", tmp_path / "single")
    jobs, text = submit(DEMO, *common, "--out", tmp_path / "sweep", "--sweep", "train.seed=0,1,2")
    assert len(jobs) == 3 and len({j.split("_")[0] for j in jobs}) == 1  # one array
    for j in [single, *jobs]:
        wait_job(j, timeout=150)
    for d in [tmp_path / "single"] + [tmp_path / "sweep" / f"train.seed={s}" for s in range(3)]:
        assert (d / "results.json").is_file(), f"{d}: {sorted(p.name for p in d.glob('*'))}"
    seeds = sorted(r.data.params["train.seed"] for r in _runs(db))
    assert seeds == ["0", "0", "1", "2"]
    parents = {r.data.tags.get("mlflow.parentRunId") for r in _runs(db) if r.data.params["train.seed"] != "0"}
    assert len(parents) == 1 and None not in parents  # the array's members nest under one sweep run
    assert all(r.info.status == "FINISHED" for r in _runs(db))


@pytest.mark.parametrize("args, message", [
    (["train.no_such_key=1"], "no_such_key"),
    (["--sweep", "optim.no_such=1,2"], "no_such"),
    (["--sweep", "train.seed"], "KEY=V1,V2"),
    (["--time", "soon"], "--time"),
])
def test_itr_submit_rejects_bad_input_before_submitting(args, message, tiny_data, tmp_path, capsys):
    from itr.cli import main

    assert main(["submit", str(DEMO), "--out", str(tmp_path / "r"), "--cluster", "slurm",
                 f"data.root={tiny_data}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "itr submit: error" in err
    assert not (tmp_path / "r" / "submitit").exists()


def test_itr_submit_a_missing_recipe_is_an_error(tmp_path, capsys):
    from itr.cli import main

    assert main(["submit", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r"), "--cluster", "local"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
