import json
import os
import shutil

import mlflow
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from itr import checkpoint as ckpt
from itr.config import load_recipe
from itr.eval.job import run_eval
from itr.eval.metrics import KEYS
from itr.train import train

from conftest import ROOT, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _train(tiny_data, out, *extra, **kw):
    return train(load_recipe(DEMO, tiny_overrides(tiny_data, **kw) + list(extra)), out)


def test_train_writes_checkpoints_results_and_mlflow(tiny_data, tmp_path):
    res = _train(tiny_data, tmp_path / "run")
    for name in ("last", "best"):
        root = ckpt.resolve(tmp_path / "run" / name)
        assert {"model.safetensors", "recipe.yaml", "itr.json", "vocab.json"} <= set(os.listdir(root))
    assert (tmp_path / "run" / "last" / "state").is_dir() and not (tmp_path / "run" / "best" / "state").exists()
    assert res["best_epoch"] in (1, 2) and set(KEYS) <= set(res["test"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == res["test"]
    # the best checkpoint evaluates to the same numbers through `itr eval`
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])

    # MLflow, default store: sqlite in the working directory
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res["run_id"])
    assert run.data.params["model.text.name"] == "gru" and run.data.params["optim.lr"] == "0.002"
    assert run.data.tags["world_size"] == "1" and run.data.tags["model"] == "vsepp"
    assert "torch.optim.Adam" in run.data.tags["optimizer_impl"]
    warm, loss = (client.get_metric_history(res["run_id"], k) for k in ("train/loss_warmup", "train/loss"))
    assert max(m.step for m in warm) < min(m.step for m in loss)  # epoch 1 sums violations (loss.warmup_epochs: 1)
    for key in ("train/lr", "train/samples_per_sec", "dev/rsum", "dev/i2t_R1", "test/rsum"):
        assert client.get_metric_history(res["run_id"], key), key
    assert [m.value for m in client.get_metric_history(res["run_id"], "dev/epoch")] == [1, 2]
    assert [m.step for m in client.get_metric_history(res["run_id"], "dev/rsum")] == [25, 50]  # optimizer steps
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"recipe.yaml", "results.json", "curves.png"} <= arts
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_mid_epoch_to_identical_weights(tiny_data, tmp_path):
    _train(tiny_data, tmp_path / "full", "tracking.enabled=false")
    # stop after 3 steps (mid-epoch 1), then resume to the end
    _train(tiny_data, tmp_path / "cut", "tracking.enabled=false", "train.max_steps=3")
    meta = ckpt.read_meta(tmp_path / "cut" / "last")
    assert meta["train_state"]["global_step"] == 3 and meta["train_state"]["epoch"] == 0
    _train(tiny_data, tmp_path / "cut", "tracking.enabled=false", "train.resume=latest")
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert ckpt.read_meta(tmp_path / "cut" / "last")["train_state"]["global_step"] == \
        ckpt.read_meta(tmp_path / "full" / "last")["train_state"]["global_step"]


def test_a_save_killed_between_renames_still_resolves(tiny_data, tmp_path):
    _train(tiny_data, tmp_path / "run", "tracking.enabled=false", "train.epochs=1")
    run = tmp_path / "run"
    os.replace(run / "last", run / ".last.old")  # the kill landed between the two renames
    (run / ".last.tmp").mkdir()  # and a half-written new one is lying around
    assert ckpt.resolve(run / "last") == run / ".last.old"
    res = _train(tiny_data, run, "tracking.enabled=false", "train.epochs=2", "train.resume=latest")
    assert res["global_step"] == 2 * (800 // 32)  # the second epoch ran on top of the recovered first
    assert (run / "last").is_dir() and not (run / ".last.tmp").exists() and not (run / ".last.old").exists()


def test_grad_accum_and_bf16_run(tiny_data, tmp_path):
    res = _train(tiny_data, tmp_path / "run", "tracking.enabled=false", "train.epochs=1", "train.grad_accum=2",
                 "train.mixed_precision=bf16")
    meta = ckpt.read_meta(tmp_path / "run" / "last")
    assert meta["rank_batch"] == 16 and meta["grad_accum"] == 2
    assert res["global_step"] == 800 // 32  # 25 steps of 2 x 16 pairs


def test_batch_not_divisible(tiny_data, tmp_path):
    from itr.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        _train(tiny_data, tmp_path / "run", "train.grad_accum=3")


def test_signal_at_an_epoch_boundary_evaluates_that_epoch_after_restart(tiny_data, tmp_path, monkeypatch):
    import itr.train as tr

    calls = {"n": 0}

    def requested(self, device):
        calls["n"] += 1
        if calls["n"] == 25:  # the last step of epoch 1 (25 steps of 32 pairs)
            self.signal = 15
            return True
        return False

    with monkeypatch.context() as m:
        m.setattr(tr.Stop, "requested", requested)
        assert _train(tiny_data, tmp_path / "run") is None
    meta = ckpt.read_meta(tmp_path / "run" / "last")["train_state"]
    assert meta["epoch"] == 1 and meta["micro_in_epoch"] == 0 and meta["pending_eval"] and meta["best"] is None
    res = _train(tiny_data, tmp_path / "run", "train.resume=latest")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.value for m in client.get_metric_history(res["run_id"], "dev/epoch")] == [1, 2]
    assert res["global_step"] == 50


def test_fp16_training_counts_skipped_steps_and_resumes_the_loss_scale(tiny_data, tmp_path):
    # a loss scale of 2**16 on this model overflows fp16 gradients at first: those steps are skipped
    res = _train(tiny_data, tmp_path / "run", "tracking.enabled=false", "train.mixed_precision=fp16",
                 "train.max_steps=6")
    meta = ckpt.read_meta(tmp_path / "run" / "last")["train_state"]
    assert res["global_step"] == 6 and meta["skipped_steps"] >= 1
    state = tmp_path / "run" / "last" / "state"
    with safe_open(str(state / "rng_0.safetensors"), "pt") as f:  # the loss scale travels as JSON, not a pickle
        scaler = json.loads(f.metadata()["itr"])["scaler"]
    assert scaler["scale"] < 2.0 ** 16  # halved once per overflow
    assert not list(state.glob("custom_checkpoint_*"))
    res = _train(tiny_data, tmp_path / "run", "tracking.enabled=false", "train.mixed_precision=fp16",
                 "train.resume=latest", "train.epochs=1")
    assert res["global_step"] == 25


def test_torch_compile_option_trains_and_checkpoints_load(tiny_data, tmp_path):
    res = _train(tiny_data, tmp_path / "run", "tracking.enabled=false", "train.compile=true", "train.epochs=1")
    assert set(KEYS) <= set(res["test"])  # the test eval loads DIR/best into an uncompiled model
