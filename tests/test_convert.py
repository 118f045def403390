"""The converters: TERAN per-image features, bottom-up TSVs, precomp in full; resumable and parallel writing."""
import json
import os

import numpy as np
import pytest
from convert_inputs import coco_json, karpathy_json, precomp_dir, teran_features, tsv_rows

from itr.data.manifest import load_manifest
from itr.data.precomp import DataError
from itr.data.sources import read_shard_split
from itr.shards.precomp import shard_precomp, shard_precomp_splits
from itr.shards.teran import shard_teran
from itr.shards.tsv import shard_tsv
from itr.shards.writer import partial_path, write_split


def test_teran_from_karpathy_normalizes_boxes_by_the_given_sizes(tmp_path):
    images = karpathy_json(tmp_path / "dataset_flickr30k.json", 7)
    feats = teran_features(tmp_path / "f", range(8))  # named by the position in Karpathy's list (TERAN's f30k)
    sizes = {str(i): [400 + i, 300 + 2 * i] for i in range(8)}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    m = shard_teran(tmp_path / "f", tmp_path / "dataset_flickr30k.json", "test", tmp_path / "out", dtype="float32",
                    images_per_shard=3, sizes=tmp_path / "sizes.json", progress=False)
    assert m["num_images"] == 7 and m["feature_shape"] == [4, 8] and [s["num_images"] for s in m["shards"]] == [3, 3, 1]
    back = read_shard_split(tmp_path / "out", "test")
    for i in range(7):
        feat, boxes = feats[str(i)]
        np.testing.assert_array_equal(back.images[i], feat)
        w, h = sizes[str(i)]
        np.testing.assert_allclose(back.boxes[i], boxes / np.array([w, h, w, h]), rtol=1e-6)
        assert back.captions[5 * i:5 * i + 5] == [s["raw"] for s in images[i]["sentences"]]
    assert back.ids == [str(i) for i in range(7)]


def test_teran_from_coco_captions_takes_sizes_from_the_file_and_orders_by_caption_ids(tmp_path):
    images = coco_json(tmp_path / "captions_val2014.json", 4)
    feats = teran_features(tmp_path / "f" / "features_36" / "..", [im["id"] for im in images])
    np.save(tmp_path / "coco_test_ids.npy", np.array([10 * 2 + k for k in range(5)] + [10 * 0 + k for k in range(5)]))
    m = shard_teran(tmp_path / "f", tmp_path / "captions_val2014.json", "test", tmp_path / "out",
                    ann_ids=tmp_path / "coco_test_ids.npy", dtype="float32", progress=False)
    back = read_shard_split(tmp_path / "out", "test")
    assert m["num_images"] == 2 and back.ids == ["702", "700"]
    assert back.captions[:2] == ["caption 0 of coco image 2", "caption 1 of coco image 2"]
    np.testing.assert_allclose(back.boxes[0], feats["702"][1] / np.array([642, 478, 642, 478]), rtol=1e-6)


def test_teran_errors_name_the_missing_file_and_the_missing_size(tmp_path):
    karpathy_json(tmp_path / "k.json", 3)
    teran_features(tmp_path / "f", [0, 1])  # image 2's features are missing
    with pytest.raises(DataError, match=r"1 of 3 images .* 2\.npz"):
        shard_teran(tmp_path / "f", tmp_path / "k.json", "test", tmp_path / "out", progress=False)
    teran_features(tmp_path / "g", [0, 1, 2])
    with pytest.raises(DataError, match="--sizes"):  # Karpathy files carry no image sizes
        shard_teran(tmp_path / "g", tmp_path / "k.json", "test", tmp_path / "out", progress=False)


