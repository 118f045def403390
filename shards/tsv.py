"""Bottom-up-attention TSV features -> WebDataset shards, with a variable number of regions kept.

    itr shard tsv TSV_FILE [TSV_FILE ...] CAPTIONS_JSON SPLIT OUT_DIR [--workers N] [--id-key stem]

A TSV row (``generate_tsv.py``'s ``FIELDNAMES``), tab-separated, no header:
``image_id, image_w, image_h, num_boxes, boxes, features``, the last two base64 float32 arrays
(num_boxes x 4 boxes x1, y1, x2, y2 in pixels; num_boxes x D features); extra columns are ignored.
Rows are never parsed with ``csv`` (whose field size limit a 36 x 2048 row exceeds) and never
loaded whole: a first streaming pass records each row's offset (cached beside the shards, keyed by
the files' size and mtime), then each worker seeks to its images' rows. Boxes are stored divided
by the row's own width and height. When the images of a split have different region counts
(MIN_BOXES 10 .. MAX_BOXES 100 in generate_tsv.py), each sample keeps its own ``feat.npy`` of
(r_i, D) and the manifest says ``variable_regions`` (``feature_shape`` = the largest); the loader
then pads each batch and passes the counts as ``feat_lens``.
"""
import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from itr.data.precomp import DataError
from itr.shards.annotations import read_annotations
from itr.shards.writer import npy_bytes, write_split

_COLS = 6


def _index_one(path, cache_dir, progress):
    """{image_id: (offset, length, num_boxes, dim)} of one TSV file, one streaming pass (cached)."""
    st = Path(path).stat()
    tag = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f".tsv-index-{tag}.json"
    if cache.is_file():
        try:
            return {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
        except (OSError, json.JSONDecodeError):
            pass
    index, offset = {}, 0
    bar = None
    if progress:
        from itr.progress import bar as progress_bar

        bar = progress_bar(total=st.st_size, desc=f"index {Path(path).name}", unit="B", unit_scale=True)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            head = line.split(b"\t", _COLS)
            if len(head) < _COLS or not line.endswith(b"\n") and len(head[5].strip()) % 4:
                raise DataError(f"{path}: line {lineno} has {len(head)} tab-separated fields or is cut short; "
                                f"expected image_id, image_w, image_h, num_boxes, boxes, features")
            try:
                key, nb = head[0].decode().strip(), int(head[3])
            except (UnicodeDecodeError, ValueError):
                raise DataError(f"{path}: line {lineno}: image_id {head[0][:40]!r} / num_boxes {head[3][:20]!r} "
                                f"are not an id and an integer") from None
            if nb < 1:
                raise DataError(f"{path}: line {lineno}: image_id {key} has num_boxes {nb}; every image needs at "
                                f"least one region (the region models attend over them)")
            if key in index:
                raise DataError(f"{path}: image_id {key} appears twice (lines {index[key][4]} and {lineno})")
            b64 = len(head[5].rstrip(b"\r\n"))
            dim = (b64 // 4 * 3 - head[5].rstrip(b"\r\n")[-2:].count(b"=")) // 4 // max(nb, 1)
            index[key] = (offset, len(line), nb, dim, lineno)
            offset += len(line)
            if bar:
                bar.update(len(line))
    if bar:
        bar.close()
    try:
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, cache)
    except OSError:
        pass
    return index


def index_tsv(paths, cache_dir, progress=True):
    """{image_id: (file number, offset, length, num_boxes, dim, line)} over every file (an id in two: an error)."""
    out = {}
    for fi, p in enumerate(paths):
        if not Path(p).is_file():
            raise DataError(f"TSV file {p} does not exist")
        for key, row in _index_one(p, cache_dir, progress).items():
            if key in out:
                raise DataError(f"image_id {key} is in both {paths[out[key][0]]} and {p}")
            out[key] = (fi, *row)
    return out


def _array(field, shape, what):
    try:
        raw = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{what}: not base64 ({e})") from None
    if len(raw) != 4 * int(np.prod(shape)):
        raise DataError(f"{what}: {len(raw)} bytes, expected {shape} float32 ({4 * int(np.prod(shape))} bytes)")
    return np.frombuffer(raw, dtype=np.float32).reshape(shape)


class TsvRows:
    """``members`` of a TSV split (picklable for ``--workers``): seeks to image ``i``'s row and decodes it."""

    def __init__(self, paths, rows, dim, dtype):
        self.paths, self.rows, self.dim, self.dtype = [str(p) for p in paths], rows, dim, dtype
        self._files = {}

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}

    def __call__(self, i):
        fi, offset, length, nb, _, lineno = self.rows[i]
        f = self._files.get(fi) or self._files.setdefault(fi, open(self.paths[fi], "rb"))
        f.seek(offset)
        line = f.read(length)
        where = f"{self.paths[fi]} line {lineno}"
        cols = line.rstrip(b"\r\n").split(b"\t")
        if len(cols) < _COLS:
            raise DataError(f"{where}: {len(cols)} fields (the file changed since it was indexed?)")
        w, h = float(cols[1]), float(cols[2])
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: image size {w} x {h}")
        boxes = _array(cols[4], (nb, 4), f"{where} boxes")
        feat = _array(cols[5], (nb, self.dim), f"{where} features").astype(self.dtype)
        if not np.isfinite(feat).all():
            raise DataError(f"{where}: non-finite features" + (" after the cast to float16" if self.dtype == "float16"
                                                                 else ""))
        norm = (boxes / np.array([w, h, w, h], dtype=np.float32)).astype(np.float32)
        return {"feat.npy": npy_bytes(feat), "boxes.npy": npy_bytes(norm)}


