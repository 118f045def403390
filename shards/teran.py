"""TERAN / TGDT per-image features -> WebDataset shards.

    itr shard teran FEATURES_DIR CAPTIONS_JSON SPLIT OUT_DIR [--sizes S.json | --image-dir DIR] [--workers N]

``FEATURES_DIR`` holds ``bu_att/{id}.npz`` (key ``feat``, R x D, 36 x 2048 in TERAN's release) and
``bu_box/{id}.npy`` (R x 4 boxes x1, y1, x2, y2 in pixels); ``features_36/`` itself or its parent.
Boxes are stored divided by ``np.tile([width, height], 2)`` as TERAN's ``data.py`` does, so the
image sizes come from COCO's captions file, a sizes JSON, or the images' headers (TERAN caches
them in a pickle, which itr does not read). Captions and ids: ``itr.shards.annotations`` (TERAN's
Flickr30k files are named by the image's position in Karpathy's list: ``--id-key index``, the
default for Karpathy files without ``cocoid``). Every file is opened per image, in the worker.
"""
import zipfile
from pathlib import Path

import numpy as np

from itr.data.precomp import DataError
from itr.shards.annotations import fill_sizes, read_annotations, sizes_digest
from itr.shards.writer import npy_bytes, write_split


def features_root(d):
    d = Path(d)
    for root in (d, d / "features_36"):
        if (root / "bu_att").is_dir():
            return root
    raise DataError(f"{d}: no bu_att/ folder (TERAN's features_36/bu_att/{{id}}.npz and bu_box/{{id}}.npy)")


def _load(path, what):
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "feat" not in z.files:
                    raise DataError(f"{path}: no key 'feat' (keys: {', '.join(z.files)})")
                return z["feat"]
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{what} {path} is missing") from None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{what} {path} is unreadable ({type(e).__name__}: {e})") from None


class TeranFiles:
    """``members`` of a TERAN split (picklable for ``--workers``): image ``i``'s features and normalized boxes."""

    def __init__(self, root, keys, sizes, shape, dtype):
        self.root, self.keys, self.sizes, self.shape, self.dtype = str(root), keys, sizes, tuple(shape), dtype

    def read(self, i):
        root, key = Path(self.root), self.keys[i]
        feat = _load(root / "bu_att" / f"{key}.npz", "features")
        boxes = _load(root / "bu_box" / f"{key}.npy", "boxes")
        return feat, boxes

    def __call__(self, i):
        feat, boxes = self.read(i)
        where = Path(self.root) / "bu_att" / f"{self.keys[i]}.npz"
        if feat.shape != self.shape or not np.issubdtype(feat.dtype, np.floating):
            raise DataError(f"{where}: features {feat.shape} {feat.dtype}, expected {self.shape} float (as the first "
                            f"image of the split)")
        if boxes.shape != (self.shape[0], 4):
            raise DataError(f"{Path(self.root) / 'bu_box' / (self.keys[i] + '.npy')}: boxes {boxes.shape}, expected "
                            f"{(self.shape[0], 4)}")
        feat = feat.astype(self.dtype)
        if not np.isfinite(feat).all():
            raise DataError(f"{where}: non-finite features" + (" after the cast to float16" if self.dtype == "float16"
                                                                 else ""))
        w, h = self.sizes[i]
        norm = (boxes / np.tile(np.array([w, h], dtype=np.float64), 2)).astype(np.float32)
        return {"feat.npy": npy_bytes(feat), "boxes.npy": npy_bytes(norm)}


def shard_teran(features_dir, captions_json, split, out_dir, dtype="float16", images_per_shard=1000, seed=0,
                shuffle=True, force=False, progress=True, workers=1, id_key="auto", sizes=None, image_dir=None,
                ann_ids=None):
    """Write the shards of ``split``; return the manifest."""
    root = features_root(features_dir)
    entries = read_annotations(captions_json, split, id_key, default_key="index", ann_ids=ann_ids)
    missing = [e.key for e in entries if not (root / "bu_att" / f"{e.key}.npz").is_file()]
    if missing:  # the commonest mistake (another id scheme): fail before writing anything
        raise DataError(f"{len(missing)} of {len(entries)} images of split {split!r} have no {root}/bu_att/ID.npz "
                        f"(first: {missing[0]}.npz); the ids come from {captions_json} (--id-key)")
    fill_sizes(entries, captions_json, sizes, image_dir)
    keys = [e.key for e in entries]
    first, _ = TeranFiles(root, keys, [e.size for e in entries], (), dtype).read(0)
    if first.ndim != 2:
        raise DataError(f"{root}/bu_att/{keys[0]}.npz: features {first.shape}, expected (regions, dim)")
    files = TeranFiles(root, keys, [e.size for e in entries], first.shape, dtype)
    info = {"kind": "features", "feature_shape": list(first.shape), "dtype": dtype, "boxes": True,
            "source": {"layout": "teran", "dir": str(root.resolve()), "captions": str(Path(captions_json).resolve()),
                       "split": split, "ann_ids": str(ann_ids) if ann_ids else None,
                       "sizes_sha256": sizes_digest(e.size for e in entries)}}
    return write_split(out_dir, split, len(entries), files, [c for e in entries for c in e.captions], keys, info,
                       images_per_shard=images_per_shard, seed=seed, shuffle=shuffle, force=force, progress=progress,
                       workers=workers)
