"""Conversion throughput: `itr shard precomp` and `itr shard tsv`, images/s with 1 and with 2 worker processes.

    python benchmarks/convert.py [--images 2000] [--regions 36] [--dim 2048] [--per-shard 100] [--rounds 3] [--tiny]

Writes a synthetic precomp split ((N, R, D) float32) and the same features as a bottom-up TSV
(variable region counts from R/2 to R, base64 float32) into a temporary folder, then times each
converter with ``--workers 1`` and ``--workers 2`` (fresh output each time; the TSV's index pass is
timed once, before, and reported apart: it is cached beside the shards). Prints images/s and the
2-worker / 1-worker ratio measured in this run (the median of alternating rounds), the CPU time per
image (this process and its workers: the work itself; the wall-time ratio also depends on free
cores, so the load average is printed), and checks that both give the same shard checksums.
"""
import argparse
import base64
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_inputs(d, n, regions, dim):
    rng = np.random.default_rng(0)
    src = d / "precomp"
    src.mkdir()
    ims = np.lib.format.open_memmap(src / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, regions, dim))
    images = []
    with open(d / "train.tsv", "w") as tsv:
        for i in range(n):
            ims[i] = rng.random((regions, dim), dtype=np.float32)
            nb = regions // 2 + i % (regions - regions // 2 + 1)
            boxes = (rng.random((nb, 4)) * 400).astype(np.float32)
            tsv.write("\t".join([str(1000 + i), "640", "480", str(nb), base64.b64encode(boxes.tobytes()).decode(),
                                 base64.b64encode(np.ascontiguousarray(ims[i, :nb]).tobytes()).decode()]) + "\n")
            images.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": "train",
                           "sentences": [{"raw": f"a photo number {i} caption {k}"} for k in range(5)]})
    ims.flush()
    del ims
    (src / "train_caps.txt").write_text("\n".join(s["raw"] for im in images for s in im["sentences"]) + "\n")
    (d / "captions.json").write_text(json.dumps({"images": images}))
    return src


def _cpu():
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    """(wall seconds, CPU seconds of this process and its finished workers, result)."""
    t, c = time.perf_counter(), _cpu()
    m = fn()
    return time.perf_counter() - t, _cpu() - c, m


def run(args):
    from itr.shards.precomp import shard_precomp
    from itr.shards.tsv import index_tsv, shard_tsv

    work = Path(args.work or tempfile.mkdtemp(prefix="itr-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = make_inputs(work, args.images, args.regions, args.dim)
        mb = (work / "train.tsv").stat().st_size / 2**20
        t_index, _, _ = timed(lambda: index_tsv([str(work / "train.tsv")], work / "tsv-index", progress=False))
        print(f"{args.images} images, {args.regions} x {args.dim} float32 (precomp {os.path.getsize(src / 'train_ims.npy') / 2**20:.0f} MiB, "
              f"TSV {mb:.0f} MiB); {args.per_shard} images per shard; {os.cpu_count()} CPUs")
        print(f"TSV index pass (cached for reruns): {t_index:.2f} s, {mb / t_index:.0f} MiB/s")
        print(f"{'converter':<10} {'workers':>7} {'seconds':>8} {'images/s':>9} {'vs 1 worker':>12} {'CPU ms/image':>13}")
        jobs = {"precomp": lambda out, w: shard_precomp(src, "train", out, images_per_shard=args.per_shard,
                                                        workers=w, progress=False),
                "tsv": lambda out, w: shard_tsv([work / "train.tsv"], work / "captions.json", "train", out,
                                                images_per_shard=args.per_shard, workers=w, progress=False)}
        same = True
        for name, job in jobs.items():
            secs, cpu, sums = {1: [], 2: []}, {1: [], 2: []}, {}
            for _ in range(args.rounds):  # alternating, so that machine noise hits both alike; the median counts
                for w in (1, 2):
                    out = work / f"out-{name}-{w}"
                    if name == "tsv":  # the index cache of the pass timed above
                        out.mkdir()
                        for f in (work / "tsv-index").glob(".tsv-index-*"):
                            shutil.copy(f, out / f.name)
                    t, c, m = timed(lambda: job(out, w))
                    secs[w].append(t)
                    cpu[w].append(c)
                    sums[w] = [s["sha256"] for s in m["shards"]]
                    shutil.rmtree(out)
            rate = {w: args.images / float(np.median(secs[w])) for w in (1, 2)}
            for w in (1, 2):
                print(f"{name:<10} {w:>7} {np.median(secs[w]):>8.2f} {rate[w]:>9.0f} {rate[w] / rate[1]:>11.2f}x "
                      f"{1000 * np.median(cpu[w]) / args.images:>13.2f}")
            same &= sums[1] == sums[2]
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"same shards with 1 and 2 workers: {same}")
        return 0 if same else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting (median)")
    p.add_argument("--work", help="folder for the inputs (default: a temporary one, removed)")
    p.add_argument("--tiny", action="store_true", help="toy sizes (a test runs it)")
    args = p.parse_args()
    if args.tiny:
        args.images, args.regions, args.dim, args.per_shard, args.rounds = 24, 6, 16, 4, 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
