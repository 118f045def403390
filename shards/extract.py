"""Raw images -> feature shards with a local vision backbone: ``itr extract``.

    itr extract BACKBONE_DIR IMAGE_SHARDS_OR_DIR OUT_DIR [--grid | --pooled] [--image-size S]
    accelerate launch -m itr extract ...          (ranks take whole output shards)

The input is a shard directory of ``itr shard images`` (every split there, or ``--split``; output shard ``k`` holds
exactly the images of input shard ``k``, same keys and captions), or a folder of images with ``--captions JSON
--split S`` (read as ``itr shard images`` reads them, dealt into shards in the same seeded order). The output is
what ``itr shard precomp`` writes: per image ``feat.npy`` (R x D float16: the grid's R cells, or R = 1 pooled),
``boxes.npy`` (R x 4, normalised; see ``itr.shards.backbone``) and the same ``json``, with the manifest, its
checksums and the captions file, so every region model trains on it unchanged.

Resumable per shard: a shard is written to a temporary file and renamed, then its record
(``OUT/.extract-{split}/{shard}.json``: checksum, count, and the digest of the settings and its input) is
written; a rerun skips a shard whose record matches and whose file still has the recorded checksum. Rank 0 writes
each split's manifest last, from the records.
"""
import hashlib
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itr.data import manifest as mf
from itr.data.precomp import CAPS_PER_IMAGE, DataError
from itr.shards.writer import _add, npy_bytes


@dataclass
class ShardJob:
    name: str
    num_images: int
    source: str  # the identity of its input (the input shard's sha256, or a digest of its files)
    samples: object  # () -> iterator of (key, json bytes, image bytes, where: names the image in errors)


@dataclass
class SplitJob:
    split: str
    shards: list
    captions: object  # () -> list of every caption, in caption-index order
    order: dict
    input: dict = field(default_factory=dict)


def _shard_samples(path, sha256=None):
    """The samples of an image shard, checked first against its manifest's checksum (``sha256``)."""
    def samples():
        import webdataset as wds

        if sha256 is not None:
            if not Path(path).is_file():
                raise DataError(f"shard {path} is missing (listed in its manifest)")
            if mf.sha256_file(path) != sha256:
                raise DataError(f"shard {path} is corrupt or truncated: its sha256 is not its manifest's")
        try:
            for s in wds.tarfile_samples([{"url": str(path)}]):
                data = s.get("jpg") or s.get("png")
                where = f"shard {path}: sample {s['__key__']}"
                if data is None or "json" not in s:
                    raise DataError(f"{where} has no jpg/png image or no json (not an `itr shard images` shard?)")
                yield s["__key__"], s["json"], data, where
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"shard {path} is unreadable ({type(e).__name__}: {e})") from None

    return samples


def plan_shards(root, split=None):
    """A SplitJob per image split of an ``itr shard images`` directory (``split``: that one only)."""
    root = Path(root)
    names = [split] if split else sorted(p.name[:-len(".manifest.json")] for p in root.glob("*.manifest.json"))
    if not names:
        raise DataError(f"{root} has no *.manifest.json: not a shard directory (images: pass --captions JSON "
                        f"--split S)")
    jobs = []
    for name in names:
        m = mf.load_manifest(root, name)
        if m.get("kind") != "images":
            raise DataError(f"{m['path']}: holds {m.get('kind', 'features')}, not images (`itr shard images` "
                            f"writes image shards)")
        caps = root / m.get("captions_file", mf.captions_path("", name).name)
        shards = [ShardJob(s["name"], s["num_images"], s["sha256"], _shard_samples(root / s["name"], s["sha256"]))
                  for s in m["shards"]]
        jobs.append(SplitJob(name, shards, lambda p=caps: p.read_text(encoding="utf-8").splitlines(),
                             m.get("order", {}), {"layout": "image-shards", "manifest": m["path"],
                                                  "digest": mf.manifest_digest(m)}))
    return jobs


