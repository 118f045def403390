"""The recipe's train.mixed_precision is what runs: a launcher asking for another precision (the environment
`accelerate launch` exports, a default `accelerate config`, a DeepSpeed JSON) stops the run naming both values;
a launch config's deepspeed_config_file is found relative to the launch YAML."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_itr, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"


def _last_line(text):
    return text.rstrip("\n").split("\n")[-1]


def test_a_launcher_precision_that_differs_from_the_recipe_stops_the_run(tmp_path, tiny_data):
    p = run_itr("train", DEMO, *tiny_overrides(tiny_data), "train.mixed_precision=no", "tracking.enabled=false",
                "--out", tmp_path / "r", env={"ACCELERATE_MIXED_PRECISION": "bf16"}, check=False)
    err = _last_line(p.stderr)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert err.startswith("itr train: error:") and "ACCELERATE_MIXED_PRECISION=bf16" in err
    assert "train.mixed_precision=no" in err and "set train.mixed_precision=bf16" in err
    assert "--mixed_precision no" in err
    assert not (tmp_path / "r" / "last").exists()


@pytest.mark.slow  # a whole training with an MLflow store
def test_the_same_precision_from_the_launcher_and_the_recipe_trains_in_it(tmp_path, tiny_data):
    p = run_itr("train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1}), "train.mixed_precision=bf16",
                f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "--out", tmp_path / "r",
                env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "precision bf16" in p.stdout
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("itr").experiment_id])
    assert run.data.params["train.mixed_precision"] == "bf16" and run.data.tags["precision"] == "bf16"


def test_the_accelerator_takes_no_precision_from_the_environment(monkeypatch):
    """itr.precision autocasts and scales by the recipe: an Accelerator that read ACCELERATE_MIXED_PRECISION
    would autocast and scale the loss a second time."""
    from itr.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert make_accelerator(cpu=True).mixed_precision == "no"


def _accelerate(*args, cwd, env=None, timeout=300):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    return subprocess.run([accelerate, "launch", "--main_process_port", "0", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _train(tmp_path, tiny_data):
    return ["-m", "itr", "train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1}), "tracking.enabled=false"]


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_flag_against_the_recipe_stops(tmp_path, tiny_data):
    """Really launched: `--mixed_precision bf16` against a recipe saying no stops with itr's user-error code."""
    p = _accelerate("--num_processes", "1", "--mixed_precision", "bf16", *_train(tmp_path, tiny_data),
                    "train.mixed_precision=no", "--out", tmp_path / "a", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert p.returncode != 0 and "ACCELERATE_MIXED_PRECISION=bf16" in p.stderr, p.stderr[-3000:]
    assert "itr train: error: " in p.stderr and "train.mixed_precision=no" in p.stderr
    assert "exit status 2" in p.stderr  # itr's exit code for a user error (accelerate adds its own traceback)
    assert not (tmp_path / "a" / "last").exists()


@pytest.mark.slow
def test_a_plain_accelerate_launch_trains_a_bf16_recipe_in_bf16(tmp_path, tiny_data):
    """A plain `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no: the recipe's bf16 runs."""
    p = _accelerate("--num_processes", "1", *_train(tmp_path, tiny_data), "train.mixed_precision=bf16",
                    "--out", tmp_path / "b", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "precision bf16" in p.stdout and (tmp_path / "b" / "results.json").is_file()


@pytest.mark.slow
def test_a_default_accelerate_config_in_bf16_against_the_recipe_stops(tmp_path, tiny_data):
    """A user's default `accelerate config` (under $HF_HOME/accelerate) with bf16, a recipe saying no: stops."""
    hf_home = tmp_path / "hf"
    (hf_home / "accelerate").mkdir(parents=True)
    (hf_home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\nnum_machines: 1\n"
        "num_processes: 1\nuse_cpu: true\n")
    p = _accelerate(*_train(tmp_path, tiny_data), "train.mixed_precision=no", "--out", tmp_path / "c", cwd=tmp_path,
                    env={"HF_HOME": str(hf_home)})
    assert p.returncode != 0 and "ACCELERATE_MIXED_PRECISION=bf16" in p.stderr, p.stderr[-3000:]
    assert "default `accelerate config`" in p.stderr


def _ds_launch_yaml(folder, ds_file):
    folder.mkdir(parents=True, exist_ok=True)
    y = folder / "launch.yaml"
    y.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                 f"  deepspeed_config_file: {ds_file}\n  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 1\n"
                 "machine_rank: 0\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n")
    return y


@pytest.mark.slow
def test_a_launch_yaml_finds_its_deepspeed_json_beside_it_and_its_precision_is_checked(tmp_path, tiny_data):
    """Launched from another directory: the JSON named relative to the launch YAML is the one read (its
    bf16.enabled=true disagrees with the recipe: the error names that file); a JSON found nowhere is an error
    naming where it was looked for."""
    ds = json.loads((ROOT / "launch" / "ds_zero2.json").read_text())
    ds["bf16"] = {"enabled": True}
    (tmp_path / "cfg" / "ds").mkdir(parents=True)
    (tmp_path / "cfg" / "ds" / "bf16.json").write_text(json.dumps(ds))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    train = ["-m", "itr", "train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1}), "tracking.enabled=false"]
    p = _accelerate("--config_file", _ds_launch_yaml(tmp_path / "cfg", "ds/bf16.json"), *train,
                    "train.mixed_precision=no", "--out", tmp_path / "r", cwd=elsewhere)
    err = p.stderr
    assert p.returncode != 0 and str(tmp_path / "cfg" / "ds" / "bf16.json") in err, err[-3000:]
    assert "bf16.enabled=true" in err and "train.mixed_precision=no" in err and "\"auto\"" in err
    p = _accelerate("--config_file", _ds_launch_yaml(tmp_path / "cfg", "ds/nope.json"), *train,
                    "--out", tmp_path / "r", cwd=elsewhere)
    assert p.returncode != 0 and str(tmp_path / "cfg" / "ds" / "nope.json") in p.stderr, p.stderr[-3000:]
    assert str(elsewhere / "ds" / "nope.json") in p.stderr and "launch.yaml" in p.stderr


def _launch(config_file=None, deepspeed_config_file=None):
    return argparse.Namespace(config_file=config_file, deepspeed_config_file=deepspeed_config_file)


def test_deepspeed_json_of_a_launch_yaml_resolves_beside_the_yaml_then_in_the_launch_directory(tmp_path):
    from itr.errors import ConfigError
    from itr.launcher import resolve_launch_deepspeed_file

    (tmp_path / "cfg").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "cfg" / "ds.json").write_text("{}")
    (tmp_path / "run" / "ds.json").write_text("{}")
    (tmp_path / "run" / "only_here.json").write_text("{}")
    yaml_launch = (_launch(config_file="../cfg/l.yaml"), str(tmp_path / "run"))
    assert resolve_launch_deepspeed_file("ds.json", yaml_launch) == str(tmp_path / "cfg" / "ds.json")
    # a YAML written for accelerate's own rule (relative to where `accelerate launch` ran) still works
    assert resolve_launch_deepspeed_file("only_here.json", yaml_launch) == str(tmp_path / "run" / "only_here.json")
    # --deepspeed_config_file on the command line is relative to where it was typed
    cli_launch = (_launch(config_file="../cfg/l.yaml", deepspeed_config_file="ds.json"), str(tmp_path / "run"))
    assert resolve_launch_deepspeed_file("ds.json", cli_launch) == str(tmp_path / "run" / "ds.json")
    with pytest.raises(ConfigError) as e:
        resolve_launch_deepspeed_file("missing.json", yaml_launch)
    assert str(tmp_path / "cfg" / "missing.json") in str(e.value) and str(tmp_path / "run" / "missing.json") in str(e.value)
    with pytest.raises(ConfigError) as e:  # no accelerate launch among the ancestors: the current directory only
        resolve_launch_deepspeed_file("missing.json", None)
    assert str(tmp_path / "missing.json") in str(e.value) and "launch YAML's folder could not be tried" in str(e.value)


def test_a_deepspeed_json_precision_that_differs_from_the_recipe_names_the_file(tmp_path):
    from itr.errors import ConfigError
    from itr.launcher import fill_deepspeed_config

    ds = json.loads((ROOT / "launch" / "ds_zero2.json").read_text())
    ds["fp16"]["enabled"] = True
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        fill_deepspeed_config(tmp_path / "fp16.json", 16, 1, 1, 2.0, "bf16")
    assert str(tmp_path / "fp16.json") in str(e.value) and "fp16.enabled=true" in str(e.value)
    assert "train.mixed_precision=bf16" in str(e.value) and "set train.mixed_precision=fp16" in str(e.value)
