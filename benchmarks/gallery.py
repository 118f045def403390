"""Global-embedding evaluation at gallery scale on 2 processes: the streamed job (``itr.eval.stream``) with the
embeddings spilled to disk (``itr.eval.spill``), against the stream with them held in memory and today's
full-matrix path (``similarity_matrix`` gathered on rank 0, then ``evaluate_sims``) where they fit.

    python benchmarks/gallery.py [--sizes 10000 50000 100000] [--dim 256] [--procs 2] [--chunk 4096]

For each gallery (n images x 5n captions, d = 256, captions noisy copies of their image: ranks spread as for
a trained model), every process makes the embeddings (held: in memory, as after the job's all-gather; spilled:
written block by block into its files, as the job does over ``eval.spill_gib``) and scores its share of the
tiles; per size: wall time, time per pair, and each rank's peak RSS (``ru_maxrss``), whole and above the RSS
once the embeddings are made (held, they alone are 6n x d x 4 bytes: 0.06 GiB at 10K, 0.57 GiB at 100K). The
targets: peak RSS per rank under 2 GiB and growing < 1.5x from the smallest to the largest gallery; time per
pair roughly constant; at the smallest size, time within 1.2x of the full-matrix path, same metrics.
"""
import argparse
import json
import os
import resource
import socket
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def blocks(n, dim, seed=0, block=2048):
    """(first image, images, their captions) in blocks of images, each from its own seed: the same gallery
    whether it is assembled in memory or written to disk block by block. Captions are noisy copies of their
    image (cosine ~0.24: R@1 well under 100)."""
    for a in range(0, n, block):
        g = torch.Generator().manual_seed(seed * 1_000_003 + a)
        img = torch.nn.functional.normalize(torch.randn(min(block, n - a), dim, generator=g), dim=1)
        cap = torch.repeat_interleave(img, 5, 0)
        cap.add_(torch.randn(cap.shape, generator=g), alpha=0.25)
        yield a, img, torch.nn.functional.normalize(cap, dim=1)


def held(n, dim):
    """The gallery in memory, as after the job's all-gather."""
    img, cap = torch.empty(n, dim), torch.empty(5 * n, dim)
    for a, i, c in blocks(n, dim):
        img[a:a + len(i)], cap[5 * a:5 * a + len(c)] = i, c
    return img, cap


def spilled(n, dim):
    """The gallery in node-local files (``itr.eval.spill``), as the job writes it over ``eval.spill_gib``."""
    import numpy as np

    from itr.eval.spill import DiskRows

    img, cap = DiskRows(n, dim), DiskRows(5 * n, dim)
    for a, i, c in blocks(n, dim):
        img.write(np.arange(a, a + len(i)), i)
        cap.write(np.arange(5 * a, 5 * a + len(c)), c)
    return img, cap


def rss_now():
    """Resident set size now, GiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def _worker(rank, world, args, n, port, out, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from itr.eval.job import score_embeddings
    from itr.eval.metrics import evaluate_sims
    from itr.eval.scores import similarity_matrix

    img, cap = spilled(n, args.dim) if path == "spilled" else held(n, args.dim)
    before = rss_now()
    torch.distributed.barrier()
    t = time.perf_counter()
    if path == "full":
        sims = similarity_matrix(lambda a, b: a @ b.t(), img, cap, args.chunk, rank=rank, world=world)
        metrics = evaluate_sims(sims, "5k") if rank == 0 else None
    else:
        metrics, _ = score_embeddings(lambda a, b: a @ b.t(), img, cap, "5k", args.chunk, rank=rank, world=world)
    wall = torch.tensor([time.perf_counter() - t])
    torch.distributed.all_reduce(wall, op=torch.distributed.ReduceOp.MAX)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB (Linux: KiB)
    parts = [torch.zeros(2) for _ in range(world)]
    torch.distributed.all_gather(parts, torch.tensor([peak, peak - before]))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"wall": float(wall), "rss": [float(p[0]) for p in parts], "above": [float(p[1]) for p in parts],
                       "rsum": metrics["rsum"]}, f)
    torch.distributed.destroy_process_group()


def run(args, n, path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "r.json")
    mp.spawn(_worker, args=(args.procs, args, n, port, out, path), nprocs=args.procs, join=True)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000], help="images (captions: 5x)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--full-up-to", type=int, default=10000, help="also run the full-matrix path up to this size")
    ap.add_argument("--held-up-to", type=int, default=10000,
                    help="also run the stream with the embeddings held in memory up to this size")
    a = ap.parse_args()
    print(f"global embeddings d={a.dim}, {a.procs} processes (gloo, 1 thread each), tile {a.chunk}")
    print("peak RSS per rank, GiB; 'above': the peak minus the RSS once the embeddings are made (in memory or on "
          "disk)")
    print(f"{'gallery':>18} {'path':>8} {'wall s':>8} {'ns/pair':>8} {'embeddings':>10} {'peak RSS':>12} "
          f"{'above':>12} {'rsum':>7}")
    first = None
    for n in a.sizes:
        rows = [("spilled", run(a, n, "spilled"))]
        rows += [("held", run(a, n, "held"))] if n <= a.held_up_to else []
        rows += [("full", run(a, n, "full"))] if n <= a.full_up_to else []
        for name, r in rows:
            pairs = n * 5 * n
            emb = 6 * n * a.dim * 4 / 2 ** 30
            print(f"{n:>8} x {5 * n:<8} {name:>8} {r['wall']:8.1f} {1e9 * r['wall'] / pairs:8.2f} {emb:10.2f} "
                  f"{' / '.join(f'{x:.2f}' for x in r['rss']):>12} {' / '.join(f'{x:.2f}' for x in r['above']):>12} "
                  f"{r['rsum']:7.1f}")
        stream = rows[0][1]
        first = first or stream
        for name, r in rows[1:]:
            print(f"{'':18} spilled / {name} time: {stream['wall'] / r['wall']:.2f}x, peak RSS "
                  f"{max(stream['rss']) / max(r['rss']):.2f}x, same rsum: {stream['rsum'] == r['rsum']}")
    print(f"spilled, largest / smallest gallery: peak RSS {max(stream['rss']) / max(first['rss']):.2f}x "
          f"(target < 1.5x), ns per pair {stream['wall'] / first['wall'] * (a.sizes[0] / a.sizes[-1]) ** 2:.2f}x")


if __name__ == "__main__":
    main()
