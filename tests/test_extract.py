"""``itr extract``: real JPEGs through tiny random vision backbones (built here, nothing downloaded) into feature
shards that the loader and the region models read."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itr.cli import main
from itr.data.manifest import load_manifest, shard_paths, verify_shards
from itr.data.precomp import DataError
from itr.data.sources import load_split
from itr.shards.extract import extract
from itr.shards.images import shard_images

from conftest import F8K, F8K_IMAGES, ROOT, _step_module, one_thread

VIT_DIM, RESNET_DIM = 32, 16


@pytest.fixture(scope="module")
def f8k(tmp_path_factory):
    """(captions JSON with train 60 / dev 20 / test 20 of the 100 real JPEGs, image shards of each split)."""
    if not (F8K_IMAGES / "ids.txt").is_file():
        pytest.skip(f"real Flickr8k images not found at {F8K_IMAGES} (../shared/data beside the checkout; CI has it)")
    d = tmp_path_factory.mktemp("f8k")
    ids = (F8K_IMAGES / "ids.txt").read_text().split()
    caps = (F8K / "dev_caps.txt").read_text().splitlines()
    split = ["test"] * 20 + ["dev"] * 20 + ["train"] * 60
    images = [{"filename": f, "imgid": i, "split": split[i], "sentences": [{"raw": c} for c in caps[5 * i:5 * i + 5]]}
              for i, f in enumerate(ids)]
    (d / "captions.json").write_text(json.dumps({"images": images}))
    for s in ("train", "dev", "test"):
        shard_images(d / "captions.json", F8K_IMAGES, s, d / "images", images_per_shard=25, progress=False)
    return d / "captions.json", d / "images"


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny random ViT (32 x 32 input, 8 x 8 patches: a 4 x 4 grid) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=VIT_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A tiny random ResNet without an image processor (itr's transform and ImageNet statistics)."""
    from transformers import ResNetConfig, ResNetModel

    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, RESNET_DIM], depths=[1, 1],
                             layer_type="basic")).save_pretrained(d)
    return d


def samples(root, split):
    """{image id: (features, boxes, meta)} of a feature shard split."""
    import webdataset as wds

    out = {}
    for path in shard_paths(load_manifest(root, split)):
        for s in wds.tarfile_samples([{"url": path}]):
            meta = json.loads(s["json"])
            out[meta["id"]] = (np.load(io.BytesIO(s["feat.npy"])), np.load(io.BytesIO(s["boxes.npy"])), meta)
    return out


def rgb(name):
    from PIL import Image

    with Image.open(F8K_IMAGES / name) as im:
        return im.convert("RGB")


