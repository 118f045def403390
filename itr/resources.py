"""The files itr ships besides its code: recipes, launch configs and sbatch files (``itr recipes ls / cp``).

A checkout keeps them beside ``itr/`` (``recipes/``, ``launch/``, ``slurm/``); a wheel installs them under
``itr/_data/`` (setup.py). Every lookup goes through ``bundled_dir``, so both work the same.

Names: a recipe is ``DATASET/MODEL`` (``f30k/vse_infty``; ``recipes/f30k/vse_infty.yaml`` works too), a launch
config or sbatch file is ``launch/FILE`` or ``slurm/FILE``, and ``launch`` or ``slurm`` alone is the whole folder
(the sbatch files source ``slurm/lib.sh`` and start ``launch/multinode.sh`` from one root, ``ITR_ROOT``).
"""
import difflib
import shutil
from pathlib import Path

from itr.errors import ItrError

KINDS = ("recipes", "launch", "slurm")
_PACKAGE = Path(__file__).resolve().parent


class ResourceError(ItrError, FileNotFoundError):
    """A bundled file that does not exist, or a copy that would overwrite one; the message names it."""


def bundled_dir(kind):
    """The folder of ``kind`` (recipes, launch or slurm): ``itr/_data/KIND`` in a wheel, ``KIND/`` in a checkout."""
    if kind not in KINDS:
        raise ResourceError(f"unknown kind of bundled file {kind!r}: one of {', '.join(KINDS)}")
    for base in (_PACKAGE / "_data", _PACKAGE.parent):
        if (base / kind).is_dir():
            return base / kind
    raise ResourceError(f"no {kind}/ folder in {_PACKAGE / '_data'} or {_PACKAGE.parent}: a broken install of itr "
                        f"(reinstall it)")


def names():
    """Every name ``find`` accepts: recipes as DATASET/MODEL, then launch/FILE and slurm/FILE, and the folders."""
    root = bundled_dir("recipes")
    out = [p.relative_to(root).with_suffix("").as_posix() for p in sorted(root.glob("*/*.yaml"))]
    for kind in ("launch", "slurm"):
        out += [kind] + [f"{kind}/{p.name}" for p in sorted(bundled_dir(kind).iterdir()) if p.is_file()]
    return out


def find(name):
    """The file or folder a name stands for; an unknown name gets the close matches."""
    key = name.strip().rstrip("/")
    if key.startswith("recipes/"):
        key = key[len("recipes/"):]
    if key.endswith(".yaml") and key.split("/", 1)[0] not in KINDS:
        key = key[: -len(".yaml")]
    kind, _, rest = key.partition("/")
    if kind in ("launch", "slurm"):
        path = bundled_dir(kind) / rest if rest else bundled_dir(kind)
    else:
        path = bundled_dir("recipes") / f"{key}.yaml"
    if key and ".." not in Path(key).parts and path.exists():
        return path
    raise ResourceError(_unknown(name))


def _unknown(name):
    known = names()
    base = Path(name).name.removesuffix(".yaml")
    same = [k for k in known if Path(k).name.removesuffix(".yaml") == base]
    close = same or difflib.get_close_matches(name.removeprefix("recipes/").removesuffix(".yaml"), known, n=4,
                                              cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"no bundled recipe or file named {name!r}{hint} (`itr recipes ls` lists them)"


def copy(name, dest, force=False):
    """Copy a bundled file or folder to ``dest`` (into it when it is a folder, as ``cp``); returns the new path."""
    src = find(name)
    dest = Path(dest).expanduser()
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise ResourceError(f"{target} already exists: pass --force to overwrite it")
    if not target.parent.is_dir():
        raise ResourceError(f"{target.parent} is not a folder: create it first")
    if src.is_dir():
        shutil.copytree(src, target, dirs_exist_ok=force, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(src, target)  # keeps the mode: launch/multinode.sh and slurm/node.sh stay executable
    return target


def _first_comment(path, width=72):
    """The file's first comment line (its own description), to the end of the sentence or ``width`` characters."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            return ""
        text = line.lstrip("# ").strip()
        text = text.split(". ")[0].rstrip(".")
        return text if len(text) <= width else text[: width - 3].rstrip() + "..."
    return ""


def _recipe_rows():
    import yaml

    root = bundled_dir("recipes")
    rows = []
    for p in sorted(root.glob("*/*.yaml")):
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        model = raw.get("model") or {}
        text = model.get("text") if isinstance(model.get("text"), dict) else {}
        rows.append((p.relative_to(root).with_suffix("").as_posix(), str(model.get("name", "?")), p.parent.name,
                     str(text.get("name", "")) if text else ""))
    return rows


def listing():
    """``itr recipes ls``: the recipes (name, model, dataset, text encoder), then the launch configs and sbatch files."""
    rows = [("RECIPE", "MODEL", "DATASET", "TEXT")] + _recipe_rows()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append("")
    for kind, what in (("launch", "launch configs"), ("slurm", "sbatch files")):
        lines.append(f"{what} (`itr recipes cp {kind} DEST` copies the folder):")
        files = [p for p in sorted(bundled_dir(kind).iterdir()) if p.is_file()]
        w = max(len(f"{kind}/{p.name}") for p in files)
        lines += [f"  {f'{kind}/{p.name}'.ljust(w)}  {_first_comment(p)}".rstrip() for p in files]
        lines.append("")
    lines.append("copy one: itr recipes cp f30k/vse_infty my.yaml")
    return "\n".join(lines)
