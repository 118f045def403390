"""Shards never unpickle: a pickle planted as a sample's ``feat.npy`` (an object-dtype .npy, or a bare pickle) is a
clear error naming the shard and the sample, from the training loader and from ``itr shard verify``, and its
payload never runs."""
import io
import pickle
import tarfile

import numpy as np
import pytest

from itr.cli import main

from test_on_error import _copy, _train
from test_shard_verify import _accept, _rewrite


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): the file's existence says the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickled(kind, marker):
    if kind == "object-dtype npy":
        buf = io.BytesIO()
        np.save(buf, np.array([_Payload(marker), 1.0], dtype=object), allow_pickle=True)
        return buf.getvalue()
    return pickle.dumps(_Payload(marker))


def _plant(shard, kind, marker):
    """Replace the features of the shard's second sample by the pickle; returns that sample's key."""
    with tarfile.open(shard) as tar:
        key = sorted({name.split(".")[0] for name in tar.getnames()})[1]
    bomb = _pickled(kind, marker)
    _rewrite(shard, lambda name, data: bomb if name == f"{key}.feat.npy" else data)
    return key


KINDS = ["object-dtype npy", "bare pickle"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_is_live(kind, tmp_path):
    """The planted bytes do run their payload when something unpickles them: the tests below can fail."""
    marker = tmp_path / "ran"
    data = _pickled(kind, marker)
    if kind == "object-dtype npy":
        np.load(io.BytesIO(data), allow_pickle=True)
    else:
        pickle.loads(data)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_loader_refuses_a_pickled_member_naming_shard_and_sample(kind, small_shards, tmp_path, capsys):
    data, paths = _copy(small_shards, tmp_path)
    marker = tmp_path / "pwned"
    key = _plant(paths[1], kind, marker)
    assert _train(data, tmp_path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(paths[1]) in err and f"sample {key}" in err and "feat.npy" in err, err[-2000:]
    assert "pickle" in err and "never unpickle" in err, err[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_verify_refuses_a_pickled_member_naming_shard_and_sample(kind, small_shards, tmp_path, capsys):
    data, paths = _copy(small_shards, tmp_path)
    marker = tmp_path / "pwned"
    key = _plant(paths[1], kind, marker)
    _accept(data, "train")  # the manifest agrees with the new bytes: only the sample check can find it
    assert main(["shard", "verify", str(data), "--split", "train", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "train: 1 problem(s)" in err, err
    assert f"shard {paths[1]}: sample {key}: feat.npy" in err and "never unpickle" in err, err
    assert not marker.exists()