def shard_tsv(tsv_files, captions_json, split, out_dir, dtype="float16", images_per_shard=1000, seed=0, shuffle=True,
              force=False, progress=True, workers=1, id_key="auto", ann_ids=None):
    """Write the shards of ``split`` from the TSV rows of its images; return the manifest."""
    entries = read_annotations(captions_json, split, id_key, default_key="stem", ann_ids=ann_ids)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [str(Path(p)) for p in tsv_files]
    index = index_tsv(paths, out_dir, progress)
    missing = [e.key for e in entries if e.key not in index]
    if missing:
        raise DataError(f"{len(missing)} of {len(entries)} images of split {split!r} are in no TSV file (first: "
                        f"{missing[0]}; the TSVs hold {len(index)} ids, e.g. {next(iter(index), 'none')}); ids come "
                        f"from {captions_json} (--id-key)")
    rows = [index[e.key] for e in entries]
    counts = np.array([r[3] for r in rows])
    dims = {r[4] for r in rows}
    if len(dims) != 1 or counts.min() < 1:
        bad = next(e.key for e, r in zip(entries, rows) if r[3] < 1 or r[4] != rows[0][4])
        raise DataError(f"image {bad}: {index[bad][3]} boxes of dimension {index[bad][4]}; the split has dimensions "
                        f"{sorted(dims)} (every row needs >= 1 box and one feature dimension)")
    variable = bool(counts.min() != counts.max())
    info = {"kind": "features", "feature_shape": [int(counts.max()), dims.pop()], "dtype": dtype, "boxes": True,
            "source": {"layout": "bottom-up-tsv", "files": [{"name": p, "bytes": Path(p).stat().st_size}
                                                            for p in paths],
                       "captions": str(Path(captions_json).resolve()), "split": split}}
    if variable:
        info["variable_regions"] = True
        info["regions"] = {"min": int(counts.min()), "max": int(counts.max()), "mean": round(float(counts.mean()), 2)}
    return write_split(out_dir, split, len(entries), TsvRows(paths, rows, info["feature_shape"][1], dtype),
                       [c for e in entries for c in e.captions], [e.key for e in entries], info,
                       images_per_shard=images_per_shard, seed=seed, shuffle=shuffle, force=force, progress=progress,
                       workers=workers)
