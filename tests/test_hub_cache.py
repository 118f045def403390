"""Hub-style text-encoder names (``bert-base-uncased``) come from the local Hugging Face cache, never a download."""
import shutil
import socket

import pytest
import torch

from itr.config import load_recipe
from itr.errors import ConfigError
from itr.models import build_model, make_tokenizer
from itr.modules.encoders import resolve_hf_path

from conftest import ROOT

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
REV = "0123456789abcdef0123456789abcdef01234567"


def _cache(root, repo_id, src, files=None):
    """huggingface_hub's layout: models--ORG--NAME/refs/main names a snapshot folder holding the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    for f in src.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_bert):
    root = tmp_path / "hf" / "hub"
    snaps = {name: _cache(root, name, tiny_bert) for name in ("itr-test/tiny-bert", "tiny-bert-legacy")}
    monkeypatch.setenv("HF_HUB_CACHE", str(root))

    def no_network(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return root, snaps


def test_a_hub_name_resolves_to_its_snapshot_in_the_local_cache(hub, tiny_bert):
    root, snaps = hub
    assert resolve_hf_path("itr-test/tiny-bert") == str(snaps["itr-test/tiny-bert"])
    assert resolve_hf_path("tiny-bert-legacy") == str(snaps["tiny-bert-legacy"])  # no organisation, as bert-base-uncased
    r = load_recipe(DEMO, ["model.embed_dim=16", "model.text={name: hf, path: itr-test/tiny-bert, pool: mean}"])
    tok = make_tokenizer(r)
    model = build_model(r, 12, tok)
    from transformers import BertModel

    ref = BertModel.from_pretrained(str(tiny_bert), local_files_only=True)
    got = model.txt_enc.backbone.state_dict()
    shared = [k for k in ref.state_dict() if k in got]
    assert len(shared) > 20  # all but the pooler, which the encoder drops
    for k in shared:
        torch.testing.assert_close(got[k], ref.state_dict()[k])  # the cached weights, not a random initialisation
    assert tok.encode("a red dog")[0] == tok.tok.cls_token_id


def test_hf_home_is_read_when_hf_hub_cache_is_unset(hub, monkeypatch):
    root, snaps = hub
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(root.parent))
    assert resolve_hf_path("itr-test/tiny-bert") == str(snaps["itr-test/tiny-bert"])


def test_a_local_directory_wins_over_the_cache(hub, tmp_path, tiny_bert):
    local = tmp_path / "itr-test" / "tiny-bert"
    shutil.copytree(tiny_bert, local)  # a relative path that also reads as ORG/NAME
    assert resolve_hf_path("itr-test/tiny-bert") == str(local.resolve())


def test_a_name_not_in_the_cache_says_where_it_looked_and_how_to_provide_it(hub):
    root, _ = hub
    with pytest.raises(ConfigError) as e:
        resolve_hf_path("google-bert/bert-base-uncased")
    msg = str(e.value)
    assert "model.text.path=google-bert/bert-base-uncased" in msg
    assert "models--google-bert--bert-base-uncased" in msg and str(root) in msg and "HF_HUB_CACHE" in msg
    assert "hf download google-bert/bert-base-uncased" in msg and "never download" in msg


def test_a_cached_config_without_weights_is_an_error_not_a_random_model(tmp_path, monkeypatch, tiny_bert):
    root = tmp_path / "hub"
    snap = _cache(root, "itr-test/partial", tiny_bert, files={"config.json", "vocab.txt"})
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    with pytest.raises(ConfigError, match="no weights") as e:
        resolve_hf_path("itr-test/partial")
    assert str(snap) in str(e.value)
