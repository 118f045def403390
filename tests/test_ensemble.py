"""``itr eval A B --ensemble``: the weighted average of the members' similarity matrices, on 1 and 2 ranks."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from itr.eval.metrics import KEYS, evaluate_sims

from conftest import ROOT, small_overrides

VSEPP = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


@pytest.fixture(scope="module")
def two_runs(small_shards, tmp_path_factory):
    """Two tiny VSE++ runs with different seeds, and each one's own similarity matrix on the test split."""
    from itr.config import load_recipe
    from itr.eval.job import run_eval
    from itr.train import train

    d = tmp_path_factory.mktemp("ensemble")
    out = []
    for seed in (0, 1):
        train(load_recipe(VSEPP, small_overrides(small_shards, **{"train.epochs": 1, "train.seed": seed})),
              d / f"run{seed}")
        metrics = run_eval(d / f"run{seed}" / "best", small_shards, "test", save_sims=d / f"sims{seed}.npy")
        out.append((d / f"run{seed}" / "best", np.load(d / f"sims{seed}.npy"), metrics))
    return out


def test_ensemble_is_the_weighted_average_of_the_saved_matrices(two_runs, small_shards, tmp_path, capsys):
    from itr.eval.ensemble import run_ensemble
    from itr.eval.job import EvalRequest

    (a, sa, ma), (b, sb, mb) = two_runs
    assert not np.allclose(sa, sb)
    for weights, wa in ((None, 0.5), ("3,1", 0.75)):
        out = run_ensemble(EvalRequest(a, small_shards, "test", ensemble=[a, b], weights=weights, chunk_size=7,
                                       save_sims=tmp_path / "e.npy", json_out=tmp_path / "e.json"))
        avg = wa * sa + (1 - wa) * sb
        np.testing.assert_allclose(np.load(tmp_path / "e.npy"), avg, rtol=0, atol=1e-6)
        assert out["ensemble"] == pytest.approx(evaluate_sims(avg, "1k"))
        assert [m["metrics"] for m in out["members"]] == [pytest.approx(ma), pytest.approx(mb)]
        assert [m["weight"] for m in out["members"]] == [wa, 1 - wa]
        assert json.loads((tmp_path / "e.json").read_text())["ensemble"] == pytest.approx(out["ensemble"])
    printed = capsys.readouterr().out
    assert "ensemble" in printed and "run0/best" in printed and "run1/best" in printed


def test_ensemble_arguments_are_checked(two_runs, small_shards, capsys):
    from itr.cli import main

    (a, *_), (b, *_) = two_runs
    base = ["eval", str(a), str(b), "--data", str(small_shards), "--split", "test"]
    assert main(base) == 2
    assert "pass --ensemble" in capsys.readouterr().err
    assert main(base + ["--ensemble", "--weights", "1,2,3"]) == 2
    assert "--weights '1,2,3': expected 2" in capsys.readouterr().err
    assert main(base + ["--ensemble", "--two-stage", "5"]) == 2
    assert "--ensemble does not combine with --two-stage" in capsys.readouterr().err
    assert main(["eval", str(a), "--data", str(small_shards), "--split", "test", "--weights", "1"]) == 2


@pytest.mark.slow
def test_ensemble_on_two_ranks_equals_one_rank(two_runs, small_shards, tmp_path):
    (a, sa, _), (b, sb, _) = two_runs
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "itr", "eval", str(a), str(b),
                        "--ensemble", "--weights", "1,3", "--data", str(small_shards), "--split", "test",
                        "--chunk-size", "5", "--json", str(tmp_path / "m.json"),
                        "--save-sims", str(tmp_path / "s.npy")],
                       capture_output=True, text=True, errors="replace", timeout=180,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "2 ranks" in p.stdout
    avg = 0.25 * sa + 0.75 * sb
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), avg, rtol=0, atol=1e-5)
    got = json.loads((tmp_path / "m.json").read_text())
    assert {k: got["ensemble"][k] for k in KEYS} == pytest.approx(evaluate_sims(avg, "1k"))
