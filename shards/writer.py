"""Writing a split as tar shards + manifest, shared by every source format.

Images are written in a seeded random order (recorded in the manifest), so each shard is a
random sample of the split and shard-level shuffling mixes well. Tars are byte-reproducible
(fixed mtime, fixed order): same input, same checksums. Shards are written to a temporary
folder and moved into place; the manifest goes last, so its presence means the split is whole.
"""
import io
import json
import os
import shutil
import tarfile
import time
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


def write_split(out_dir, split, n, members, captions, ids, info, images_per_shard=1000, seed=0, shuffle=True,
                force=False, progress=True):
    """Shard ``n`` images. ``members(i)`` returns {extension: bytes} for image ``i`` (besides ``json``);
    ``captions`` holds 5 per image in order; ``info`` goes into the manifest. Returns the manifest."""
    if images_per_shard < 1:
        raise ValueError("images_per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(out, split)
    if mpath.exists() and not force:
        raise DataError(f"{mpath} already exists; pass --force to rebuild split {split!r}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    tmp = out / f".tmp-{split}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards = []
    bar = None
    if progress:
        from itr.progress import bar as progress_bar

        bar = progress_bar(total=n, desc=f"shard {split}", unit="img")
    try:
        for si, start in enumerate(range(0, n, images_per_shard)):
            idx = order[start:start + images_per_shard]
            name = shard_name(split, si)
            with tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in idx:
                    i = int(i)
                    key = f"{i:09d}"
                    for ext, data in members(i).items():
                        _add(tar, f"{key}.{ext}", data)
                    caps = list(range(CAPS_PER_IMAGE * i, CAPS_PER_IMAGE * (i + 1)))
                    meta = {"image_index": i, "caption_indices": caps, "captions": [captions[c] for c in caps],
                            "id": ids[i] if ids else str(i)}
                    _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                    if bar:
                        bar.update(1)
            shards.append({"name": name, "num_images": len(idx), "num_captions": CAPS_PER_IMAGE * len(idx),
                           "bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)})
        captions_path(tmp, split).write_text("\n".join(captions) + "\n", encoding="utf-8")
        manifest = {
            "format": FORMAT,
            "split": split,
            "num_images": n,
            "num_captions": len(captions),
            "captions_per_image": CAPS_PER_IMAGE,
            **info,
            "order": {"shuffled": bool(shuffle), "seed": seed},
            "captions_file": captions_path(out, split).name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shards": shards,
        }
        # Shards first, the manifest last: it marks the split complete.
        if mpath.exists():
            mpath.unlink()
        for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()
        for s in shards:
            os.replace(tmp / s["name"], out / s["name"])
        os.replace(captions_path(tmp, split), captions_path(out, split))
        (out / f".{split}.verified.json").unlink(missing_ok=True)
        tmp_m = tmp / mpath.name
        tmp_m.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp_m, mpath)
    finally:
        if bar:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
