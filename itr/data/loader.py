"""The training stream: shards -> (image, caption) pairs -> equal-length batches per rank.

How an epoch is split, deterministically from ``(seed, epoch)`` and the manifest alone:

1. Shards are shuffled. ``S - S % W`` of them go whole to the ``W`` ranks, round robin;
   each of the ``S % W`` leftover shards is read by every rank, each keeping every
   ``W``-th image. So ranks get equal data (to within a few images) for any shard count,
   and no rank reads more than about twice its share.
2. Within a rank, those units go round robin to the DataLoader workers, which decode,
   expand each image into its 5 caption pairs, shuffle through a buffer and tokenize.
3. The main process cuts the merged worker stream into batches of exactly
   ``batch_size / (W * grad_accum)`` and stops after ``n_batches``, the same number on
   every rank (the smallest rank's pair count // batch). Unequal batch counts would hang DDP.

The stream is a pure function of ``(seed, epoch)``, so resuming mid-epoch replays the
epoch and skips the batches already trained on.
"""
import io
import json
import random
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from itr.data.manifest import shard_paths
from itr.data.precomp import DataError

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


def image_key(manifest):
    """The batch key of the image side: ``feats`` (features) or ``pixels`` (raw images)."""
    return "pixels" if manifest.get("kind") == "images" else "feats"


class PairStream(IterableDataset):
    """Yields chunks of shuffled (image, caption tokens, image index, caption index) pairs.

    The image is its feature array, or for image shards the decoded JPEG after a random
    resized crop and flip (uint8, 3 x image_size x image_size), drawn per image and epoch.
    """

    def __init__(self, manifest, units, tokenizer, seed, epoch, rank, shuffle_buffer=5000, chunk=32,
                 image_size=224):
        self.paths = shard_paths(manifest)
        self.manifest = {k: manifest.get(k) for k in ("feature_shape", "captions_per_image", "kind")}
        self.units = list(units)
        self.tokenizer = tokenizer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer = shuffle_buffer
        self.chunk = chunk
        self.image_size = image_size
        self.key = image_key(manifest)

    def _decode(self, sample, path, aug):
        if self.key == "pixels":
            from itr.data.images import decode, train_transform

            data = sample.get("jpg") or sample.get("png")
            if data is None:
                raise DataError(f"shard {path}: sample {sample['__key__']} has no jpg/png image")
            return train_transform(decode(data), aug, self.image_size)
        feat = np.load(io.BytesIO(sample["feat.npy"]), allow_pickle=False)
        want = tuple(self.manifest["feature_shape"])
        if feat.shape != want:
            raise DataError(f"shard {path}: sample {sample['__key__']} has features {feat.shape}, manifest says {want}")
        return feat

    def _images(self, unit, aug=None):
        import webdataset as wds

        s, part, parts = unit
        path = self.paths[s]
        k = -1
        try:
            for k, sample in enumerate(wds.tarfile_samples([{"url": path}])):
                if k % parts != part:
                    continue  # another rank's share of this shard: skip before decoding
                meta = json.loads(sample["json"])
                feat = self._decode(sample, path, aug)
                if "boxes.npy" in sample:
                    meta["boxes"] = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False)
                yield feat, meta
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"shard {path} is unreadable near sample {k + 1} ({type(e).__name__}: {e}); "
                            f"rebuild it with `itr shard`") from e

    def _pairs(self, units, aug):
        for unit in units:
            for feat, meta in self._images(unit, aug):
                extra = {"boxes": meta["boxes"]} if "boxes" in meta else {}
                for cap_idx, text in zip(meta["caption_indices"], meta["captions"]):
                    yield feat, text, meta["image_index"], cap_idx, extra

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}")
        aug = random.Random(f"aug-{self.seed}-{self.epoch}-{self.rank}-{wid}")
        stream = _shuffled(self._pairs(self.units[wid::nw], aug), self.shuffle_buffer, rng)
        buf = []
        for feat, text, img, cap, extra in stream:
            buf.append((feat, self.tokenizer.encode(text), img, cap, extra))
            if len(buf) == self.chunk:
                yield _chunk(buf, self.key)
                buf = []
        if buf:
            yield _chunk(buf, self.key)


def _shuffled(it, bufsize, rng):
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


def _chunk(items, key="feats"):
    out = {
        key: torch.from_numpy(np.stack([it[0] for it in items])),
        "tokens": [it[1] for it in items],
        "img_ids": torch.tensor([it[2] for it in items], dtype=torch.long),
        "cap_ids": torch.tensor([it[3] for it in items], dtype=torch.long),
    }
    for key in items[0][4]:  # per-image extras: boxes
        out[key] = torch.from_numpy(np.stack([it[4][key] for it in items]))
    return out


def collate_tokens(token_lists, pad_id):
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    ids = torch.full((len(token_lists), int(lens.max())), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    return ids, lens


def _merge(chunks, pad_id):
    ids, lens = collate_tokens([t for c in chunks for t in c["tokens"]], pad_id)
    out = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0] if key != "tokens"}
    out.update(text_ids=ids, text_lens=lens)
    return out


def _split_chunk(c, k):
    head = {key: (v[:k]) for key, v in c.items()}
    tail = {key: (v[k:]) for key, v in c.items()}
    return head, tail


@dataclass
class TrainLoader:
    """Per-rank iterable of exactly ``num_batches(epoch)`` batches of ``rank_batch`` pairs."""

    manifest: dict
    tokenizer: object
    rank_batch: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 5000
    image_size: int = 224

    def num_batches(self, epoch):
        return batches_per_epoch(self.manifest, epoch, self.seed, self.world, self.rank_batch)

    def epoch(self, epoch, skip=0):
        """Batches of ``epoch``, starting after the first ``skip`` (resume)."""
        n = self.num_batches(epoch)
        if n == 0:
            raise DataError(
                f"{self.manifest['path']}: {self.manifest['num_captions']} captions are fewer than one batch of "
                f"{self.rank_batch} per rank x {self.world} ranks; lower train.batch_size"
            )
        units = plan_epoch(self.manifest, epoch, self.seed, self.world)[self.rank]
        ds = PairStream(self.manifest, units, self.tokenizer, self.seed, epoch, self.rank,
                        shuffle_buffer=self.shuffle_buffer, chunk=min(32, self.rank_batch), image_size=self.image_size)
        workers = min(self.num_workers, len(units))
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, which a
        # resumed run has just restored to mid-epoch: the draw would shift every later random op (exact resume).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.rank)
        dl = DataLoader(ds, batch_size=None, num_workers=workers, generator=gen,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
        return _batches(iter(dl), self.rank_batch, n, skip, self.tokenizer.pad_id)


def _batches(chunks, size, n, skip, pad_id):
    pending, have, made = [], 0, 0
    try:
        for c in chunks:
            while c is not None:
                k = len(c["img_ids"])
                if have + k <= size:
                    pending.append(c)
                    have += k
                    c = None
                else:
                    head, c = _split_chunk(c, size - have)
                    pending.append(head)
                    have = size
                if have == size:
                    if made >= skip:
                        yield _merge(pending, pad_id)
                    made += 1
                    pending, have = [], 0
                    if made == n:
                        return
    finally:
        del chunks  # shuts the workers down when the consumer stops early
    raise DataError(f"the shard stream ended after {made} of {n} batches: shards changed since the manifest was written?")
