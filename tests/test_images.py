"""Raw-image shards: Karpathy / COCO captions JSON + JPEG folder -> shards -> loader / eval."""
import json

import numpy as np
import pytest

from itr.cli import main
from itr.data.images import eval_transform, train_transform
from itr.data.loader import TrainLoader
from itr.data.manifest import load_manifest
from itr.data.precomp import DataError
from itr.data.sources import load_split
from itr.data.text import WordVocab
from itr.shards.images import shard_images

from conftest import F8K, F8K_IMAGES


@pytest.fixture
def f8k_json(tmp_path):
    if not (F8K_IMAGES / "ids.txt").is_file():
        pytest.skip(f"real Flickr8k images not found at {F8K_IMAGES} (../shared/data beside the checkout; CI has it)")
    ids = (F8K_IMAGES / "ids.txt").read_text().split()
    caps = (F8K / "dev_caps.txt").read_text().splitlines()
    images = [{"filename": f, "imgid": i, "split": "test" if i < 20 else "train",
               "sentences": [{"raw": c} for c in caps[5 * i:5 * i + 5]]} for i, f in enumerate(ids)]
    p = tmp_path / "dataset_f8k.json"
    p.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return p


def test_transforms_give_fixed_size_uint8(f8k_json):
    import random

    from PIL import Image

    img = Image.open(next(F8K_IMAGES.glob("*.jpg"))).convert("RGB")
    a = eval_transform(img, 64)
    assert a.shape == (3, 64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, eval_transform(img, 64))  # deterministic
    b = train_transform(img, random.Random(0), 64)
    c = train_transform(img, random.Random(1), 64)
    assert b.shape == (3, 64, 64) and not np.array_equal(b, c)


def test_shard_real_jpegs_and_read_them_back(f8k_json, tmp_path):
    m = shard_images(f8k_json, F8K_IMAGES, "train", tmp_path / "s", images_per_shard=32, progress=False)
    assert m["kind"] == "images" and m["num_images"] == 80 and len(m["shards"]) == 3
    split = load_split(tmp_path / "s", "train", image_size=64)
    assert split.image_key == "pixels" and split.images.shape == (80, 3, 64, 64)
    caps = (F8K / "dev_caps.txt").read_text().splitlines()
    assert split.captions == caps[100:500]
    assert set(split.image_inputs(0, 2)) == {"pixels"}
    loader = TrainLoader(load_manifest(tmp_path / "s", "train"), WordVocab.build(split.captions), 16,
                         num_workers=0, image_size=64)
    batch = next(iter(loader.epoch(0)))
    assert batch["pixels"].shape == (16, 3, 64, 64) and str(batch["pixels"].dtype) == "torch.uint8"


def test_cli_and_bad_inputs(f8k_json, tmp_path, capsys):
    assert main(["shard", "images", str(f8k_json), str(F8K_IMAGES), "test", str(tmp_path / "s")]) == 0
    assert "20 images, 100 captions" in capsys.readouterr().out
    with pytest.raises(DataError, match="splits there: test, train"):
        shard_images(f8k_json, F8K_IMAGES, "val", tmp_path / "v", progress=False)
    with pytest.raises(DataError, match="is missing"):
        shard_images(f8k_json, tmp_path, "test", tmp_path / "x", progress=False)
    d = json.loads(f8k_json.read_text())
    d["images"][0]["sentences"] = d["images"][0]["sentences"][:3]
    f8k_json.write_text(json.dumps(d))
    with pytest.raises(DataError, match="has 3 captions, need 5"):
        shard_images(f8k_json, F8K_IMAGES, "test", tmp_path / "y", progress=False)
    bad = tmp_path / "imgs"
    bad.mkdir()
    for f in d["images"]:
        (bad / f["filename"]).write_bytes(b"not a jpeg")
    d["images"][0]["sentences"] *= 2
    f8k_json.write_text(json.dumps(d))
    with pytest.raises(DataError, match="not a readable image"):
        shard_images(f8k_json, bad, "test", tmp_path / "z", progress=False)


def test_coco_captions_format(tmp_path):
    from PIL import Image

    (tmp_path / "im").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "im" / "a.jpg")
    d = {"images": [{"id": 7, "file_name": "a.jpg"}],
         "annotations": [{"image_id": 7, "caption": f"a red square {i}"} for i in range(7)]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    m = shard_images(tmp_path / "c.json", tmp_path / "im", "test", tmp_path / "s", progress=False)
    assert m["num_captions"] == 5  # the first 5 of 7
    split = load_split(tmp_path / "s", "test", image_size=32)
    assert split.captions[-1] == "a red square 4" and split.images[0, 0].mean() > 150
