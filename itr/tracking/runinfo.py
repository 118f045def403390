"""What a run records besides its metrics: git state, package versions, how it was launched, memory,
and the key names (params from the recipe, metric prefixes of an evaluation). No MLflow here."""
import getpass
import importlib
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("torch", "accelerate", "deepspeed", "transformers", "webdataset", "mlflow", "itr")
# environment variables that describe how a run was launched (none holds a secret)
LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "SLURM_", "TORCHELASTIC_", "PET_", "ITR_", "DS_")
LAUNCH_ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "NODE_RANK", "NNODES",
                    "PROCS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                    "MLFLOW_TRACKING_URI", "HOSTNAME")
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CRED", "AUTH")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding itr/


def recipe_params(recipe_dict):
    from itr.schema import flatten

    return {k: v for k, v in flatten(recipe_dict).items() if k != "train.resume"}


def run_name(recipe_dict, dataset):
    return f"{recipe_dict['model']['name']}-{dataset}-{time.strftime('%m%d-%H%M%S')}"


def git_state(root=None):
    """{"commit", "dirty"} of the itr source tree; "unknown" without git or outside a checkout."""
    root = Path(root) if root else _SOURCE_ROOT
    unknown = {"commit": "unknown", "dirty": "unknown"}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return unknown  # e.g. an installed copy inside some other repository
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return unknown
        status = git("status", "--porcelain", "--", "itr", "shards", "setup.cfg", "setup.py", "pyproject.toml")
        dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return unknown


def package_versions(names=PACKAGES):
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in ("itr", "mlflow"):  # a checkout on PYTHONPATH; mlflow-skinny (the same package, another name)
                out[name] = importlib.import_module(name).__version__
    return out


def node_count():
    """Nodes of this launch: SLURM_NNODES, else NNODES, else WORLD_SIZE / LOCAL_WORLD_SIZE, else 1."""
    for var in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "NNODES"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(local) > 0:
        return max(1, math.ceil(int(world) / int(local)))
    return 1


def sweep_name(cfg=None):
    """The sweep a run belongs to: the recipe's tracking.sweep if the recipe has that key, else $ITR_SWEEP."""
    value = cfg.get("sweep") if isinstance(cfg, dict) else getattr(cfg, "sweep", None)
    return value or os.environ.get("ITR_SWEEP") or None


def launch_info():
    """sys.argv, the launcher's own command line and the launcher environment (no secrets)."""
    env = {k: v for k, v in sorted(os.environ.items())
           if (k in LAUNCH_ENV_NAMES or k.startswith(LAUNCH_ENV_PREFIXES)) and not any(w in k for w in _SECRET_WORDS)}
    info = {"argv": list(sys.argv), "executable": sys.executable, "cwd": os.getcwd(), "host": socket.gethostname(),
            "command": shlex.join([sys.executable, *sys.argv]), "env": env}
    if any(k in os.environ for k in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")):
        try:  # the launcher (accelerate launch / torchrun / srun) is our parent
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                info["launcher"] = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            pass
    return info


def manifest_tags(manifest):
    from itr.data.manifest import manifest_digest, sha256_file

    tags = {}
    if manifest.get("path"):
        tags["data.manifest"] = manifest["path"]
        try:
            tags["data.manifest_sha256"] = sha256_file(manifest["path"])[:16]
        except OSError:
            pass
    try:
        tags["data.manifest_digest"] = manifest_digest(manifest)
    except (KeyError, TypeError):
        pass
    return tags


def user_name():
    """Who ran it: ``MLFLOW_TRACKING_USERNAME`` (as MLflow itself), else the login name (``getpass``: LOGNAME,
    USER, ..., then the password database); a generic ``root`` gives way to ``SUDO_USER`` / ``SLURM_JOB_USER``."""
    explicit = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if explicit:
        return explicit
    try:
        name = getpass.getuser()
    except Exception:  # no USER and a uid without a passwd entry (some containers)
        name = ""
    if name in ("", "root"):
        for var in ("SUDO_USER", "SLURM_JOB_USER"):
            if os.environ.get(var) and os.environ[var] != "root":
                return os.environ[var]
    return name or "unknown"


def source_tags():
    """MLflow's own source tags (user, entry point, commit), set when a run is created."""
    git = git_state()
    tags = {"mlflow.user": user_name(), "mlflow.source.type": "LOCAL",
            "mlflow.source.name": " ".join(sys.argv[:2])[:500]}
    if git["commit"] != "unknown":
        tags["mlflow.source.git.commit"] = git["commit"]
    return tags


def run_tags(cfg=None, world=None, manifest=None):
    """Tags describing where and with what a run ran: git, package versions, nodes, sweep, data, launch."""
    git = git_state()
    tags = {"git_commit": git["commit"], "git_dirty": git["dirty"], "nodes": node_count(),
            "launch_command": launch_info()["command"][:5000]}
    if world is not None:
        tags["world_size"] = world
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    sweep = sweep_name(cfg)
    if sweep:
        tags["sweep"] = sweep
    if manifest is not None:
        tags.update(manifest_tags(manifest))
    return tags


def memory_metrics(device=None):
    """Process RSS (MB) and, on CUDA, the peak allocated GPU memory (MB)."""
    out = {}
    try:
        import psutil

        out["cpu_rss_mb"] = psutil.Process().memory_info().rss / 2 ** 20
    except Exception:
        try:
            with open("/proc/self/statm") as f:
                out["cpu_rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        except (OSError, ValueError, IndexError):
            pass
    try:
        import torch

        if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
            out["gpu_mem_max_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    except Exception:
        pass
    return out


def protocol_key(protocol):
    return "".join(c for c in str(protocol) if c.isalnum())


def metric_prefix(split, protocol, extra=""):
    """``{split}_{protocol}_``: the key prefix of an evaluation, e.g. test_1k_ or testall_coco5fold_."""
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in str(split))
    return f"{s}_{protocol_key(protocol)}{extra}_"
