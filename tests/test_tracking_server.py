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
                    + (self.root / f"server-{port}.log").read_text()[-3000:])

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
    assert [r.info.run_id for r in runs] == [res["run_id"]]  # one run: rank 0 only
    run = runs[0]
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["nodes"] == "1" and tags["sweep"] == "2proc" and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(res["run_id"], "loss")]
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
    rows = [line.split(",") for line in open(f"{out}.csv").read().splitlines()[1:]]
    assert [r[0] for r in rows] == expected
    assert [float(r[6]) for r in rows] == pytest.approx([results[n] for n in expected])
    assert [r[-4] for r in rows] == ["2", "2"]  # epochs, from the dev rsum history
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
    out = (tmp_path / "train.log").read_text()
    assert rc == 0, out[-5000:]
    assert "training continues without the tracking server" in out and "itr sync" in out
    res = json.loads((run / "results.json").read_text())
    assert res["test"] is not None and res["run_id"]

    srv.start()  # the same backend database and port
    client = mlflow.tracking.MlflowClient(srv.uri)
    before = [m.step for m in client.get_metric_history(res["run_id"], "dev_rsum")]
    assert before[:1] == [1] and len(before) < 3  # the server saw the first epoch, not all
    assert client.get_run(res["run_id"]).info.status == "RUNNING"
    capsys.readouterr()
    assert main(["sync", str(run), "--tracking-uri", srv.uri]) == 0
    assert f"run {res['run_id']}" in capsys.readouterr().out
    r = client.get_run(res["run_id"])
    assert sorted(m.step for m in client.get_metric_history(res["run_id"], "dev_rsum")) == [1, 2, 3]
    assert r.data.metrics["test_rsum"] == pytest.approx(res["test"]["rsum"]) and r.info.status == "FINISHED"
    loss = [m.step for m in client.get_metric_history(res["run_id"], "loss")]
    assert sorted(loss) == list(range(1, res["global_step"] + 1))
    assert {"results.json", "recall_at_k.png", "best_checkpoint"} <= {a.path for a in client.list_artifacts(res["run_id"])}
    assert main(["sync", str(run)]) == 0  # again, to the URI the run was started with: nothing new
    again = capsys.readouterr().out
    assert "0 metric values, 0 params" in again and "0 artifacts" in again
    assert sorted(m.step for m in client.get_metric_history(res["run_id"], "loss")) == loss
