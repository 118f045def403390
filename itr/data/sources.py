"""Where a recipe's data comes from: a precomp directory (sharded on first use) or a shard directory."""
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from itr.data import manifest as mf
from itr.data.precomp import (CAPS_PER_IMAGE, DataError, PrecompSplit, is_precomp, open_precomp, read_captions,
                              split_hint)
from itr.data.remote import fetch, is_remote, url_of


def cache_root() -> Path:
    return Path(os.environ.get("ITR_CACHE", Path.home() / ".cache" / "itr"))


def data_kind(root, split):
    if is_remote(root):
        fetch_meta(root, split, captions=False)  # a DataError naming the URL when the split is not there
        return "shards"
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if mf.is_shard_dir(root, split):
        return "shards"
    if is_precomp(root, split):
        return "precomp"
    raise DataError(
        f"{root} has neither {split}.manifest.json (a shard directory) nor {split}_ims.npy / {split}_caps.txt "
        f"(a precomp directory) for split {split!r}{split_hint(root, split)}"
    )


def shard_cache_dir(root, dtype, images_per_shard):
    """A cache directory keyed by the source files' identity and the sharding options."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    h.update(f"{root}|{dtype}|{images_per_shard}|{mf.FORMAT}".encode())
    for p in sorted(root.glob("*_ims.npy")) + sorted(root.glob("*_caps.txt")):
        st = p.stat()
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "shards" / f"{root.name}-{h.hexdigest()[:12]}"


def ensure_shards(data_cfg, split, is_main=True, barrier=lambda: None, progress=True):
    """Return the manifest of ``split``, sharding a precomp directory on first use (main process only)."""
    from itr.config import resolve_path

    if not data_cfg.root:
        raise DataError("data.root is not set (a precomp or shard directory)")
    root = resolve_path(data_cfg.root)
    kind = data_kind(root, split)
    if kind == "shards":
        out = root
    else:
        out = resolve_path(data_cfg.shard_dir) if data_cfg.shard_dir else shard_cache_dir(root, data_cfg.dtype, data_cfg.images_per_shard)
        if is_main and not mf.is_shard_dir(out, split):
            with sharding_lock(out):  # another job (a sweep's sibling) may be sharding the same source now
                if not mf.is_shard_dir(out, split):
                    from itr.shards.precomp import shard_precomp

                    print(f"[itr] sharding {root} split {split!r} -> {out}", flush=True)
                    shard_precomp(root, split, out, dtype=data_cfg.dtype, images_per_shard=data_cfg.images_per_shard,
                                  force=True, progress=progress)
        barrier()
    m = open_manifest(out, split)
    if is_main:
        skip = getattr(data_cfg, "on_error", "error") == "skip"
        note = (lambda msg: print(f"[itr] data.on_error=skip: {msg}; its unreadable samples will be skipped",
                                  flush=True)) if skip else None
        mf.verify_shards(m, data_cfg.verify, progress=progress, on_bad=note)
    barrier()
    return m


@contextlib.contextmanager
def sharding_lock(out):
    """An exclusive lock on the cache folder ``out`` across processes (flock): jobs started together on one
    source shard it once; the others wait, then find it done."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sharding.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_manifest(root, split):
    """A split's manifest, from a shard directory or fetched from a remote root (itr/data/remote.py)."""
    if not is_remote(root):
        return mf.load_manifest(root, split)
    m = mf.load_manifest(fetch_meta(root, split), split)
    m["remote"] = root
    return m


