"""Checkpoints for the retrieval tests (index, search, report), trained once per session and shared by
tests/test_search.py and tests/test_report.py.

The data: synthetic, 400 / 40 / 40 images of 4 regions x 32-d with boxes, noise 0.3 (less than the demo's
1.0): a VSE++ learns it in 4 short epochs to far above chance (test t2i R@1 of ~0.5-0.8 against 1/40); SCAN
(1 epoch), TGDT (1 epoch) and TERAN (8 steps) only have to be trained models of their kind, not good ones."""
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"data.num_workers": 0, "data.shuffle_buffer": 400, "data.images_per_shard": 100, "train.batch_size": 64,
          "train.log_every": 100, "eval.batch_size": 256, "tracking.enabled": "false"}
WORDS = {"model.text.min_count": 1}  # the word-vocabulary encoders'
RUNS = {
    "vsepp": ("vsepp_gru.yaml", {**WORDS, "model.embed_dim": 64, "model.text.word_dim": 32, "train.epochs": 4,
                                 "optim.lr": 4e-3}),
    "scan": ("scan_t2i.yaml", {**WORDS, "model.embed_dim": 32, "model.text.word_dim": 16, "train.epochs": 1,
                               "optim.lr": 2e-3}),
    "tgdt": ("tgdt.yaml", {**WORDS, "model.embed_dim": 16, "model.ff_dim": 32, "model.heads": 2,
                           "model.text.word_dim": 8, "train.epochs": 1, "model.dropout": 0.0}),
    # its text model: the session's tiny BERT (``checkpoint(base, "teran", "model.text.path=DIR")``)
    "teran": ("teran.yaml", {"model.embed_dim": 16, "model.image_layers": 1, "model.layers": 1, "model.heads": 2,
                             "model.ff_dim": 32, "model.dropout": 0.0, "train.epochs": 1, "train.max_steps": 8,
                             "optim.warmup_steps": 0, "optim.lr": 1e-3}),
}


@functools.lru_cache(maxsize=None)
def data(base):
    from itr.data.synthetic import generate

    return generate(Path(base) / "retrieval_data", splits=(("train", 400), ("dev", 40), ("test", 40)), dim=32,
                    regions=4, noise=0.3, seed=1)


@functools.lru_cache(maxsize=None)
def checkpoint(base, name, *overrides):
    """``base/retrieval_NAME/best``, trained on first use in this session (``overrides``: more "key=value")."""
    import contextlib
    import io

    from itr.config import load_recipe
    from itr.train import train

    recipe, extra = RUNS[name]
    d = data(base)
    o = {**COMMON, **extra, "data.root": d, "data.shard_dir": Path(base) / "retrieval_shards"}
    out = Path(base) / f"retrieval_{name}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(load_recipe(ROOT / "recipes" / "synthetic" / recipe, [*(f"{k}={v}" for k, v in o.items()), *overrides]),
              out)
    return out / "best"


@pytest.fixture(scope="session")
def retrieval(tmp_path_factory):
    """(data directory, checkpoint(name) -> DIR/best)."""
    base = tmp_path_factory.getbasetemp()
    return data(base), functools.partial(checkpoint, base)
