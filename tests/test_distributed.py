"""Real multi-process runs through `accelerate launch` on CPU (gloo)."""
import json
import os
import shutil
import subprocess
import sys

import mlflow
import pytest

from conftest import ROOT, free_port, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def accelerate_launch(n, *args, use_cpu=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
           "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0",
           "-m", "itr", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout)


@pytest.mark.slow
def test_two_process_training_logs_once_and_checkpoints_evaluate(tiny_data, tmp_path):
    """Through the shipped launch config, as the docs tell users to run it."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    p = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
                        "--main_process_port", "0", "-m", "itr", "train", str(DEMO), *tiny_overrides(tiny_data),
                        "train.world_size=2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, errors="replace", env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["world_size"] == 2
    meta = json.loads((tmp_path / "run" / "last" / "itr.json").read_text())
    assert meta["world_size"] == 2 and meta["rank_batch"] == 16
    # one MLflow run (rank 0 only), tagged with the world size we asked for
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("itr").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    steps = [m.step for k in ("train/loss_warmup", "train/loss") for m in client.get_metric_history(res["run_id"], k)]
    assert len(steps) == len(set(steps)) > 0  # each step logged once
    # 2 epochs x (800 pairs // 32 global)
    assert res["global_step"] == 2 * (800 // 32)
    from itr.eval.job import run_eval

    assert run_eval(tmp_path / "run" / "best", tiny_data, "test")["rsum"] == pytest.approx(res["test"]["rsum"])


@pytest.mark.slow
def test_multi_gpu_flag_on_a_cpu_box_still_gives_a_real_two_process_run(tiny_data, tmp_path):
    # Plain accelerate would start 2 processes that each see a world of 1 here; the trainer asks for gloo.
    p = accelerate_launch(2, "train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1}), "train.world_size=2",
                          "tracking.enabled=false", "--out", tmp_path / "run", use_cpu=False)
    assert p.returncode == 0, p.stderr[-4000:]
    ends = [line for line in p.stderr.splitlines() if line.startswith("epoch 1/1: 100%")]
    assert len(ends) == 1 and ends[0].isascii() and "\r" not in p.stderr  # rank 0's bar only, as whole ASCII lines
    assert json.loads((tmp_path / "run" / "results.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_silently_single_process_launch_is_caught_by_train_world_size(tiny_data, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process, without a word
    env = dict(os.environ, OMP_NUM_THREADS="1")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    p = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "-m", "itr", "train", str(DEMO),
                        *tiny_overrides(tiny_data), "train.world_size=2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, errors="replace", env=env, timeout=300)
    assert p.returncode != 0
    assert "train.world_size=2 but 1 process(es) were started" in p.stderr


def test_launcher_world_size_disagreement_is_an_error(monkeypatch):
    from itr.distributed import LaunchError, check_world_size

    class One:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="WORLD_SIZE=2"):
        check_world_size(One())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert check_world_size(One()) == 1


@pytest.mark.slow
def test_two_machines_on_localhost_through_the_multinode_script(tiny_data, tmp_path):
    """launch/multinode.sh on 2 "nodes" (one process each) fills rank and address from the environment."""
    procs = []
    env = dict(os.environ, OMP_NUM_THREADS="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PROCS_PER_NODE="1", PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [str(ROOT / "launch" / "multinode.sh"), "-m", "itr", "train", str(DEMO),
             *tiny_overrides(tiny_data, **{"train.epochs": 1}), "train.world_size=2", "tracking.enabled=false",
             "--out", str(tmp_path / "run")],
            env=dict(env, NODE_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace"))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    assert "machine 0 of 2" in logs[0] and "machine 1 of 2" in logs[1]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_two_process_training_with_a_transformers_text_encoder(tiny_data, tiny_bert, tmp_path):
    """DDP with a BERT-family text encoder (its unused pooler must not stall the reducer)."""
    p = accelerate_launch(2, "train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1, "train.max_steps": 4}),
                          f"model.text={{name: hf, path: {tiny_bert}}}", "optim.text_lr_mult=0.1", "train.world_size=2",
                          "tracking.enabled=false", "--out", tmp_path / "run")
    assert p.returncode == 0, p.stderr[-4000:]


def test_collectives_of_host_tensors_use_the_gpu_under_nccl(monkeypatch):
    """NCCL takes no host tensors: the evaluation job's host-side collectives (score tiles, shortlists, reranked
    scores) pick the rank's GPU under NCCL and the CPU under gloo (a GPU-only bug: `itr eval` on N GPUs)."""
    import torch

    import itr.distributed as D

    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "nccl")
    assert D.comm_device() == torch.device("cuda", 1)
    monkeypatch.setattr(D.dist, "get_backend", lambda *a: "gloo")
    assert D.comm_device() == torch.device("cpu")
    t, seen = torch.zeros(3), []
    D.host_collective(lambda x, src: (seen.append((x, src)), x.add_(1)), t, src=0)
    assert seen[0][0] is t and seen[0][1] == 0 and t.tolist() == [1.0, 1.0, 1.0]  # gloo: in place, no copy
