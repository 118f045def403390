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

The stream is a pure function of ``(seed, epoch)`` and its shape (world, per-rank batch, workers,
shuffle buffer; ``itr.data.plan``), so resuming mid-epoch with the same shape replays the epoch and
skips the batches already trained on; with another shape, ``itr.data.segments`` deals the epoch's
pairs not yet trained on to the new ranks (``keep``).
"""
import json
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from itr.data.manifest import shard_paths
from itr.data.npy import load_npy
from itr.data.plan import batches_per_epoch, chunk_size, plan_epoch, shuffled  # noqa: F401 (re-exported)
from itr.data.precomp import DataError
from itr.data.segments import Shape, batches_left, consumed, shard_index, stream_plan


def image_key(manifest):
    """The batch key of the image side: ``feats`` (features) or ``pixels`` (raw images)."""
    return "pixels" if manifest.get("kind") == "images" else "feats"


class PairStream(IterableDataset):
    """Yields chunks of shuffled (image, caption tokens, image index, caption index) pairs.

    The image is its feature array, or for image shards the decoded JPEG after a random
    resized crop and flip (uint8, 3 x image_size x image_size), drawn per image and epoch.
    """

    def __init__(self, manifest, units, tokenizer, seed, epoch, rank, shuffle_buffer=5000, chunk=32,
                 image_size=224, keep=None, on_error="error"):
        self.paths = shard_paths(manifest)
        self.manifest = {k: manifest.get(k) for k in ("feature_shape", "captions_per_image", "kind", "variable_regions")}
        self.units = list(units)
        self.tokenizer = tokenizer
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer = shuffle_buffer
        self.chunk = chunk
        self.image_size = image_size
        self.key = image_key(manifest)
        self.variable = bool(manifest.get("variable_regions"))
        self.keep = keep  # a boolean mask over caption indices: this rank's pairs of a resumed epoch, or None
        self.on_error, self.skipped = on_error, []

    def _decode(self, sample, path, aug):
        if self.key == "pixels":
            from itr.data.images import decode, train_transform

            data = sample.get("jpg") or sample.get("png")
            if data is None:
                raise DataError(f"shard {path}: sample {sample['__key__']} has no jpg/png image")
            return train_transform(decode(data), aug, self.image_size)
        feat = load_npy(sample["feat.npy"], f"shard {path}: sample {sample['__key__']}: feat.npy")
        want = tuple(self.manifest["feature_shape"])
        if self.manifest.get("variable_regions"):  # (r, D) with 1 <= r <= the manifest's largest
            if feat.ndim == 2 and feat.shape[1] == want[1] and 1 <= feat.shape[0] <= want[0]:
                return feat
            raise DataError(f"shard {path}: sample {sample['__key__']} has features {feat.shape}, manifest says "
                            f"(1..{want[0]}, {want[1]})")
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
                try:
                    item = self._sample(sample, path, aug)
                except Exception as e:
                    self._bad(f"shard {path}: sample {sample.get('__key__', k + 1)} is unreadable "
                              f"({type(e).__name__}: {e})", e)
                    continue
                if item is not None:
                    yield item
        except DataError:
            raise
        except Exception as e:
            self._bad(f"shard {path} is unreadable near sample {k + 1} ({type(e).__name__}: {e}); rebuild it with "
                      f"`itr shard`", e)

    def _sample(self, sample, path, aug):
        """(features, meta) of one image, or None when none of its pairs is this rank's (before decoding)."""
        need = ("json",) if self.key == "pixels" else ("json", "feat.npy")
        lacks = [k for k in need if k not in sample]
        if lacks:
            raise DataError(f"shard {path}: sample {sample.get('__key__')} lacks {', '.join(lacks)}: the shard is "
                            f"truncated or was not written by `itr shard`; rebuild it (or data.on_error=skip)")
        meta = json.loads(sample["json"])
        if self.keep is not None:
            pairs = [(c, t) for c, t in zip(meta["caption_indices"], meta["captions"]) if self.keep[c]]
            if not pairs:
                return None
            meta["caption_indices"], meta["captions"] = [c for c, _ in pairs], [t for _, t in pairs]
        feat = self._decode(sample, path, aug)
        if "boxes.npy" in sample:
            meta["boxes"] = load_npy(sample["boxes.npy"], f"shard {path}: sample {sample['__key__']}: boxes.npy")
        return feat, meta

    def _bad(self, message, error):
        """A corrupt sample or shard: an error naming it, or with ``data.on_error=skip`` a note for the main
        process (it rides on the next chunk) and on."""
        if self.on_error != "skip":
            raise error if isinstance(error, DataError) else DataError(message) from error
        self.skipped.append(message)

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
        stream = shuffled(self._pairs(self.units[wid::nw], aug), self.shuffle_buffer, rng)
        buf = []
        for feat, text, img, cap, extra in stream:
            buf.append((feat, self.tokenizer.encode(text), img, cap, extra))
            if len(buf) == self.chunk:
                yield self._with_notes(_chunk(buf, self.key, self.variable))
                buf = []
        if buf or self.skipped:
            yield self._with_notes(_chunk(buf, self.key, self.variable) if buf else {})

    def _with_notes(self, chunk):
        if self.skipped:
            chunk["skipped"], self.skipped = self.skipped, []
        return chunk


