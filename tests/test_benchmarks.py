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
def test_search_benchmark_measures_faiss_against_exact_search_in_one_run():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (dev.py installs itr[faiss])")
    out = _bench("search.py", "--tiny", "--rounds", 1)
    rows = {r[1].strip(): r[2:] for r in (line.split("|") for line in out.splitlines())
            if len(r) == 7 and r[1].strip() not in ("method", "---")}
    exact, flat = rows["exact (chunked)"], rows["FAISS flat"]
    assert exact[2].strip() == "1.00x" and exact[3].strip() == "1.000", out
    assert flat[3].strip() == "1.000", out  # a flat index is exact
    approx = [v for k, v in rows.items() if k.startswith(("FAISS IVF", "FAISS HNSW"))]
    assert len(approx) == 2 and all(0.0 <= float(v[3]) <= 1.0 for v in approx), out
    assert all(float(v[2].strip().rstrip("x")) > 0 for v in rows.values()), out
