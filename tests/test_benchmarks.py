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


def _bench(name, *args, timeout=300):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_ranks_benchmark_finds_identical_ranks():
    out = _bench("ranks.py", "--images", 200, "--rounds", 1)
    assert "identical ranks: True" in out, out


@pytest.mark.slow
def test_gallery_benchmark_streams_to_the_full_paths_metrics_on_two_processes():
    out = _bench("gallery.py", "--sizes", 300, 600, "--chunk", 128, "--full-up-to", 300)
    assert "same rsum: True" in out, out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("300 ", "600 "))]
    assert [r[3] for r in rows] == ["stream", "full", "stream"], out


@pytest.mark.slow
def test_cascade_benchmark_shortlists_hold_more_ground_truths_as_k_grows(tmp_path):
    out = _bench("cascade.py", "--tiny", "--work", tmp_path, "--ks", 3, 10, 200, "--chunk", 64, timeout=600)
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("3", "10", "200")]
    assert [r[0] for r in rows] == ["3", "10", "200"], out
    in_i2t = [float(r[1]) for r in rows]
    assert in_i2t == sorted(in_i2t) and in_i2t[-1] == 100.0, out  # K = every caption: every ground truth is in
    full = float(out.split("full SCAN: rsum ")[1].split(",")[0])
    assert float(rows[-1][4]) == full, out  # ... and SCAN alone decides


@pytest.mark.slow
def test_f8k_ridge_baseline_chooses_the_ridge_on_dev(f8k):
    """Toy size (120 training images, 30 dev / test): the ridge with the best dev rsum is the one tested."""
    out = _bench("f8k_ridge_baseline.py", "--tiny", "--data", f8k, "--alphas", 0.3, 3, 30, timeout=600)
    for kind in ("bow", "minilm"):
        dev = dict(p.split(": ") for p in out.split(f"{kind}: dev rsum by alpha: ")[1].splitlines()[0].split(", "))
        best = max(dev, key=lambda a: float(dev[a]))
        assert f"{kind} ridge (alpha {best}, chosen on dev rsum {dev[best]})" in out, out
        row = next(line.split() for line in out.splitlines() if line.startswith(f"{kind} ") and len(line.split()) == 10)
        assert row[1] == best and 0 < float(row[-1]) <= 600, out
