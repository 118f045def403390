"""Shard directories: ``{split}-000000.tar`` ... plus ``{split}.manifest.json``.

One WebDataset sample per image: ``feat.npy`` (R x D features), optionally ``boxes.npy``
(R x 4, normalized), and ``json`` (``image_index``, ``caption_indices``, ``captions``, ``id``). The manifest is
written last, so its presence means the split is complete. It records counts,
feature shape and dtype, and each shard's size and sha256 so that a truncated or
corrupted shard is caught before training starts, naming the file.
"""
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

from itr.data.precomp import DataError, split_hint

FORMAT = "itr-shards/1"


def manifest_path(root, split):
    return Path(root) / f"{split}.manifest.json"


def captions_path(root, split):
    return Path(root) / f"{split}.captions.txt"


def shard_name(split, i):
    return f"{split}-{i:06d}.tar"


def is_shard_dir(root, split):
    return manifest_path(root, split).is_file()


def sha256_file(path, bufsize=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_digest(path):
    return sha256_file(path)


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def safe_name(value, what, where):
    """A file or split name read from a file: one plain path component, never joined into a path blindly."""
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or ".." in value:
        raise DataError(f"{where}: {what} {value!r} is not a plain file name (letters, digits, _ . + -)")
    return value


def load_manifest(root, split):
    p = manifest_path(root, split)
    if not p.is_file():
        have = sorted(q.name[:-len(".manifest.json")] for q in Path(root).glob("*.manifest.json"))
        raise DataError(f"{p} is missing: not a shard directory for split {split!r} (build one with `itr shard "
                        f"precomp`){split_hint(root, split, have)}")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{p}: unknown format {m.get('format')!r}, expected {FORMAT!r}")
    for key in ("num_images", "num_captions", "feature_shape", "dtype", "shards"):
        if key not in m:
            raise DataError(f"{p}: missing key {key!r}")
    if safe_name(m.get("split", split), "split", p) != split:
        raise DataError(f"{p}: its split field is {m.get('split')!r}, the file name says {split!r}")
    m["split"] = split
    for s in m["shards"]:
        safe_name(s.get("name"), "shard name", p)
    if "captions_file" in m:
        safe_name(m["captions_file"], "captions_file", p)
    _check_counts(m, p)
    m["root"] = str(Path(root).resolve())
    m["path"] = str(p)
    return m


def _check_counts(m, p):
    """The manifest's totals against its per-shard counts (the tars themselves are counted in verify_shards)."""
    per_image = m.get("captions_per_image", 5)
    imgs = sum(s.get("num_images", 0) for s in m["shards"])
    caps = sum(s.get("num_captions", 0) for s in m["shards"])
    if imgs != m["num_images"] or caps != m["num_captions"] or m["num_captions"] != per_image * m["num_images"]:
        raise DataError(f"{p}: counts disagree: num_images {m['num_images']} and num_captions {m['num_captions']}, "
                        f"but its shards list {imgs} images and {caps} captions ({per_image} captions per image); "
                        f"rebuild the split with `itr shard`")


def count_samples(path):
    """Samples (distinct keys) in a tar shard, reading headers only."""
    with tarfile.open(path) as tar:
        return len({member.name.split(".", 1)[0] for member in tar if member.isfile()})


def shard_paths(m):
    """Where each shard is read from: beside the manifest, or at the remote root it was fetched from."""
    if m.get("remote"):
        from itr.data.remote import url_of

        return [url_of(m["remote"], s["name"]) for s in m["shards"]]
    return [str(Path(m["root"]) / s["name"]) for s in m["shards"]]


def verify_shards(m, mode="checksum", progress=False, on_bad=None, use_cache=True):
    """Check every shard against the manifest; raise DataError naming the first bad file (with ``on_bad``, call
    it with each bad file's message and go on).

    ``checksum`` hashes each file once and counts its samples against the manifest, and caches the result next
    to the manifest keyed by the file's size and mtime and the manifest's checksum and count: a changed file (or
    an edited manifest entry) is checked again, repeated runs on the same shards cost a stat() each.
    ``use_cache=False`` hashes every file (``itr shard verify``).
    """
    if mode == "none":
        return
    root = Path(m["root"])
    cache_file = root / f".{m['split']}.verified.json"
    try:
        cache = json.loads(cache_file.read_text()) if use_cache and mode == "checksum" and cache_file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    changed = False
    shards = m["shards"]
    it = shards
    if progress and mode == "checksum":
        from itr.progress import bar

        it = bar(shards, desc=f"verify {m['split']} shards", unit="shard")
    if m.get("remote"):
        from itr.data.remote import verify_remote as check
    else:
        check = _verify_one
    for s, where in zip(it, shard_paths(m)):
        try:
            changed |= check(where, s, m, mode, cache)
        except DataError as e:
            if on_bad is None:
                raise
            on_bad(str(e))
    if changed:
        try:
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only shard directory just re-verifies next time


def _verify_one(p, s, m, mode, cache):
    """One shard against its manifest entry; True when it was hashed now (the cache changed)."""
    p = Path(p)
    if not p.is_file():
        raise DataError(f"shard {p} is missing (listed in {m['path']})")
    st = p.stat()
    if st.st_size != s["bytes"]:
        raise DataError(f"shard {p} is corrupt or truncated: {st.st_size} bytes, manifest says {s['bytes']}")
    if mode != "checksum":
        return False
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    entry = [stamp, s["sha256"], s.get("num_images")]
    if cache.get(s["name"]) == entry:
        return False
    digest = sha256_file(p)
    if digest != s["sha256"]:
        raise DataError(f"shard {p} is corrupt: sha256 {digest[:12]}... != manifest {s['sha256'][:12]}...")
    found = count_samples(p)
    if found != s.get("num_images"):
        raise DataError(f"shard {p} holds {found} images but {m['path']} says {s.get('num_images')}: the manifest "
                        f"was edited or belongs to other shards; rebuild the split with `itr shard`")
    cache[s["name"]] = entry
    return True


def manifest_digest(m):
    """Digest of what defines the data (for run comparison): shard names, sizes and checksums."""
    body = json.dumps([m["num_images"], m["feature_shape"], m["dtype"], [(s["name"], s["sha256"]) for s in m["shards"]]])
    return hashlib.sha256(body.encode()).hexdigest()[:16]
