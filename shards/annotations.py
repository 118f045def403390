"""Captions (and image sizes) for feature converters whose features are keyed by an image id (TERAN, TSV).

Two caption files are read:

- Karpathy's split file (``dataset_flickr30k.json``, ``dataset_coco.json``): ``images[]`` with ``split``,
  ``filename``, ``imgid``, ``cocoid`` (COCO), ``sentences[].raw``; ``SPLIT`` selects by ``split``
  (``train+restval`` joins several). No image sizes: pass ``sizes`` or ``image_dir`` where boxes need them.
- A COCO captions file (``captions_val2014.json``): ``images[].id/width/height/file_name`` and
  ``annotations[].id/image_id/caption``. With ``ann_ids`` (VSE++/TERAN's ``coco_{split}_ids.npy``, caption
  annotation ids, 5 consecutive per image) the split is those captions in that order; without, every image
  in file order with its first 5 captions.

Which id names an image's features (``id_key``): ``cocoid``, ``imgid``, ``index`` (position in Karpathy's
list: TERAN's Flickr30k files), ``stem`` (file name without extension: the Flickr30k TSVs), or ``id`` (COCO).
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from itr.data.precomp import CAPS_PER_IMAGE, DataError

ID_KEYS = ("auto", "cocoid", "imgid", "index", "stem", "id")


@dataclass
class Entry:
    key: str  # the features' id (file name stem / TSV image_id)
    captions: List[str]
    size: Optional[Tuple[int, int]]  # (width, height) where the caption file has it
    path: str  # the image file (relative), for sizes from an image folder


def _load(path):
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"captions file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"captions file {path} is not valid JSON ({e})") from None


def _karpathy(d, path, split, id_key):
    wanted = set(split.split("+"))
    out = []
    for pos, im in enumerate(d["images"]):
        if im.get("split") not in wanted:
            continue
        key = {"cocoid": im.get("cocoid"), "imgid": im.get("imgid"), "index": pos,
               "stem": Path(im.get("filename", "")).stem, "id": im.get("id")}[id_key]
        if key is None or key == "":
            raise DataError(f"{path}: image {pos} has no {id_key!r} (choose another --id-key)")
        rel = str(Path(im.get("filepath", "")) / im.get("filename", ""))
        out.append(Entry(str(key), [s["raw"].strip() for s in im.get("sentences", [])], None, rel))
    if not out:
        have = sorted({str(im.get("split", "?")) for im in d["images"]})
        raise DataError(f"{path}: no images with split {split!r} (splits there: {', '.join(have)})")
    return out


def _coco(d, path, ann_ids):
    images = {im["id"]: im for im in d["images"]}
    anns = {a["id"]: a for a in d["annotations"]}

    def entry(image_id, caps):
        im = images.get(image_id)
        if im is None:
            raise DataError(f"{path}: annotation of image {image_id}, which is not in its 'images'")
        size = (int(im["width"]), int(im["height"])) if "width" in im and "height" in im else None
        return Entry(str(image_id), caps, size, im.get("file_name", ""))

    if ann_ids is None:
        caps = {}
        for a in d["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        return [entry(im["id"], caps.get(im["id"], [])) for im in d["images"]]
    try:
        ids = np.load(ann_ids, allow_pickle=False).reshape(-1).tolist()
    except (OSError, ValueError) as e:
        raise DataError(f"caption id file {ann_ids} is unreadable as a numeric .npy ({e})") from None
    if len(ids) % CAPS_PER_IMAGE:
        raise DataError(f"{ann_ids}: {len(ids)} caption ids, not {CAPS_PER_IMAGE} per image")
    out = []
    for g in range(0, len(ids), CAPS_PER_IMAGE):
        group = [anns.get(int(a)) for a in ids[g:g + CAPS_PER_IMAGE]]
        if any(a is None for a in group):
            raise DataError(f"{ann_ids}: caption id {ids[g + group.index(None)]} is not in {path}")
        if len({a["image_id"] for a in group}) != 1:
            raise DataError(f"{ann_ids}: caption ids {ids[g]}..{ids[g + CAPS_PER_IMAGE - 1]} (rows {g}-{g + 4}) belong "
                            f"to several images; expected {CAPS_PER_IMAGE} consecutive ids per image")
        out.append(entry(group[0]["image_id"], [a["caption"].strip() for a in group]))
    return out


def read_annotations(path, split, id_key="auto", default_key="index", ann_ids=None) -> List[Entry]:
    """The images of ``split`` in file order, each with its first 5 captions (see the module docstring)."""
    if id_key not in ID_KEYS:
        raise DataError(f"--id-key must be one of {', '.join(ID_KEYS)}, got {id_key!r}")
    d = _load(path)
    if not isinstance(d.get("images"), list):
        raise DataError(f"{path}: expected an 'images' list (Karpathy or COCO captions format)")
    if "annotations" in d:
        out = _coco(d, path, ann_ids)
    else:
        if id_key == "auto":
            id_key = "cocoid" if d["images"] and "cocoid" in d["images"][0] else default_key
        out = _karpathy(d, path, split, id_key)
    seen = set()
    for e in out:
        if len(e.captions) < CAPS_PER_IMAGE:
            raise DataError(f"{path}: image {e.key} has {len(e.captions)} captions, need {CAPS_PER_IMAGE}")
        if e.key in seen:
            raise DataError(f"{path}: image id {e.key} appears twice in split {split!r}")
        seen.add(e.key)
        e.captions = e.captions[:CAPS_PER_IMAGE]
    return out


def fill_sizes(entries, path, sizes=None, image_dir=None):
    """Give every entry its (width, height): from the caption file, a ``sizes`` JSON ({id: [w, h]}) or the
    image files' headers in ``image_dir``; an entry left without one is an error naming it."""
    table = {}
    if sizes:
        try:
            table = {str(k): v for k, v in json.loads(Path(sizes).read_text()).items()}
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"sizes file {sizes}: expected a JSON object {{image id: [width, height]}} ({e})") from None
    for e in entries:
        if e.key in table:
            w, h = table[e.key]
            e.size = (int(w), int(h))
        elif e.size is None and image_dir:
            from PIL import Image

            f = Path(image_dir) / e.path
            try:
                with Image.open(f) as im:
                    e.size = im.size
            except OSError as err:
                raise DataError(f"image {f} (for its size) is unreadable ({err})") from None
        if e.size is None:
            raise DataError(f"no size for image {e.key} of {path}: boxes are normalized by the image size; pass "
                            f"--sizes SIZES.json ({{id: [width, height]}}) or --image-dir DIR, or use COCO's "
                            f"captions file (it has width and height)")
    return entries


def sizes_digest(sizes):
    """Part of a split's fingerprint: other sizes give other boxes."""
    return hashlib.sha256(json.dumps([list(s) for s in sizes]).encode()).hexdigest()