def test_tsv_keeps_variable_region_counts_and_reads_rows_beyond_the_csv_field_limit(tmp_path):
    karpathy_json(tmp_path / "k.json", 5)
    counts = [3, 7, 1, 20, 5]
    rows = tsv_rows(tmp_path / "a.tsv", [1000, 1001, 1002], counts[:3], dim=8)
    rows.update(tsv_rows(tmp_path / "b.tsv", [1003, 1004, 9999], counts[3:] + [2], dim=8, seed=1, extra_cols=True))
    m = shard_tsv([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "k.json", "test", tmp_path / "out",
                  dtype="float32", images_per_shard=2, progress=False)
    assert m["variable_regions"] and m["feature_shape"] == [20, 8] and m["regions"]["min"] == 1
    back = read_shard_split(tmp_path / "out", "test")
    assert back.lens.tolist() == counts and back.images.shape == (5, 20, 8)
    for i, key in enumerate(back.ids):
        feat, boxes, w, h = rows[key]
        np.testing.assert_array_equal(back.images[i, :len(feat)], feat)
        assert not back.images[i, len(feat):].any()
        np.testing.assert_allclose(back.boxes[i, :len(feat)], boxes / np.array([w, h, w, h], np.float32))
    # a 36 x 2048 row is ~400 KB of base64: csv's default field limit (128 KB) would refuse it
    karpathy_json(tmp_path / "k1.json", 1)
    tsv_rows(tmp_path / "big.tsv", [1000], [36], dim=2048)
    big = shard_tsv([tmp_path / "big.tsv"], tmp_path / "k1.json", "test", tmp_path / "big", progress=False)
    assert big["feature_shape"] == [36, 2048] and "variable_regions" not in big  # equal counts: the fixed layout


def test_tsv_errors_name_the_file_and_line(tmp_path):
    karpathy_json(tmp_path / "k.json", 2)
    tsv_rows(tmp_path / "a.tsv", [1000, 1001], [3, 3])
    text = (tmp_path / "a.tsv").read_text().splitlines()
    (tmp_path / "cut.tsv").write_text(text[0] + "\n" + "\t".join(text[1].split("\t")[:4]) + "\n")
    with pytest.raises(DataError, match=r"cut\.tsv: line 2 has 4"):
        shard_tsv([tmp_path / "cut.tsv"], tmp_path / "k.json", "test", tmp_path / "o1", progress=False)
    cols = text[1].split("\t")
    (tmp_path / "empty.tsv").write_text(text[0] + "\n" + "\t".join(cols[:3] + ["0", "", ""] + cols[6:]) + "\n")
    with pytest.raises(DataError, match=r"empty\.tsv: line 2: image_id 1001 has num_boxes 0"):
        shard_tsv([tmp_path / "empty.tsv"], tmp_path / "k.json", "test", tmp_path / "o0", progress=False)
    tsv_rows(tmp_path / "other.tsv", [5, 6], [3, 3])
    with pytest.raises(DataError, match=r"2 of 2 images .* \(first: 1000; .* e\.g\. 5\)"):
        shard_tsv([tmp_path / "other.tsv"], tmp_path / "k.json", "test", tmp_path / "o2", progress=False)


def test_precomp_all_splits_in_one_call_with_rows_repeated_per_caption(tmp_path):
    ims = precomp_dir(tmp_path / "src", {"train": 6, "dev": 2, "testall": 10}, repeat=("testall",))
    ms = shard_precomp_splits(tmp_path / "src", "all", tmp_path / "out", dtype="float32", images_per_shard=4,
                              progress=False)
    assert [m["split"] for m in ms] == ["dev", "testall", "train"]
    back = read_shard_split(tmp_path / "out", "testall")  # 50 rows for 50 captions: SCAN's im_div rule
    assert back.images.shape == (10, 3, 4) and len(back.captions) == 50
    np.testing.assert_array_equal(back.images, ims["testall"])
    assert load_manifest(tmp_path / "out", "testall")["source"]["rows_per_image"] == 5


def test_precomp_rows_per_caption_must_be_copies(tmp_path):
    precomp_dir(tmp_path / "src", {"test": 2})
    np.save(tmp_path / "src" / "test_ims.npy", np.random.default_rng(0).random((10, 3, 4), dtype=np.float32))
    with pytest.raises(DataError, match="rows 0-4 .* differ"):
        shard_precomp(tmp_path / "src", "test", tmp_path / "out", progress=False)


class _Dies:
    """A members callable that fails at image ``at`` (a killed conversion), counting the images it made."""

    def __init__(self, at=None):
        self.at, self.made = at, []

    def __call__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        self.made.append(i)
        return {"feat.npy": np.full((2, 3), i, np.float16).tobytes()}


def test_a_rerun_keeps_the_shards_written_and_verified_and_rewrites_the_rest(tmp_path):
    caps = [f"c{j}" for j in range(50)]
    args = (tmp_path, "train", 10)
    info = {"kind": "features", "feature_shape": [2, 3], "dtype": "float16"}
    dying = _Dies(at=7)  # image 7 is the first of the 3rd shard (no shuffle, 3 per shard)
    with pytest.raises(KeyboardInterrupt):
        write_split(*args, dying, caps, None, info, images_per_shard=3, shuffle=False, progress=False)
    assert not (tmp_path / "train.manifest.json").exists() and partial_path(tmp_path, "train").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.tar*")) == ["train-000000.tar", "train-000001.tar"]
    (tmp_path / ".train-000002.tar.tmp99999").write_bytes(b"left by a killed run")
    first = {n: os.stat(tmp_path / n).st_mtime_ns for n in ("train-000000.tar", "train-000001.tar")}
    again = _Dies()
    m = write_split(*args, again, caps, None, info, images_per_shard=3, shuffle=False, progress=False)
    assert m["resumed"] == 2 and again.made == [6, 7, 8, 9]  # shards 0 and 1 kept, not rebuilt
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in first} == first
    assert not partial_path(tmp_path, "train").exists() and not list(tmp_path.glob(".*.tmp*"))
    # a damaged shard of a complete split is found on the rerun and only it is rewritten
    (tmp_path / "train-000001.tar").write_bytes(b"\0" * 1024)
    third = _Dies()
    m2 = write_split(*args, third, caps, None, info, images_per_shard=3, shuffle=False, progress=False)
    assert third.made == [3, 4, 5] and m2["resumed"] == 3
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


