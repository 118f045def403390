"""Captions JSON + image folder -> WebDataset shards holding the JPEG bytes (for raw-image models).

    itr shard images CAPTIONS_JSON IMAGE_DIR SPLIT OUT_DIR [--images-per-shard 1000]

CAPTIONS_JSON is either Karpathy's split file (``dataset_flickr30k.json``, ``dataset_coco.json``:
``images[].filename``, optional ``filepath``, ``split``, ``sentences[].raw``) or a COCO captions
file (``images[].id/file_name`` + ``annotations[].image_id/caption``, all images). The first 5
captions of each image are kept (COCO has up to 7), in file order; an image with fewer is an error.
``--split`` selects Karpathy's ``split`` field; ``train+restval`` joins several.
Every image is opened once here, so a missing or corrupt file fails now, named.
"""
import json
from pathlib import Path

from itr.data.precomp import CAPS_PER_IMAGE, DataError
from itr.shards.writer import write_split


def read_captions_json(path, split):
    """[(relative image path, [captions...], id)] of ``split`` ('+'-joined for several)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"captions file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DataError(f"captions file {path} is not valid JSON ({e})") from None
    images = d.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: expected an 'images' list (Karpathy or COCO captions format)")
    out = []
    if "annotations" in d:  # COCO captions: no split field, every image
        caps = {}
        for a in d["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        for im in images:
            out.append((im["file_name"], caps.get(im["id"], []), str(im["id"])))
    else:  # Karpathy
        wanted = set(split.split("+"))
        have = sorted({im.get("split", "?") for im in images})
        for im in images:
            if im.get("split") in wanted:
                rel = str(Path(im.get("filepath", "")) / im["filename"])
                out.append((rel, [s["raw"].strip() for s in im.get("sentences", [])], str(im.get("imgid", im["filename"]))))
        if not out:
            raise DataError(f"{path}: no images with split {split!r} (splits there: {', '.join(have)})")
    for rel, caps, _ in out:
        if len(caps) < CAPS_PER_IMAGE:
            raise DataError(f"{path}: image {rel} has {len(caps)} captions, need {CAPS_PER_IMAGE}")
    return [(rel, caps[:CAPS_PER_IMAGE], i) for rel, caps, i in out]


def shard_images(captions_json, image_dir, split, out_dir, images_per_shard=1000, seed=0, shuffle=True,
                 force=False, progress=True):
    """Write JPEG shards of ``split``; returns the manifest."""
    from PIL import Image

    entries = read_captions_json(captions_json, split)
    root = Path(image_dir)
    for rel, _, _ in entries:  # fail before writing anything
        f = root / rel
        if not f.is_file():
            raise DataError(f"image {f} is missing (listed in {captions_json})")
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:
            raise DataError(f"image {f} is not a readable image ({e})") from None

    def members(i):
        data = (root / entries[i][0]).read_bytes()
        ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
        return {ext: data}

    captions = [c for _, caps, _ in entries for c in caps]
    ids = [Path(rel).name for rel, _, _ in entries]
    info = {"kind": "images", "feature_shape": None, "dtype": "encoded", "boxes": False,
            "source": {"layout": "captions-json", "captions": str(Path(captions_json).resolve()),
                       "images": str(root.resolve())}}
    return write_split(out_dir, split, len(entries), members, captions, ids, info,
                       images_per_shard=images_per_shard, seed=seed, shuffle=shuffle, force=force,
                       progress=progress)