def test_vit_grid_equals_a_direct_forward_pass(f8k, vit, tmp_path):
    from transformers import AutoImageProcessor, ViTModel

    _, images = f8k
    ms = extract(vit, images, tmp_path / "out", progress=False)
    assert sorted(ms) == ["dev", "test", "train"]
    m = load_manifest(tmp_path / "out", "train")
    assert (m["kind"], m["feature_shape"], m["dtype"], m["boxes"]) == ("features", [16, VIT_DIM], "float16", True)
    assert m["num_images"] == 60 and [s["name"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar",
                                                                          "train-000002.tar"]
    verify_shards(m)
    src = load_manifest(images, "train")  # same shards, same images in each, same captions
    assert [s["num_images"] for s in m["shards"]] == [s["num_images"] for s in src["shards"]]
    got = samples(tmp_path / "out", "train")
    name = sorted(got)[0]
    feat, boxes, meta = got[name]
    assert feat.dtype == np.float16 and feat.shape == (16, VIT_DIM) and boxes.shape == (16, 4)
    row = (F8K_IMAGES / "ids.txt").read_text().split().index(name)
    assert meta["captions"] == (F8K / "dev_caps.txt").read_text().splitlines()[5 * row:5 * row + 5]
    # cells row-major over a 4 x 4 grid of the 32 x 32 input
    assert boxes[0].tolist() == [0, 0, 0.25, 0.25] and boxes[1].tolist() == [0.25, 0, 0.5, 0.25]
    assert boxes[-1].tolist() == [0.75, 0.75, 1, 1]
    proc = AutoImageProcessor.from_pretrained(vit, local_files_only=True)
    with torch.no_grad():
        ref = ViTModel.from_pretrained(vit).eval()(**proc(images=[rgb(name)], return_tensors="pt")).last_hidden_state
    np.testing.assert_allclose(feat.astype(np.float32), ref[0, 1:].numpy(), rtol=2e-3, atol=2e-3)  # CLS dropped
    assert not np.allclose(feat[0], feat[1])
    train = load_split(tmp_path / "out", "train")
    assert train.images.shape == (60, 16, VIT_DIM) and train.boxes.shape == (60, 16, 4)


def test_resnet_grid_and_pooled_from_a_folder_of_images(f8k, resnet, tmp_path):
    from transformers import ResNetModel

    from itr.data.images import eval_transform, normalize

    captions, _ = f8k
    kw = dict(image_size=64, captions=captions, split="test", images_per_shard=8, progress=False)
    grid = extract(resnet, F8K_IMAGES, tmp_path / "grid", **kw)["test"]
    pooled = extract(resnet, F8K_IMAGES, tmp_path / "pooled", mode="pooled", **kw)["test"]
    assert grid["feature_shape"] == [64, RESNET_DIM] and pooled["feature_shape"] == [1, RESNET_DIM]  # 8 x 8 map
    assert len(grid["shards"]) == 3 and grid["num_captions"] == 100
    g, p = samples(tmp_path / "grid", "test"), samples(tmp_path / "pooled", "test")
    name = sorted(g)[3]
    pixels = normalize(torch.from_numpy(eval_transform(rgb(name), 64))[None])
    with torch.no_grad():
        out = ResNetModel.from_pretrained(resnet).eval()(pixels)
    np.testing.assert_allclose(g[name][0].astype(np.float32), out.last_hidden_state[0].flatten(1).T.numpy(),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(p[name][0][0].astype(np.float32), out.pooler_output[0].flatten().numpy(),
                               rtol=2e-3, atol=2e-3)
    assert p[name][1].tolist() == [[0, 0, 1, 1]] and g[name][1][9].tolist() == [0.125, 0.125, 0.25, 0.25]
    assert g[name][2]["captions"] == p[name][2]["captions"]
    assert load_split(tmp_path / "pooled", "test").images.shape == (20, 1, RESNET_DIM)


def test_clip_vision_tower_and_image_size(f8k, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    _, images = f8k
    cfg = CLIPConfig(text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 32, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1},
                     vision_config={"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 32, "image_size": 32, "patch_size": 8}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    # no processor: 48 x 48 pixels through a 32 x 32 position table, interpolated: a 6 x 6 grid
    m = extract(tmp_path / "clip", images, tmp_path / "out", image_size=48, split="test", progress=False)["test"]
    assert m["feature_shape"] == [36, 24] and m["source"]["image_size"] == [48, 48]
    assert m["source"]["backbone"]["class"].startswith("CLIPVision")  # the image tower, not the dual encoder


def test_convnext_with_its_processor_pooled_equals_a_direct_forward_pass(f8k, tmp_path):
    from transformers import AutoImageProcessor, ConvNextConfig, ConvNextImageProcessor, ConvNextModel

    _, images = f8k
    torch.manual_seed(0)
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(tmp_path / "cnx")
    ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(tmp_path / "cnx")  # resize 73, crop 64
    m = extract(tmp_path / "cnx", images, tmp_path / "out", mode="pooled", split="test", progress=False)["test"]
    assert m["feature_shape"] == [1, 16] and m["source"]["image_size"] == [64, 64]
    name, (feat, _, _) = sorted(samples(tmp_path / "out", "test").items())[0]
    proc = AutoImageProcessor.from_pretrained(tmp_path / "cnx", local_files_only=True)
    with torch.no_grad():
        ref = ConvNextModel.from_pretrained(tmp_path / "cnx").eval()(**proc(images=[rgb(name)], return_tensors="pt"))
    np.testing.assert_allclose(feat[0].astype(np.float32), ref.pooler_output[0].numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_skips_verified_shards_and_redoes_a_damaged_one(f8k, vit, tmp_path, capsys):
    _, images = f8k
    out = tmp_path / "out"
    first = extract(vit, images, out, split="train", progress=False)["train"]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    damaged = out / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # truncated, as a kill mid-copy leaves it
    (out / "train.manifest.json").unlink()
    capsys.readouterr()
    again = extract(vit, images, out, split="train", progress=False)["train"]
    assert "2 shard(s) already written and verified, skipped" in capsys.readouterr().out
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert [n for n in stamp if now[n] != stamp[n]] == ["train-000001.tar"]
    with pytest.raises(DataError, match="other input or settings; pass --force"):
        extract(vit, images, out, split="train", mode="pooled", progress=False)
    assert extract(vit, images, out, split="train", mode="pooled", force=True, progress=False)["train"][
        "feature_shape"] == [1, VIT_DIM]


def test_bad_input_is_named(f8k, vit, tmp_path, tiny_bert):
    captions, images = f8k
    with pytest.raises(DataError, match="backbone directory .*nothere does not exist"):
        extract(tmp_path / "nothere", images, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="holds a BertModel .*not a vision backbone"):
        extract(tiny_bert, images, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="image source .*missing does not exist"):
        extract(vit, tmp_path / "missing", tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="pass --captions CAPTIONS_JSON and --split SPLIT"):
        extract(vit, F8K_IMAGES, tmp_path / "o", progress=False)
    feats = tmp_path / "feats"
    extract(vit, images, feats, split="test", progress=False)
    with pytest.raises(DataError, match="holds features, not images"):
        extract(vit, feats, tmp_path / "o", progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "test-000000.tar").write_bytes((broken / "test-000000.tar").read_bytes()[:5000])
    with pytest.raises(DataError, match="test-000000.tar is corrupt or truncated"):
        extract(vit, broken, tmp_path / "o3", split="test", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in F8K_IMAGES.glob("*.jpg"):
        os.symlink(f, bad / f.name)
    victim = sorted(bad.glob("*.jpg"))[5]
    victim.unlink()
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=f"image {victim} is not a readable image"):
        extract(vit, bad, tmp_path / "o2", captions=captions, split="train+dev+test", progress=False)


def test_cli(f8k, vit, tmp_path, capsys):
    _, images = f8k
    assert main(["extract", str(vit), str(images), str(tmp_path / "o"), "--pooled", "--split", "dev"]) == 0
    assert f"dev: 1 shard(s), 20 images, features [1, {VIT_DIM}] float16" in capsys.readouterr().out
    assert main(["extract", str(tmp_path / "none"), str(images), str(tmp_path / "o")]) == 2
    assert "itr extract: error: backbone directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vit_grid(f8k, vit, tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_grid")
    extract(vit, f8k[1], out, progress=False)
    return out


@pytest.mark.slow
def test_vse_infinity_trains_on_extracted_grid_features(vit_grid, tmp_path):
    """VSE-infinity's grid-feature setting: the backbone's grid as regions, GPO over them, the recipe unchanged."""
    from itr.config import load_recipe
    from itr.train import train

    over = {"data.root": vit_grid, "data.num_workers": 0, "data.shuffle_buffer": 100, "model.embed_dim": 32,
            "model.text.word_dim": 16, "train.batch_size": 50, "train.epochs": 1, "train.log_every": 2,
            "tracking.enabled": "false", "eval.batch_size": 64}
    res = train(load_recipe(ROOT / "recipes" / "synthetic" / "vse_infty.yaml", [f"{k}={v}" for k, v in over.items()]),
                tmp_path / "run")
    assert np.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    weights = (tmp_path / "run" / "best").resolve()
    assert any(weights.glob("*.safetensors"))


# every region model of the step-equivalence table (tests/helpers/step.py), on a batch of the extracted shards
REGION_MODELS = ["vsepp", "hrem_trip", "selfalign_vsrn", "selfalign_camera", "scan_t2i", "scan_i2t", "teran", "tgdt",
                 "dime_i2t"]


@pytest.mark.parametrize("name", REGION_MODELS)
def test_region_models_take_a_step_on_extracted_features(name, vit_grid, tiny_bert):
    from itr.config import load_recipe
    from itr.data.loader import TrainLoader
    from itr.data.sources import split_captions
    from itr.models import build_model, make_tokenizer

    entry = _step_module().MODELS[name]
    over = list(entry.get("over", [])) + ([f"model.text.path={tiny_bert}"] if entry.get("bert") else [])
    spec = entry["recipe"]
    recipe = load_recipe(ROOT / spec, over) if isinstance(spec, str) else load_recipe(raw=spec, overrides=over)
    m = load_manifest(vit_grid, "train")
    tok = make_tokenizer(recipe, captions=split_captions(m))
    torch.manual_seed(0)
    model = build_model(recipe, m["feature_shape"][-1], tok)
    batch = next(iter(TrainLoader(m, tok, 10, num_workers=0, shuffle_buffer=50).epoch(0)))
    assert batch["feats"].shape == (10, 16, VIT_DIM) and batch["boxes"].shape == (10, 16, 4)
    loss = model(batch, epoch=entry.get("epoch", 0))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    first = next(p for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and p.shape[1] == VIT_DIM)
    assert first.grad is not None and first.grad.abs().sum() > 0  # the features reached the image side


def _members(root, split):
    import tarfile

    names = []
    for path in shard_paths(load_manifest(root, split)):
        with tarfile.open(path) as tar:
            names.append([m.name for m in tar])
    return names


def test_workers_prepare_the_images_in_order_and_name_a_bad_one(f8k, vit, vit_grid, tmp_path):
    captions, images = f8k
    m = extract(vit, images, tmp_path / "w", split="train", workers=2, batch_size=7, progress=False)["train"]
    assert _members(tmp_path / "w", "train") == _members(vit_grid, "train")  # the same samples in the same order
    got, ref = samples(tmp_path / "w", "train"), samples(vit_grid, "train")
    for k in ref:
        np.testing.assert_allclose(got[k][0].astype(np.float32), ref[k][0].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert m["num_images"] == 60
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in F8K_IMAGES.glob("*.jpg"):
        os.symlink(f, bad / f.name)
    victim = sorted(bad.glob("*.jpg"))[7]
    victim.unlink()
    victim.write_bytes(b"GIF89a truncated")
    with pytest.raises(DataError, match=f"^image {victim} is not a readable image"):
        extract(vit, bad, tmp_path / "o", captions=captions, split="train+dev+test", workers=2, progress=False)


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).glob("*-*.tar"))}


@pytest.mark.slow
def test_two_processes_write_the_same_shards_as_one(f8k, vit, tmp_path):
    _, images = f8k
    with one_thread():
        extract(vit, images, tmp_path / "one", batch_size=7, progress=False)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", ITR_PROGRESS_SECONDS="0")
    p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0", "-m", "itr",
                        "extract", str(vit), str(images), str(tmp_path / "two"), "--batch-size", "7"],
                       capture_output=True, text=True, errors="replace", env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "train: 3 shard(s), 60 images" in p.stdout and p.stdout.count("shard(s),") == 3  # rank 0 reports
    assert "extract grid:" in p.stderr  # rank 0's bar
    recs = [json.loads(f.read_text()) for f in (tmp_path / "two").glob(".extract-*/*.json")]
    assert len(recs) == 5 and sorted(r["rank"] for r in recs) == [0, 0, 0, 1, 1]  # whole shards, dealt
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one") and len(_digests(tmp_path / "one")) == 5
    for split in ("train", "dev", "test"):
        a, b = load_manifest(tmp_path / "one", split), load_manifest(tmp_path / "two", split)
        assert a["shards"] == b["shards"] and a["extract_key"] == b["extract_key"]
