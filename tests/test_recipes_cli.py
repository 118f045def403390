"""``itr recipes ls / cp``: the bundled recipes, launch configs and sbatch files, by name (itr.resources)."""
import os

import pytest
import yaml

from itr import resources
from itr.cli import main

from conftest import ROOT


def test_every_recipe_launch_config_and_sbatch_file_has_a_name_that_finds_it():
    names = resources.names()
    recipes = sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix() for p in ROOT.glob("recipes/*/*.yaml"))
    assert [n for n in names if "/" in n and n.split("/")[0] not in ("launch", "slurm")] == recipes
    assert {"launch", "slurm", "launch/ds_zero2.json", "slurm/train.sbatch", "slurm/lib.sh"} <= set(names)
    for n in names:
        assert resources.find(n).exists(), n
    assert resources.find("f30k/vse_infty") == ROOT / "recipes" / "f30k" / "vse_infty.yaml"
    assert resources.find("recipes/f30k/vse_infty.yaml") == resources.find("f30k/vse_infty")
    assert resources.bundled_dir("slurm") == ROOT / "slurm"


def test_ls_lists_each_recipe_with_its_model_and_dataset(capsys):
    assert main(["recipes", "ls"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith(" ")}
    for path in ROOT.glob("recipes/*/*.yaml"):
        name = path.relative_to(ROOT / "recipes").with_suffix("").as_posix()
        model = yaml.safe_load(path.read_text())["model"]["name"]
        assert rows[name][1:3] == [model, path.parent.name], name
    assert "  launch/multi_gpu.yaml  " in out and "DDP on all GPUs of one machine" in out
    assert "  slurm/train.sbatch  " in out and out.isascii()


def test_cp_copies_a_recipe_a_file_into_a_folder_and_a_whole_folder(tmp_path, capsys):
    assert main(["recipes", "cp", "f8k/vsepp_gru", str(tmp_path / "my.yaml")]) == 0
    assert (tmp_path / "my.yaml").read_bytes() == (ROOT / "recipes" / "f8k" / "vsepp_gru.yaml").read_bytes()
    assert main(["recipes", "cp", "launch/multi_gpu.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "multi_gpu.yaml").read_text() == (ROOT / "launch" / "multi_gpu.yaml").read_text()
    assert main(["recipes", "cp", "launch", str(tmp_path)]) == 0  # the YAMLs name launch/ds_zero*.json: keep the folder
    assert sorted(p.name for p in (tmp_path / "launch").iterdir()) == sorted(p.name for p in (ROOT / "launch").iterdir()
                                                                          if p.name != "__pycache__")
    assert os.access(tmp_path / "launch" / "multinode.sh", os.X_OK)
    assert "copied" in capsys.readouterr().out


def test_cp_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "my.yaml").write_text("mine\n")
    assert main(["recipes", "cp", "f8k/vsepp_gru", str(tmp_path / "my.yaml")]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err and (tmp_path / "my.yaml").read_text() == "mine\n"
    assert main(["recipes", "cp", "f8k/vsepp_gru", str(tmp_path / "my.yaml"), "--force"]) == 0
    assert (tmp_path / "my.yaml").read_text() != "mine\n"
    (tmp_path / "slurm").mkdir()
    assert main(["recipes", "cp", "slurm", str(tmp_path)]) == 2
    assert main(["recipes", "cp", "slurm", str(tmp_path), "--force"]) == 0 and (tmp_path / "slurm" / "lib.sh").is_file()


@pytest.mark.parametrize("name, expected", [
    ("f30k/vse_infinity", "f30k/vse_infty"),          # a typo
    ("vse_infty", "coco/vse_infty, f30k/vse_infty"),  # no dataset: every dataset that has it
    ("launch/multi-gpu.yaml", "launch/multi_gpu.yaml"),
])
def test_an_unknown_name_gets_the_close_matches(tmp_path, capsys, name, expected):
    assert main(["recipes", "cp", name, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"no bundled recipe or file named {name!r}" in err and expected in err and "itr recipes ls" in err
    assert not (tmp_path / "x").exists()


def test_names_cannot_leave_the_bundled_folders(tmp_path):
    with pytest.raises(resources.ResourceError):
        resources.find("slurm/../setup.py")
    with pytest.raises(resources.ResourceError):
        resources.find("../setup")


def test_bad_usage_is_an_argparse_error(capsys):
    for argv in (["recipes", "cp", "f8k/vsrn"], ["recipes", "ls", "f8k"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "itr recipes cp NAME DEST" in capsys.readouterr().err
