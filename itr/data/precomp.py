"""The SCAN "precomp" layout: ``{split}_ims.npy`` + ``{split}_caps.txt`` (+ ``{split}_ids.txt``,
+ ``{split}_boxes.npy``: region boxes normalized to [0, 1], for models that use positions).

Caption ``j`` belongs to image ``j // 5`` (SCAN, VSE-infinity, HREM, DIME all use this rule).
Some releases repeat each image's row once per caption (``{split}_ims.npy`` has 5N rows, SCAN's
``im_div`` rule: one row per caption when the row count equals the caption count); rows ``5i`` are
then the images (a strided view of the memory map, nothing is loaded).
Checks happen here, at open time, so a bad split fails in seconds, not after an epoch.
Captions are read as text (UTF-8): reading them as bytes is the Python-3 port bug that
cost VSRN half its R@1 (VSRN#15).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

CAPS_PER_IMAGE = 5


from itr.errors import DataError, did_you_mean  # noqa: F401  (re-exported)


@dataclass
class PrecompSplit:
    images: np.ndarray  # (N, R, D) features, memory-mapped where possible; or (N, 3, S, S) uint8 pixels
    captions: List[str]  # 5N, caption j of image j // 5
    ids: Optional[List[str]]
    files: dict  # role -> Path
    boxes: Optional[np.ndarray] = None  # (N, R, 4) region boxes x1, y1, x2, y2 in [0, 1] of the image size
    image_key: str = "feats"  # "feats" (features) or "pixels" (raw images)
    lens: Optional[np.ndarray] = None  # (N,) region counts when images have a variable number (zero padded)
    rows_per_image: int = 1  # 5: the source repeats each image's row per caption (SCAN's im_div rule)

    @property
    def num_images(self):
        return self.images.shape[0]

    def image_inputs(self, lo, hi):
        """The image side of a model's batch for images [lo, hi), as tensors."""
        import torch

        if self.image_key == "pixels":
            out = {"pixels": torch.from_numpy(np.array(self.images[lo:hi]))}
        else:
            out = {"feats": torch.from_numpy(np.array(self.images[lo:hi], dtype=np.float32))}
        if self.boxes is not None:
            out["boxes"] = torch.from_numpy(np.array(self.boxes[lo:hi], dtype=np.float32))
        if self.lens is not None:
            out["feat_lens"] = torch.from_numpy(np.array(self.lens[lo:hi], dtype=np.int64))
        return out


def split_files(root, split):
    root = Path(root)
    return {
        "ims": root / f"{split}_ims.npy",
        "caps": root / f"{split}_caps.txt",
        "ids": root / f"{split}_ids.txt",
        "boxes": root / f"{split}_boxes.npy",
    }


def splits_in(root):
    """The split names a data directory holds, precomp (``{split}_ims.npy``, ``{split}_caps.txt``) or sharded
    (``{split}.manifest.json``)."""
    names = set()
    for suffix in ("_ims.npy", "_caps.txt", ".manifest.json"):
        names |= {p.name[:-len(suffix)] for p in Path(root).glob("*" + suffix)}
    return sorted(names)


def split_hint(root, split, have=None):
    """What to say after "split X is missing": the closest split present, and all of them."""
    have = splits_in(root) if have is None else have
    return f"{did_you_mean(split, have)}; splits there: {', '.join(have) or 'none'}"


def is_precomp(root, split):
    f = split_files(root, split)
    return f["ims"].is_file() or f["caps"].is_file()


def read_captions(path: Path) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.splitlines()
    caps = [line.strip() for line in lines]
    empty = [i for i, c in enumerate(caps) if not c]
    if empty:
        raise DataError(f"{path}: empty caption on line {empty[0] + 1} ({len(empty)} empty lines)")
    return caps


def open_precomp(root, split, mmap=True) -> PrecompSplit:
    root = Path(root)
    f = split_files(root, split)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    for role in ("ims", "caps"):
        if not f[role].is_file():
            have = sorted(p.name[:-len("_ims.npy")] for p in root.glob("*_ims.npy"))
            raise DataError(f"{f[role]} is missing (split {split!r} in {root}{did_you_mean(split, have)}; "
                            f"splits with features there: {', '.join(have) or 'none'})")
    try:
        ims = np.load(f["ims"], mmap_mode="r" if mmap else None)
    except Exception as e:  # numpy raises several types for corrupt files
        raise DataError(f"{f['ims']}: cannot read as .npy ({e})") from None
    if ims.ndim == 2:  # pooled features: one "region" per image
        ims = ims[:, None, :]
    if ims.ndim != 3:
        raise DataError(f"{f['ims']}: expected shape (N, R, D) or (N, D), got {ims.shape}")
    if not np.issubdtype(ims.dtype, np.floating):
        raise DataError(f"{f['ims']}: expected float features, got dtype {ims.dtype}")
    caps = read_captions(f["caps"])
    n, rows = ims.shape[0], 1
    if n == len(caps) and n % CAPS_PER_IMAGE == 0 and n:  # one row per caption: every image's row repeated
        rows, n = CAPS_PER_IMAGE, n // CAPS_PER_IMAGE
        if not all(np.array_equal(ims[0], ims[r]) for r in range(1, CAPS_PER_IMAGE)):
            raise DataError(f"{f['ims']}: {len(caps)} rows for {len(caps)} captions, but rows 0-4 (image 0) differ: "
                            f"expected each image's row repeated per caption, or {n} rows (one per image)")
        ims = ims[::CAPS_PER_IMAGE]
    if len(caps) != CAPS_PER_IMAGE * n:
        raise DataError(
            f"{f['caps']}: {len(caps)} captions for {n} images in {f['ims'].name}; "
            f"expected {CAPS_PER_IMAGE} per image ({CAPS_PER_IMAGE * n}), caption j belonging to image j // 5"
        )
    ids = None
    if f["ids"].is_file():
        ids = [line.strip() for line in f["ids"].read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows > 1 and len(ids) == rows * n:
            ids = ids[::rows]
        if len(ids) != n:
            raise DataError(f"{f['ids']}: {len(ids)} ids for {n} images in {f['ims'].name}")
    boxes = None
    if f["boxes"].is_file():
        try:
            boxes = np.load(f["boxes"], mmap_mode="r" if mmap else None)
        except Exception as e:
            raise DataError(f"{f['boxes']}: cannot read as .npy ({e})") from None
        if rows > 1 and boxes.ndim == 3 and boxes.shape[0] == rows * n:
            boxes = boxes[::rows]
        if boxes.shape != (n, ims.shape[1], 4):
            raise DataError(f"{f['boxes']}: shape {boxes.shape}, expected {(n, ims.shape[1], 4)} "
                            f"(one x1, y1, x2, y2 box in [0, 1] per region of {f['ims'].name})")
    return PrecompSplit(images=ims, captions=caps, ids=ids, files={k: v for k, v in f.items() if v.is_file()},
                        boxes=boxes, rows_per_image=rows)
