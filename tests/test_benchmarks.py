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
    out = _bench("gallery.py", "--sizes", 300, 600, "--chunk", 128, "--full-up-to", 300, "--held-up-to", 300)
    assert out.count("same rsum: True") == 2, out  # spilled = held in memory = the full matrix
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("300 ", "600 "))]
    assert [r[3] for r in rows] == ["spilled", "held", "full", "spilled"], out
    assert "largest / smallest gallery: peak RSS" in out, out


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


def test_extract_benchmark_gives_the_naive_loops_features(tmp_path):
    out = _bench("extract.py", "--tiny", "--work", tmp_path, "--batch-sizes", 1, 8, "--rounds", 1)
    assert "same features as the naive loop: True" in out and "speedup (best itr / naive):" in out, out
    rows = [line for line in out.splitlines() if line.startswith(("naive per-image loop", "itr extract, batch"))]
    assert len(rows) == 3, out


@pytest.mark.slow
def test_loader_benchmark_reads_every_pair_once_and_measures_both_sizes(tmp_path):
    import json

    out = _bench("loader.py", "--tiny", "--json", tmp_path / "loader.json", timeout=600)
    res = json.loads((tmp_path / "loader.json").read_text())
    assert "keeps up with" in out and "peak RSS grows" in out, out
    assert all(res[f"loader_{t}_{w}_pairs_per_s"] > 0 for t in ("bert", "words") for w in (0, 1, 2))
    assert res["consume_pairs_per_s"] > 0
    assert 0 < res["rss_1x_gib"] and 0 < res["rss_10x_gib"]
    assert out.count(", 600 pairs;") == 6  # 120 images x 5 captions, each once


def test_install_size_measures_what_mlflow_skinny_leaves_out():
    """benchmarks/install_size.py --tiny: the full mlflow's closure holds the skinny one and the server's stack."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import install_size
    finally:
        sys.path.pop(0)
    assert {"mlflow-skinny", "pyyaml", "torch"} <= set(install_size.runtime_requirements())
    skinny, full = install_size.closure(["mlflow-skinny"]), install_size.closure(["mlflow"])
    assert set(skinny) < set(full) and {"flask", "pandas", "scipy"} <= set(full) - set(skinny)
    assert not {"flask", "pandas", "scipy", "pyarrow"} & set(skinny)
    out = _bench("install_size.py", "--tiny")
    saved = float(out.split("saved ")[1].split()[0])
    assert saved > 100 and "only in the full install" in out, out


def test_convert_benchmark_times_both_converters_with_one_and_two_workers_and_same_shards():
    out = _bench("convert.py", "--tiny")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["precomp"], ["tsv"])]
    assert [(r[0], r[1]) for r in rows] == [("precomp", "1"), ("precomp", "2"), ("tsv", "1"), ("tsv", "2")], out
    assert all(float(r[3]) > 0 for r in rows) and rows[0][4] == "1.00x", out
    assert "same shards with 1 and 2 workers: True" in out, out


def test_f8k_ridge_baseline_chooses_the_ridge_on_dev(f8k):
    """Toy size (120 training images, 30 dev / test): the ridge with the best dev rsum is the one tested."""
    out = _bench("f8k_ridge_baseline.py", "--tiny", "--data", f8k, "--alphas", 0.3, 3, 30, timeout=600)
    for kind in ("bow", "minilm"):
        dev = dict(p.split(": ") for p in out.split(f"{kind}: dev rsum by alpha: ")[1].splitlines()[0].split(", "))
        best = max(dev, key=lambda a: float(dev[a]))
        assert f"{kind} ridge (alpha {best}, chosen on dev rsum {dev[best]})" in out, out
        row = next(line.split() for line in out.splitlines() if line.startswith(f"{kind} ") and len(line.split()) == 10)
        assert row[1] == best and 0 < float(row[-1]) <= 600, out
