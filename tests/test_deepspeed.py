"""DeepSpeed ZeRO-2 and ZeRO-3 in bf16 on 2 CPU processes through `accelerate launch`:
save, exact resume, and consolidation into one safetensors file that `itr eval` reads
without DeepSpeed."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, free_port, small_overrides, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _launch(config, tiny_data, out, *extra, check=True):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / config), "--main_process_port", "0",
           "-m", "itr", "train", str(DEMO), *tiny_overrides(tiny_data), "train.mixed_precision=bf16",
           "train.world_size=2", "tracking.enabled=false", *extra, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0 or not check, p.stdout[-2000:] + p.stderr[-6000:]
    return p


def _partitions(run):
    state = run / "last" / "state" / "pytorch_model"
    return sorted(f.name for f in state.iterdir() if "optim_states" in f.name)


@pytest.mark.slow
def test_zero3_bf16_save_resume_consolidate(tiny_data, tmp_path):
    """ZeRO-3, the harder stage (parameters partitioned too); ZeRO-2 takes DDP's steps in
    test_deepspeed_and_ddp_take_the_same_steps and partitions its optimizer in the launcher test below."""
    config = "cpu_deepspeed_zero3.yaml"
    p = _launch(config, tiny_data, tmp_path / "full")
    assert "deepspeed ZeRO-3" in p.stdout and "precision bf16" in p.stdout
    assert len(_partitions(tmp_path / "full")) == 2  # one optimizer partition per rank: really ZeRO
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    assert all(v.dtype.is_floating_point and str(v.dtype) == "torch.float32" for v in a.values())  # fp32 master
    # the consolidated checkpoint evaluates in a process where DeepSpeed cannot be imported
    code = ("import sys; sys.modules['deepspeed'] = None; from itr.cli import main; "
            f"sys.exit(main(['eval', {str(tmp_path / 'full' / 'best')!r}, '--data', {str(tiny_data)!r}, "
            f"'--split', 'test', '--json', {str(tmp_path / 'm.json')!r}]))")
    e = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, errors="replace", timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads((tmp_path / "full" / "results.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["rsum"] == pytest.approx(res["test"]["rsum"])
    # stop after 30 of 50 steps, resume, and end bit-identical to the uninterrupted run
    _launch(config, tiny_data, tmp_path / "cut", "train.max_steps=30")
    p = _launch(config, tiny_data, tmp_path / "cut", "train.resume=latest")
    assert "resumed from" in p.stdout and "step 30" in p.stdout
    b = load_file(str(tmp_path / "cut" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # DeepSpeed loads its partitions with weights_only=False; itr forces weights-only: a planted pickle is refused
    import torch

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    planted = sorted((tmp_path / "cut" / "last" / "state" / "pytorch_model").glob("*model_states.pt"))
    assert len(planted) == 2  # ZeRO-3: one per rank (zero_pp_rank_N_mp_rank_00_model_states.pt)
    for f in planted:
        torch.save({"module": Payload()}, f)
    p = _launch(config, tiny_data, tmp_path / "cut", "train.resume=latest", "train.epochs=3", check=False)
    assert p.returncode != 0 and not (tmp_path / "ran").exists()
    assert "refusing to unpickle" in p.stderr and "_model_states.pt" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_the_same_json(tiny_data, tmp_path):
    """`deepspeed --module itr train ... train.deepspeed=launch/ds_zero2.json` (it adds --local_rank=N)."""
    ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    cmd = [ds, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "itr", "train", str(DEMO),
           *tiny_overrides(tiny_data, **{"train.epochs": 1}), "train.mixed_precision=bf16", "train.world_size=2",
           "tracking.enabled=false", f"train.deepspeed={ROOT / 'launch' / 'ds_zero2.json'}", "--out", str(tmp_path / "r")]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["world_size"] == 2
    assert "deepspeed ZeRO-2" in p.stdout and len(_partitions(tmp_path / "r")) == 2  # really ZeRO: one per rank


def test_deepspeed_json_autos_are_filled_from_the_recipe(tmp_path):
    from itr.distributed import fill_deepspeed_config
    from itr.errors import ConfigError

    cfg = fill_deepspeed_config(ROOT / "launch" / "ds_zero3.json", rank_batch=16, grad_accum=2, world=4,
                                grad_clip=2.0, mixed_precision="bf16")
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (16, 2, 128)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False and cfg["gradient_clipping"] == 2.0
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=4"):
        fill_deepspeed_config(bad, 16, 1, 1, 2.0, "no")
    with pytest.raises(ConfigError, match="does not exist"):
        fill_deepspeed_config(tmp_path / "nope.json", 16, 1, 1, 2.0, "no")


@pytest.mark.slow
def test_deepspeed_and_ddp_take_the_same_steps(tiny_data, tmp_path):
    """fp32, 2 ranks x 2 accumulation steps: the same losses and gradient norms under ZeRO-2 as under DDP,
    so DeepSpeed's own loss scaling by accumulation steps and its reduction match ours."""
    import mlflow

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    for name, flags in (("ddp", ["--multi_gpu"]),
                        ("zero2", ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / "launch" / "ds_zero2.json")])):
        cmd = [accelerate, "launch", *flags, "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
               "-m", "itr", "train", str(DEMO), *tiny_overrides(tiny_data), "train.grad_accum=2", "train.log_every=1",
               "train.max_steps=5", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", f"tracking.run_name={name}",
               "--out", str(tmp_path / name)]
        p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true"))
        assert p.returncode == 0, p.stderr[-4000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([client.get_experiment_by_name("itr").experiment_id])}
    for key in ("train/loss_warmup", "train/grad_norm"):  # 5 steps of the warm-up epoch
        ddp, ds = ([m.value for m in sorted(client.get_metric_history(runs[n], key), key=lambda m: m.step)]
                   for n in ("ddp", "zero2"))
        assert len(ddp) == 5 and ddp == pytest.approx(ds, rel=1e-4), key


