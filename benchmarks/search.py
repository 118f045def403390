"""Search over a synthetic gallery: exact chunked search (``itr search``'s default) against FAISS flat, IVF and
HNSW (``itr index --faiss``), queries/s and recall@10 against exact, in one run.

    python benchmarks/search.py [--n 1000000] [--dim 256] [--queries 1000] [--threads 2] [--kinds flat ivf hnsw]
    python benchmarks/search.py --tiny        # a toy size, for the test suite

The gallery is what a trained model's image embeddings look like to an index: unit vectors in clusters (``--clusters``
centres, ``--spread`` noise around them), not uniform noise (on which no approximate index does well); a query is
a gallery item moved by ``--query-noise`` and renormalized, like a caption near its image. Exact search is
``itr.ann.exact_topk`` (chunks of ``--chunk`` gallery rows); each FAISS index is built with ``itr.ann.build_faiss``
(the parameters ``itr index`` uses), searched with ``faiss_topk``, and compared with exact search's lists
(``recall_at``). One index is in memory at a time. Prints, per method: build time, queries/s, the ratio to exact
search's queries/s measured in this run, and recall@10.
"""
import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gallery(n, dim, clusters, spread, queries, query_noise, seed=0):
    """(gallery (n, dim), queries (queries, dim)) float32 unit vectors, made in blocks (no float64 temporaries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    g = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, clusters, hi - lo)] + spread / np.sqrt(dim) * \
            rng.standard_normal((hi - lo, dim), dtype=np.float32)
        g[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = g[rng.choice(n, queries, replace=False)] + query_noise / np.sqrt(dim) * \
        rng.standard_normal((queries, dim), dtype=np.float32)
    return g, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def timed(fn, rounds):
    """(result of the last call, best wall seconds of ``rounds`` calls)."""
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=1.0, help="noise around a cluster centre (norm ~ spread)")
    ap.add_argument("--query-noise", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=65536, help="exact search: gallery rows per matrix product")
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch and FAISS threads (0: their defaults)")
    ap.add_argument("--rounds", type=int, default=2, help="searches timed per method (the best is kept)")
    ap.add_argument("--tiny", action="store_true", help="a toy size (20,000 x 32, 200 queries, 50 clusters)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.n, a.dim, a.queries, a.clusters, a.chunk = 20_000, 32, 200, 50, 4096
    import torch

    from itr.ann import FaissParams, build_faiss, exact_topk, faiss_topk, recall_at, require_faiss

    faiss = require_faiss("benchmarks/search.py")
    if a.threads:
        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    t = time.perf_counter()
    g, q = gallery(a.n, a.dim, a.clusters, a.spread, a.queries, a.query_noise)
    print(f"gallery {a.n:,} x {a.dim} float32 ({g.nbytes / 2**30:.2f} GiB, {a.clusters} clusters), {a.queries} "
          f"queries, k={a.k}; torch threads {torch.get_num_threads()}, FAISS threads {faiss.omp_get_max_threads()}; "
          f"made in {time.perf_counter() - t:.1f} s", flush=True)
    gt = torch.from_numpy(g)
    (_, exact), t_exact = timed(lambda: exact_topk(q, gt, a.k, a.chunk), a.rounds)
    qps_exact = a.queries / t_exact
    rows = [("exact (chunked)", 0.0, qps_exact, 1.0, 1.0)]
    print(f"exact: {qps_exact:,.0f} queries/s", flush=True)
    for kind in a.kinds:
        params = FaissParams(kind, nprobe=a.nprobe, hnsw_m=a.hnsw_m, ef_search=a.ef_search)
        index, build_s = build_faiss(g, params)
        (_, ids), t_s = timed(lambda: faiss_topk(index, q, a.k), a.rounds)
        label = {"flat": "FAISS flat", "ivf": f"FAISS IVF (nlist {params.nlist}, nprobe {params.nprobe})",
                 "hnsw": f"FAISS HNSW (M {params.hnsw_m}, efSearch {params.ef_search})"}[kind]
        rows.append((label, build_s, a.queries / t_s, (a.queries / t_s) / qps_exact, recall_at(ids, exact, a.k)))
        print(f"{label}: built in {build_s:.1f} s, {rows[-1][2]:,.0f} queries/s, recall@{a.k} {rows[-1][4]:.3f}",
              flush=True)
        del index
        gc.collect()
    print(f"\n| method | build | queries/s | vs exact | recall@{a.k} |\n|---|---|---|---|---|")
    for label, build_s, qps, ratio, rec in rows:
        print(f"| {label} | {build_s:.1f} s | {qps:,.0f} | {ratio:.2f}x | {rec:.3f} |")


if __name__ == "__main__":
    main()
