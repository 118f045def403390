"""A run killed with SIGKILL at a random step and resumed ends with the weights of an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from itr.checkpoint import read_meta

from conftest import ROOT, run_itr, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _args(tiny_data, out):
    return ["train", str(DEMO), *tiny_overrides(tiny_data, **{"train.batch_size": 8, "train.checkpoint_every": 5,
                                                              "tracking.enabled": False}), "--out", str(out)]


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(tiny_data, tmp_path):
    run_itr(*_args(tiny_data, tmp_path / "full"))
    seed = int(time.time()) % 10000
    k = random.Random(seed).randrange(6, 180)  # 2 epochs x 100 steps
    proc = subprocess.Popen([sys.executable, "-m", "itr", *_args(tiny_data, tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = tmp_path / "killed" / "last" / "itr.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text())["train_state"]["global_step"] >= k:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before step {k} (seed {seed})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped = read_meta(tmp_path / "killed" / "last")["train_state"]["global_step"]  # also mid-swap
    assert stopped < 200
    p = run_itr(*_args(tiny_data, tmp_path / "killed"), "train.resume=latest")
    assert f"at epoch {stopped // 100} step {stopped}" in p.stdout
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after a kill at step {stopped} (seed {seed})"
