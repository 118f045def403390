"""The evaluation job's scoring, streamed: every tile is computed, folded into rank counters (and top-k lists,
and the matrix on disk when asked), then dropped. A rank holds the embeddings, one tile and O(n + m)
counters; one all-reduce combines the ranks' counters. No full matrix exists anywhere.

Two passes over the fixed tile grid of ``itr.eval.scores`` (``tile_grid``): first the tiles that hold
ground-truth pairs, whose scores are summed across ranks (each pair lies in exactly one tile, so the sum is
exact); then every tile a protocol block touches, counted against them (``itr.eval.ranks.RankCounts``).
The ground-truth tiles are computed twice (chunk / n of the work: 1% at 100K images) rather than kept
(memory that would grow with the gallery). Every score comes from the same call on the same inputs as in
the full-matrix path (``similarity_matrix``), so ranks, and metrics, equal it for any world size.

A long evaluation is resumable: with a state folder, each rank writes its finished tiles and counters there
every ``state_every`` seconds (atomically), and a restarted job skips what is done (same world, tile size
and split).
"""
import os
import time
from pathlib import Path

import numpy as np
import torch

from itr.distributed import host_collective
from itr.rundir import fault
from itr.eval.ranks import RankCounts
from itr.eval.scores import num_rows, rows, tile_grid
from itr.eval.topk import TopK

STEP_DELAY = float(os.environ.get("ITR_STEP_DELAY", "0") or 0)  # tests: sleep after each tile (not once resumed)


def protocol_blocks(n, protocol, caps_per_image=5):
    """The (first image, end image) blocks a protocol ranks within: the whole split, or COCO's 5 folds."""
    if protocol in ("1k", "5k"):
        return [(0, n)]
    if protocol != "coco-5fold":
        raise ValueError(f"unknown protocol {protocol!r}; choose one of 1k, coco-5fold, 5k")
    if n % 5:
        raise ValueError(f"coco-5fold needs a number of images divisible by 5, got {n}")
    f = n // 5
    return [(i * f, (i + 1) * f) for i in range(5)]


def _overlap(a0, a1, b0, b1):
    return max(a0, b0), min(a1, b1)


class Streamer:
    """Tiles of ``score_fn(img rows, caption rows)`` on the fixed grid, dealt round robin to the ranks."""

    def __init__(self, score_fn, img, cap, chunk=1024, device="cpu", rank=0, world=1, caps_per_image=5,
                 progress=False):
        self.score_fn, self.img, self.cap, self.device = score_fn, img, cap, device
        self.rank, self.world, self.k = rank, world, caps_per_image
        self.n, self.m = num_rows(img), num_rows(cap)
        self.grid, self.chunk, self.progress = tile_grid(self.n, self.m, chunk), chunk, progress

    @torch.no_grad()
    def tile(self, t):
        i0, i1, j0, j1 = t
        out = self.score_fn(rows(self.img, i0, i1, self.device), rows(self.cap, j0, j1, self.device))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def each(self, tiles, fn, desc, skip=(), stop=None):
        """``fn(index, tile, scores)`` for this rank's share of ``tiles``, in step with the other ranks: every rank
        makes the same number of score calls (ZeRO-3 gathers parameters inside them). ``stop()``, asked after
        every call on every rank alike, ends the loop early (returns True then)."""
        from itr.progress import bar as progress_bar

        mine = [(i, t) for i, t in enumerate(tiles) if i % self.world == self.rank]
        calls = -(-len(tiles) // self.world)
        pairs = sum((t[1] - t[0]) * (t[3] - t[2]) for t in tiles)
        bar = progress_bar(total=pairs, desc=desc, unit="pair", unit_scale=True, leave=False,
                           enabled=self.progress and calls >= 2)
        for c in range(calls):
            if c < len(mine) and mine[c][0] not in skip:
                i, t = mine[c]
                fn(i, t, self.tile(t))
            else:  # keep step with ranks that have one more tile (or a tile this rank finished before a restart)
                self.score_fn(rows(self.img, 0, 1, self.device), rows(self.cap, 0, 1, self.device))
            bar.update(sum((t[1] - t[0]) * (t[3] - t[2]) for t in tiles[c * self.world:(c + 1) * self.world]))
            if stop is not None and stop():
                bar.close()
                return True
        bar.close()
        return False

    def ground_truth(self, blocks):
        """(n, caps_per_image) ground-truth scores, on every rank, from the tiles that hold them."""
        k = self.k
        needed = [t for t in self.grid if _holds_gt(t, k) and any(_touches(t, b, k) for b in blocks)]
        gt = np.zeros((self.n, k), np.float32)

        def take(_, t, scores):
            i0, i1, j0, j1 = t
            for i in range(i0, i1):
                c0, c1 = _overlap(j0, j1, k * i, k * (i + 1))
                if c0 < c1:
                    gt[i, c0 - k * i:c1 - k * i] = scores[i - i0, c0 - j0:c1 - j0]

        self.each(needed, take, "ground-truth tiles")
        return host_collective(torch.distributed.all_reduce, torch.from_numpy(gt)).numpy() if self.world > 1 else gt

    def tiles_for(self, blocks):
        return [t for t in self.grid if any(_touches(t, b, self.k) for b in blocks)]


def _holds_gt(t, k):
    """Whether tile t holds a ground-truth pair (image i with caption k i .. k i + k - 1)."""
    c0, c1 = _overlap(t[2], t[3], k * t[0], k * t[1])
    return c0 < c1


def _touches(t, block, k):
    i0, i1 = _overlap(t[0], t[1], *block)
    j0, j1 = _overlap(t[2], t[3], k * block[0], k * block[1])
    return i0 < i1 and j0 < j1


class Counting:
    """What the second pass folds every tile into: per block rank counters, top-k lists, the matrix on disk."""

    def __init__(self, blocks, gt, k=5, topk=0, sims=None):
        self.blocks, self.k, self.sims = blocks, k, sims
        self.counts = [RankCounts(gt[b0:b1]) for b0, b1 in blocks]
        self.topk = [TopK(b1 - b0, k * (b1 - b0), topk) if topk else None for b0, b1 in blocks]

    def add(self, _, t, scores):
        if self.sims is not None:
            self.sims[t[0]:t[1], t[2]:t[3]] = scores
        for (b0, b1), counts, top in zip(self.blocks, self.counts, self.topk):
            r0, r1 = _overlap(t[0], t[1], b0, b1)
            c0, c1 = _overlap(t[2], t[3], self.k * b0, self.k * b1)
            if r0 < r1 and c0 < c1:
                crop = scores[r0 - t[0]:r1 - t[0], c0 - t[2]:c1 - t[2]]
                counts.add(crop, r0 - b0, c0 - self.k * b0)
                if top is not None:
                    top.add(crop, r0 - b0, c0 - self.k * b0)

    def arrays(self):
        """Every counter as a named array (what a rank contributes, and what its state file holds)."""
        out = {}
        for b, c in enumerate(self.counts):
            out[f"i2t{b}"], out[f"t2i{b}"] = c.i2t, c.t2i
        for b, top in enumerate(self.topk):
            if top is not None:
                out.update({f"top{b}_{name}": a for name, a in top.arrays().items()})
        return out

    def load(self, arrays):
        for b, c in enumerate(self.counts):
            c.i2t[:], c.t2i[:] = arrays[f"i2t{b}"], arrays[f"t2i{b}"]
        for b, top in enumerate(self.topk):
            if top is not None:
                top.load({name[len(f"top{b}_"):]: a for name, a in arrays.items() if name.startswith(f"top{b}_")})


class State:
    """A rank's finished tiles and counters in ``folder/state-rank{R}.npz``, rewritten atomically every ``every_s``."""

    def __init__(self, folder, rank, key, every_s=300.0):
        self.path = Path(folder) / f"state-rank{rank}.npz" if folder else None
        self.key, self.every, self.last, self.done = np.asarray(key, np.int64), every_s, time.monotonic(), set()

    def load(self, counting):
        if self.path is None or not self.path.is_file():
            return set()
        with np.load(self.path) as z:
            if not np.array_equal(z["key"], self.key):
                from itr.errors import DataError

                raise DataError(f"{self.path} belongs to another evaluation (images, captions, tile size, world "
                                f"size, protocol or top-k differ); remove it or give another state folder")
            counting.load({k: z[k] for k in z.files if k not in ("key", "done", "gt")})
            self.done = set(z["done"].tolist())
        return set(self.done)

    def tick(self, index, counting, gt, force=False):
        self.done.add(index)
        if self.path is None or (not force and time.monotonic() - self.last < self.every):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, key=self.key, done=np.array(sorted(self.done), np.int64), gt=gt, **counting.arrays())
        os.replace(tmp, self.path)
        self.last = time.monotonic()


