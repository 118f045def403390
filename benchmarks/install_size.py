"""What logging through mlflow-skinny instead of mlflow saves on disk, measured on the installed environment.

The runtime requirements of itr (setup.cfg) are resolved over the distributions installed here, once with
``mlflow-skinny`` (what itr asks for) and once with the full ``mlflow`` (the baseline: what itr asked for
before, now the extra ``itr[server]``); each closure's size is the sum of the files its distributions'
RECORDs list, each file counted once (mlflow and mlflow-skinny install into the same ``mlflow/`` folder).
Needs both installed (``python3 dev.py`` installs ``itr[server]``).

    python benchmarks/install_size.py          # every requirement of itr
    python benchmarks/install_size.py --tiny   # the MLflow part alone (the closures without itr's other needs)
"""
import argparse
import configparser
import os
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def runtime_requirements():
    """setup.cfg's install_requires, as names (comments and versions dropped)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in cfg["options"]["install_requires"].splitlines()]
    return [Requirement(line).name for line in lines if line]


def _key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names):
    """{distribution key: Distribution} of ``names`` and everything they require (markers evaluated, no
    extras), among the installed distributions; a requirement that is not installed is left out."""
    seen, todo = {}, [n for n in names]
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[_key(name)] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def files(dists):
    """Every file (absolute path) the distributions installed."""
    out = set()
    for dist in dists.values():
        for f in dist.files or []:
            out.add(os.path.realpath(dist.locate_file(f)))
    return out


def size_mb(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2 ** 20


def measure(base):
    """(skinny MB, full MB, distributions only the full closure has) for requirements ``base`` plus each MLflow."""
    skinny = closure(base + ["mlflow-skinny"])
    full = closure(base + ["mlflow"])
    if "mlflow" not in full or "mlflow-skinny" not in skinny:
        raise SystemExit("needs both mlflow and mlflow-skinny installed (pip install 'itr[server]')")
    extra = sorted(set(full) - set(skinny))
    return size_mb(files(skinny)), size_mb(files(full)), extra


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the MLflow closures alone, without itr's other requirements")
    args = ap.parse_args(argv)
    base = [] if args.tiny else [n for n in runtime_requirements() if _key(n) not in ("mlflow", "mlflow-skinny")]
    skinny, full, extra = measure(base)
    what = "mlflow alone" if args.tiny else "itr's requirements"
    print(f"{what} with mlflow-skinny: {skinny:.0f} MB; with mlflow (baseline): {full:.0f} MB; saved "
          f"{full - skinny:.0f} MB ({full / skinny:.2f}x the skinny install)")
    print(f"only in the full install ({len(extra)}): {', '.join(extra)}")
    return {"skinny_mb": skinny, "full_mb": full, "saved_mb": full - skinny, "only_full": extra}


if __name__ == "__main__":
    main()
