"""Faults a hostile tester tries, each ending in a clear error naming what is wrong, or in nothing lost:
planted pickles, a second run on the same directory, a full disk, edited manifests, NaN features, bad values,
truncated weights, path tricks in manifests, checksums of every split read, bad similarity matrices."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from itr.cli import main
from itr.config import load_recipe
from itr.errors import CheckpointError, ItrError
from itr.train import train

from conftest import ROOT, small_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _err(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after any progress bar
    assert "Traceback" not in err and ": error: " in last, err
    return last


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- no pickle on resume


def test_a_planted_pickle_under_any_name_the_trainer_reads_never_runs(small_shards, tmp_path, monkeypatch):
    """An fp16 run (its loss scale is training state) stopped at step 5; then each file of its state, and the
    names accelerate would also read, replaced by a pickle whose loading runs code. No resume runs it: the
    optimizer state is refused naming the file; the others are not read as pickles at all."""
    over = small_overrides(small_shards, **{"train.mixed_precision": "fp16", "train.epochs": 1})
    monkeypatch.setenv("ITR_FAULT", "term@step 5")
    assert train(load_recipe(DEMO, over), tmp_path / "run") is None
    monkeypatch.delenv("ITR_FAULT")
    state = tmp_path / "run" / "last" / "state"
    names = sorted({p.name for p in state.iterdir() if p.suffix in (".bin", ".pkl", ".pt")}
                   | {"custom_checkpoint_0.pkl", "scaler.pt", "random_states_0.pkl"})
    assert "optimizer.bin" in names
    refused = []
    for name in names:
        run = tmp_path / f"planted-{name}"
        shutil.copytree(tmp_path / "run", run)
        marker = tmp_path / f"ran-{name}"
        torch.save({"state": Payload(marker)}, run / "last" / "state" / name)
        try:
            res = train(load_recipe(DEMO, over + ["train.resume=latest"]), run)
            assert res["global_step"] == 10  # not read as a pickle at all: resumed as usual
        except CheckpointError as e:
            assert name in str(e) and "refusing to unpickle" in str(e) and "the global io.open" in str(e), str(e)
            refused.append(name)
        assert not marker.exists(), f"unpickling {name} ran code"
    assert "optimizer.bin" in refused and "custom_checkpoint_0.pkl" in refused


@pytest.fixture(scope="module")
def stopped_run(small_shards, tmp_path_factory):
    """An fp16 run with an EMA stopped by SIGTERM at step 13 of 20 (epoch 2: ``best`` exists): every kind of file a
    resume reads is in its ``last``."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    over = small_overrides(small_shards, **{"train.mixed_precision": "fp16", "train.ema_decay": 0.9})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ITR_FAULT", "term@step 13")
        assert train(load_recipe(DEMO, over), run) is None
    return run, over


# every file of `last` a resume reads, and its weights (`best` is promoted from them when a kill interrupted that)
RESUME_READS = ["itr.json", "vocab.json", "model.safetensors", "ema.safetensors", "state/model.safetensors",
                "state/optimizer.bin", "state/random_states_0.pkl", "state/rng_0.safetensors"]