@pytest.mark.slow
def test_two_workers_write_the_same_shards_as_one(tmp_path):
    precomp_dir(tmp_path / "src", {"train": 23}, regions=5, dim=6)
    karpathy_json(tmp_path / "k.json", 9)
    tsv_rows(tmp_path / "a.tsv", range(1000, 1009), [2, 5, 3, 9, 1, 4, 4, 6, 2])
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        shard_precomp(tmp_path / "src", "train", out, images_per_shard=4, workers=workers, progress=False)
        shard_tsv([tmp_path / "a.tsv"], tmp_path / "k.json", "test", out, images_per_shard=2, workers=workers,
                  progress=False)
    for split in ("train", "test"):
        one, two = (load_manifest(tmp_path / f"w{w}", split) for w in (1, 2))
        assert len(one["shards"]) > 2 and one["shards"] == two["shards"]  # names, sizes, sha256 all equal


def test_the_commands_convert_every_split_and_a_rerun_keeps_the_shards(tmp_path, capsys):
    from itr.cli import main

    precomp_dir(tmp_path / "src", {"train": 5, "test": 2})
    args = ["shard", "precomp", str(tmp_path / "src"), "all", str(tmp_path / "out"), "--images-per-shard", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "wrote 1 shard(s): 2 images, 10 captions" in first and "wrote 3 shard(s): 5 images" in first
    assert main(args) == 0 and "wrote 3 shard(s), 3 kept from an earlier run" in capsys.readouterr().out
    karpathy_json(tmp_path / "k.json", 3)
    tsv_rows(tmp_path / "a.tsv", [1000, 1001, 1002], [2, 4, 3])
    assert main(["shard", "tsv", str(tmp_path / "a.tsv"), str(tmp_path / "k.json"), "test", str(tmp_path / "t")]) == 0
    assert "3 images, 15 captions, features [4, 8] (regions 2..4) float16" in capsys.readouterr().out
    assert main(["shard", "tsv", str(tmp_path / "k.json"), "test", str(tmp_path / "t")]) == 2
    assert "usage: itr shard tsv TSV_FILE" in capsys.readouterr().err


def test_teran_reads_the_sizes_from_the_image_headers(tmp_path):
    from PIL import Image

    karpathy_json(tmp_path / "k.json", 2)
    feats = teran_features(tmp_path / "f", [0, 1])
    for i, size in enumerate([(320, 200), (150, 90)]):
        Image.new("RGB", size).save(tmp_path / f"{1000 + i}.jpg")
    shard_teran(tmp_path / "f", tmp_path / "k.json", "test", tmp_path / "out", image_dir=tmp_path, progress=False)
    back = read_shard_split(tmp_path / "out", "test")
    np.testing.assert_allclose(back.boxes[1], feats["1"][1] / np.array([150, 90, 150, 90]), rtol=1e-6)


def test_converters_hold_a_shard_not_the_file_in_memory(tmp_path):
    import tracemalloc

    precomp_dir(tmp_path / "src", {"train": 400}, regions=36, dim=512)  # 30 MB of features
    karpathy_json(tmp_path / "k.json", 400)
    tsv_rows(tmp_path / "a.tsv", range(1000, 1400), [36] * 400, dim=512)  # 39 MB of base64
    for name, run in [("precomp", lambda: shard_precomp(tmp_path / "src", "train", tmp_path / "p",
                                                        images_per_shard=10, progress=False)),
                      ("tsv", lambda: shard_tsv([tmp_path / "a.tsv"], tmp_path / "k.json", "test", tmp_path / "t",
                                                images_per_shard=10, progress=False))]:
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # sha256's 4 MiB read buffer and a few images' arrays, not the 30-39 MB of the file
        assert peak < 8 * 2**20, f"{name}: peak {peak / 2**20:.1f} MiB"