def plan_folder(image_dir, captions_json, split, images_per_shard=1000, seed=0, shuffle=True):
    """A SplitJob of a folder of images and a captions JSON (as ``itr shard images`` reads them)."""
    from itr.shards.images import read_captions_json

    root = Path(image_dir)
    if not captions_json or not split:
        raise DataError(f"{root} is a folder of images: pass --captions CAPTIONS_JSON and --split SPLIT "
                        f"(or give a shard directory of `itr shard images`)")
    if images_per_shard < 1:
        raise ValueError("images_per_shard must be >= 1")
    entries = read_captions_json(captions_json, split)
    order = np.random.default_rng(seed).permutation(len(entries)) if shuffle else np.arange(len(entries))

    def samples(idx):
        for i in idx:
            rel, caps, image_id = entries[i]
            f = root / rel
            if not f.is_file():
                raise DataError(f"image {f} is missing (listed in {captions_json})")
            meta = {"image_index": int(i), "caption_indices": list(range(CAPS_PER_IMAGE * i, CAPS_PER_IMAGE * (i + 1))),
                    "captions": caps, "id": Path(rel).name}
            yield f"{i:09d}", json.dumps(meta, ensure_ascii=False).encode("utf-8"), f.read_bytes(), f"image {f}"

    shards = []
    for k, start in enumerate(range(0, len(entries), images_per_shard)):
        idx = [int(i) for i in order[start:start + images_per_shard]]
        ident = hashlib.sha256(json.dumps([entries[i][0] for i in idx]).encode()).hexdigest()
        shards.append(ShardJob(mf.shard_name(split, k), len(idx), ident, lambda idx=idx: samples(idx)))
    digest = mf.sha256_file(captions_json)
    return SplitJob(split, shards, lambda: [c for _, caps, _ in entries for c in caps],
                    {"shuffled": bool(shuffle), "seed": seed},
                    {"layout": "image-folder", "images": str(root.resolve()),
                     "captions": str(Path(captions_json).resolve()), "captions_sha256": digest,
                     "images_per_shard": images_per_shard})


def plan(source, split=None, captions=None, images_per_shard=1000, seed=0, shuffle=True):
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"image source {source} does not exist (a shard directory or a folder of images)")
    if captions is None and any(source.glob("*.manifest.json")):
        return plan_shards(source, split)
    return [plan_folder(source, captions, split, images_per_shard, seed, shuffle)]


def _record_path(out, split, name):
    return Path(out) / f".extract-{split}" / f"{name}.json"


def _done(out, split, shard, key):
    """The shard was written with these settings from this input, and its file still has the recorded checksum."""
    try:
        rec = json.loads(_record_path(out, split, shard.name).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    f = Path(out) / shard.name
    if rec.get("key") != key or rec.get("source") != shard.source or not f.is_file():
        return False
    return f.stat().st_size == rec.get("bytes") and mf.sha256_file(f) == rec.get("sha256")


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _prepared(shard, pre, workers):
    """(key, json, where, pixels) of a shard's samples in order, or (None, message, ...) at a bad one."""
    from itr.shards.backbone import PreparedImages

    ds = PreparedImages(shard.samples, pre)
    if not workers:
        return iter(ds)
    from torch.utils.data import DataLoader

    # fork: the samples are closures over the plan (nothing to pickle); workers never touch a GPU
    return iter(DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4, multiprocessing_context="fork"))


def _flush(bb, mode, tar, batch):
    """Features of one batch of prepared samples into the tar; returns (feature shape, image size)."""
    import torch

    pixels = torch.stack([px for _, _, _, px in batch]).to(bb.device)
    grid, boxes, pooled = bb.features(pixels)
    if mode == "pooled":
        feats, boxes = pooled[:, None], np.array([[0, 0, 1, 1]], np.float32)
    else:
        feats = grid
    feats = feats.cpu().numpy().astype(np.float16)
    for (key, meta, where, _), f in zip(batch, feats):
        if not np.isfinite(f).all():
            raise DataError(f"{where}: {bb.path} gives features beyond float16's range (|x| > 65504) or NaN")
        _add(tar, f"{key}.feat.npy", npy_bytes(f))
        _add(tar, f"{key}.boxes.npy", npy_bytes(boxes))
        _add(tar, f"{key}.json", meta)
    return list(feats.shape[1:]), list(pixels.shape[-2:])


