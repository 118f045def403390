"""Writing a split as tar shards + manifest, shared by every source format.

Images are written in a seeded random order (recorded in the manifest), so each shard is a
random sample of the split and shard-level shuffling mixes well. Tars are byte-reproducible
(fixed mtime, fixed order): same input, same checksums, for any number of ``workers``.

Resumable: each shard is written under a temporary name and renamed into place, and its entry
(size, sha256, count) goes into ``.{split}.partial.json`` together with a fingerprint of the
input and the options. A rerun with the same fingerprint re-hashes the shards listed there and
writes only the missing or damaged ones; the manifest goes last, so its presence means the split
is whole (a rerun of a whole split verifies it and returns). Other inputs need ``force``.
"""
import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from itr.data.manifest import FORMAT, captions_path, manifest_path, sha256_file, shard_name
from itr.data.precomp import CAPS_PER_IMAGE, DataError


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = "itr"
    tar.addfile(info, io.BytesIO(data))


def partial_path(out, split):
    return Path(out) / f".{split}.partial.json"


def write_shard(members, out, split, si, idx, captions, ids, tick=None):
    """Shard ``si`` holding images ``idx`` (``captions``: their 5 each, ``ids``: theirs); its manifest entry.
    Runs in a worker process too: ``members`` must then pickle (a closure works with one worker only)."""
    name = shard_name(split, si)
    tmp = Path(out) / f".{name}.tmp{os.getpid()}"
    try:
        _write_tar(tmp, members, idx, captions, ids, tick)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        getattr(members, "close", lambda: None)()  # open input files (TSV)
    entry = {"name": name, "num_images": len(idx), "num_captions": CAPS_PER_IMAGE * len(idx),
             "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    os.replace(tmp, Path(out) / name)
    return entry


def _write_tar(tmp, members, idx, captions, ids, tick):
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, i in enumerate(idx):
            i = int(i)
            key = f"{i:09d}"
            for ext, data in members(i).items():
                _add(tar, f"{key}.{ext}", data)
            caps = list(range(CAPS_PER_IMAGE * i, CAPS_PER_IMAGE * (i + 1)))
            meta = {"image_index": i, "caption_indices": caps,
                    "captions": captions[CAPS_PER_IMAGE * k:CAPS_PER_IMAGE * (k + 1)], "id": ids[k]}
            _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            if tick:
                tick(1)


def fingerprint(n, captions, ids, info, images_per_shard, seed, shuffle):
    """What defines a split's shards: a rerun with another fingerprint rebuilds (with ``force``)."""
    h = hashlib.sha256(json.dumps([FORMAT, n, images_per_shard, seed, bool(shuffle), info], sort_keys=True).encode())
    for c in captions:
        h.update(c.encode("utf-8") + b"\n")
    h.update(json.dumps(ids).encode())
    return h.hexdigest()


def _still_good(out, entries):
    """The recorded shards whose file is there with the recorded size and sha256 (re-hashed now)."""
    good = {}
    for e in entries:
        p = Path(out) / e["name"]
        if p.is_file() and p.stat().st_size == e["bytes"] and sha256_file(p) == e["sha256"]:
            good[e["name"]] = e
    return good


def _previous(out, split, mpath, fp, force):
    """(the complete manifest to return as it is, or None; shard entries a rerun may keep)."""
    if force:
        return None, {}
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") != fp:
            raise DataError(f"{mpath} already exists (from other input or options); pass --force to rebuild "
                            f"split {split!r}")
        good = _still_good(out, old["shards"])
        if len(good) == len(old["shards"]):
            return old, good
        return None, good
    try:
        part = json.loads(partial_path(out, split).read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    return None, (_still_good(out, part.get("shards", [])) if part.get("fingerprint") == fp else {})


def _save_partial(out, split, fp, done):
    p = partial_path(out, split)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"fingerprint": fp, "shards": sorted(done.values(), key=lambda e: e["name"])}))
    os.replace(tmp, p)


