"""Global-batch negatives and exact gradient accumulation: splitting a batch over ranks or
accumulation steps gives the loss and gradients of the whole batch in one process."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "tests" / "helpers" / "step_equivalence.py"


def _run(tmp_path, procs, accum, global_negatives="true", head="no"):
    out = tmp_path / f"w{procs}a{accum}{global_negatives}{head}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    if procs == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), str(accum), global_negatives, head]
    else:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0",
               str(SCRIPT), str(out), str(accum), global_negatives, head]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r = torch.load(out)
    assert r["world"] == procs
    return r


def _same(a, b):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in a["grads"]:
        torch.testing.assert_close(a["grads"][k], b["grads"][k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ref"), 1, 1)


def test_accumulation_equals_the_whole_batch(reference, tmp_path):
    _same(_run(tmp_path, 1, 2), reference)
    _same(_run(tmp_path, 1, 4), reference)


@pytest.mark.slow
def test_two_ranks_with_gathered_negatives_equal_one_rank(reference, tmp_path):
    _same(_run(tmp_path, 2, 1), reference)
    _same(_run(tmp_path, 2, 2), reference)  # ranks and accumulation together


@pytest.mark.slow
def test_per_rank_negatives_differ(reference, tmp_path):
    local = _run(tmp_path, 2, 1, "false")
    assert local["loss"] < reference["loss"]  # fewer negatives, smaller hardest violations
    assert any(not torch.allclose(local["grads"][k], reference["grads"][k]) for k in reference["grads"])


@pytest.mark.slow
def test_a_learnable_batch_level_module_gets_the_whole_batch_gradient(tmp_path):
    """HREM-style: a module inside batch_loss, over the gathered global batch, with accumulation."""
    ref = _run(tmp_path, 1, 1, head="yes")
    assert "head.weight" in ref["grads"]
    _same(_run(tmp_path, 1, 2, head="yes"), ref)
    _same(_run(tmp_path, 2, 2, head="yes"), ref)
