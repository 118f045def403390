"""Bad input fails fast, as one line that names the file or key (no traceback, exit code 2)."""
import numpy as np
import pytest

from itr.cli import main
from itr.shards.precomp import shard_precomp

from conftest import ROOT, tiny_overrides

DEMO = str(ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml")


def _err(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after any progress bar
    assert "Traceback" not in err and last.startswith("itr ") and ": error: " in last, err
    return last


def test_missing_recipe(capsys, tmp_path):
    assert "nope.yaml" in _err(capsys, "train", tmp_path / "nope.yaml", "--out", tmp_path / "r")


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
    err = _err(capsys, "train", DEMO, "optim.learning_rate=1", "--out", tmp_path / "r")
    assert "optim.learning_rate" in err and "lr_update" in err


def test_missing_data_root(capsys, tmp_path):
    assert str(tmp_path / "nowhere") in _err(capsys, "train", DEMO, f"data.root={tmp_path / 'nowhere'}",
                                              "--out", tmp_path / "r")


def test_caption_count_mismatch_when_sharding(capsys, tmp_path):
    np.save(tmp_path / "train_ims.npy", np.zeros((3, 4), np.float32))
    (tmp_path / "train_caps.txt").write_text("\n".join(["a caption"] * 14))
    err = _err(capsys, "shard", "precomp", tmp_path, "train", tmp_path / "out")
    assert "train_caps.txt" in err and "14 captions for 3 images" in err


def test_corrupt_shard_stops_training_before_it_starts(capsys, tmp_path, tiny_data):
    m = shard_precomp(tiny_data, "train", tmp_path / "shards", images_per_shard=40, progress=False)
    for split in ("dev", "test"):
        shard_precomp(tiny_data, split, tmp_path / "shards", progress=False)
    bad = tmp_path / "shards" / m["shards"][1]["name"]
    data = bytearray(bad.read_bytes())
    data[5000] ^= 0x01
    bad.write_bytes(bytes(data))
    err = _err(capsys, "train", DEMO, *tiny_overrides(tmp_path / "shards"), "--out", tmp_path / "r")
    assert bad.name in err and "corrupt" in err
    assert not (tmp_path / "r" / "last").exists()


def test_eval_of_something_that_is_not_a_checkpoint(capsys, tmp_path, tiny_data):
    assert "not an itr checkpoint" in _err(capsys, "eval", tmp_path, "--data", tiny_data, "--split", "test")


def test_eval_of_a_missing_split(capsys, tmp_path, tiny_data):
    from itr.config import load_recipe
    from itr.train import train

    train(load_recipe(DEMO, tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": False})), tmp_path / "r")
    err = _err(capsys, "eval", tmp_path / "r" / "best", "--data", tiny_data, "--split", "testall")
    assert "testall" in err


def test_feature_dim_mismatch_at_eval(capsys, tmp_path, tiny_data):
    from itr.config import load_recipe
    from itr.train import train

    train(load_recipe(DEMO, tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": False})), tmp_path / "r")
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 8, 16), np.float32))
    (tmp_path / "test_caps.txt").write_text("\n".join(["a dog"] * 10))
    err = _err(capsys, "eval", tmp_path / "r" / "best", "--data", tmp_path, "--split", "test")
    assert "16-d" in err and "32-d" in err


def test_version_is_one_line_whatever_the_terminal_width(capsys, monkeypatch):
    """argparse's version action wrapped a long install path at $COLUMNS (seen from a deep pytest temp folder)."""
    import itr

    monkeypatch.setenv("COLUMNS", "20")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out == f"itr {itr.__version__} ({ROOT / 'itr'})\n"
