"""Ranks of an (n, 5n) similarity matrix: itr's counting (``itr.eval.ranks``) against the per-query argsort loop
of the references (fartashf/vsepp ``evaluation.py@d3a68af`` ``i2t`` / ``t2i``, copied by SCAN, VSRN, ...),
in the same run, on one thread.

    python benchmarks/ranks.py [--images 5000] [--rounds 3]

The matrix is a model's: image and caption embeddings (d = 64) whose captions are noisy copies of their image,
so ranks spread from 0 to thousands as for a trained model (random scores rank every target mid-list, which
flatters neither). Both paths must give identical ranks (the matrix has no ties; ties are in the unit tests).
Prints both times (median of the rounds) and the ratio; the targets: >= 20x, aim 40x.
"""
import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def matrix(n, dim=64, noise=2.0, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim)).astype(np.float32)
    cap = np.repeat(img, 5, 0) + noise * rng.standard_normal((5 * n, dim)).astype(np.float32)
    return img @ cap.T


def argsort_loop(sims):
    """vsepp evaluation.py i2t / t2i (numpy argsort per query), ranks 0-based."""
    n = sims.shape[0]
    i2t = np.zeros(n, np.int64)
    for index in range(n):
        inds = np.argsort(sims[index])[::-1]
        i2t[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
    t2i = np.zeros(5 * n, np.int64)
    for index in range(n):
        d = sims[:, 5 * index:5 * index + 5].T
        for i in range(5):
            inds = np.argsort(d[i])[::-1]
            t2i[5 * index + i] = np.where(inds == index)[0][0]
    return i2t, t2i


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from itr.eval.metrics import evaluate_sims
    from itr.eval.ranks import ranks_of

    sims = matrix(a.images)
    times = {"itr": [], "argsort": []}
    for _ in range(a.rounds):  # alternate so that machine noise hits both alike
        t = time.perf_counter()
        ours = ranks_of(sims)
        times["itr"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = argsort_loop(sims)
        times["argsort"].append(time.perf_counter() - t)
    same = all(np.array_equal(x, y) for x, y in zip(ours, ref))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    t = time.perf_counter()
    m = evaluate_sims(sims, "5k")
    full = time.perf_counter() - t
    print(f"{a.images} images x {5 * a.images} captions, one thread, median of {a.rounds} rounds")
    print(f"argsort loop (vsepp evaluation.py): {med['argsort']:.3f} s")
    print(f"itr ranks (counting, tiles):       {med['itr']:.3f} s   identical ranks: {same}")
    print(f"itr evaluate_sims (ranks + metrics): {full:.3f} s   (rsum {m['rsum']:.1f})")
    print(f"speedup: {med['argsort'] / med['itr']:.1f}x")
    assert same


if __name__ == "__main__":
    main()
