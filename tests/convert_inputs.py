"""Small synthetic inputs in every source format the converters read (written by the tests, nothing downloaded)."""
import base64
import json

import numpy as np


def karpathy_json(path, n, split="test", coco=False, words=None):
    """A Karpathy split file: n images of ``split`` (plus one of another split), 5 sentences each."""
    words = words or ["a", "dog", "runs", "on", "the", "grass", "near", "water"]
    rng = np.random.default_rng(5)
    images = []
    for i in range(n + 1):
        im = {"filename": f"{1000 + i}.jpg", "imgid": i, "split": split if i < n else "restval",
              "sentences": [{"raw": " ".join(rng.choice(words, 3 + (i + k) % 6)) + f" {i}"} for k in range(5)]}
        if coco:
            im.update(cocoid=50000 + i, filepath="val2014")
        images.append(im)
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))
    return images[:n]


def coco_json(path, n):
    """A COCO captions file: n images with sizes, 6 captions each (annotation ids 10*i + k)."""
    images = [{"id": 700 + i, "width": 640 + i, "height": 480 - i, "file_name": f"COCO_{700 + i}.jpg"}
              for i in range(n)]
    anns = [{"id": 10 * i + k, "image_id": 700 + i, "caption": f"caption {k} of coco image {i}"}
            for i in range(n) for k in range(6)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return images


def teran_features(root, keys, regions=4, dim=8, seed=0):
    """TERAN's features_36/bu_att/{id}.npz (key feat) and bu_box/{id}.npy (pixel boxes); returns them."""
    rng = np.random.default_rng(seed)
    (root / "features_36" / "bu_att").mkdir(parents=True)
    (root / "features_36" / "bu_box").mkdir(parents=True)
    out = {}
    for k in keys:
        feat = rng.standard_normal((regions, dim)).astype(np.float32)
        boxes = (rng.random((regions, 4)) * 300).astype(np.float32)
        np.savez(root / "features_36" / "bu_att" / f"{k}.npz", feat=feat)
        np.save(root / "features_36" / "bu_box" / f"{k}.npy", boxes)
        out[str(k)] = (feat, boxes)
    return out


def tsv_rows(path, keys, counts, dim=8, seed=0, extra_cols=False):
    """A bottom-up-attention TSV (no header, base64 float32), image k with counts[k] boxes; returns the rows."""
    rng = np.random.default_rng(seed)
    rows = {}
    with open(path, "w") as f:
        for k, nb in zip(keys, counts):
            w, h = 500 + nb, 375
            boxes = (rng.random((nb, 4)) * 300).astype(np.float32)
            feat = rng.random((nb, dim)).astype(np.float32)
            cols = [str(k), str(w), str(h), str(nb), base64.b64encode(boxes.tobytes()).decode(),
                    base64.b64encode(feat.tobytes()).decode()]
            if extra_cols:
                cols += ["cls", "attr"]
            f.write("\t".join(cols) + "\n")
            rows[str(k)] = (feat, boxes, w, h)
    return rows


def precomp_dir(d, splits, regions=3, dim=4, repeat=()):
    """SCAN precomp splits {name: n_images}; names in ``repeat`` get each image's row once per caption."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in splits.items():
        ims = np.random.default_rng(len(split) + n).standard_normal((n, regions, dim)).astype(np.float32)
        np.save(d / f"{split}_ims.npy", np.repeat(ims, 5, axis=0) if split in repeat else ims)
        (d / f"{split}_caps.txt").write_text("\n".join(f"{split} caption {j} image {j // 5}" for j in range(5 * n)))
        out[split] = ims
    return out
