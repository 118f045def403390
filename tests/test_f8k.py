"""The real Flickr8k data in ../shared/data/f8k_pooled (skipped, with the reason, where it is absent)."""
import json

import numpy as np
import pytest

from itr.data.precomp import open_precomp
from itr.data.sources import load_split

from conftest import ROOT, run_itr


def test_f8k_precomp_splits_open_and_shard_round_trip(f8k, tmp_path):
    for split, n in (("train", 700), ("dev", 100), ("test", 100)):
        s = open_precomp(f8k, split)
        assert s.images.shape == (n, 1, 512) and len(s.captions) == 5 * n and len(s.ids) == n
    p = run_itr("shard", "precomp", f8k, "test", tmp_path / "shards", "--images-per-shard", 30)
    assert "4 shard(s): 100 images, 500 captions, features [1, 512] float16" in p.stdout
    src, back = open_precomp(f8k, "test"), load_split(tmp_path / "shards", "test")
    assert back.captions == src.captions and back.ids == src.ids
    np.testing.assert_allclose(back.images.astype(np.float32), src.images, rtol=1e-3, atol=1e-2)


@pytest.mark.slow
def test_f8k_minilm_recipe_learns_on_real_data(f8k, tmp_path):
    """One epoch of the shipped recipe, run as a user types it, lands far above chance on the test split."""
    p = run_itr("train", ROOT / "recipes" / "f8k" / "vsepp_minilm.yaml", f"data.root={f8k}", "train.epochs=1",
                "train.max_steps=12", "--out", tmp_path / "run", timeout=900)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    # chance on 100 images: R@1 1, R@5 5, R@10 10 per direction (rsum 32)
    assert res["test"]["rsum"] > 150, res["test"]
    assert "test (test) with the best dev checkpoint" in p.stdout
    run_itr("eval", tmp_path / "run" / "best", "--data", f8k, "--split", "test", "--json", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["rsum"] == pytest.approx(res["test"]["rsum"], abs=1e-6)
