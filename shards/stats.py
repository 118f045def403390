"""``itr shard stats``: what a shard directory holds, per split: counts and sizes, caption lengths (words),
feature norms (L2 of each region, and of the mean over an image's regions) and region counts per image.
Reads every sample once (or the first ``max_images`` of each split)."""
import json
from pathlib import Path

import numpy as np

from itr.data.manifest import load_manifest
from itr.data.npy import load_npy
from itr.data.precomp import read_captions
from itr.shards.verify import samples, splits_of


def _dist(x):
    x = np.asarray(x, dtype=np.float64)
    if not x.size:
        return {}
    q = np.percentile(x, [5, 50, 95])
    return {"min": float(x.min()), "p5": float(q[0]), "median": float(q[1]), "mean": float(x.mean()),
            "p95": float(q[2]), "max": float(x.max())}


def split_stats(root, split, max_images=None, progress=True):
    m = load_manifest(root, split)
    caps = read_captions(Path(root) / m.get("captions_file", f"{split}.captions.txt"))
    out = {"split": split, "images": m["num_images"], "captions": m["num_captions"], "shards": len(m["shards"]),
           "bytes": sum(s["bytes"] for s in m["shards"]), "kind": m.get("kind", "features"),
           "feature_shape": m["feature_shape"], "dtype": m["dtype"], "boxes": bool(m.get("boxes")),
           "variable_regions": bool(m.get("variable_regions")),
           "caption_words": _dist([len(c.split()) for c in caps])}
    if out["kind"] == "images":
        return out
    region_norms, image_norms, regions, n = [], [], [], 0
    it = samples(m, lambda msg: None)
    if progress:
        from itr.progress import bar

        it = bar(it, total=min(m["num_images"], max_images or m["num_images"]), desc=f"stats {split}", unit="img")
    for path, sample in it:
        where = f"shard {path}: sample {sample.get('__key__')}: feat.npy"
        feat = load_npy(sample["feat.npy"], where).astype(np.float32)
        region_norms.append(np.linalg.norm(feat, axis=-1))
        image_norms.append(float(np.linalg.norm(feat.mean(0))))
        regions.append(feat.shape[0])
        n += 1
        if max_images and n >= max_images:
            break
    out.update(images_read=n, region_norm=_dist(np.concatenate(region_norms) if region_norms else []),
               image_mean_norm=_dist(image_norms), regions=_dist(regions),
               zero_regions=int(sum((r == 0).sum() for r in region_norms)))
    return out


def _fmt(d):
    return "  ".join(f"{k} {v:.4g}" for k, v in d.items()) if d else "-"


def report(stats):
    """Human-readable lines of ``split_stats`` results."""
    lines = []
    for s in stats:
        lines.append(f"{s['split']}: {s['images']} images, {s['captions']} captions, {s['shards']} shard(s), "
                     f"{s['bytes'] / 2**20:.1f} MiB; {s['kind']} {s['feature_shape']} {s['dtype']}"
                     + (", boxes" if s["boxes"] else "") + (", variable regions" if s["variable_regions"] else ""))
        lines.append(f"  caption words:   {_fmt(s['caption_words'])}")
        if "regions" in s:
            lines.append(f"  regions/image:   {_fmt(s['regions'])}   (read {s['images_read']} images)")
            lines.append(f"  region L2 norm:  {_fmt(s['region_norm'])}   ({s['zero_regions']} all-zero regions)")
            lines.append(f"  image mean norm: {_fmt(s['image_mean_norm'])}")
    return lines


def shard_stats(root, split=None, max_images=None, progress=True, json_out=None):
    stats = [split_stats(root, s, max_images, progress) for s in splits_of(root, split)]
    if json_out:
        Path(json_out).write_text(json.dumps(stats, indent=1))
    return stats
