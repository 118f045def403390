"""SCAN precomp split(s) -> WebDataset tar shards + manifest.

    itr shard precomp DATA_DIR SPLIT[,SPLIT...|all] OUT_DIR [--dtype float16] [--images-per-shard 1000] [--workers N]

One sample per image: ``feat.npy`` (R x D, float16 by default), ``boxes.npy`` when the split
has ``{split}_boxes.npy``, and ``json`` (image index, caption indices, captions, id). ``all`` takes
every split with a ``{split}_caps.txt`` (train, dev, test, COCO's 5K ``testall``, ...). A file
with one row per caption (each image's row repeated 5 times, SCAN's ``im_div`` rule) is read
every fifth row. Features are read through a memory map, a shard's rows at a time.
"""
from pathlib import Path

import numpy as np

from itr.data.precomp import DataError, open_precomp
from itr.shards.writer import npy_bytes, write_split


_MAPS = {}  # (file, rows per image) -> memory map, once per process (a worker gets a fresh PrecompRows per shard)


def _rows(path, step):
    key = (str(path), step)
    if key not in _MAPS:
        a = np.load(path, mmap_mode="r")
        _MAPS[key] = (a[:, None, :] if a.ndim == 2 else a)[::step]
    return _MAPS[key]


class PrecompRows:
    """``members`` of a precomp split: picklable (for ``--workers``), the memory maps opened in each process
    (checked by ``open_precomp`` in the main one)."""

    def __init__(self, src, dtype):
        self.ims, self.dtype, self.step = str(src.files["ims"]), dtype, src.rows_per_image
        self.boxes = str(src.files["boxes"]) if src.boxes is not None else None
        self.box_step = np.load(self.boxes, mmap_mode="r").shape[0] // src.num_images if self.boxes else 1

    def __call__(self, i):
        feat = np.asarray(_rows(self.ims, self.step)[i], dtype=self.dtype)
        if not np.isfinite(feat).all():
            raise DataError(f"{self.ims}: image {i} has non-finite features"
                            + (" after the cast to float16 (values beyond 65504?)" if self.dtype == "float16" else ""))
        out = {"feat.npy": npy_bytes(feat)}
        if self.boxes:
            out["boxes.npy"] = npy_bytes(np.asarray(_rows(self.boxes, self.box_step)[i], dtype=np.float32))
        return out


def precomp_splits(data_dir, spec):
    """The split names of ``spec``: one name, a comma-separated list, or ``all`` (every ``*_caps.txt``)."""
    if spec != "all":
        return [s for s in spec.split(",") if s]
    found = sorted(p.name[:-len("_caps.txt")] for p in Path(data_dir).glob("*_caps.txt"))
    if not found:
        raise DataError(f"{data_dir}: no {{split}}_caps.txt files, so no splits for 'all'")
    return found


def shard_precomp(data_dir, split, out_dir, dtype="float16", images_per_shard=1000, seed=0,
                  shuffle=True, force=False, progress=True, workers=1):
    """Write ``OUT_DIR/{split}-NNNNNN.tar`` and ``OUT_DIR/{split}.manifest.json``; return the manifest."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    src = open_precomp(data_dir, split)  # validates files, shapes and the caption count
    info = {
        "kind": "features",
        "feature_shape": list(src.images.shape[1:]),
        "dtype": dtype,
        "boxes": src.boxes is not None,
        "source": {
            "layout": "precomp",
            "dir": str(Path(data_dir).resolve()),
            "files": {role: {"name": p.name, "bytes": p.stat().st_size} for role, p in src.files.items()},
            "dtype": str(src.images.dtype),
            "rows_per_image": src.rows_per_image,
        },
    }
    return write_split(out_dir, split, src.num_images, PrecompRows(src, dtype), src.captions, src.ids,
                       info, images_per_shard=images_per_shard, seed=seed, shuffle=shuffle, force=force,
                       progress=progress, workers=workers)


def shard_precomp_splits(data_dir, spec, out_dir, **kw):
    """Every split of ``spec`` (see ``precomp_splits``), each checked before any is written; their manifests."""
    splits = precomp_splits(data_dir, spec)
    for s in splits:
        open_precomp(data_dir, s)  # a bad split fails before the others are written
    return [shard_precomp(data_dir, s, out_dir, **kw) for s in splits]
