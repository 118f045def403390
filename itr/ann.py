"""Nearest neighbours by inner product over a gallery of vectors: exact, in chunks, or a FAISS index.

Exact search multiplies the queries by a chunk of the gallery at a time and keeps each query's K best (memory:
queries x chunk scores, whatever the gallery). FAISS (the optional ``faiss-cpu`` package, ``pip install
'itr[faiss]'``) gives ``flat`` (exact, its own BLAS), ``ivf`` (an inverted file: k-means cells, ``nprobe`` of
them searched) and ``hnsw`` (a graph). An approximate index is only shipped with its recall@10 against exact
search measured on a sample of queries (``recall_at``), so a degraded index is seen, not found out later.

Order of a result list: score descending, then gallery index ascending (as the evaluation's top-K lists); a
tie at the K-th place keeps either candidate.
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

from itr.errors import ConfigError
from itr.eval.topk import merge_topk as _merge

KINDS = ("flat", "ivf", "hnsw")


@torch.no_grad()
def exact_topk(queries, gallery, k, chunk=65536):
    """(scores, ids), each (queries, min(k, n)): the k largest inner products of every query with the gallery,
    one chunk of ``chunk`` gallery rows at a time."""
    q = torch.as_tensor(queries, dtype=torch.float32)
    g = torch.as_tensor(gallery)
    n = g.shape[0]
    k = min(k, n)
    best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((q.shape[0], 0), np.int64)
    for lo in range(0, n, chunk):
        s = q @ g[lo:lo + chunk].to(torch.float32).t()
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s = np.concatenate([best_s, top.values.numpy()], 1)
        best_i = np.concatenate([best_i, top.indices.numpy() + lo], 1)
        best_s, best_i = _merge(best_s, best_i, k)
    return best_s, best_i


def scored_topk(score_fn, n, k, chunk=4096):
    """(scores, ids) of the k best of ``n`` candidates, ``score_fn(lo, hi)`` -> (queries, hi - lo) scores of a
    chunk of them (for models whose score is not an inner product: every candidate is scored)."""
    best_s, best_i = None, None
    for lo in range(0, n, chunk):
        s = np.asarray(score_fn(lo, min(n, lo + chunk)), np.float32)
        ids = np.broadcast_to(np.arange(lo, lo + s.shape[1]), s.shape)
        if best_s is not None:
            s, ids = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        best_s, best_i = _merge(s, ids, min(k, n))
    return best_s, best_i


def require_faiss(what="--faiss"):
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"{what} needs the faiss-cpu package, which is not installed: pip install 'itr[faiss]' "
                          f"(or pip install faiss-cpu); exact search needs nothing") from None
    return faiss


@dataclass
class FaissParams:
    """How a FAISS index is built and searched (stored in the index manifest, applied again at load)."""
    kind: str = "flat"  # flat, ivf or hnsw
    nlist: int = 0  # ivf: k-means cells (0: sqrt(n), at least 1 and at most n / 39, FAISS's training minimum)
    nprobe: int = 32  # ivf: cells searched per query
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: candidate list while building
    ef_search: int = 128  # hnsw: candidate list while searching

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"--faiss must be one of {', '.join(KINDS)}, got {self.kind!r}")


def cells(n, nlist=0):
    """The IVF cell count: ``nlist``, or sqrt(n); never more than n / 39 (FAISS wants 39 training points per
    cell) nor less than 1."""
    want = nlist or int(round(np.sqrt(n)))
    return int(max(1, min(want, n // 39)))


def build_faiss(vectors, params):
    """A FAISS inner-product index over ``vectors`` (n, d) float32; returns (index, seconds to build)."""
    faiss = require_faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    t0 = time.perf_counter()
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.kind == "ivf":
        params.nlist = cells(n, params.nlist)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, params.nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    else:
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    index.add(x)
    configure(index, params)
    return index, time.perf_counter() - t0


def configure(index, params):
    """The search-time parameters (FAISS does not keep all of them in the file)."""
    if params.kind == "ivf":
        index.nprobe = min(params.nprobe, params.nlist or params.nprobe)
    elif params.kind == "hnsw":
        index.hnsw.efSearch = params.ef_search
    return index


def faiss_topk(index, queries, k):
    """(scores, ids) of FAISS's k best per query, in the order of ``exact_topk`` (ties by index)."""
    k = min(k, index.ntotal)
    s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    s = np.where(i < 0, -np.inf, s).astype(np.float32)  # -1: fewer than k found (an IVF probe too narrow)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), -s), axis=-1)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i.astype(np.int64), order, 1)


def recall_at(approx_ids, exact_ids, k=10):
    """Mean share of each query's exact top-k that the approximate top-k found (1.0: nothing lost)."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    found = [len(set(x.tolist()) & set(y.tolist())) / max(1, len(y)) for x, y in zip(a, e)]
    return float(np.mean(found)) if found else 1.0


def sample_rows(n, size, seed=0):
    """``size`` row indices of ``n`` (all of them when n <= size), sorted, the same for a seed."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def measure_recall(index, queries, gallery, k=10, chunk=65536):
    """recall@k of ``index`` against exact search for these queries."""
    _, exact = exact_topk(queries, gallery, k, chunk)
    _, approx = faiss_topk(index, queries, k)
    return recall_at(approx, exact, k)
