import io
import json
import tarfile

import numpy as np
import pytest

from itr.data.manifest import load_manifest, verify_shards
from itr.data.precomp import DataError, open_precomp
from itr.data.sources import ensure_shards, load_split, read_shard_split, split_captions
from itr.shards.precomp import shard_precomp


def _write_precomp(d, n=12, regions=3, dim=4, caps_per=5, split="train"):
    d.mkdir(parents=True, exist_ok=True)
    ims = np.random.default_rng(0).standard_normal((n, regions, dim)).astype(np.float32)
    np.save(d / f"{split}_ims.npy", ims)
    (d / f"{split}_caps.txt").write_text("\n".join(f"caption {j} of image {j // 5}" for j in range(caps_per * n)) + "\n")
    (d / f"{split}_ids.txt").write_text("\n".join(f"img{i}.jpg" for i in range(n)) + "\n")
    return ims


def test_round_trip_float16(tmp_path):
    ims = _write_precomp(tmp_path / "src", n=12)
    m = shard_precomp(tmp_path / "src", "train", tmp_path / "out", images_per_shard=5, progress=False)
    assert [s["num_images"] for s in m["shards"]] == [5, 5, 2]
    assert m["num_images"] == 12 and m["num_captions"] == 60 and m["feature_shape"] == [3, 4] and m["dtype"] == "float16"
    back = read_shard_split(tmp_path / "out", "train", verify="checksum")
    assert back.images.dtype == np.float16
    np.testing.assert_allclose(back.images, ims, rtol=1e-3, atol=1e-3)
    assert back.captions == [f"caption {j} of image {j // 5}" for j in range(60)]
    assert back.ids == [f"img{i}.jpg" for i in range(12)]
    assert split_captions(load_manifest(tmp_path / "out", "train")) == back.captions