def _write_shard(bb, mode, out, job, shard, key, batch_size, bar, rank=0, workers=0):
    tmp = out / f".tmp-{shard.name}-{os.getpid()}"
    n, shape, size = 0, None, None
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            batch = []
            for item in _prepared(shard, bb.pre, workers):
                if item[0] is None:
                    raise DataError(item[1])
                batch.append(item)
                if len(batch) == batch_size:
                    shape, size = _flush(bb, mode, tar, batch)
                    n, batch = n + len(batch), []
                    bar.update(batch_size)
            if batch:
                shape, size = _flush(bb, mode, tar, batch)
                n += len(batch)
                bar.update(len(batch))
        if n != shard.num_images:
            raise DataError(f"{shard.name} of split {job.split}: read {n} images, its input lists {shard.num_images}")
        rec = {"name": shard.name, "num_images": n, "num_captions": CAPS_PER_IMAGE * n, "bytes": tmp.stat().st_size,
               "sha256": mf.sha256_file(tmp), "key": key, "source": shard.source, "feature_shape": shape,
               "image_size": size, "rank": rank}
        os.replace(tmp, out / shard.name)
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(_record_path(out, job.split, shard.name), rec)


def _write_manifest(out, job, key, mode, backbone):
    """Rank 0, after every rank's shards: the split's manifest from the records (written last)."""
    recs = []
    for s in job.shards:
        p = _record_path(out, job.split, s.name)
        if not p.is_file():
            raise DataError(f"{out / s.name} of split {job.split} was not written (its record {p} is missing)")
        recs.append(json.loads(p.read_text()))
    shapes = {tuple(r["feature_shape"]) for r in recs}
    if len(shapes) != 1:
        raise DataError(f"{out}: the shards of split {job.split} have different feature shapes {sorted(shapes)}")
    caps = job.captions()
    n = sum(r["num_images"] for r in recs)
    mf.captions_path(out, job.split).write_text("\n".join(caps) + "\n", encoding="utf-8")
    manifest = {
        "format": mf.FORMAT, "split": job.split, "num_images": n, "num_captions": len(caps),
        "captions_per_image": CAPS_PER_IMAGE, "kind": "features", "feature_shape": list(shapes.pop()),
        "dtype": "float16", "boxes": True,
        "source": {"layout": "extract", "mode": mode, "image_size": recs[0]["image_size"], "backbone": backbone,
                   "input": job.input},
        "extract_key": key, "order": job.order, "captions_file": mf.captions_path(out, job.split).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "shards": [{k: r[k] for k in ("name", "num_images", "num_captions", "bytes", "sha256")} for r in recs],
    }
    (out / f".{job.split}.verified.json").unlink(missing_ok=True)
    _write_json(mf.manifest_path(out, job.split), manifest)
    m = mf.load_manifest(out, job.split)
    mf.verify_shards(m)
    return m


