"""MLflow tracking without a server: what a run records, the journal and `itr sync`, `itr compare`, eval logging."""
import json
import os
import time
import warnings
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.entities import Metric, Param, RunTag, ViewType

from itr import tracking
from itr.cli import main
from itr.config import load_recipe
from itr.eval.metrics import KEYS

from conftest import ROOT, free_port, small_overrides, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """Smaller than tiny_data: 5 steps of 32 pairs per epoch."""
    from itr.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("micro"), splits=(("train", 32), ("dev", 20), ("test", 20)),
                    dim=16, regions=4, seed=2)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty MLflow sqlite database: creating one runs ~40 migrations (seconds), copying it does not."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.tracking.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(store_template, tmp_path):
    """A fresh MLflow store in tmp_path/mlflow.db (the default store of a run started in tmp_path)."""
    import shutil

    shutil.copy(store_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def micro_overrides(root, **extra):
    return tiny_overrides(root, **{"data.images_per_shard": 16, "model.embed_dim": 16, "model.text.word_dim": 8,
                                   "train.epochs": 1, "train.log_every": 1, **extra})


def _cfg(uri, experiment="itr", run_name=None):
    return SimpleNamespace(uri=uri, experiment=experiment, run_name=run_name)


def test_training_records_environment_metrics_artifacts_and_eval_lines_up(micro_data, tmp_path, monkeypatch, store):
    from itr.eval.job import run_eval
    from itr.train import train

    monkeypatch.setenv("ITR_SWEEP", "sweep-a")
    run = tmp_path / "run"
    res = train(load_recipe(DEMO, micro_overrides(micro_data)), run)
    uri = store
    client = mlflow.tracking.MlflowClient(uri)
    r = client.get_run(res["run_id"])
    tags, metrics = r.data.tags, r.data.metrics
    assert tags["model"] == "vsepp" and tags["dataset"] == "synthetic" and tags["sweep"] == "sweep-a"
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in ("true", "false", "unknown")
    for pkg in ("torch", "accelerate", "transformers", "webdataset", "mlflow", "itr"):
        assert tags[f"version.{pkg}"], pkg
    assert tags["world_size"] == "1" and tags["nodes"] == "1" and tags["precision"] == "no"
    assert tags["zero_stage"] == "none" and "torch.optim.Adam" in tags["optimizer_impl"]
    assert len(tags["data.manifest_digest"]) == 16 and len(tags["data.manifest_sha256"]) == 16
    assert tags["best_checkpoint"] == "artifact:best_checkpoint"
    # per step (the one epoch is the warm-up): loss, lr, grad norm, throughput, memory; dev at the last step; test
    for key in ("train/loss_warmup", "train/lr", "train/grad_norm", "train/samples_per_sec", "train/cpu_rss_mb"):
        assert len(client.get_metric_history(res["run_id"], key)) == 5, key
    assert {f"dev/{k}" for k in KEYS} | {f"test/{k}" for k in KEYS} | {"dev/epoch"} <= set(metrics)
    assert all("/" in k for k in metrics) and not any(k.startswith("test_") for k in metrics)  # one name per value
    assert metrics["test/rsum"] == pytest.approx(res["test"]["rsum"]) and metrics["dev/epoch"] == 1
    assert metrics["train/samples_per_sec_mean"] > 0 and metrics["train/cpu_rss_mb"] > 10
    assert [(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs] == [
        ("synthetic/train", tags["data.manifest_digest"])]
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"recipe.yaml", "results.json", "curves.png", "recall_at_k.png", "launch.json", "best_checkpoint"} <= arts
    assert "best_checkpoint/model.safetensors" in {a.path for a in client.list_artifacts(res["run_id"], "best_checkpoint")}
    launch = json.loads((run / "launch.json").read_text())
    assert launch["argv"] and launch["env"].get("ITR_SWEEP") == "sweep-a"
    assert (run / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    ops = [rec["op"] for rec in tracking.read_journal(run / tracking.JOURNAL)]
    assert ops[0] == "start" and ops[-1] == "end" and "offline" not in ops and "input" in ops

    # itr eval into the training run (another protocol) and into a new evaluation run: the same key names
    run_eval(run / "best", micro_data, "test", protocol="5k", log_to_run=res["run_id"])
    assert client.get_run(res["run_id"]).data.metrics["test_5k/rsum"] == pytest.approx(res["test"]["rsum"])
    assert main(["eval", str(run / "best"), "--data", str(micro_data), "--split", "test", "--log-run",
                 "--run-name", "later-eval"]) == 0
    ev = [x for x in client.search_runs([r.info.experiment_id]) if x.info.run_name == "later-eval"][0]
    assert ev.data.metrics == pytest.approx({f"test/{k}": res["test"][k] for k in KEYS})  # the recipe's protocol
    assert ev.data.tags["itr.kind"] == "eval" and ev.data.tags["train_run_id"] == res["run_id"]
    assert ev.data.tags["mlflow.parentRunId"] == res["run_id"]  # nested under the training
    assert ev.data.tags["model"] == "vsepp" and ev.data.params["model.name"] == "vsepp" and ev.info.status == "FINISHED"
    assert {"eval/test_1k_metrics.json", "eval/test_1k_recall_at_k.png"} <= {
        a.path for a in client.list_artifacts(ev.info.run_id, "eval")}
    # and both line up in `itr compare` (test/* in both)
    rows = tracking_compare(uri)
    assert {row["run_id"]: row["rsum"] for row in rows} == pytest.approx(
        {res["run_id"]: res["test"]["rsum"], ev.info.run_id: res["test"]["rsum"]})


def tracking_compare(uri, **kw):
    from itr.compare import compare

    return compare(tracking_uri=uri, out=open(os.devnull, "w"), **kw)


def test_a_run_with_score_test_false_never_reads_the_test_split_and_logs_no_test(small_shards, tmp_path, store):
    """A selection sweep's member: the test split is neither checked nor scored (here it is garbage), results.json
    and MLflow say so, and `itr compare` ranks such runs by their best dev epoch."""
    import shutil

    from itr.errors import ItrError
    from itr.train import train

    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    for f in data.glob("test*"):  # the shard, its captions and its manifest
        f.write_bytes(b"\0garbage" * 50)
    over = small_overrides(data, **{"tracking.enabled": "true", "tracking.uri": store, "train.ema_decay": 0.9})
    with pytest.raises(ItrError, match="test"):  # by default a bad test split fails before the first step
        train(load_recipe(DEMO, over), tmp_path / "default")
    res = train(load_recipe(DEMO, over + ["train.score_test=false"]), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == res and res["test_scored"] is False and not {"test", "test_ema"} & res.keys()
    assert res["dev"]["rsum"] > 0 and (tmp_path / "run" / "best_ema").is_dir()
    run = mlflow.tracking.MlflowClient(store).get_run(res["run_id"])
    assert run.data.tags["test_scored"] == "false" and run.data.params["train.score_test"] == "False"
    assert not [k for k in run.data.metrics if k.startswith("test")] and "dev/rsum" in run.data.metrics
    (row,) = tracking_compare(store)
    assert row["metric"] == f"dev (epoch {res['best_epoch']})" and row["rsum"] == pytest.approx(res["dev"]["rsum"])


def test_a_large_checkpoint_is_only_referenced(tmp_path, monkeypatch, store):
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"0" * 300_000)
    t = tracking.Tracker(_cfg(store), journal=tmp_path / tracking.JOURNAL)
    monkeypatch.setenv("ITR_MLFLOW_MAX_ARTIFACT_MB", "0.1")
    t.log_checkpoint(ckpt)
    t.finish()
    client = mlflow.tracking.MlflowClient(t.uri)
    tags = client.get_run(t.run_id).data.tags
    assert tags["best_checkpoint"].startswith("reference:") and tags["best_checkpoint.path"].endswith(str(ckpt))
    assert client.list_artifacts(t.run_id) == []


def test_unreachable_server_keeps_a_journal_fast_and_sync_uploads_it_once(tmp_path, monkeypatch, store):
    for k in tracking.HTTP_LIMITS:
        monkeypatch.delenv(k, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = tracking.Tracker(_cfg(dead, run_name="offline-run"), journal=tmp_path / "run" / tracking.JOURNAL)
        t.log_params({"optim.lr": 0.1, "model.name": "vsepp"})
        t.set_tags({"model": "vsepp"})
        for step in (1, 2, 3):
            t.log_metrics({"loss": 1.0 / step, "grad_norm": float("nan")}, step=step)
        t.log_metrics({"dev_rsum": 100.0}, step=1)
        (tmp_path / "run" / "results.json").write_text("{}")
        t.log_artifact(tmp_path / "run" / "results.json")
        t.finish()
    elapsed = time.perf_counter() - t0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"
    assert elapsed < 20, f"an unreachable server stalled the tracker for {elapsed:.0f} s"
    msgs = " ".join(str(x.message) for x in w)
    assert "MLflow unavailable at start" in msgs and "itr sync" in msgs
    assert t.run_id is None and not t.online

    assert main(["sync", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    first = tracking.sync(tmp_path / "run", uri=store, quiet=True)  # again: nothing new, same run
    assert first[0]["metrics"] == first[0]["params"] == first[0]["artifacts"] == 0 and not first[0]["created"]
    client = mlflow.tracking.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("itr").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == first[0]["run_id"]
    r = runs[0]
    assert r.info.run_name == "offline-run" and r.info.status == "FINISHED"
    assert r.data.params == {"optim.lr": "0.1", "model.name": "vsepp"} and r.data.tags["model"] == "vsepp"
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert len(client.get_metric_history(r.info.run_id, "grad_norm")) == 3
    assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["results.json"]


def test_sync_fills_in_what_a_run_missed_after_the_store_failed(tmp_path, store):
    t = tracking.Tracker(_cfg(store), journal=tmp_path / tracking.JOURNAL)
    t.log_metrics({"loss": 3.0}, step=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.client = SimpleNamespace(**{name: _boom for name in ("log_batch", "log_artifact", "set_terminated")})
        t.log_metrics({"loss": 2.0}, step=2)  # fails: warns once, goes offline
        t.log_metrics({"loss": 1.0}, step=3)
        t.finish()
    assert sum("training continues" in str(x.message) for x in w) == 1
    client = mlflow.tracking.MlflowClient(store)
    assert [m.value for m in client.get_metric_history(t.run_id, "loss")] == [3.0]
    assert client.get_run(t.run_id).info.status == "RUNNING"
    out = tracking.sync(tmp_path, quiet=True)  # the journal's own URI
    assert out[0]["run_id"] == t.run_id and out[0]["metrics"] == 2 and not out[0]["created"]
    assert sorted(m.value for m in client.get_metric_history(t.run_id, "loss")) == [1.0, 2.0, 3.0]
    assert client.get_run(t.run_id).info.status == "FINISHED"


def _boom(*a, **kw):
    raise ConnectionError("server gone")


def _fake_run(client, exp_id, name, test=None, dev=(), sweep="s", sps=100.0, legacy=False, params=None, ema=(),
              r1=()):
    """A finished training run: dev/* at optimizer steps (10 per epoch) with dev/epoch, test/*; ``legacy``: the
    names before the prefixes (dev_* at step = epoch, test_*, train_samples_per_sec). ``ema``: dev_ema rsums per
    epoch; ``r1``: dev i2t_R1 per epoch (else rsum / 6 like every recall); ``params``: the recipe keys."""
    run = client.create_run(exp_id, run_name=name, tags={"model": "vsepp", "dataset": "synthetic", "sweep": sweep})
    recalls = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10")
    key = (lambda fam, k: f"{fam}_{k}") if legacy else (lambda fam, k: f"{fam}/{k}")
    metrics = [Metric("train_samples_per_sec" if legacy else "train/samples_per_sec_mean", sps, 0, 0)]
    for epoch, rsum in enumerate(dev, 1):
        step = epoch if legacy else 10 * epoch
        metrics += [Metric(key("dev", "rsum"), rsum, epoch, step)] + [
            Metric(key("dev", k), r1[epoch - 1] if r1 and k == "i2t_R1" else rsum / 6, epoch, step) for k in recalls]
        if not legacy:
            metrics.append(Metric("dev/epoch", epoch, epoch, step))
    for epoch, rsum in enumerate(ema, 1):
        metrics += [Metric(key("dev_ema", k), rsum if k == "rsum" else rsum / 6, epoch, 10 * epoch)
                    for k in ("rsum", *recalls)]
    if test is not None:
        metrics += [Metric(key("test", k), test / 6, 0, 0) for k in recalls] + [Metric(key("test", "rsum"), test, 0, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag("x", "1")],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_compare_sorts_by_rsum_and_writes_csv_markdown_and_plot(tmp_path, capsys, store):
    client = mlflow.tracking.MlflowClient(store)
    exp = client.create_experiment("itr")
    low = _fake_run(client, exp, "low", test=300.0, dev=(200.0, 250.0), legacy=True)  # logged before the prefixes
    client.create_run(exp, run_name="sweep s", tags={"itr.kind": "sweep", "sweep": "s"})  # a parent: no row
    high = _fake_run(client, exp, "high", test=450.0, dev=(300.0, 400.0, 420.0))
    devonly = _fake_run(client, exp, "dev-only", dev=(100.0, 350.0, 320.0))
    other = _fake_run(client, exp, "other-sweep", test=500.0, sweep="t")
    out = tmp_path / "cmp"
    assert main(["compare", "--tracking-uri", store, "--filter", "tags.sweep = 's'", "--csv", f"{out}.csv",
                 "--markdown", f"{out}.md", "--plot", f"{out}.png"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("high") < printed.index("dev-only") < printed.index("low") and "other-sweep" not in printed
    lines = open(f"{out}.csv").read().splitlines()
    assert lines[0].startswith("run,run_id,model,dataset,sweep,metric,rsum,i2t_R1")
    assert [line.split(",")[1] for line in lines[1:]] == [high, devonly, low]
    assert lines[2].split(",")[5] == "dev (epoch 2)" and float(lines[2].split(",")[6]) == 350.0
    assert float(lines[2].split(",")[7]) == pytest.approx(350 / 6)  # the best dev step's recalls
    assert lines[3].split(",")[5:7] == ["test", "300.0"] and float(lines[3].split(",")[-4]) == 2  # old names
    assert float(lines[1].split(",")[-4]) == 3  # epochs: from the dev history
    md = open(f"{out}.md").read().splitlines()
    assert md[0].startswith("| run | id | model |") and len(md) == 5 and "| 450.0 |" in md[2]
    assert open(f"{out}.png", "rb").read(4) == b"\x89PNG"
    rows = tracking_compare(store, run_ids=[low, other])
    assert [r["run_id"] for r in rows] == [other, low]


def test_compare_ranks_a_dev_selection_by_the_best_dev_epoch_with_the_swept_keys(tmp_path, capsys, store):
    client = mlflow.tracking.MlflowClient(store)
    exp = client.create_experiment("itr")
    sel = lambda loss, ema, run_name: {"model.name": "vsepp", "loss.name": loss, "train.ema_decay": ema,  # noqa: E731
                                       "train.score_test": False, "tracking.run_name": run_name}
    # best dev 380 (epoch 2) but the last epoch 350; b: 375 at its last epoch; scored: test 500, best dev 200
    a = _fake_run(client, exp, "a", dev=(300.0, 380.0, 350.0), ema=(390.0, 340.0, 330.0), params=sel("hinge", 0, "a"))
    b = _fake_run(client, exp, "b", dev=(370.0, 360.0, 375.0), params=sel("infonce", 0, "b"))
    scored = _fake_run(client, exp, "scored", test=500.0, dev=(100.0, 200.0), params=sel("infonce", 0.95, "c"))
    out = tmp_path / "sel"
    assert main(["compare", "--tracking-uri", store, "--csv", f"{out}.csv"]) == 0
    assert "ranked by each run's best dev epoch" in capsys.readouterr().out
    header, *lines = [line.split(",") for line in open(f"{out}.csv").read().splitlines()]
    assert header[:8] == ["run", "run_id", "model", "dataset", "sweep", "loss.name", "train.ema_decay", "metric"]
    col = {name: [line[header.index(name)] for line in lines] for name in header}
    assert col["run_id"] == [a, b, scored]  # by the best dev epoch, never by test: the last epoch would rank b first
    assert col["metric"] == ["dev (epoch 2)", "dev (epoch 3)", "dev (epoch 2)"]
    assert [float(v) for v in col["rsum"]] == [380.0, 375.0, 200.0]
    assert col["loss.name"] == ["hinge", "infonce", "infonce"] and "tracking.run_name" not in header
    assert float(col["i2t_R1"][0]) == pytest.approx(380 / 6)  # the best epoch's recalls
    rows = tracking_compare(store, metric="test")  # asked for: test where a run has it
    assert [(r["run_id"], r["metric"], r["rsum"]) for r in rows] == [
        (scored, "test", 500.0), (a, "dev (epoch 2)", 380.0), (b, "dev (epoch 3)", 375.0)]
    ema = {r["run_id"]: (r["metric"], r["rsum"]) for r in tracking_compare(store, metric="dev_ema")}
    assert ema[a] == ("dev_ema (epoch 1)", 390.0) and ema[b] == ("", None)


def test_compare_best_dev_follows_eval_best_metric_and_ignores_dev_ema_as_a_test_family(store):
    client = mlflow.tracking.MlflowClient(store)
    exp = client.create_experiment("itr")
    # selected on i2t_R1: epoch 1 (R1 70) although epoch 2 has the higher rsum; no score_test param: an older run
    r1 = _fake_run(client, exp, "r1", dev=(300.0, 320.0), r1=(70.0, 50.0), params={"eval.best_metric": "i2t_R1"})
    ema = _fake_run(client, exp, "ema", dev=(310.0, 305.0), ema=(400.0, 380.0))  # no test: dev, not dev_ema/*
    got = {r["run_id"]: (r["metric"], r["rsum"], r["i2t_R1"]) for r in tracking_compare(store)}
    assert got == {r1: ("dev (epoch 1)", 300.0, 70.0), ema: ("dev (epoch 1)", 310.0, 310 / 6)}
    last = {r["run_id"]: r["rsum"] for r in tracking_compare(store, metric="dev")}
    assert last == {r1: 300.0, ema: 310.0}  # --metric dev: the selecting epoch, not the last one


def test_compare_shows_only_a_few_differing_recipe_keys():
    from itr.compare import differing_keys

    run = lambda **p: SimpleNamespace(data=SimpleNamespace(params={"model.name": "vsepp", **p}))  # noqa: E731
    assert differing_keys([run(**{"optim.lr": "0.1", "tracking.run_name": "x"}),
                           run(**{"optim.lr": "0.2", "tracking.run_name": "y"}), run()]) == []  # not in every run
    assert differing_keys([run(**{"optim.lr": "0.1", "a.b": "1"}), run(**{"optim.lr": "0.2", "a.b": "1"})]) == ["optim.lr"]
    many = [run(**{f"k.{i}": str(j) for i in range(7)}) for j in range(2)]  # 7 keys: different recipes, no columns
    assert differing_keys(many) == [] and differing_keys(many[:1]) == []
    assert differing_keys([run(**{f"k.{i}": str(j) for i in range(6)}) for j in range(2)]) == [f"k.{i}" for i in range(6)]


def test_compare_and_sync_errors_are_one_line(tmp_path, capsys, store):
    assert main(["compare", "--tracking-uri", store, "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", store, "--runs", "0123456789abcdef"]) == 2
    assert main(["sync", str(tmp_path)]) == 2
    assert "nothing to sync" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["compare", "--tracking-uri", dead]) == 2
    assert f"cannot reach the MLflow tracking store {dead}" in capsys.readouterr().err


def test_a_server_that_never_answers_costs_one_short_timeout(tmp_path, monkeypatch):
    """A port that accepts connections but never replies: the request timeout (the user's, here 2 s) bounds the
    stall, and only the first call pays it."""
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = tracking.Tracker(_cfg(f"http://127.0.0.1:{sock.getsockname()[1]}"), journal=tmp_path / tracking.JOURNAL)
            start = time.perf_counter() - t0
            for step in range(20):
                t.log_metrics({"loss": 1.0}, step=step)
            t.finish()
        total = time.perf_counter() - t0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and not t.online
    assert start < 12 and total - start < 1, (start, total)
    assert len(tracking.read_journal(tmp_path / tracking.JOURNAL)) == 2 + 20 + 1  # start, offline, metrics, end


def test_batches_over_mlflow_caps_go_through_tracker_and_sync(tmp_path, store):
    """MLflow refuses more than 100 params / 100 tags / 1000 metrics in one batch: the Tracker and `itr sync`
    share one batching that cuts them, and a replay of all of it adds nothing."""
    t = tracking.Tracker(_cfg(store), journal=tmp_path / tracking.JOURNAL)
    t.log_params({f"p{i}": i for i in range(250)})
    t.set_tags({f"t{i}": i for i in range(150)})
    t.log_metrics({f"m{i}": float(i) for i in range(1200)}, step=1)
    t.finish()
    assert t.online
    client = mlflow.tracking.MlflowClient(store)
    r = client.get_run(t.run_id)
    assert len(r.data.params) == 250 and r.data.tags["t149"] == "149" and len(r.data.metrics) == 1200
    out = tracking.sync(tmp_path, quiet=True)
    assert (out[0]["run_id"], out[0]["metrics"], out[0]["params"], out[0]["created"]) == (t.run_id, 0, 0, False)


def test_log_evaluation_adds_to_a_run_without_ending_it_again(tmp_path, store):
    """`itr eval --log-to-run`: a Tracker attached to the training's run adds metrics, tags and artifacts and
    leaves its status and end time alone; an unreachable store only warns."""
    t = tracking.Tracker(_cfg(store))
    t.finish("FAILED")
    client = mlflow.tracking.MlflowClient(store)
    before = client.get_run(t.run_id).info
    (tmp_path / "m.json").write_text("{}")
    metrics = {k: 10.0 for k in KEYS} | {"folds": [], "timing": {"global_s": 1.0}}
    assert tracking.log_evaluation(metrics, "test_5k_", uri=store, run_id=t.run_id, experiment="elsewhere",
                                   checkpoint="ck", data="d", artifacts=[tmp_path / "m.json"]) == t.run_id
    r = client.get_run(t.run_id)
    assert (r.info.status, r.info.end_time) == (before.status, before.end_time) == ("FAILED", before.end_time)
    assert {f"test_5k/{k}" for k in KEYS} == set(r.data.metrics) and r.data.tags["eval.test_5k_checkpoint"] == "ck"
    assert [a.path for a in client.list_artifacts(t.run_id, "eval")] == ["eval/m.json"]
    assert client.get_experiment_by_name("elsewhere") is None  # the run has its experiment

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dead = f"http://127.0.0.1:{free_port()}"
        assert tracking.log_evaluation(metrics, "test_5k_", uri=dead, experiment="x", checkpoint="ck", data="d") is None
    assert any("MLflow logging of the evaluation failed" in str(x.message) for x in w)
    assert not tracking.tracker._ACTIVE  # nothing left for end_active to close


def test_tracking_imports_neither_the_trainer_nor_models():
    import subprocess
    import sys

    code = ("import sys, itr.tracking; bad = [m for m in sys.modules if m.startswith(('itr.train', 'itr.models', "
            "'itr.eval', 'mlflow', 'torch'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_run_eval_takes_a_request_and_nothing_else(tmp_path):
    from itr.eval.job import EvalRequest, run_eval

    req = EvalRequest(tmp_path, tmp_path, "test", experiment="e")
    assert req.logs_to_mlflow and not EvalRequest(tmp_path, tmp_path, "test").logs_to_mlflow
    with pytest.raises(TypeError):
        run_eval(req, protocol="1k")


def test_a_resumed_tracker_runs_the_same_run_again_and_keeps_its_params(tmp_path, store):
    t = tracking.Tracker(_cfg(store), journal=tmp_path / tracking.JOURNAL)
    t.log_params({"optim.lr": 0.1})
    t.finish("KILLED")
    again = tracking.Tracker(_cfg(store, experiment="not-this-one"), run_id=t.run_id,
                             journal=tmp_path / tracking.JOURNAL)
    client = mlflow.tracking.MlflowClient(store)
    assert again.online and again.experiment_id == t.experiment_id
    assert client.get_run(t.run_id).info.status == "RUNNING"
    again.log_params({"optim.lr": 0.2, "train.epochs": 3})  # a changed value is not an error; it stays
    again.finish()
    r = client.get_run(t.run_id)
    assert r.info.status == "FINISHED" and r.data.params == {"optim.lr": "0.1", "train.epochs": "3"}
    assert [s["resumed"] for s in tracking.read_journal(tmp_path / tracking.JOURNAL) if s["op"] == "start"] == [False, True]


def test_metric_names_old_and_new():
    from itr.tracking import names

    assert names.train_metrics(2.0, True, lr=0.1) == {"train/loss_warmup": 2.0, "train/lr": 0.1}
    assert names.eval_family("test", "1k", "", ("test", "1k")) == "test"
    assert names.eval_family("testall", "coco-5fold", "", ("testall", "coco-5fold")) == "test"
    assert names.eval_family("test", "5k", "", ("test", "1k")) == "test_5k"
    assert names.eval_family("test", "1k", "_top50", ("test", "1k")) == "test_1k_top50"
    assert names.eval_family("testall", "coco-5fold") == "testall_coco5fold"
    old = {"loss": 1.0, "lr": 0.1, "dev_rsum": 3.0, "dev_i2t_R10": 4.0, "test_rsum": 5.0, "test_1k_t2i_meanr": 6.0,
           "train_samples_per_sec": 7.0, "epochs_completed": 2.0, "cpu_rss_mb": 9.0, "train/loss": 1.5}
    assert names.normalize(old) == {"train/loss": 1.5, "train/lr": 0.1, "dev/rsum": 3.0, "dev/i2t_R10": 4.0,
                                    "test/rsum": 5.0, "test_1k/t2i_meanr": 6.0, "train/samples_per_sec_mean": 7.0,
                                    "train/epochs_completed": 2.0, "train/cpu_rss_mb": 9.0}
    assert names.families(names.normalize(old)) == ["test"]
    assert names.history_keys("dev/rsum") == ("dev/rsum", "dev_rsum")
    assert names.history_keys("train/samples_per_sec_mean") == ("train/samples_per_sec_mean", "train_samples_per_sec")


def test_links_open_the_training_view_and_the_user_is_a_person(monkeypatch):
    view = "workflowType=machine_learning"
    assert tracking.ui_hint("http://h:5000/", "3", "abc") == f"open http://h:5000/#/experiments/3/runs/abc?{view}"
    assert tracking.ui_hint("http://h:5000", "3").endswith(f"/#/experiments/3?{view}")
    assert tracking.ui_path(compare=[("1", "a"), ("2", "b"), ("1", "c")]) == \
        f'/#/compare-runs?runs=["a","b","c"]&experiments=["1","2"]&{view}'
    assert f"# then open http://127.0.0.1:5000/#/experiments/1/runs/r?{view}" in tracking.ui_hint("sqlite:///x.db", "1", "r")
    for var in ("MLFLOW_TRACKING_USERNAME", "SUDO_USER", "SLURM_JOB_USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USER", "alice")
    assert tracking.user_name() == "alice"
    monkeypatch.setenv("USER", "root")
    monkeypatch.setenv("SUDO_USER", "bob")
    assert tracking.user_name() == "bob"  # a person behind a generic root
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    assert tracking.user_name() == "carol" == tracking.source_tags()["mlflow.user"]


def test_racing_sweep_members_agree_on_one_parent(store):
    """A member whose search ran before another member's parent existed creates its own, then finds the older
    one, takes it and deletes its own: every member nests under one run."""
    client = mlflow.tracking.MlflowClient(store)
    exp = client.create_experiment("itr")
    first = tracking.sweep_parent(client, exp, "lr")
    assert tracking.sweep_parent(client, exp, "lr") == first  # found, not created again

    class Late:  # the first search sees nothing yet
        def __init__(self):
            self.searches = 0

        def __getattr__(self, name):
            return getattr(client, name)

        def search_runs(self, *a, **kw):
            self.searches += 1
            return [] if self.searches == 1 else client.search_runs(*a, **kw)

    assert tracking.sweep_parent(Late(), exp, "lr") == first
    runs = client.search_runs([exp], "tags.`itr.kind` = 'sweep'", run_view_type=ViewType.ALL)
    assert sorted(r.info.lifecycle_stage for r in runs) == ["active", "deleted"]
    assert tracking.sweep_parent(client, exp, "other") != first


def test_sync_brings_the_dataset_input_and_the_sweep_parent_of_an_offline_run(tmp_path, store, micro_data):
    """A run that never reached the store: `itr sync` creates it under its sweep's run, with its dataset input;
    a second sync adds nothing."""
    from itr.data.sources import ensure_shards

    recipe = load_recipe(DEMO, micro_overrides(micro_data))
    manifest = ensure_shards(recipe.data, "train", progress=False)
    dead = f"http://127.0.0.1:{free_port()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = tracking.Tracker(_cfg(dead, run_name="offline"), journal=tmp_path / tracking.JOURNAL, sweep="s1",
                             system_metrics=True)
        t.log_input(tracking.manifest_dataset(manifest, "synthetic/train"))
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.finish()
    assert t.system is None  # offline: no monitor
    out = tracking.sync(tmp_path, uri=store, quiet=True)
    assert out[0]["created"] and out[0]["inputs"] == 1
    client = mlflow.tracking.MlflowClient(store)
    run = client.get_run(out[0]["run_id"])
    assert [(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs] == [
        ("synthetic/train", tracking.manifest_tags(manifest)["data.manifest_digest"])]
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["itr.sweep_of"] == "s1" and parent.info.experiment_id == run.info.experiment_id
    again = tracking.sync(tmp_path, uri=store, quiet=True)
    assert (again[0]["run_id"], again[0]["inputs"], again[0]["metrics"]) == (run.info.run_id, 0, 0)


def test_plots_name_rsum_mark_the_warm_up_and_keep_labels_apart():
    """recall_at_k: rsum in the legend, value labels that do not overlap even where two lines meet; curves:
    plain log-axis tick labels (1-2-5), the warm-up loss drawn and shaded apart, rsum in the dev legend."""
    import matplotlib.pyplot as plt

    from itr import plots

    keys = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10")
    dev = dict(zip(keys, (40.0, 60.0, 69.0, 38.0, 55.0, 64.0)), rsum=326.0)
    test = dict(dev, i2t_R1=40.4, t2i_R5=54.7, rsum=326.1)  # nearly the same: labels would sit on each other
    fig, _ = plots.recall_figure({"dev (best, epoch 6)": dev, "test": test})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dev (best, epoch 6) (rsum 326.0)", "test (rsum 326.1)"]
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == 6
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)

    loss = [[s, 40 * 0.97 ** s if s <= 50 else 0.4 * 0.99 ** (s - 50)] for s in range(1, 301)]
    hist = {"loss": loss, "dev": [[e, dict(dev, rsum=300.0 + e)] for e in (1, 2, 3)]}
    fig = plots.curves_figure(hist, warmup_epochs=1, warmup_step=50)
    fig.canvas.draw()
    ax1, ax2, ax3 = fig.axes
    assert ax1.get_yscale() == "log"
    ticks = {t.get_text() for t in ax1.get_yticklabels() if t.get_text()}
    assert {"0.1", "0.2", "0.5", "1", "2", "5", "10", "20"} <= ticks and not any("^" in t for t in ticks)
    assert [line.get_label() for line in ax1.get_lines()] == ["warm-up: summed violations", "hardest negative"]
    assert ax1.patches and ax2.patches  # the warm-up shaded on both panels
    assert "rsum (right axis)" in [t.get_text() for t in ax2.get_legend().get_texts()]
    plt.close(fig)
