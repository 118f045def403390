import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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
    from itr.shards.precomp import shard_precomp

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
    # the vocabulary positionally: transformers 5 ignores vocab_file= (a 5-token vocabulary, every word [UNK])
    BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d)
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
    p = subprocess.run([sys.executable, "-m", "itr", *map(str, args)], capture_output=True, text=True, errors="replace",
                       env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"itr {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def free_port():
    """A free port below the kernel's ephemeral range: a port from ``bind(0)`` is free only until the next
    process (a gloo pair, an accelerate launch with port 0) is handed the same one between our check and the
    server's bind; ports below the range are never handed out that way."""
    import random
    import socket

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(min(20000, low - 1000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
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


# ----------------------------------------------------------------------------- step equivalence over ranks

STEP = ROOT / "tests" / "helpers" / "step.py"


@functools.lru_cache(maxsize=None)
def _step_module():
    spec = importlib.util.spec_from_file_location("itr_test_step", STEP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(runs):
    """Each run: "model", ("model", accum) or ("model", accum, {"global_negatives": False})."""
    out = []
    for r in runs:
        r = (r,) if isinstance(r, str) else tuple(r)
        out.append({"model": r[0], "accum": r[1] if len(r) > 1 else 1, **(r[2] if len(r) > 2 else {})})
    return out


def launch_steps(procs, *runs, bert=None, timeout=300):
    """One step of tests/helpers/step.py per run on ``procs`` ranks; their results, in order.

    1 rank runs in this process (no start-up to pay); more is one ``accelerate launch`` for all the
    runs, so a test file pays its ~8 s of start-up once, not once per configuration."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    spec = {"runs": _runs(runs), "bert": str(bert) if bert else None}
    if procs == 1:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            with one_thread(), torch.random.fork_rng(devices=[]):  # the caller's RNG untouched
                results = _step_module().run_all(spec)
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    else:
        results = _launched(procs, spec, timeout)
    assert [r["world"] for r in results] == [procs] * len(results), "the launcher started the wrong world size"
    return results


def _launched(procs, spec, timeout):
    import torch

    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "steps.pt"
        cmd = [str(accelerate if accelerate.exists() else "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(procs), "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
               "--main_process_port", "0", str(STEP), str(out), json.dumps(spec)]
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout)
        assert p.returncode == 0, f"{STEP.name} on {procs} ranks failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        return torch.load(out)


def assert_same_step(got, ref, what="", rel=1e-5, rtol=1e-4, atol=1e-6):
    """The same loss and the same gradient for every parameter; a failure names the parameter."""
    import torch

    assert got["loss"] == pytest.approx(ref["loss"], rel=rel), f"{what}: loss {got['loss']} != {ref['loss']}"
    assert got["grads"].keys() == ref["grads"].keys(), \
        f"{what}: gradients of different parameters: {sorted(got['grads'].keys() ^ ref['grads'].keys())}"
    for k in ref["grads"]:
        torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{what}: gradient of {k}: {m}")


def assert_split_steps_equal(model, splits, bert=None, **options):
    """The step of ``model`` on the whole batch in one process against the same step split as each
    (ranks, accumulation steps) of ``splits`` (one launch per number of ranks); returns the reference,
    for the test's own checks of what it covers."""
    one = [a for p, a in splits if p == 1]
    ref, *accumulated = launch_steps(1, *[(model, a, options) for a in (1, *one)], bert=bert)
    for a, got in zip(one, accumulated):
        assert_same_step(got, ref, f"{model}, 1 rank x {a} micro-batches")
    for procs in sorted({p for p, _ in splits if p > 1}):
        accums = [a for p, a in splits if p == procs]
        for a, got in zip(accums, launch_steps(procs, *[(model, a, options) for a in accums], bert=bert)):
            assert_same_step(got, ref, f"{model}, {procs} ranks x {a} micro-batches")
    return ref


@pytest.fixture(scope="session")
def manifest(tiny_data, tmp_path_factory):
    """tiny_data's train split in 7 uneven shards of 160 images (the loader and segment tests)."""
    from itr.data.manifest import load_manifest
    from itr.shards.precomp import shard_precomp

    out = tmp_path_factory.mktemp("uneven_shards")
    shard_precomp(tiny_data, "train", out, images_per_shard=23, progress=False)
    return load_manifest(out, "train")


@pytest.fixture(scope="session")
def vocab(manifest):
    from itr.data.sources import split_captions
    from itr.data.text import WordVocab

    return WordVocab.build(split_captions(manifest))