def settings_key(job, mode, image_size, backbone):
    body = json.dumps([job.split, mode, image_size, backbone, job.input], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _check_existing(out, job, key, force):
    p = mf.manifest_path(out, job.split)
    if p.is_file() and not force:
        try:
            old = json.loads(p.read_text()).get("extract_key")
        except (OSError, json.JSONDecodeError):
            old = None
        if old != key:
            raise DataError(f"{p} already exists, written from other input or settings; pass --force to rebuild "
                            f"split {job.split!r}")


def _clear(out, job):
    mf.manifest_path(out, job.split).unlink(missing_ok=True)
    for old in Path(out).glob(f"{job.split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    shutil.rmtree(Path(out) / f".extract-{job.split}", ignore_errors=True)


def extract(backbone_dir, source, out_dir, mode="grid", image_size=None, split=None, captions=None, batch_size=32,
            images_per_shard=1000, seed=0, shuffle=True, force=False, progress=True, workers=0, device=None):
    """Feature shards of every split of ``source`` in ``out_dir``; on rank 0 returns {split: manifest}."""
    from itr.distributed import init_job
    from itr.progress import bar as progress_bar
    from itr.shards.backbone import Backbone

    if mode not in ("grid", "pooled"):
        raise ValueError(f"mode must be grid or pooled, got {mode!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    jobs = plan(source, split, captions, images_per_shard, seed, shuffle)  # bad input fails before the model loads
    rank, world, default_device = init_job()
    bb = Backbone(backbone_dir, image_size, device or default_device)
    backbone = bb.identity()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = {j.split: settings_key(j, mode, image_size, backbone) for j in jobs}
    for j in jobs:
        _check_existing(out, j, keys[j.split], force)
    if force and rank == 0:
        for j in jobs:
            _clear(out, j)
    _barrier(world)
    mine = [(j, s) for j in jobs for s in j.shards][rank::world]  # whole shards, dealt round robin
    todo = [(j, s) for j, s in mine if not _done(out, j.split, s, keys[j.split])]
    if rank == 0 and len(todo) < len(mine):
        print(f"[itr] extract: {len(mine) - len(todo)} shard(s) already written and verified, skipped", flush=True)
    bar = progress_bar(total=sum(s.num_images for _, s in todo), desc=f"extract {mode}", unit="img",
                       enabled=progress)
    try:
        for j, s in todo:
            _write_shard(bb, mode, out, j, s, keys[j.split], batch_size, bar, rank, workers)
    finally:
        bar.close()
    _barrier(world)
    manifests = {j.split: _write_manifest(out, j, keys[j.split], mode, backbone) for j in jobs} if rank == 0 else {}
    _barrier(world)
    return manifests


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def add_parser(sub):
    e = sub.add_parser("extract", help="images (itr shard images shards, or a folder + captions JSON) -> feature "
                                       "shards with a local vision backbone (ViT, CLIP, ResNet, ConvNeXt ...)")
    e.add_argument("backbone_dir", help="a local transformers model directory (config.json + weights)")
    e.add_argument("source", help="a shard directory of `itr shard images`, or a folder of images (with --captions)")
    e.add_argument("out_dir")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--grid", dest="mode", action="store_const", const="grid",
                     help="patch tokens / last feature map as regions with their boxes (default)")
    how.add_argument("--pooled", dest="mode", action="store_const", const="pooled", help="one pooled vector")
    e.add_argument("--image-size", type=int, help="input resolution S x S (default: the backbone's own)")
    e.add_argument("--split", help="the split to extract (default: every split of a shard directory)")
    e.add_argument("--captions", help="a folder of images: Karpathy or COCO captions JSON, as `itr shard images`")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--workers", type=int, default=0, help="processes decoding and preparing images per rank (a GPU "
                                                           "wants several; 0: in the main process)")
    e.add_argument("--images-per-shard", type=int, default=1000, help="a folder of images: images per shard")
    e.add_argument("--seed", type=int, default=0, help="a folder of images: seed of the image order")
    e.add_argument("--no-shuffle", action="store_true", help="a folder of images: keep the file's image order")
    e.add_argument("--force", action="store_true", help="rebuild splits already extracted with other settings")
    e.set_defaults(mode="grid")
    return e


def run_cli(a):
    from itr.distributed import finish_job

    ms = extract(a.backbone_dir, a.source, a.out_dir, mode=a.mode, image_size=a.image_size, split=a.split,
                 captions=a.captions, batch_size=a.batch_size, images_per_shard=a.images_per_shard, seed=a.seed,
                 shuffle=not a.no_shuffle, force=a.force, workers=a.workers)
    for split, m in ms.items():
        print(f"{split}: {len(m['shards'])} shard(s), {m['num_images']} images, features {m['feature_shape']} "
              f"{m['dtype']} with boxes -> {a.out_dir}/{split}.manifest.json")
    finish_job()
