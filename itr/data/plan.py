"""The plan of an epoch: which shard parts each rank reads, how many batches every rank yields, and the
shuffle; pure functions of ``(seed, epoch)``, the manifest and the stream's shape (``itr.data.loader`` reads
by them, ``itr.data.segments`` replays them). The module docstring of ``itr.data.loader`` tells the story."""
from typing import List, Tuple

import numpy as np

Unit = Tuple[int, int, int]  # (shard index, part, parts): images i of the shard with i % parts == part


def _unit_images(manifest, unit):
    s, part, parts = unit
    return len(range(part, manifest["shards"][s]["num_images"], parts))


def plan_epoch(manifest, epoch: int, seed: int, world: int) -> List[List[Unit]]:
    """The units each rank reads this epoch (see the module docstring)."""
    S = len(manifest["shards"])
    order = np.random.default_rng([seed, epoch, 1]).permutation(S).tolist()
    full = len(order) - len(order) % world
    per_rank = [[(s, 0, 1) for s in order[r:full:world]] for r in range(world)]
    for k, s in enumerate(order[full:]):
        for r in range(world):
            per_rank[r].append((s, (r + k) % world, world))  # rotate, so no rank always gets the short part
    rng = np.random.default_rng([seed, epoch, 2])
    for units in per_rank:
        rng.shuffle(units)
    return per_rank


def batches_per_epoch(manifest, epoch, seed, world, rank_batch):
    cpi = manifest.get("captions_per_image", 5)
    per_rank = plan_epoch(manifest, epoch, seed, world)
    pairs = min(sum(_unit_images(manifest, u) for u in units) * cpi for units in per_rank)
    return pairs // rank_batch


def shuffled(it, bufsize, rng):
    buf = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(bufsize)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def chunk_size(rank_batch):
    """Pairs per chunk a worker hands the main process."""
    return min(32, rank_batch)


