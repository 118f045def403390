"""``itr shard verify`` and ``itr shard stats``: a shard directory checked sample by sample, and described.

verify: every split's manifest (``{split}.manifest.json``) against its shards: file, size, sha256 and
sample count (``itr.data.manifest.verify_shards``), then every sample decoded: its json (image index,
the 5 caption indices, captions equal to the captions file), its features (shape and dtype as the
manifest says; finite), its boxes; every image of the split present once. It lists every problem,
not the first, so one run tells what to rebuild.
"""
import json
from pathlib import Path

import numpy as np

from itr.data.manifest import load_manifest, shard_paths, verify_shards
from itr.data.npy import load_npy
from itr.data.precomp import CAPS_PER_IMAGE, DataError, read_captions


def splits_of(root, split=None):
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"shard directory {root} does not exist")
    names = [split] if split else sorted(p.name[:-len(".manifest.json")] for p in root.glob("*.manifest.json"))
    if not names:
        raise DataError(f"{root}: no *.manifest.json (not a shard directory; build one with `itr shard`)")
    return names


def samples(m, bad):
    """(shard path, sample dict) of every readable sample; an unreadable shard goes to ``bad``."""
    import webdataset as wds

    for path in shard_paths(m):
        if not Path(path).is_file():
            continue  # reported by verify_shards
        try:
            for sample in wds.tarfile_samples([{"url": path}]):
                yield path, sample
        except Exception as e:
            bad(f"shard {path} is unreadable after its last good sample ({type(e).__name__}: {e})")


def _features(m, sample, where, bad):
    want = tuple(m["feature_shape"])
    try:
        feat = load_npy(sample["feat.npy"], f"{where}: feat.npy")
    except DataError as e:
        return bad(str(e))
    except Exception as e:
        return bad(f"{where}: feat.npy is unreadable ({type(e).__name__}: {e})")
    ok = (feat.ndim == 2 and feat.shape[1] == want[1] and 1 <= feat.shape[0] <= want[0]
          if m.get("variable_regions") else feat.shape == want)
    if not ok:
        bad(f"{where}: features {feat.shape}, manifest says {want}" + (" (variable regions)"
                                                                       if m.get("variable_regions") else ""))
    if str(feat.dtype) != m["dtype"]:
        bad(f"{where}: features are {feat.dtype}, manifest says {m['dtype']}")
    if not np.isfinite(feat).all():
        bad(f"{where}: non-finite features")
    if m.get("boxes"):
        try:
            boxes = load_npy(sample["boxes.npy"], f"{where}: boxes.npy")
            if boxes.shape != (feat.shape[0], 4):
                bad(f"{where}: boxes {boxes.shape}, expected {(feat.shape[0], 4)}")
        except KeyError:
            bad(f"{where}: no boxes.npy (the manifest says the split has boxes)")
        except DataError as e:
            bad(str(e))
        except Exception as e:
            bad(f"{where}: boxes.npy is unreadable ({type(e).__name__}: {e})")
    return feat


def check_sample(m, path, sample, captions, seen, bad):
    """One sample against the manifest; returns (features or None, meta or None)."""
    where = f"shard {path}: sample {sample.get('__key__')}"
    try:
        meta = json.loads(sample["json"])
        i = int(meta["image_index"])
    except Exception as e:
        return bad(f"{where}: json is missing or unreadable ({type(e).__name__}: {e})"), None
    if not 0 <= i < m["num_images"]:
        return bad(f"{where}: image_index {i} outside 0..{m['num_images'] - 1}"), None
    if seen[i]:
        bad(f"{where}: image_index {i} appears more than once")
    seen[i] = True
    caps = list(range(CAPS_PER_IMAGE * i, CAPS_PER_IMAGE * (i + 1)))
    if meta.get("caption_indices") != caps:
        bad(f"{where}: caption_indices {meta.get('caption_indices')}, expected {caps}")
    elif captions is not None and meta.get("captions") != [captions[c] for c in caps]:
        bad(f"{where}: its captions differ from {m.get('captions_file')} lines {caps[0] + 1}-{caps[-1] + 1}")
    if m.get("kind") == "images":
        if sample.get("jpg") is None and sample.get("png") is None:
            bad(f"{where}: no jpg/png image")
        return None, meta
    return _features(m, sample, where, bad), meta


def verify_split(root, split, progress=True):
    """Every problem of one split, as lines (empty: the split is sound)."""
    problems = []
    bad = problems.append
    try:
        m = load_manifest(root, split)
    except DataError as e:
        return [str(e)]
    verify_shards(m, "checksum", progress=progress, on_bad=bad, use_cache=False)
    captions = None
    cap_file = Path(root) / m.get("captions_file", f"{split}.captions.txt")
    try:
        captions = read_captions(cap_file)
        if len(captions) != m["num_captions"]:
            bad(f"{cap_file}: {len(captions)} captions, manifest says {m['num_captions']}")
            captions = None
    except (OSError, DataError) as e:
        bad(f"captions file {cap_file}: {e}")
    seen = np.zeros(m["num_images"], dtype=bool)
    it = samples(m, bad)
    if progress:
        from itr.progress import bar

        it = bar(it, total=m["num_images"], desc=f"decode {split}", unit="img")
    for path, sample in it:
        check_sample(m, path, sample, captions, seen, bad)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        bad(f"{m['path']}: {len(missing)} of {m['num_images']} images are in no shard (first: image {missing[0]})")
    return problems