def test_sample_layout_and_float32(tmp_path):
    ims = _write_precomp(tmp_path / "src", n=4)
    m = shard_precomp(tmp_path / "src", "train", tmp_path / "out", dtype="float32", images_per_shard=10,
                      shuffle=False, progress=False)
    with tarfile.open(tmp_path / "out" / m["shards"][0]["name"]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000001.json").read())
        feat = np.load(io.BytesIO(tar.extractfile("000000001.feat.npy").read()))
    assert names[:4] == ["000000000.feat.npy", "000000000.json", "000000001.feat.npy", "000000001.json"]
    assert meta["image_index"] == 1 and meta["caption_indices"] == [5, 6, 7, 8, 9]
    assert meta["captions"][0] == "caption 5 of image 1" and meta["id"] == "img1.jpg"
    assert feat.dtype == np.float32 and np.array_equal(feat, ims[1])


def test_checksums_are_reproducible(tmp_path):
    _write_precomp(tmp_path / "src")
    a = shard_precomp(tmp_path / "src", "train", tmp_path / "a", images_per_shard=5, progress=False)
    b = shard_precomp(tmp_path / "src", "train", tmp_path / "b", images_per_shard=5, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_pooled_features_become_one_region(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    np.save(d / "test_ims.npy", np.ones((2, 7), np.float32))
    (d / "test_caps.txt").write_text("\n".join(["x"] * 10))
    assert open_precomp(d, "test").images.shape == (2, 1, 7)


def test_caption_count_mismatch_names_the_file(tmp_path):
    _write_precomp(tmp_path / "src", n=4)
    caps = tmp_path / "src" / "train_caps.txt"
    caps.write_text("\n".join(caps.read_text().splitlines()[:-1]))  # 19 captions for 4 images
    with pytest.raises(DataError) as e:
        shard_precomp(tmp_path / "src", "train", tmp_path / "out", progress=False)
    assert "train_caps.txt" in str(e.value) and "19" in str(e.value) and "20" in str(e.value)


def test_missing_features_file_names_it_and_lists_splits(tmp_path):
    _write_precomp(tmp_path / "src", split="dev")
    with pytest.raises(DataError) as e:
        open_precomp(tmp_path / "src", "train")
    assert "train_ims.npy" in str(e.value) and "dev" in str(e.value)


def test_refuses_to_overwrite_other_input_without_force(tmp_path):
    _write_precomp(tmp_path / "src")
    shard_precomp(tmp_path / "src", "train", tmp_path / "out", progress=False)
    again = shard_precomp(tmp_path / "src", "train", tmp_path / "out", progress=False)  # same input: verified, kept
    assert again["resumed"] == len(again["shards"])
    with pytest.raises(DataError, match="--force"):  # other options: another split
        shard_precomp(tmp_path / "src", "train", tmp_path / "out", images_per_shard=5, progress=False)
    shard_precomp(tmp_path / "src", "train", tmp_path / "out", images_per_shard=5, force=True, progress=False)


def test_corrupt_shard_is_caught_before_training(tmp_path):
    _write_precomp(tmp_path / "src")
    m = shard_precomp(tmp_path / "src", "train", tmp_path / "out", images_per_shard=5, progress=False)
    bad = tmp_path / "out" / m["shards"][1]["name"]
    data = bytearray(bad.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    bad.write_bytes(bytes(data))
    m = load_manifest(tmp_path / "out", "train")
    verify_shards(m, "size")  # a flipped byte keeps the size
    with pytest.raises(DataError) as e:
        verify_shards(m, "checksum")
    assert bad.name in str(e.value) and "corrupt" in str(e.value)
    bad.write_bytes(bytes(data[:1000]))
    with pytest.raises(DataError) as e:
        verify_shards(m, "size")
    assert bad.name in str(e.value) and "truncated" in str(e.value)


def test_missing_shard_and_manifest(tmp_path):
    _write_precomp(tmp_path / "src")
    m = shard_precomp(tmp_path / "src", "train", tmp_path / "out", images_per_shard=5, progress=False)
    (tmp_path / "out" / m["shards"][0]["name"]).unlink()
    with pytest.raises(DataError, match=m["shards"][0]["name"]):
        verify_shards(load_manifest(tmp_path / "out", "train"), "size")
    with pytest.raises(DataError, match="test.manifest.json"):
        load_manifest(tmp_path / "out", "test")


def test_ensure_shards_caches_by_source(tmp_path, tiny_data):
    from itr.config import DataConfig

    cfg = DataConfig(root=str(tiny_data), images_per_shard=50)
    m1 = ensure_shards(cfg, "train", progress=False)
    m2 = ensure_shards(cfg, "train", progress=False)
    assert m1["root"] == m2["root"] and str(tmp_path / "cache") in m1["root"]
    assert len(m1["shards"]) == 4
    # evaluation reads the same split from either layout
    a, b = load_split(tiny_data, "dev"), load_split(tiny_data, "dev")
    assert a.captions == b.captions


def test_unknown_data_dir_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_split(tmp_path / "empty", "test")


def test_boxes_travel_through_shards_and_the_loader(tmp_path, tiny_data):
    from itr.data.loader import TrainLoader
    from itr.data.text import WordVocab

    src = open_precomp(tiny_data, "train")
    assert src.boxes is not None and src.boxes.shape == (160, 8, 4)
    m = shard_precomp(tiny_data, "train", tmp_path / "s", images_per_shard=40, progress=False)
    assert m["boxes"] is True
    back = read_shard_split(tmp_path / "s", "train")
    np.testing.assert_array_equal(back.boxes, src.boxes)
    m = load_manifest(tmp_path / "s", "train")
    batch = next(iter(TrainLoader(m, WordVocab.build(src.captions), 8, num_workers=0).epoch(0)))
    assert batch["boxes"].shape == (8, 8, 4)
    for img, boxes in zip(batch["img_ids"], batch["boxes"]):
        np.testing.assert_array_equal(boxes.numpy(), src.boxes[int(img)])
    inputs = back.image_inputs(3, 5)
    assert set(inputs) == {"feats", "boxes"} and inputs["boxes"].shape == (2, 8, 4)


def test_boxes_of_the_wrong_shape_name_the_file(tmp_path):
    _write_precomp(tmp_path, n=4, regions=3)
    np.save(tmp_path / "train_boxes.npy", np.zeros((4, 2, 4), np.float32))
    with pytest.raises(DataError, match="train_boxes.npy"):
        open_precomp(tmp_path, "train")


def test_jobs_sharding_one_source_at_once_wait_for_each_other(tmp_path, tiny_data):
    """A sweep's jobs start together on one precomp directory: one shards it, the others wait for the lock (a
    job that went ahead used to delete its sibling's temporary shard), then all read the same shards."""
    import subprocess
    import sys
    import time

    from itr.config import DataConfig
    from itr.data.sources import shard_cache_dir, sharding_lock

    from conftest import ROOT

    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))  # ITR_CACHE: this test's (conftest)
    code = ("from itr.config import DataConfig; from itr.data.sources import ensure_shards; "
            f"m = ensure_shards(DataConfig(root={str(tiny_data)!r}, images_per_shard=20), 'train', progress=False); "
            "print(len(m['shards']))")
    run = lambda: subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,  # noqa: E731
                                   stderr=subprocess.PIPE, text=True)
    out = shard_cache_dir(tiny_data, DataConfig().dtype, 20)
    with sharding_lock(out):
        blocked = run()
        time.sleep(3)
        assert blocked.poll() is None and not (out / "train.manifest.json").exists()  # waiting, nothing written
    jobs = [blocked, run(), run()]
    for p in jobs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and stdout.split()[-1] == "8", stderr[-2000:]
