"""Resuming an epoch on a different stream: another number of ranks, workers or shuffle buffer.

The stream of an epoch is a pure function of ``(seed, epoch)``, the manifest and the stream's shape (world,
per-rank batch, DataLoader workers, shuffle buffer): ``itr.data.loader``. A run resumed with the same shape
replays it and skips what it trained on. A run resumed with another shape (a requeued SLURM job that got
fewer GPUs) cannot: its ranks would read other pairs in another order. This module makes that resume exact in
what matters, the set of pairs:

- **a segment** is a part of the epoch run under one shape; a checkpoint records the finished segments of
  the current epoch (``TrainState.segments``: shape and micro-batches consumed);
- replaying the segments on caption indices alone (shard headers and JSON, no features: ``shard_index``)
  gives the pairs they consumed (``consumed``), exactly as their loaders emitted them;
- the rest of the epoch's pairs (the epoch's set under its first segment's shape, minus those consumed) are
  dealt round robin, in an order drawn from ``(seed, epoch, segment)``, to the new ranks
  (``remainder_masks``), and each rank's loader keeps only its own (``PairStream(keep=...)``).

Exact: every pair of the epoch is trained on at most once, and all of them but fewer than one micro-step's
pairs (the new ranks' batches must be equal) are. Not exact: the order (a new shape shuffles differently),
and so the weights differ from an uninterrupted run's. Cost: for the rest of that epoch every rank reads
every shard (and skips other ranks' pairs before decoding).
"""
import json
import random
from dataclasses import asdict, dataclass

import numpy as np

from itr.data.manifest import shard_paths
from itr.data.remote import open_tar
from itr.data.plan import batches_per_epoch, chunk_size, plan_epoch, shuffled


@dataclass(frozen=True)
class Shape:
    """What decides a rank's stream besides ``(seed, epoch)`` and the manifest."""

    world: int
    rank_batch: int
    num_workers: int
    shuffle_buffer: int

    def as_dict(self):
        return asdict(self)


def stream_shape(meta, recipe_file):
    """The stream shape a checkpoint was written under: its ``stream`` record, or (older checkpoints) its world
    size and per-rank batch with the data section of the recipe saved beside it."""
    if "stream" in meta:
        return Shape(**meta["stream"])
    import yaml

    data = (yaml.safe_load(recipe_file.read_text()) or {}).get("data", {}) if recipe_file.is_file() else {}
    return Shape(meta["world_size"], meta["rank_batch"], data.get("num_workers", 2), data.get("shuffle_buffer", 5000))


def consumed(segments):
    """Micro-batches of the epoch run on earlier shapes."""
    return sum(seg["micro"] for seg in segments)


def begin_segment(state, old, new):
    """On a resume mid-epoch (``state``: a ``TrainState``) with a stream shape other than the checkpoint's,
    close the old shape's part of the epoch as a segment; the message to print, or None."""
    if state.micro_in_epoch == 0 or old == new:
        return None
    state.segments.append({**old.as_dict(), "micro": state.micro_in_epoch - consumed(state.segments)})
    return (f"resuming epoch {state.epoch + 1} on another data stream ({old} -> {new}): the pairs of the epoch not "
            f"yet trained on are dealt to {new.world} rank(s), none twice; their order differs from an "
            f"uninterrupted run's")


def shard_index(manifest):
    """Per shard, in sample order: (image index, caption indices) of each image, from the tar's JSON members."""
    out = []
    for path in shard_paths(manifest):
        images = []
        with open_tar(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    images.append((meta["image_index"], list(meta["caption_indices"])))
        out.append(images)
    return out


def _unit_captions(index, unit, keep):
    s, part, parts = unit
    for k, (_, caps) in enumerate(index[s]):
        if k % parts == part:
            yield from (c for c in caps if keep is None or keep[c])


def _chunks(items, size):
    return [items[a:a + size] for a in range(0, len(items), size)]


def rank_order(index, units, shape, seed, epoch, rank, keep=None):
    """The caption indices of one rank's stream, in the order its loader yields them (``PairStream`` per
    worker, then the DataLoader taking the workers' chunks round robin, an exhausted worker dropping out)."""
    workers = min(shape.num_workers, len(units)) or 1
    per_worker = []
    for wid in range(workers):
        rng = random.Random(f"{seed}-{epoch}-{rank}-{wid}")
        pairs = [c for u in units[wid::workers] for c in _unit_captions(index, u, keep)]
        per_worker.append(_chunks(list(shuffled(pairs, shape.shuffle_buffer, rng)), chunk_size(shape.rank_batch)))
    order, live, at = [], list(range(workers)), [0] * workers
    while live:
        for wid in list(live):
            if at[wid] < len(per_worker[wid]):
                order.extend(per_worker[wid][at[wid]])
                at[wid] += 1
            else:
                live.remove(wid)
    return order


def remainder_masks(available, world, seed, epoch, segment):
    """Per new rank, the boolean mask (over caption indices) of the available pairs it gets: dealt round robin
    in an order drawn from ``(seed, epoch, segment)``, so ranks get equal shares (to within one pair)."""
    ids = np.flatnonzero(available)
    ids = ids[np.random.default_rng([seed, epoch, 3, segment]).permutation(len(ids))]
    masks = []
    for r in range(world):
        m = np.zeros(len(available), bool)
        m[ids[r::world]] = True
        masks.append(m)
    return masks


def stream_plan(manifest, index, segments, shape, seed, epoch):
    """Where the epoch stands after ``segments`` (dicts: a ``Shape``'s fields and ``micro``, the micro-batches
    each rank consumed), for a stream of ``shape``: per rank of ``shape``, (units, keep mask or None); and
    the pairs of the epoch still available. No segments: the plain epoch plan."""
    n_caps = manifest["num_captions"]
    if not segments:
        return [(u, None) for u in plan_epoch(manifest, epoch, seed, shape.world)], None
    available = None
    for k, seg in enumerate(segments):
        prev = Shape(**{f: seg[f] for f in Shape.__dataclass_fields__})
        plans = _segment_plans(manifest, available, prev, seed, epoch, k)
        if available is None:  # the epoch's set: what the first shape's ranks would have trained on
            available = np.zeros(n_caps, bool)
            n = batches_per_epoch(manifest, epoch, seed, prev.world, prev.rank_batch)
            for rank, (units, keep) in enumerate(plans):
                available[rank_order(index, units, prev, seed, epoch, rank, keep)[:n * prev.rank_batch]] = True
        for rank, (units, keep) in enumerate(plans):
            available[rank_order(index, units, prev, seed, epoch, rank, keep)[:seg["micro"] * prev.rank_batch]] = False
    return _segment_plans(manifest, available, shape, seed, epoch, len(segments)), available


def _segment_plans(manifest, available, shape, seed, epoch, k):
    if available is None:
        return [(u, None) for u in plan_epoch(manifest, epoch, seed, shape.world)]
    units = [(s, 0, 1) for s in np.random.default_rng([seed, epoch, 1]).permutation(len(manifest["shards"])).tolist()]
    return [(units, m) for m in remainder_masks(available, shape.world, seed, epoch, k)]


def batches_left(plans, rank_batch):
    """Batches each rank yields from a remainder plan: the smallest share // rank_batch."""
    return min(int(keep.sum()) for _, keep in plans) // rank_batch
