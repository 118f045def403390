"""The wheel ships what users need (itr.shards, recipes, launch configs, sbatch files) and no top-level ``shards``;
installed outside the checkout, ``itr --version`` and ``itr recipes ls / cp`` work; the editable install of
``python3 dev.py install`` still imports ``itr.shards``. Built offline: no index, no build isolation."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from itr import __version__

from conftest import ROOT

SOURCES = ("itr", "shards", "recipes", "launch", "slurm", "setup.py", "setup.cfg", "pyproject.toml", "README.md",
           "LICENSE")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _run(cmd, cwd, check=True, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout must not shadow the install
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                       timeout=300, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _copy_sources(dest):
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dest / name)
    return dest


def _venv(path):
    """A bare venv whose dependencies come from this interpreter's site-packages, after its own (no .pth of
    that directory is processed, so the checkout's editable install does not leak in)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout.strip()
    Path(site, "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp / "src")
    _run(PIP + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("itr-*.whl")
    return tmp, wheel


def test_the_wheel_holds_the_code_recipes_launch_configs_and_sbatch_files(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
        meta = z.read(f"itr-{__version__}.dist-info/METADATA").decode()
        top = z.read(f"itr-{__version__}.dist-info/top_level.txt").decode().split()
    assert top == ["itr"] and not any(n.startswith("shards/") for n in names)
    assert {f"itr/shards/{m}.py" for m in ("__init__", "precomp", "images", "writer")} <= names
    for kind, pattern in (("recipes", "*/*.yaml"), ("launch", "*"), ("slurm", "*.*")):
        bundled = {f"itr/_data/{kind}/{p.relative_to(ROOT / kind).as_posix()}" for p in (ROOT / kind).glob(pattern)
                   if p.is_file()}
        assert bundled and bundled <= names, sorted(bundled - names)
    assert "itr/_data/recipes/f30k/vse_infty.yaml" in names and "itr/_data/slurm/train.sbatch" in names
    assert not any("testcluster" in n for n in names)  # the test cluster is for this repository's tests only
    for script in ("itr/_data/slurm/node.sh", "itr/_data/launch/multinode.sh"):
        assert modes[script] & 0o111, script  # srun and the sbatch files execute these
    assert f"itr-{__version__}.dist-info/licenses/LICENSE" in names
    assert "License: MIT" in meta or "License-Expression: MIT" in meta
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_installed_outside_the_checkout_itr_lists_and_copies_its_recipes(built):
    tmp, wheel = built
    py = _venv(tmp / "venv")
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", py, "install", "--no-deps",
          "--no-index", wheel], cwd=tmp)
    itr = tmp / "venv" / "bin" / "itr"
    work = tmp / "work"
    work.mkdir()
    where = _run([py, "-c", "import importlib.util, itr, itr.shards.precomp; print(itr.__file__); "
                            "print(importlib.util.find_spec('shards'))"], cwd=work).stdout.split()
    assert where[0].startswith(str(tmp / "venv")) and where[1] == "None"
    assert _run([itr, "--version"], cwd=work).stdout.startswith(f"itr {__version__} ({tmp / 'venv'}")
    listing = _run([itr, "recipes", "ls"], cwd=work).stdout
    assert "f30k/vse_infty" in listing and "vse_infty" in listing and "launch/multi_gpu.yaml" in listing
    assert "slurm/train.sbatch" in listing
    _run([itr, "recipes", "cp", "f30k/vse_infty", "my.yaml"], cwd=work)
    assert (work / "my.yaml").read_bytes() == (ROOT / "recipes" / "f30k" / "vse_infty.yaml").read_bytes()
    _run([itr, "recipes", "cp", "slurm", "."], cwd=work)
    assert os.access(work / "slurm" / "node.sh", os.X_OK) and (work / "slurm" / "lib.sh").is_file()
    bad = _run([itr, "recipes", "cp", "f30k/vse_infinity", "x.yaml"], cwd=work, check=False)
    assert bad.returncode == 2 and "f30k/vse_infty" in bad.stderr and not (work / "x.yaml").exists()
    demo = _run([py, "-c", "from itr.demo import default_recipe; print(default_recipe())"], cwd=work).stdout
    assert demo.strip().startswith(str(tmp / "venv")) and demo.strip().endswith("synthetic/vsepp_gru.yaml")


def test_the_editable_install_of_dev_py_imports_itr_shards_from_the_checkout(built, tmp_path):
    tmp, _ = built
    src = _copy_sources(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", py, "install", "--no-deps",
          "--no-build-isolation", "--no-index", "-e", src], cwd=tmp_path)
    out = _run([py, "-c", "import itr, itr.shards.writer as w, itr.resources as r; print(itr.__file__); "
                          "print(w.__file__); print(r.bundled_dir('recipes'))"], cwd=tmp_path).stdout.split()
    assert out == [str(src / "itr" / "__init__.py"), str(src / "shards" / "writer.py"), str(src / "recipes")]
