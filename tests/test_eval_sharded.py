"""The evaluation job divides score tiles among ranks and equals the one-process computation."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from itr.eval.scores import similarity_matrix

from conftest import ROOT, one_thread, tiny_overrides


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_tiles_of_any_size_give_the_same_matrix(chunk):
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(11, 5, generator=g), torch.randn(55, 5, generator=g)
    ref = (img @ cap.t()).numpy()
    calls = []

    def score(a, b):
        calls.append((a.shape[0], b.shape[0]))
        return a @ b.t()

    out = similarity_matrix(score, img, cap, chunk=chunk)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert max(a for a, _ in calls) <= chunk and max(b for _, b in calls) <= chunk  # memory bounded by the tile


@pytest.mark.slow
@pytest.mark.parametrize("procs,chunk", [(2, 16), (3, 7)])
def test_eval_job_on_several_ranks_equals_one_rank(tiny_data, tmp_path, procs, chunk):
    from itr.config import load_recipe
    from itr.eval.job import run_eval
    from itr.train import train

    recipe = load_recipe(ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml",
                         tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": False}))
    train(recipe, tmp_path / "run")
    ref = run_eval(tmp_path / "run" / "best", tiny_data, "test", save_sims=tmp_path / "ref.npy")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(procs), "-m", "itr", "eval",
                        str(tmp_path / "run" / "best"), "--data", str(tiny_data), "--split", "test",
                        "--chunk-size", str(chunk), "--json", str(tmp_path / "m.json"),
                        "--save-sims", str(tmp_path / "sims.npy"), "--save-topk", "5", "--topk-path",
                        str(tmp_path / "top.npz")] + (["--spill-gib", "0"] if procs == 2 else []),  # embeddings on disk
                       capture_output=True, text=True, errors="replace", timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"{procs} ranks" in p.stdout
    assert ("embeddings kept in a file" in p.stdout) == (procs == 2)
    np.testing.assert_allclose(np.load(tmp_path / "sims.npy"), np.load(tmp_path / "ref.npy"), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(ref)  # identical ranks
    # the same tile size on 1 rank: bitwise the same matrix (the tile grid does not depend on the world size)
    with one_thread():
        run_eval(tmp_path / "run" / "best", tiny_data, "test", chunk_size=chunk, save_sims=tmp_path / "one.npy",
                 save_topk=5, topk_path=tmp_path / "one.npz")
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "sims.npy"))
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "top.npz")  # top-K lists merged across the ranks
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
