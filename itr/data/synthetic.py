"""A deterministic synthetic dataset in the SCAN precomp layout, with learnable structure.

A world of concepts (objects with 2-3 synonyms each) and colors. Every image holds 2-4
objects; each object occupies a few of the image's regions as noisy copies of its
concept prototype (plus its color's prototype when it has one); the other regions are
clutter. Each image gets 5 captions from templates that name its objects in varied
words and order, sometimes with colors, sometimes leaving one out. Regions have boxes: an
object's regions overlap around one box, clutter lies anywhere (for models that use positions). A model must learn
which words go with which region directions, so a trained model lands far above chance
while an untrained or broken one stays at chance (R@1 = 0.1% on 1,000 images).
"""
import json
from pathlib import Path

import numpy as np

CONCEPTS = [
    ("dog", "puppy", "hound"), ("cat", "kitten"), ("horse", "pony", "stallion"), ("bird", "sparrow"),
    ("car", "automobile", "sedan"), ("bicycle", "bike"), ("boat", "ship", "vessel"), ("bus", "coach"),
    ("tree", "oak"), ("flower", "blossom", "rose"), ("house", "home", "cottage"), ("bridge", "overpass"),
    ("man", "guy", "gentleman"), ("woman", "lady"), ("child", "kid", "toddler"), ("ball", "sphere"),
    ("chair", "seat", "stool"), ("table", "desk"), ("umbrella", "parasol"), ("kite", "glider"),
    ("guitar", "instrument"), ("cake", "dessert", "pastry"), ("pizza", "pie"), ("book", "novel"),
    ("laptop", "computer", "notebook"), ("phone", "cellphone", "mobile"), ("clock", "watch"),
    ("lamp", "light"), ("bench", "pew"), ("fence", "railing"), ("mountain", "peak", "hill"),
    ("river", "stream", "creek"), ("beach", "shore", "coast"), ("snow", "ice"), ("train", "locomotive"),
    ("plane", "airplane", "jet"), ("truck", "lorry"), ("sheep", "lamb"), ("cow", "cattle"),
    ("elephant", "mammoth"),
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
PREPS = ["near", "next to", "beside", "behind", "in front of", "with"]
TEMPLATES = [
    "a photo of {0}",
    "there is {0} in the picture",
    "{0} can be seen here",
    "an image showing {0}",
    "{0} in a scene",
]


def _article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(rng, objects, colors):
    """One caption naming ``objects`` (concept ids) with their ``colors`` (-1: none)."""
    order = list(rng.permutation(len(objects)))
    if len(order) >= 3 and rng.random() < 0.25:
        order = order[:-1]  # captions do not always name everything
    phrases = []
    for i in order:
        c = objects[i]
        word = CONCEPTS[c][rng.integers(len(CONCEPTS[c]))]
        if colors[i] >= 0 and rng.random() < 0.7:
            word = f"{COLORS[colors[i]]} {word}"
        phrases.append(_article(word))
    if len(phrases) == 2 and rng.random() < 0.5:
        body = f"{phrases[0]} {PREPS[rng.integers(len(PREPS))]} {phrases[1]}"
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(body)


def _random_boxes(rng, k):
    """k boxes (x1, y1, x2, y2) in [0, 1]."""
    wh = rng.uniform(0.1, 0.6, size=(k, 2))
    xy = rng.uniform(0, 1, size=(k, 2)) * (1 - wh)
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _jittered(rng, box, k):
    """k boxes around ``box`` (regions of one object overlap)."""
    w, h = box[2] - box[0], box[3] - box[1]
    jitter = rng.normal(0, 0.1, size=(k, 4)) * np.array([w, h, w, h])
    b = np.clip(box[None] + jitter, 0, 1)
    return np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1).astype(np.float32)


def generate(out_dir, splits=(("train", 3000), ("dev", 500), ("test", 1000)), dim=256, regions=36,
             noise=1.0, seed=0):
    """Write ``{split}_ims.npy`` (N, regions, dim) float32, ``{split}_boxes.npy`` (N, regions, 4),
    ``{split}_caps.txt`` and ``{split}_ids.txt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = np.random.default_rng([seed, 0])
    protos = world.standard_normal((len(CONCEPTS), dim)).astype(np.float32)
    color_protos = 0.6 * world.standard_normal((len(COLORS), dim)).astype(np.float32)
    for si, (split, n) in enumerate(splits):
        rng = np.random.default_rng([seed, 1, si])
        box_rng = np.random.default_rng([seed, 2, si])  # its own stream: features do not depend on boxes
        ims = np.empty((n, regions, dim), dtype=np.float32)
        boxes = np.empty((n, regions, 4), dtype=np.float32)
        caps, ids = [], []
        for i in range(n):
            k = int(rng.integers(2, 5))
            objects = rng.choice(len(CONCEPTS), size=k, replace=False)
            colors = np.where(rng.random(k) < 0.5, rng.integers(len(COLORS), size=k), -1)
            feats = 0.8 * rng.standard_normal((regions, dim)).astype(np.float32)  # clutter
            slots = rng.permutation(regions)
            used = 0
            boxes[i] = _random_boxes(box_rng, regions)  # clutter anywhere
            for j, (c, col) in enumerate(zip(objects, colors)):
                r = min(int(rng.integers(2, 5)), max(1, (regions - used) // (k - j)))  # leave room for the rest
                base = protos[c] + (color_protos[col] if col >= 0 else 0.0)
                feats[slots[used:used + r]] = base + noise * rng.standard_normal((r, dim))
                boxes[i, slots[used:used + r]] = _jittered(box_rng, _random_boxes(box_rng, 1)[0], r)  # one object
                used += r
            ims[i] = feats
            caps += [_caption(rng, objects, colors) for _ in range(5)]
            ids.append(f"synth-{split}-{i:06d}")
        np.save(out / f"{split}_ims.npy", ims)
        np.save(out / f"{split}_boxes.npy", boxes)
        (out / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        (out / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    (out / "synthetic.json").write_text(json.dumps(
        {"generator": "itr.data.synthetic", "splits": dict(splits), "dim": dim, "regions": regions,
         "noise": noise, "seed": seed, "concepts": len(CONCEPTS), "colors": len(COLORS)}, indent=1))
    return out
