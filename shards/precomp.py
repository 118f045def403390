"""SCAN precomp split -> WebDataset tar shards + manifest.

    itr shard precomp DATA_DIR SPLIT OUT_DIR [--dtype float16] [--images-per-shard 1000]

One sample per image: ``feat.npy`` (R x D, float16 by default), ``boxes.npy`` when the split
has ``{split}_boxes.npy``, and ``json`` (image index, caption indices, captions, id).
"""
from pathlib import Path

import numpy as np

from itr.data.precomp import DataError, open_precomp
from itr.shards.writer import npy_bytes, write_split


def shard_precomp(data_dir, split, out_dir, dtype="float16", images_per_shard=1000, seed=0,
                  shuffle=True, force=False, progress=True):
    """Write ``OUT_DIR/{split}-NNNNNN.tar`` and ``OUT_DIR/{split}.manifest.json``; return the manifest."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    src = open_precomp(data_dir, split)  # validates files, shapes and the caption count

    def members(i):
        feat = np.asarray(src.images[i], dtype=dtype)
        if not np.isfinite(feat).all():
            raise DataError(f"{src.files['ims']}: image {i} has non-finite features"
                            + (" after the cast to float16 (values beyond 65504?)" if dtype == "float16" else ""))
        out = {"feat.npy": npy_bytes(feat)}
        if src.boxes is not None:
            out["boxes.npy"] = npy_bytes(np.asarray(src.boxes[i], dtype=np.float32))
        return out

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
        },
    }
    return write_split(out_dir, split, src.num_images, members, src.captions, src.ids, info,
                       images_per_shard=images_per_shard, seed=seed, shuffle=shuffle, force=force,
                       progress=progress)