def fetch_meta(root, split, captions=True):
    """A remote split's manifest (and captions sidecar) into a local cache folder; that folder."""
    out = cache_root() / "remote" / hashlib.sha256(f"{root}|{split}".encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    name = mf.manifest_path("", split).name
    fetch(url_of(root, name), out / name)
    if captions:
        try:
            caps = json.loads((out / name).read_text()).get("captions_file") or mf.captions_path("", split).name
        except (ValueError, AttributeError):
            caps = None  # load_manifest says what is wrong with it
        if caps:
            fetch(url_of(root, mf.safe_name(caps, "captions_file", url_of(root, name))), out / caps)
    return out


def split_captions(manifest):
    """All captions of a sharded split, in caption-index order (from the text sidecar)."""
    p = Path(manifest["root"]) / manifest.get("captions_file", mf.captions_path("", manifest["split"]).name)
    caps = read_captions(p)
    if len(caps) != manifest["num_captions"]:
        raise DataError(f"{p}: {len(caps)} captions, manifest says {manifest['num_captions']}")
    return caps


def read_shard_split(root, split, verify="checksum", image_size=224) -> PrecompSplit:
    """Load a whole sharded split into memory, ordered by image index (for evaluation).
    Image shards are decoded with the evaluation transform (resize, center crop)."""
    import webdataset as wds

    m = open_manifest(root, split)
    mf.verify_shards(m, verify)
    n = m["num_images"]
    pixels = m.get("kind") == "images"
    if pixels:
        from itr.data.images import decode, eval_transform

        feats = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    else:
        feats = np.zeros((n, *m["feature_shape"]), dtype=m["dtype"])
    boxes = np.zeros((n, m["feature_shape"][0], 4), dtype=np.float32) if m.get("boxes") else None
    lens = np.zeros(n, dtype=np.int64) if m.get("variable_regions") else None  # zero padded past each image's count
    caps = [None] * m["num_captions"]
    ids = [None] * n
    seen = np.zeros(n, dtype=bool)
    for path in mf.shard_paths(m):
        try:
            for sample in wds.tarfile_samples([{"url": path}]):
                meta = json.loads(sample["json"])
                i = meta["image_index"]
                if pixels:
                    feats[i] = eval_transform(decode(sample.get("jpg") or sample["png"]), image_size)
                else:
                    f = np.load(io.BytesIO(sample["feat.npy"]), allow_pickle=False)
                    if lens is None and f.shape != feats.shape[1:]:
                        raise DataError(f"sample {sample['__key__']}: features {f.shape}, manifest says {feats.shape[1:]}")
                    feats[i, :len(f)] = f
                    if lens is not None:
                        lens[i] = len(f)
                if boxes is not None:
                    b = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False)
                    boxes[i, :len(b)] = b
                for c, t in zip(meta["caption_indices"], meta["captions"]):
                    caps[c] = t
                ids[i] = meta.get("id")
                seen[i] = True
        except Exception as e:
            raise DataError(f"shard {path} is unreadable ({type(e).__name__}: {e})") from e
    if not seen.all():
        raise DataError(f"{m['path']}: {int((~seen).sum())} of {n} images missing from the shards")
    if any(c is None for c in caps):
        raise DataError(f"{m['path']}: some captions are missing from the shards")
    if len(caps) != CAPS_PER_IMAGE * n:
        raise DataError(f"{m['path']}: {len(caps)} captions for {n} images; expected {CAPS_PER_IMAGE} per image")
    if not pixels:
        check_finite(feats, m["path"])
    return PrecompSplit(images=feats, captions=caps, ids=ids, files={"manifest": Path(m["path"])}, boxes=boxes,
                        image_key="pixels" if pixels else "feats", lens=lens)


def check_finite(feats, where, chunk=1024):
    """NaN or inf features fail here, naming the file and the first bad image, not as a traceback after training."""
    for lo in range(0, len(feats), chunk):
        ok = np.isfinite(feats[lo:lo + chunk]).reshape(min(chunk, len(feats) - lo), -1).all(1)
        if not ok.all():
            bad = lo + int(np.argmin(ok))
            raise DataError(f"{where}: row {bad} has non-finite (NaN or inf) values")


def load_split(root, split, image_size=224, verify="checksum") -> PrecompSplit:
    """An evaluation split from a precomp directory or a shard directory (shards checked against their manifest:
    ``verify`` as ``data.verify``), its features checked finite."""
    if data_kind(root, split) == "shards":
        return read_shard_split(root, split, verify=verify, image_size=image_size)
    root = Path(root)
    out = open_precomp(root, split)
    check_finite(out.images, out.files["ims"])
    return out


def data_root(recipe):
    """Evaluation splits come from the recipe's data.root (precomp or shards)."""
    from itr.schema import resolve_path

    return resolve_path(recipe.data.root)


def check_split(recipe, split):
    """Open and check a split before training (counts, checksums, finite features), if the data has one."""
    try:
        data_kind(data_root(recipe), split)
    except DataError:
        return
    load_split(data_root(recipe), split, recipe.data.image_size, verify=recipe.data.verify)
