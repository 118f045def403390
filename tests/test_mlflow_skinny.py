"""itr logs through mlflow-skinny: the full mlflow (server, UI, and pandas, scipy, scikit-learn, pyarrow, flask
... with it) is the optional ``itr[server]``. CI installs that extra, so this checks the tracking path in an
environment that holds only what setup.cfg requires (plus the dev, deepspeed and slurm extras): a view of this
interpreter's site-packages with every other distribution left out."""
import configparser
import importlib.metadata as md
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

DEMO = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
EXTRAS = ("dev", "deepspeed", "slurm")  # not server
SERVER_ONLY = ("flask", "pandas", "scipy", "sklearn", "pyarrow", "gunicorn")


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = cfg["options"]["install_requires"].split("\n")
    for extra in EXTRAS:
        reqs += cfg["options.extras_require"][extra].split("\n")
    spec = importlib.util.spec_from_file_location("itr_dev_py", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    return [r.strip() for r in reqs if r.strip() and not r.strip().startswith("#")] + list(dev.EXTRA_NO_DEPS)


def _closure(roots):
    """The installed distributions ``roots`` need, transitively (markers evaluated, extras followed)."""
    from packaging.requirements import Requirement

    dists = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    seen, todo = set(), [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if (name, frozenset(req.extras)) in seen or name not in dists:
            continue
        seen.add((name, frozenset(req.extras)))
        for line in dists[name].requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return {name for name, _ in seen}, dists


def _declared_only_env(path):
    """A bare venv whose site-packages links every entry of ours except those of undeclared distributions."""
    keep, dists = _closure(_declared())
    owners = {}
    for name, d in dists.items():
        for f in d.files or []:
            if f.parts and f.parts[0] != "..":
                owners.setdefault(f.parts[0], set()).add(name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if owners.get(entry.name, {"?"}) & keep or entry.name not in owners:
            (site / entry.name).symlink_to(entry)
    return py, keep


@pytest.mark.slow
def test_tracked_training_and_compare_work_with_mlflow_skinny_alone(tiny_data, tmp_path):
    py, keep = _declared_only_env(tmp_path / "venv")
    assert "mlflow-skinny" in keep and "mlflow" not in keep and "pandas" not in keep
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    present = subprocess.run([py, "-c", f"import importlib.util as u; print([m for m in {SERVER_ONLY} if u.find_spec(m)])"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert present == "[]"  # the view really lacks them
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train = subprocess.run([py, "-m", "itr", "train", DEMO, *tiny_overrides(tiny_data, **{"train.epochs": 1}),
                            f"tracking.uri={db}", "tracking.run_name=skinny", "--out", tmp_path / "run"],
                           capture_output=True, text=True, errors="replace", env=env, timeout=300)
    assert train.returncode == 0, train.stderr[-4000:]
    assert "tracker failed" not in train.stderr, train.stderr[-3000:]  # the tracker would warn and go on without
    import mlflow

    (run,) = mlflow.tracking.MlflowClient(db).search_runs([mlflow.tracking.MlflowClient(db).get_experiment_by_name(
        "itr").experiment_id])
    assert run.info.status == "FINISHED" and len(run.data.metrics) > 10 and run.data.tags["mlflow.runName"] == "skinny"
    assert any(k.endswith("rsum") for k in run.data.metrics)
    cmp = subprocess.run([py, "-m", "itr", "compare", "--tracking-uri", db], capture_output=True, text=True,
                         errors="replace", env=env, timeout=120)
    assert cmp.returncode == 0 and "skinny" in cmp.stdout, cmp.stderr[-3000:]
