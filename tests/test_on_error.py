"""data.on_error: a corrupt sample or a truncated shard is a clear error naming the shard and the sample by default;
with ``skip`` the run goes on, and the skipped samples are counted on the console and in MLflow."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import mlflow
import pytest

from itr.cli import main
from itr.data.manifest import load_manifest, shard_paths

from conftest import ROOT, small_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _copy(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    return data, shard_paths(load_manifest(data, "train"))


def corrupt_one_sample(shard):
    """Replace the features of the shard's second sample by bytes that are no .npy; returns that sample's key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = sorted({m.name.split(".")[0] for m, _ in members})[1]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.feat.npy":
                data = b"\x93NUMPY garbage, not an array"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return key


def truncate(shard):
    size = Path(shard).stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2 + 100)  # mid-member: the tar reader fails part-way through the shard


def _train(data, tmp_path, *extra):
    return main(["train", str(DEMO), *small_overrides(data, **{"train.epochs": 1, "data.verify": "none"}), *extra,
                 "--out", str(tmp_path / "run")])


def test_a_corrupt_sample_is_an_error_naming_the_shard_and_the_sample(small_shards, tmp_path, capsys):
    data, paths = _copy(small_shards, tmp_path)
    key = corrupt_one_sample(paths[1])
    assert _train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(paths[1]) in err and f"sample {key}" in err and "unreadable" in err, err[-2000:]


def test_skip_passes_over_a_corrupt_sample_and_counts_it_on_the_console_and_in_mlflow(small_shards, tmp_path,
                                                                                       capsys):
    data, paths = _copy(small_shards, tmp_path)
    key = corrupt_one_sample(paths[1])
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = _train(data, tmp_path, "data.on_error=skip", "tracking.enabled=true", f"tracking.uri={db}",
                "tracking.experiment=skips")
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    said = out.out + out.err
    assert "1 unreadable sample(s) skipped in epoch 1" in said and f"sample {key}" in said, said[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    client = mlflow.tracking.MlflowClient(db)
    [exp] = [e for e in client.search_experiments() if e.name == "skips"]
    [run] = client.search_runs([exp.experiment_id])
    [skipped] = [k for k in run.data.metrics if k.endswith("skipped")]
    assert run.data.metrics[skipped] == 1
    assert res["global_step"] > 0


def test_skip_survives_a_truncated_shard_and_an_error_names_it_by_default(small_shards, tmp_path, capsys):
    data, paths = _copy(small_shards, tmp_path)
    truncate(paths[0])
    assert _train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert str(paths[0]) in err and "truncated" in err and "itr shard" in err, err[-2000:]
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
    rc = _train(data, tmp_path, "data.on_error=skip")
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "skipped in epoch 1" in out.out + out.err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] > 0


def test_an_unknown_on_error_value_is_refused_naming_the_key(small_shards, tmp_path, capsys):
    assert _train(small_shards, tmp_path, "data.on_error=ignore") == 2
    err = capsys.readouterr().err
    assert "data.on_error" in err and "skip" in err, err[-1000:]
