"""MLflow tracking against a real `mlflow server` on 127.0.0.1: a 2-process training logs once, `itr compare`
on two runs, and a server that dies mid-run (training finishes, `itr sync` fills in the rest)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from itr.logs import read_log

from conftest import ROOT, free_port
from test_tracking_journal import micro_overrides

pytestmark = pytest.mark.slow
DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
MLFLOW = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"


class Server:
    """`mlflow server` (sqlite backend, local artifact root) in its own process group."""

    def __init__(self, root):
        self.root = root
        self.db = root / "server.db"
        self.proc = None
        self.port = free_port()

    def start(self, deadline_s=120):
        """Start (or restart, on the same port and database)."""
        port = self.port
        self.uri = f"http://127.0.0.1:{port}"
        self.log = open(self.root / f"server-{port}.log", "a")
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health within {deadline_s} s:\n"
                    + read_log(self.root / f"server-{port}.log", tail=3000))

    def stop(self, sig=signal.SIGTERM):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the server and its uvicorn worker, both ours
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow_server")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from itr.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("micro"), splits=(("train", 32), ("dev", 20), ("test", 20)),
                    dim=16, regions=4, seed=2)


def test_two_process_training_logs_one_run_from_rank_0(server, micro, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    p = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
                        "--main_process_port", "0", "-m", "itr", "train", str(DEMO), *micro_overrides(micro),
                        "train.world_size=2", f"tracking.uri={server.uri}", "tracking.experiment=two-proc",
                        "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", ITR_SWEEP="2proc"),
                       timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "training continues" not in p.stderr  # no tracking warning
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    client = mlflow.tracking.MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("two-proc").experiment_id])
    trainings = [r for r in runs if r.data.tags.get("itr.kind") != "sweep"]
    assert [r.info.run_id for r in trainings] == [res["run_id"]]  # one run: rank 0 only (beside its sweep's run)
    run = trainings[0]
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["nodes"] == "1" and tags["sweep"] == "2proc" and run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics  # one node: MLflow's plain keys
    steps = [m.step for m in client.get_metric_history(res["run_id"], "train/loss_warmup")]  # 1 epoch: the warm-up
    assert sorted(steps) == list(range(1, res["global_step"] + 1))  # each step logged once
    assert {"recall_at_k.png", "launch.json", "best_checkpoint"} <= {a.path for a in client.list_artifacts(res["run_id"])}
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert launch["env"]["WORLD_SIZE"] == "2" and any("accelerate" in a for a in launch.get("launcher", []))
    journal = [json.loads(line) for line in (tmp_path / "run" / "mlflow_journal.jsonl").read_text().splitlines()]
    assert [r["op"] for r in journal].count("start") == 1 and journal[-1]["op"] == "end"


def test_compare_two_runs_on_the_server(server, micro, tmp_path, monkeypatch, capsys):
    from itr.cli import main
    from itr.config import load_recipe
    from itr.train import train

    monkeypatch.setenv("ITR_SWEEP", "cmp")
    results = {}
    for name, lr in (("lr-high", "2e-2"), ("lr-zero", "0")):
        res = train(load_recipe(DEMO, micro_overrides(micro, **{"optim.lr": lr, "train.epochs": 2})
                                + [f"tracking.uri={server.uri}", f"tracking.run_name={name}"]), tmp_path / name)
        results[name] = res["test"]["rsum"]
    assert results["lr-high"] != results["lr-zero"]
    expected = sorted(results, key=results.get, reverse=True)
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", "--tracking-uri", server.uri, "--filter", "tags.sweep = 'cmp'", "--csv", f"{out}.csv",
                 "--markdown", f"{out}.md", "--plot", f"{out}.png"]) == 0
    table = capsys.readouterr().out
    assert table.index(expected[0]) < table.index(expected[1])
    link = next(line for line in table.splitlines() if "in the MLflow UI" in line)
    assert f"{server.uri}/#/compare-runs?runs=" in link and link.endswith("&workflowType=machine_learning")
    header, *rows = [line.split(",") for line in open(f"{out}.csv").read().splitlines()]
    col = {name: [r[header.index(name)] for r in rows] for name in header}
    assert col["run"] == expected and col["optim.lr"] == [{"lr-high": "0.02", "lr-zero": "0.0"}[n] for n in expected]
    assert [float(v) for v in col["rsum"]] == pytest.approx([results[n] for n in expected])
    assert col["epochs"] == ["2", "2"]  # epochs, from the dev rsum history
    assert open(f"{out}.md").read().count("\n") == 4 and open(f"{out}.png", "rb").read(4) == b"\x89PNG"


def test_server_killed_mid_run_training_finishes_and_sync_fills_in(server, tmp_path, micro, capsys):
    from itr.cli import main

    srv = server
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "itr", "train", str(DEMO), *micro_overrides(micro, **{"train.epochs": 3}),
           f"tracking.uri={srv.uri}", "tracking.experiment=killed", "--out", str(run)]
    log = open(tmp_path / "train.log", "w")
    train = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        end = time.monotonic() + 180
        while not (run / "last").exists() and train.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        srv.stop(signal.SIGKILL)  # the server dies after epoch 1
        rc = train.wait(timeout=240)
    finally:
        if train.poll() is None:
            train.kill()
        log.close()
    out = read_log(tmp_path / "train.log")
    assert rc == 0, out[-5000:]
    assert "training continues without the tracking server" in out and "itr sync" in out
    res = json.loads((run / "results.json").read_text())
    assert res["test"] is not None and res["run_id"]

    srv.start()  # the same backend database and port
    client = mlflow.tracking.MlflowClient(srv.uri)
    before = [m.value for m in client.get_metric_history(res["run_id"], "dev/epoch")]
    assert before[:1] == [1] and len(before) < 3  # the server saw the first epoch, not all
    assert client.get_run(res["run_id"]).info.status == "RUNNING"
    capsys.readouterr()
    assert main(["sync", str(run), "--tracking-uri", srv.uri]) == 0
    assert f"run {res['run_id']}" in capsys.readouterr().out
    r = client.get_run(res["run_id"])
    assert sorted(m.value for m in client.get_metric_history(res["run_id"], "dev/epoch")) == [1, 2, 3]
    assert r.data.metrics["test/rsum"] == pytest.approx(res["test"]["rsum"]) and r.info.status == "FINISHED"
    assert [d.dataset.name for d in r.inputs.dataset_inputs] == ["synthetic/train"]
    loss = [m.step for k in ("train/loss_warmup", "train/loss") for m in client.get_metric_history(res["run_id"], k)]
    assert sorted(loss) == list(range(1, res["global_step"] + 1))
    assert {"results.json", "recall_at_k.png", "best_checkpoint"} <= {a.path for a in client.list_artifacts(res["run_id"])}
    assert main(["sync", str(run)]) == 0  # again, to the URI the run was started with: nothing new
    again = capsys.readouterr().out
    assert "0 metric values, 0 params" in again and "0 artifacts" in again
    assert sorted(m.step for k in ("train/loss_warmup", "train/loss")
                  for m in client.get_metric_history(res["run_id"], k)) == sorted(loss)


# ----------------------------------------------------------------------------- what a run looks like in MLflow

@pytest.fixture(scope="module")
def two_nodes(server, micro, tmp_path_factory):
    """A 2-epoch training launched as two nodes of one process each (two torchrun agents on 127.0.0.1) in sweep
    `nodes`, then `itr eval --log-run` of its best checkpoint; the printed output of both."""
    d = tmp_path_factory.mktemp("two_nodes")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", ITR_SWEEP="nodes", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    logs = [d / f"node{i}.log" for i in (0, 1)]
    procs = []
    try:
        for i in (0, 1):
            cmd = [torchrun, "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), "-m", "itr", "train", str(DEMO),
                   *micro_overrides(micro, **{"train.epochs": 2}), "train.world_size=2", f"tracking.uri={server.uri}",
                   "tracking.experiment=structure", "--out", str(d / "run")]
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [log.read_text(errors="replace") for log in logs]
    assert rcs == [0, 0], out[0][-4000:] + out[1][-4000:]
    ev = subprocess.run([sys.executable, "-m", "itr", "eval", str(d / "run" / "best"), "--data", str(micro), "--split",
                         "test", "--log-run", "--run-name", "nested-eval"], capture_output=True, text=True, env=env,
                        timeout=180)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    return {"res": json.loads((d / "run" / "results.json").read_text()), "out": out, "eval_out": ev.stdout}


def test_a_training_run_reads_like_one_in_mlflow(server, two_nodes):
    """Sections by prefix, dev on the optimizer-step axis, one test family, the warm-up loss apart, system metrics
    per node, the dataset input, the sweep above the run and the evaluation below it, the user, and links that
    open the training view."""
    from itr.eval.metrics import KEYS
    from itr.tracking import user_name

    client = mlflow.tracking.MlflowClient(server.uri)
    res = two_nodes["res"]
    run = client.get_run(res["run_id"])
    m, tags = run.data.metrics, run.data.tags

    def history(key):
        return [(x.step, x.value) for x in sorted(client.get_metric_history(res["run_id"], key), key=lambda x: x.step)]

    assert {k.split("/")[0] for k in m} == {"train", "dev", "test", "system"}
    warm, loss = [s for s, _ in history("train/loss_warmup")], [s for s, _ in history("train/loss")]
    assert max(warm) < min(loss) and warm + loss == list(range(1, res["global_step"] + 1))  # epoch 1 is the warm-up
    half = res["global_step"] // 2
    assert history("dev/epoch") == [(half, 1), (res["global_step"], 2)]  # dev at the optimizer step of each epoch end
    assert [s for s, _ in history("dev/rsum")] == [half, res["global_step"]]
    assert {f"test/{k}" for k in KEYS} <= set(m) and not [k for k in m if k.startswith("test_")]
    assert m["test/rsum"] == pytest.approx(res["test"]["rsum"])
    for node in (0, 1):  # MLflow's own monitor, one per node, into rank 0's run
        assert f"system/node{node}/cpu_utilization_percentage" in m and f"system/node{node}/system_memory_usage_megabytes" in m

    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("synthetic/train", tags["data.manifest_digest"])
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "training")}
    assert json.loads(inp.dataset.profile)["num_images"] == 32

    sweep = client.get_run(tags["mlflow.parentRunId"])
    assert tags["sweep"] == "nodes" and sweep.data.tags["itr.kind"] == "sweep" and sweep.data.tags["itr.sweep_of"] == "nodes"
    ev = client.search_runs([run.info.experiment_id], "attributes.run_name = 'nested-eval'")[0]
    assert ev.data.tags["mlflow.parentRunId"] == res["run_id"] and ev.data.metrics["test/rsum"] == pytest.approx(m["test/rsum"])
    assert tags["mlflow.user"] == user_name() != ""

    link = f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{res['run_id']}?workflowType=machine_learning"
    assert f"MLflow run {res['run_id']}: open {link}" in two_nodes["out"][0]
    assert f"/runs/{ev.info.run_id}?workflowType=machine_learning" in two_nodes["eval_out"]
    assert "View run" not in two_nodes["out"][0] + two_nodes["eval_out"]  # MLflow's own link (GenAI view) is off


def test_the_run_page_in_chromium_shows_the_metric_sections(server, two_nodes, tmp_path):
    """The printed link's Model metrics tab in headless Chromium: the training view, one section per prefix with
    as many charts as the run has metrics there. The screenshot is kept (printed; copied to $ITR_TEST_ARTIFACTS)."""
    import re

    exe = shutil.which("chromium")
    if exe is None:
        if os.geteuid() == 0:  # root can install it: `python3 dev.py test` does (apt-get install chromium)
            pytest.fail("chromium is not installed: apt-get install -y chromium (python3 dev.py test does it)")
        pytest.skip("no chromium (not root, so it cannot be installed here)")
    res = two_nodes["res"]
    link = re.search(rf"open (\S+/runs/{res['run_id']}\?\S+)", two_nodes["out"][0]).group(1)
    page = link.replace("?", "/model-metrics?", 1)
    shot = tmp_path / "mlflow_run_page.png"
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,3600",
                        "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw",
                        f"--screenshot={shot}", "--dump-dom", page], capture_output=True, text=True, timeout=240)
    print(f"run page screenshot: {shot}")
    if os.environ.get("ITR_TEST_ARTIFACTS"):
        os.makedirs(os.environ["ITR_TEST_ARTIFACTS"], exist_ok=True)
        shutil.copy(shot, os.environ["ITR_TEST_ARTIFACTS"])
    assert p.returncode == 0 and shot.is_file(), p.stderr[-3000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1600 and len(png) > 50_000
    dom = p.stdout
    sections = {name: int(n) for name, n in re.findall(r">(\w+)</div><div[^>]*>\((\d+)\)</div>", dom)}
    metrics = mlflow.tracking.MlflowClient(server.uri).get_run(res["run_id"]).data.metrics
    assert sections == {s: sum(k.startswith(f"{s}/") for k in metrics) for s in ("dev", "test", "train")}, sections
    assert "Evaluation runs" not in dom  # the GenAI view's menu: the link opened the training view