@pytest.mark.slow
def test_zero3_with_a_transformers_text_encoder(tiny_data, tiny_bert, tmp_path):
    """A BERT-family encoder next to our own heads, partitioned by ZeRO-3 in bf16, with accumulation,
    a 0.1x text learning rate and activation checkpointing; its checkpoint evaluates without DeepSpeed."""
    p = _launch("cpu_deepspeed_zero3.yaml", tiny_data, tmp_path / "run", "train.epochs=1", "train.grad_accum=2",
                f"model.text={{name: hf, path: {tiny_bert}, grad_checkpointing: true}}", "optim.text_lr_mult=0.1")
    assert "deepspeed ZeRO-3" in p.stdout
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test"]["rsum"] > 0 and (tmp_path / "run" / "best" / "text_model" / "config.json").is_file()


@pytest.mark.slow
def test_resuming_a_deepspeed_checkpoint_on_another_number_of_ranks_is_refused(small_shards, tmp_path):
    """ZeRO partitions the optimizer state per rank: a checkpoint written by 2 ranks resumed on 1 under DeepSpeed
    is a clear error naming it and the way out (train.init_from), before anything is built or written. The
    2-rank checkpoint is a 1-process run's with its recorded world size set to 2 (all the check reads)."""
    from itr.cli import main

    run = tmp_path / "run"
    assert main(["train", str(DEMO), *small_overrides(small_shards, **{"train.max_steps": 2}), "--out", str(run)]) == 0
    meta_path = run / "last" / "itr.json"
    meta = json.loads(meta_path.read_text())
    meta["world_size"], meta["stream"]["world"] = 2, 2
    meta_path.write_text(json.dumps(meta))
    before = {p: p.stat().st_mtime_ns for p in (run / "last").rglob("*")}
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu_deepspeed_zero2.yaml"),
           "--num_processes", "1", "--main_process_port", "0", "-m", "itr", "train", str(DEMO),
           *small_overrides(small_shards), "train.mixed_precision=bf16", "train.resume=latest", "--out", str(run)]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0
    err = p.stderr
    assert (f"itr train: error: {run / 'last'} was written by 2 ranks under DeepSpeed" in err
            and "resume it on 2 ranks" in err and f"train.init_from={run / 'last'}" in err), err[-3000:]
    assert "Traceback" not in err.split("itr train: error:")[0]  # the refusal, not a crash before it
    assert {p: p.stat().st_mtime_ns for p in (run / "last").rglob("*")} == before
