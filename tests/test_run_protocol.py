"""The run-directory protocol (itr.rundir, docs/training.md "The run directory"): a SIGKILL at every point of
it, then a second SIGKILL at the same point during the resume, changes nothing: ``last``, ``best`` and
``results.json`` end as an uninterrupted run's. For VSE++ and for VSE-infinity (random region drop and caption
masking in its forward)."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from itr.logs import read_log

from conftest import ROOT, small_overrides

HELPER = ROOT / "tests" / "helpers" / "kill_protocol.py"


def _same_weights(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["vsepp_gru", "vse_infty"])
def test_a_kill_at_every_point_of_the_protocol_then_another_loses_nothing(recipe, small_shards, tmp_path):
    """VSE++ at every point; VSE-infinity (what it adds: random draws replayed from a checkpoint) at every point
    of saving ``last`` and of the results (``best`` is the same code whatever the model)."""
    overrides = small_overrides(small_shards, **{"train.checkpoint_every": 4, "model.text.word_dim": 16})
    points = ["--points", "last:,results"] if recipe == "vse_infty" else []
    p = subprocess.run([sys.executable, str(HELPER), *points, str(ROOT / "recipes" / "synthetic" / f"{recipe}.yaml"),
                        str(tmp_path), *overrides], capture_output=True, text=True, errors="replace", timeout=1200,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    points = set(report["points"])
    for name in ("last", "best") if recipe == "vsepp_gru" else ("last",):
        assert {f"{name}: tmp written", f"{name}: old moved aside", f"{name}: new in place",
                f"{name}: old deleted"} <= points, sorted(points)
    assert "results.json: written" in points
    ref = tmp_path / "ref"
    twice = 0
    for name, sc in report["scenarios"].items():
        runs, out = sc["runs"], sc["dir"]
        log = read_log(out + ".log", tail=3000)
        assert runs[0] == "killed" and runs[-1] == "ok", (name, runs, log)
        twice += runs[1] == "killed"
        for ck in ("last", "best"):
            assert _same_weights(ref / ck / "model.safetensors", f"{out}/{ck}/model.safetensors"), (name, ck, runs)
        assert json.loads(open(f"{out}/results.json").read()) == json.loads((ref / "results.json").read_text()), name
    # the second kill really happened wherever the resumed run must pass the point again (a best promoted before
    # the first kill is not promoted again, so those resumes end without one)
    again = [n for n in report["scenarios"] if n.startswith(("last:", "results")) or n.endswith("recovered")]
    assert all(report["scenarios"][n]["runs"][1] == "killed" for n in again), report["scenarios"]
    assert twice >= len(again) and any(n.endswith("last: recovered") for n in again)
    if recipe == "vsepp_gru":
        assert any(n.endswith("best: recovered") for n in again) and report["counts"]["best: tmp written"] >= 2


@pytest.mark.slow
def test_a_run_that_scores_no_test_stops_resumes_and_ends_as_an_uninterrupted_one(small_shards, tmp_path, monkeypatch):
    """train.score_test=false (a selection sweep's member): stopped by SIGTERM mid-epoch and resumed, ``best``
    and ``results.json`` (no test, ``test_scored`` false) equal the uninterrupted run's."""
    from itr.config import load_recipe
    from itr.train import train

    over = small_overrides(small_shards, **{"train.score_test": "false", "train.epochs": 1})
    recipe = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
    ref = train(load_recipe(recipe, over), tmp_path / "ref")
    monkeypatch.setenv("ITR_FAULT", "term@step 4")
    assert train(load_recipe(recipe, over), tmp_path / "cut") is None
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.delenv("ITR_FAULT")
    res = train(load_recipe(recipe, over + ["train.resume=latest"]), tmp_path / "cut")
    assert res == ref and ref["test_scored"] is False and "test" not in ref
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    assert json.loads((cut_dir / "results.json").read_text()) == json.loads((ref_dir / "results.json").read_text())
    assert _same_weights(ref_dir / "best" / "model.safetensors", cut_dir / "best" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_a_kill_during_the_first_promotion_of_best_leaves_the_best_an_uninterrupted_run_has(epochs, small_shards,
                                                                                            tmp_path):
    """A kill in the first-ever promotion of ``best`` before its swap (``last`` already records the new best, no
    ``best/`` exists yet: the points after the swap are the ordinary recovery of the every-point test), another during
    the resume, then a resume: ``best/`` is there and is the uninterrupted run's, as are ``last`` and
    ``results.json``. 1 epoch: the resume only reconciles, then tests; 2: it trains on."""
    overrides = small_overrides(small_shards, **{"train.epochs": epochs, "model.text.word_dim": 16})
    p = subprocess.run([sys.executable, str(HELPER), "--first", "--points", "best: tmp",
                        str(ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"), str(tmp_path), *overrides],
                       capture_output=True, text=True, errors="replace", timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["points"] == ["best: tmp cleared", "best: tmp written"], report["points"]
    ref = tmp_path / "ref"
    for name, sc in report["scenarios"].items():
        runs, out = sc["runs"], sc["dir"]
        assert sc["faults"][0] == f"{name.split(' / ')[0]}:1", sc
        log = read_log(out + ".log", tail=3000)
        assert runs[0] == "killed" and runs[-1] == "ok", (name, runs, log)
        for ck in ("last", "best"):
            assert _same_weights(ref / ck / "model.safetensors", f"{out}/{ck}/model.safetensors"), (name, ck, runs)
        assert json.loads(open(f"{out}/results.json").read()) == json.loads((ref / "results.json").read_text()), name
    # before the tmp folder is complete, nothing but last's record of the best is left: the resume promotes it again
    # (checkpoint.reconcile_best), also after a second kill in that very promotion
    cleared = report["scenarios"]["best: tmp cleared"]
    assert cleared["runs"] == ["killed", "killed", "ok"], cleared
    assert "promoted again from last" in read_log(cleared["dir"] + ".log", tail=20000)