class EvalStopped(Exception):
    """A signal (preemption, a time limit) stopped a resumable evaluation after its state was saved."""


def stream_ranks(streamer, protocol, topk=0, sims=None, state_dir=None, state_every=300.0, stop=None):
    """(per block (i2t ranks, t2i ranks), per block TopK or None) on rank 0; None elsewhere. With ``stop`` (an
    ``itr.step.Stop``) and a state folder, SIGTERM / SIGUSR1 saves the state and raises EvalStopped."""
    blocks = protocol_blocks(streamer.n, protocol, streamer.k)
    key = [streamer.n, streamer.m, streamer.chunk, streamer.world, len(blocks), topk]
    state = State(state_dir, streamer.rank, key, state_every)
    gt = streamer.ground_truth(blocks)
    counting = Counting(blocks, gt, streamer.k, topk, sims)
    done = state.load(counting)
    tiles = streamer.tiles_for(blocks)

    def fold(i, t, scores):
        counting.add(i, t, scores)
        state.tick(i, counting, gt)
        fault("eval tile")
        if STEP_DELAY and not done:
            time.sleep(STEP_DELAY)

    if done and streamer.rank == 0:
        print(f"[itr] resuming the evaluation from {state.path.parent}: {len(done)} of this rank's tiles are done",
              flush=True)
    asked = (lambda: stop.requested(streamer.device)) if stop is not None and state.path is not None else None
    if streamer.each(tiles, fold, "similarity tiles", skip=done, stop=asked):
        state.tick(-1, counting, gt, force=True)
        raise EvalStopped(f"stopped by signal {stop.signal}: the state is in {state.path.parent}; run the same "
                          f"command again to resume")
    if state.path is not None:
        state.tick(-1, counting, gt, force=True)
    return _combine(counting, streamer.rank, streamer.world)


def _combine(counting, rank, world):
    for c in counting.counts:
        if world > 1:
            c.i2t[:] = host_collective(torch.distributed.all_reduce, torch.from_numpy(c.i2t)).numpy()
            c.t2i[:] = host_collective(torch.distributed.all_reduce, torch.from_numpy(c.t2i)).numpy()
    tops = [top.merged(rank, world) if top is not None else None for top in counting.topk]
    if rank != 0:
        return None
    return [c.ranks() for c in counting.counts], tops
