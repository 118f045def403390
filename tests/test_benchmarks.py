"""The benchmarks run end to end at toy sizes (their timings are not asserted: ratios live in docs/performance.md)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPS = ROOT.parent / "shared" / "data" / "f8k_pooled" / "test_caps.txt"


def _run(*args, timeout=300):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scan_allpairs.py"), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_scan_allpairs_agrees_with_the_reference_on_one_and_two_processes():
    # tiny tiles (--chunk 16): several per process, every one cut into length groups
    args = ["--images", "9", "--captions", "45", "--regions", "5", "--dim", "32", "--chunk", "16", "--world", "2"]
    if CAPS.is_file():  # real caption lengths where ../shared/data is beside the checkout (CI has it)
        args += ["--lengths", str(CAPS)]
    out = _run(*args)
    assert "max |ours - reference|" in out and "speedup:" in out and "bitwise equal: True" in out, out
    assert float(out.split("max |ours - reference| = ")[1].split()[0]) <= 1e-5
    assert ("from " + str(CAPS) in out) == CAPS.is_file()