def _stack(arrays):
    """np.stack, zero padding the first axis to the longest where the region counts differ."""
    r = max(a.shape[0] for a in arrays)
    if all(a.shape[0] == r for a in arrays):
        return torch.from_numpy(np.stack(arrays))
    out = np.zeros((len(arrays), r, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return torch.from_numpy(out)


def _chunk(items, key="feats", variable=False):
    """A chunk of pairs; with ``variable`` region counts, features and boxes zero padded and ``feat_lens``."""
    if variable:
        out = {key: _stack([it[0] for it in items]),
               "feat_lens": torch.tensor([it[0].shape[0] for it in items], dtype=torch.long)}
        for k in items[0][4]:
            out[k] = _stack([it[4][k] for it in items])
        return {**out, **_chunk_ids(items)}
    out = {
        key: torch.from_numpy(np.stack([it[0] for it in items])),
        "tokens": [it[1] for it in items],
        "img_ids": torch.tensor([it[2] for it in items], dtype=torch.long),
        "cap_ids": torch.tensor([it[3] for it in items], dtype=torch.long),
    }
    for key in items[0][4]:  # per-image extras: boxes
        out[key] = torch.from_numpy(np.stack([it[4][key] for it in items]))
    return out


def _chunk_ids(items):
    return {"tokens": [it[1] for it in items],
            "img_ids": torch.tensor([it[2] for it in items], dtype=torch.long),
            "cap_ids": torch.tensor([it[3] for it in items], dtype=torch.long)}


def collate_tokens(token_lists, pad_id):
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    ids = torch.full((len(token_lists), int(lens.max())), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    return ids, lens


def _as_is(chunk):
    """The DataLoader's collate: chunks are already tensors (its default walks every token list, ~10% of a step)."""
    return chunk


def _cat(xs):
    """Chunks into one batch, zero-padded to the longest when region counts vary. numpy's copy: torch.cat of
    float16 CPU tensors was ~100x slower (150 ms per 128 x 36 x 2048 batch)."""
    arrays = [x.numpy() for x in xs]
    shape = [max(s) for s in zip(*(a.shape for a in arrays))]
    if all(list(a.shape[1:]) == shape[1:] for a in arrays):
        return torch.from_numpy(np.concatenate(arrays))
    out = np.zeros([sum(len(a) for a in arrays), *shape[1:]], dtype=arrays[0].dtype)
    at = 0
    for a in arrays:
        out[(slice(at, at + len(a)), *(slice(0, d) for d in a.shape[1:]))] = a
        at += len(a)
    return torch.from_numpy(out)


def _merge(chunks, pad_id):
    ids, lens = collate_tokens([t for c in chunks for t in c["tokens"]], pad_id)
    out = {key: _cat([c[key] for c in chunks]) for key in chunks[0] if key != "tokens"}
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
    on_error: str = "error"  # data.on_error: "skip" passes over corrupt samples (noted in ``skipped``)

    def __post_init__(self):
        self._plans, self._index, self.skipped = {}, None, []

    def skipped_total(self, device="cpu"):
        """(samples skipped on every rank since the last call, the first note of this rank or None). Collective."""
        from itr.distributed import all_reduce_sum

        total = int(all_reduce_sum(torch.tensor([float(len(self.skipped))], device=device)).item())
        first = self.skipped[0] if self.skipped else "(on another rank)" if total else None
        self.skipped.clear()
        return total, first

    def shape(self):
        return Shape(self.world, self.rank_batch, self.num_workers, self.shuffle_buffer)

    def _plan(self, epoch, segments):
        """(this rank's units, keep mask or None, batches per rank) of ``epoch`` after ``segments`` (the parts of
        it run under another stream shape: ``itr.data.segments``)."""
        key = (epoch, json.dumps(segments, sort_keys=True))
        if key not in self._plans:
            if not segments:
                units = plan_epoch(self.manifest, epoch, self.seed, self.world)[self.rank]
                n = batches_per_epoch(self.manifest, epoch, self.seed, self.world, self.rank_batch)
                self._plans[key] = (units, None, n)
            else:
                self._index = self._index or shard_index(self.manifest)
                plans, _ = stream_plan(self.manifest, self._index, segments, self.shape(), self.seed, epoch)
                self._plans[key] = (*plans[self.rank], batches_left(plans, self.rank_batch))
        return self._plans[key]

    def num_batches(self, epoch, segments=()):
        """Micro-batches of ``epoch`` per rank (with ``segments``: those they consumed plus the rest's)."""
        return consumed(segments) + self._plan(epoch, list(segments))[2]

    def epoch(self, epoch, skip=0, segments=()):
        """Batches of ``epoch`` after the first ``skip`` of it (a resume); with ``segments`` (parts of the epoch
        run on other stream shapes), the rest of the epoch's pairs, dealt to this stream's ranks."""
        units, keep, n = self._plan(epoch, list(segments))
        skip -= consumed(segments)
        if n == 0 and not segments:
            raise DataError(
                f"{self.manifest['path']}: {self.manifest['num_captions']} captions are fewer than one batch of "
                f"{self.rank_batch} per rank x {self.world} ranks; lower train.batch_size"
            )
        ds = PairStream(self.manifest, units, self.tokenizer, self.seed, epoch, self.rank,
                        shuffle_buffer=self.shuffle_buffer, chunk=chunk_size(self.rank_batch), image_size=self.image_size,
                        keep=keep, on_error=self.on_error)
        workers = min(self.num_workers, len(units))

        def stream():
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, which a
            # resumed run has just restored to mid-epoch: the draw would shift every later random op (exact resume).
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + self.rank)
            return iter(DataLoader(ds, batch_size=None, num_workers=workers, generator=gen, collate_fn=_as_is,
                                   prefetch_factor=4 if workers else None, persistent_workers=False))

        return _batches(stream(), self.rank_batch, n, skip, self.tokenizer.pad_id, self.skipped,
                        stream if self.on_error == "skip" else None)


def _batches(chunks, size, n, skip, pad_id, skipped=None, again=None):
    """Cut the chunk stream into ``n`` batches of ``size`` and yield those after the first ``skip``. Notes of
    skipped samples go to ``skipped``; with ``again`` (``data.on_error=skip``) a stream that ends early starts
    over (its first pairs repeat), so that every rank still makes ``n`` batches."""
    if skip >= n:
        return
    pending, have, made, pairs = [], 0, 0, 0
    try:
        while True:
            for c in chunks:
                if skipped is not None:
                    skipped.extend(c.pop("skipped", []))
                c = c if c.get("img_ids") is not None and len(c["img_ids"]) else None
                pairs += len(c["img_ids"]) if c is not None else 0
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
            if again is None or pairs == 0:
                break
            chunks, pairs = again(), 0
    finally:
        del chunks  # shuts the workers down when the consumer stops early
    if again is not None:
        raise DataError(f"every sample of this rank's shards was skipped as unreadable ({len(skipped or [])} notes)")
    raise DataError(f"the shard stream ended after {made} of {n} batches: shards changed since the manifest was written?")