def write_split(out_dir, split, n, members, captions, ids, info, images_per_shard=1000, seed=0, shuffle=True,
                force=False, progress=True, workers=1):
    """Shard ``n`` images. ``members(i)`` returns {extension: bytes} for image ``i`` (besides ``json``);
    ``captions`` holds 5 per image in order; ``info`` goes into the manifest. Returns the manifest; its
    ``resumed`` key (not written) counts the shards kept from an earlier run."""
    if images_per_shard < 1:
        raise ValueError("images_per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(out, split)
    ids = [str(x) for x in ids] if ids else [str(i) for i in range(n)]
    fp = fingerprint(n, captions, ids, info, images_per_shard, seed, shuffle)
    complete, done = _previous(out, split, mpath, fp, force)
    if complete is not None:
        return {**complete, "resumed": len(done)}
    mpath.unlink(missing_ok=True)  # from here on the split is incomplete
    for left in out.glob(f".{split}-*.tar.tmp*"):  # from a killed run
        left.unlink()
    (out / f".{split}.verified.json").unlink(missing_ok=True)
    kept = len(done)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    jobs = [(si, order[start:start + images_per_shard]) for si, start in enumerate(range(0, n, images_per_shard))]
    todo = [(si, idx) for si, idx in jobs if shard_name(split, si) not in done]
    bar = None
    if progress:
        from itr.progress import bar as progress_bar

        bar = progress_bar(total=n, desc=f"shard {split}", unit="img", initial=n - sum(len(i) for _, i in todo))
    try:
        _run(todo, members, out, split, captions, ids, workers, bar, lambda e: _record(out, split, fp, done, e))
    finally:
        if bar:
            bar.close()
    return _finish(out, split, n, captions, info, fp, [done[shard_name(split, si)] for si, _ in jobs],
                   seed, shuffle, kept)


def _record(out, split, fp, done, entry):
    done[entry["name"]] = entry
    _save_partial(out, split, fp, done)


def _args(si, idx, captions, ids):
    caps = [captions[c] for i in idx for c in range(CAPS_PER_IMAGE * int(i), CAPS_PER_IMAGE * (int(i) + 1))]
    return si, idx, caps, [ids[int(i)] for i in idx]


def _run(todo, members, out, split, captions, ids, workers, bar, record):
    if workers <= 1 or len(todo) <= 1:
        for si, idx in todo:
            record(write_shard(members, out, split, *_args(si, idx, captions, ids), tick=bar.update if bar else None))
        return
    # spawn: a fresh interpreter per worker (no forked torch / thread state); each opens its inputs itself
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(write_shard, members, str(out), split, *_args(si, idx, captions, ids)): len(idx)
                   for si, idx in todo}
        for f in as_completed(futures):
            record(f.result())
            if bar:
                bar.update(futures[f])


def _finish(out, split, n, captions, info, fp, shards, seed, shuffle, kept):
    tmp_caps = out / f".{split}.captions.tmp{os.getpid()}"
    tmp_caps.write_text("\n".join(captions) + "\n", encoding="utf-8")
    os.replace(tmp_caps, captions_path(out, split))
    names = {s["name"] for s in shards}
    for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in names:  # from an earlier layout with more shards
            old.unlink()
    manifest = {
        "format": FORMAT,
        "split": split,
        "num_images": n,
        "num_captions": len(captions),
        "captions_per_image": CAPS_PER_IMAGE,
        **info,
        "order": {"shuffled": bool(shuffle), "seed": seed},
        "captions_file": captions_path(out, split).name,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "shards": shards,
    }
    tmp_m = out / f".{split}.manifest.tmp{os.getpid()}"
    tmp_m.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_m, manifest_path(out, split))  # last: the split is complete
    partial_path(out, split).unlink(missing_ok=True)
    return {**manifest, "resumed": kept}
