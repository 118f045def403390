import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
F8K = SHARED / "f8k_pooled"
F8K_IMAGES = SHARED / "f8k_images"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own shard cache and MLflow store (cwd-relative defaults land in tmp)."""
    monkeypatch.setenv("ITR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri() exports it
    monkeypatch.chdir(tmp_path)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # in-process trainings may use another precision
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic precomp dataset: 8 regions x 32-d, 160/40/40 images."""
    from itr.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny"), splits=(("train", 160), ("dev", 40), ("test", 40)),
                    dim=32, regions=8, seed=1)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """Shards of a smaller synthetic dataset (48/16/16 images, 4 regions x 16-d): ~10 steps of 24 pairs an epoch,
    for tests that train many times (the resume and kill-protocol tests)."""
    from itr.data.synthetic import generate
    from shards.precomp import shard_precomp

    src = generate(tmp_path_factory.mktemp("small_src"), splits=(("train", 48), ("dev", 16), ("test", 16)), dim=16,
                   regions=4, seed=3)
    out = tmp_path_factory.mktemp("small_shards")
    for split in ("train", "dev", "test"):
        shard_precomp(src, split, out, images_per_shard=16, progress=False)
    return out


def small_overrides(root, **extra):
    """Overrides that make a run on small_shards take about a second (2 epochs of 10 steps)."""
    o = {"data.root": root, "data.num_workers": 0, "data.shuffle_buffer": 100, "train.batch_size": 24,
         "train.epochs": 2, "train.log_every": 2, "tracking.enabled": "false", "model.embed_dim": 16,
         "eval.batch_size": 64, "optim.lr": 2e-3}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with a word-level vocabulary, saved like a local bert-base-uncased directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from itr.data.synthetic import COLORS, CONCEPTS, PREPS, TEMPLATES

    d = tmp_path_factory.mktemp("tiny_bert")
    words = {w for c in CONCEPTS for w in c} | set(COLORS) | {w for p in PREPS for w in p.split()}
    words |= {w.strip(",") for t in TEMPLATES for w in t.replace("{0}", "").split()} | {"a", "an", "and", ","}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    import torch

    with torch.random.fork_rng(devices=[]):  # the same weights whichever tests ran first in the session
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture
def f8k():
    if not (F8K / "train_ims.npy").is_file():
        pytest.skip(f"real Flickr8k data not found at {F8K} (it lives in ../shared/data beside the checkout; CI has it)")
    return F8K


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as each rank of a multi-process test: a BLAS that picks its thread count by load
    (MKL_DYNAMIC) splits reductions differently, which changes last bits; bitwise comparisons across process
    counts need the same thread count on both sides (the suite must pass beside another CPU-heavy job)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_itr(*args, env=None, timeout=600, check=True):
    """Run the CLI in a subprocess, as a user would."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "itr", *map(str, args)], capture_output=True, text=True, env=e,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"itr {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(root, **extra):
    """Overrides that make a VSE++ run on tiny_data take seconds."""
    o = {
        "data.root": root, "data.num_workers": 0, "data.shuffle_buffer": 200, "data.images_per_shard": 40,
        "model.embed_dim": 32, "model.text.word_dim": 16, "train.batch_size": 32, "train.epochs": 2,
        "train.log_every": 2, "optim.lr": 2e-3, "eval.batch_size": 64,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]
