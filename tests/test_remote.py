"""Remote shards: a run reading its shards from a local HTTP server, or through a ``pipe:`` command, ends with the
weights of the same run on the local directory; a missing or corrupt remote file is an error naming its URL."""
import functools
import http.server
import shutil
import threading

import pytest
from safetensors.torch import load_file

from itr.cli import main

from conftest import ROOT, small_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


@pytest.fixture
def server(small_shards, tmp_path):
    """small_shards (copied) served over HTTP on 127.0.0.1; yields (base URL, served folder)."""
    served = tmp_path / "served"
    shutil.copytree(small_shards, served)
    handler = functools.partial(_Quiet, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data", served
    httpd.shutdown()
    httpd.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def translate_path(self, path):  # /data/NAME -> served/NAME
        return super().translate_path(path.replace("/data/", "/", 1))

    def log_message(self, *args):
        pass


def _train(root, out, monkeypatch, tmp_path, *extra):
    monkeypatch.setenv("ITR_CACHE", str(tmp_path / "cache"))
    return main(["train", str(DEMO), *small_overrides(root, **{"train.epochs": 1}), *extra, "--out", str(out)])


def _same_weights(a, b):
    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.slow
def test_http_and_pipe_shards_train_to_the_weights_of_the_local_run(server, small_shards, tmp_path, monkeypatch,
                                                                    capsys):
    url, served = server
    assert _train(small_shards, tmp_path / "local", monkeypatch, tmp_path) == 0
    assert _train(url, tmp_path / "http", monkeypatch, tmp_path) == 0, capsys.readouterr().err[-3000:]
    assert _same_weights(tmp_path / "local", tmp_path / "http")
    pipe = f"pipe:cat {served}/{{name}}"
    assert _train(pipe, tmp_path / "pipe", monkeypatch, tmp_path) == 0, capsys.readouterr().err[-3000:]
    assert _same_weights(tmp_path / "local", tmp_path / "pipe")


def test_a_missing_remote_split_names_its_url(server, tmp_path, monkeypatch, capsys):
    url, _ = server
    assert _train(url + "/nowhere", tmp_path / "run", monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{url}/nowhere/train.manifest.json" in err and "Traceback" not in err, err[-2000:]


def test_a_corrupt_remote_shard_fails_verification_naming_its_url(server, tmp_path, monkeypatch, capsys):
    url, served = server
    shard = sorted(served.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _train(url, tmp_path / "run", monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{url}/{shard.name} is corrupt" in err, err[-2000:]