def _legacy(path):
    """``path`` re-saved in torch's pre-1.6 format (a bare pickle, no zip): only loading it finds it cut short."""
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("name", RESUME_READS + ["state/optimizer.bin legacy", "state/optimizer.bin empty"])
def test_a_truncated_file_of_the_training_state_is_named_before_any_training(capsys, stopped_run, tmp_path, name):
    """Each file a resume reads, cut to half its size: the resume stops before it trains with one line naming the file
    as damaged (not as a planted pickle) and what to do; nothing in the run directory changes."""
    src, over = stopped_run
    state = {str(p.relative_to(src / "last")) for p in (src / "last" / "state").iterdir()}
    assert state - {"scheduler.bin"} <= set(RESUME_READS), state  # a new kind of state file gets its case here
    run = tmp_path / "run"
    shutil.copytree(src, run)
    rel, _, how = name.partition(" ")
    f = run / "last" / rel
    if how == "legacy":
        _legacy(f)
    f.write_bytes(b"" if how == "empty" else f.read_bytes()[:f.stat().st_size // 2])
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    err = _err(capsys, "train", DEMO, *over, "train.resume=latest", "--out", run)
    assert f"{f} is damaged (" in err and "nothing was trained" in err, err
    assert "refusing to unpickle" not in err
    assert f"train.init_from={run / 'best'}" in err and "start afresh without train.resume" in err, err
    if how == "empty":
        assert "the file is empty" in err
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before


# ----------------------------------------------------------------------------- one run per directory, full disks


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(small_shards, tmp_path):
    from itr.rundir import RunLock

    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    try:
        with pytest.raises(ItrError, match=rf"in use by another `itr train` \(pid {os.getpid()} on host "):
            train(load_recipe(DEMO, small_overrides(small_shards)), tmp_path / "run")
    finally:
        lock.release()
    # a holder that died (SIGKILL) leaves no stale lock: the kernel dropped its flock
    code = f"import os, signal; from itr.rundir import RunLock; RunLock({str(tmp_path / 'run')!r}); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    RunLock(tmp_path / "run").release()


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(small_shards, tmp_path, monkeypatch):
    from itr import checkpoint as ckpt

    real, calls = ckpt.write_weights, []

    def full_disk(state_dict, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(state_dict, path)

    monkeypatch.setattr(ckpt, "write_weights", full_disk)
    over = small_overrides(small_shards, **{"train.checkpoint_every": 4})
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        train(load_recipe(DEMO, over), tmp_path / "run")
    assert ".last.tmp" in str(e.value) and "resume with train.resume=latest" in str(e.value)
    assert not (tmp_path / "run" / ".last.tmp").exists()
    assert ckpt.read_meta(tmp_path / "run" / "last")["train_state"]["global_step"] == 4  # the first save is intact


# ----------------------------------------------------------------------------- data checked before the first step


def _shards(tmp_path, tiny_data):
    from itr.shards.precomp import shard_precomp

    out = tmp_path / "shards"
    for split in ("train", "dev", "test"):
        shard_precomp(tiny_data, split, out, images_per_shard=40, progress=False)
    return out


def test_an_edited_manifest_is_caught_when_the_stream_is_planned(capsys, tmp_path, tiny_data):
    out = _shards(tmp_path, tiny_data)
    mpath = out / "train.manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["num_images"] += 1  # totals now disagree
    mpath.write_text(json.dumps(m))
    err = _err(capsys, "train", DEMO, *small_overrides(out), "--out", tmp_path / "r")
    assert "train.manifest.json" in err and "counts disagree" in err
    m["shards"][1]["num_images"] -= 1  # totals agree again, two shards do not
    mpath.write_text(json.dumps(m))
    err = _err(capsys, "train", DEMO, *small_overrides(out), "--out", tmp_path / "r")
    assert m["shards"][0]["name"] in err and "holds 40 images" in err
    assert not (tmp_path / "r" / "last").exists()


def test_a_bad_test_split_fails_before_training_not_after(capsys, tmp_path, tiny_data):
    out = _shards(tmp_path, tiny_data)
    mpath = out / "test.manifest.json"
    m = json.loads(mpath.read_text())
    m["num_images"], m["num_captions"] = 41, 205
    mpath.write_text(json.dumps(m))
    err = _err(capsys, "train", DEMO, *small_overrides(out), "--out", tmp_path / "r")
    assert "test.manifest.json" in err and not (tmp_path / "r" / "last").exists()


@pytest.mark.parametrize("split", ["dev", "test"])
def test_nan_features_in_an_evaluation_split_fail_before_the_first_step(capsys, tmp_path, tiny_data, split):
    src = tmp_path / "data"
    shutil.copytree(tiny_data, src)
    ims = np.load(src / f"{split}_ims.npy")
    ims[7, 2, 3] = np.nan
    np.save(src / f"{split}_ims.npy", ims)
    err = _err(capsys, "train", DEMO, *small_overrides(src), "--out", tmp_path / "r")
    assert f"{split}_ims.npy" in err and "row 7" in err and "non-finite" in err
    assert not (tmp_path / "r" / "last").exists()


def test_a_flipped_byte_in_a_test_shard_fails_the_evaluation(capsys, tmp_path, tiny_data):
    out = _shards(tmp_path, tiny_data)
    train(load_recipe(DEMO, small_overrides(out, **{"train.epochs": 1})), tmp_path / "r")
    bad = out / json.loads((out / "test.manifest.json").read_text())["shards"][0]["name"]
    data = bytearray(bad.read_bytes())
    data[3000] ^= 0x01
    bad.write_bytes(bytes(data))
    err = _err(capsys, "eval", tmp_path / "r" / "best", "--data", out, "--split", "test")
    assert bad.name in err and "corrupt" in err


def test_a_manifest_cannot_name_a_path_outside_its_folder(capsys, tmp_path, tiny_data):
    out = _shards(tmp_path, tiny_data)
    m = json.loads((out / "train.manifest.json").read_text())
    m["split"] = "../../escaped"
    (out / "train.manifest.json").write_text(json.dumps(m))
    err = _err(capsys, "train", DEMO, *small_overrides(out), "--out", tmp_path / "r")
    assert "train.manifest.json" in err and "not a plain file name" in err
    m["split"], m["shards"][0]["name"] = "train", "../x.tar"
    (out / "train.manifest.json").write_text(json.dumps(m))
    assert "../x.tar" in _err(capsys, "train", DEMO, *small_overrides(out), "--out", tmp_path / "r")
    assert not list(tmp_path.glob("*escaped*")) and not (tmp_path / ".escaped.verified.json").exists()


# ----------------------------------------------------------------------------- values, weights, matrices


@pytest.mark.parametrize("override,key", [("optim.lr=-1", "optim.lr"), ("optim.lr=nan", "optim.lr"),
                                          ("data.num_workers=-1", "data.num_workers"),
                                          ("model.embed_dim=0", "model.embed_dim"),
                                          ("train.log_every=0", "train.log_every"),
                                          ("train.checkpoint_every=-1", "train.checkpoint_every")])
def test_out_of_range_values_are_refused_naming_the_key(capsys, tmp_path, override, key):
    err = _err(capsys, "train", DEMO, override, "--out", tmp_path / "r")
    assert key in err and ("must be" in err)


def test_a_truncated_weights_file_is_named(capsys, tmp_path, small_shards):
    train(load_recipe(DEMO, small_overrides(small_shards, **{"train.epochs": 1})), tmp_path / "r")
    w = tmp_path / "r" / "best" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    err = _err(capsys, "eval", tmp_path / "r" / "best", "--data", small_shards, "--split", "test")
    assert str(w) in err and "unreadable" in err


def test_itr_score_refuses_non_finite_and_empty_matrices(capsys, tmp_path):
    sims = np.random.default_rng(0).standard_normal((4, 20)).astype(np.float32)
    sims[2, 5] = np.inf
    np.save(tmp_path / "inf.npy", sims)
    err = _err(capsys, "score", tmp_path / "inf.npy")
    assert "inf.npy" in err and "row 2" in err and "non-finite" in err
    np.save(tmp_path / "empty.npy", np.zeros((0, 0), np.float32))
    assert "non-empty" in _err(capsys, "score", tmp_path / "empty.npy")
