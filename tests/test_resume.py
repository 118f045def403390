"""Exact resume for every model with randomness in its forward. (Kills at every point of the checkpoint protocol:
tests/test_run_protocol.py.)"""
import shutil

import pytest
from safetensors.torch import load_file

from itr.checkpoint import read_meta

from conftest import ROOT

# Every model with randomness in its forward (region drop, caption masking, dropout, random crops and flips), at toy
# sizes. VSE++ and DIME have none; SCAN none in training either. "recipe": another recipe than
# recipes/synthetic/NAME.yaml; "images": trained on small_image_shards (raw JPEGs) instead of small_shards.
RANDOM_FORWARD = {
    "vse_infty": {"model.text.word_dim": 8, "model.text.min_count": 1},
    "hrem": {"model.nhead": 4, "model.topk": 3, "model.relation_words": 12, "model.text.word_dim": 8,
             "model.interaction_warmup_epochs": 0},
    "vsrn": {"model.caption_hidden": 16, "model.caption_word_dim": 8, "model.text.word_dim": 8},
    "selfalign_vsrn": {"model.caption_hidden": 16, "model.caption_word_dim": 8, "model.text.word_dim": 8,
                       "model.prototypes": 64, "data.max_words": 20},
    "tgdt": {"model.ff_dim": 32, "model.heads": 2, "model.text.word_dim": 8, "model.text.min_count": 1,
             "optim.warmup_steps": 0},
    "teran": {"model.heads": 2, "model.image_layers": 1, "model.layers": 1, "model.ff_dim": 32, "model.text_layers": 0,
              "model.text.path": "{bert}", "model.text.freeze": "false", "optim.warmup_steps": 0},
    "camera": {"model.heads": 4, "model.views": 3, "model.dropout": 0.1, "model.text.path": "{bert}"},
    # CAMERA's dropout, SelfAlign's Sinkhorn codes; the BERT trained (its dropout live)
    "selfalign_camera": {"model.heads": 4, "model.views": 3, "model.dropout": 0.1, "model.text.path": "{bert}",
                         "model.text.freeze": "false", "model.prototypes": 24, "model.negatives": 7,
                         "model.freeze_prototypes_epochs": 0, "data.max_words": 12},
    # the MLPs' dropout and the BERT's, random resized crops and flips of the JPEGs (the loader's own RNG)
    "sentence_matcher": {"recipe": "f8k/sentence_matcher_images.yaml", "images": True, "model.text.path": "{bert}",
                         "model.text.freeze": "false", "model.mlp_dim": 24, "model.image.hidden_sizes": "[8, 16]",
                         "model.image.embedding_size": 8, "data.image_size": 24, "data.dev_split": "test",
                         "optim.warmup_ratio": 0.0},
}


@pytest.fixture(scope="module")
def small_image_shards(tmp_path_factory):
    """small_shards' captions (48/16 images, 5 captions each) with a tiny JPEG per image (noise on the image's own
    colour), as raw-image shards: the same ~10 steps of 24 pairs an epoch."""
    import json

    import numpy as np
    from PIL import Image

    from itr.data.synthetic import generate
    from itr.shards.images import shard_images

    src = generate(tmp_path_factory.mktemp("small_img_src"), splits=(("train", 48), ("test", 16)), dim=16, regions=4,
                   seed=3)
    images, rng = [], np.random.default_rng(0)
    (src / "jpg").mkdir()
    for split in ("train", "test"):
        caps = (src / f"{split}_caps.txt").read_text().splitlines()
        for i in range(len(caps) // 5):
            name = f"{split}{i}.jpg"
            pixels = rng.integers(0, 256, (30, 40, 3)) // 2 + rng.integers(0, 128, 3)
            Image.fromarray(pixels.astype(np.uint8)).save(src / "jpg" / name)
            images.append({"filename": name, "split": split, "sentences": [{"raw": c} for c in caps[5 * i:5 * i + 5]]})
    (src / "captions.json").write_text(json.dumps({"images": images}))
    out = tmp_path_factory.mktemp("small_image_shards")
    for split in ("train", "test"):
        shard_images(src / "captions.json", src / "jpg", split, out, images_per_shard=16, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RANDOM_FORWARD))
def test_a_model_with_randomness_in_its_forward_resumes_exactly(name, small_shards, small_image_shards, tiny_bert,
                                                                 tmp_path, monkeypatch):
    """Stopped by SIGTERM mid-epoch 2 (the test hook sends it at step 13), resumed: every weight and every reported
    number equal the uninterrupted run's. A resumed run creates its data iterator after restoring the RNG: the
    iterator must not draw from the global RNG (it did: VSE-infinity's region drops then shifted)."""
    from itr.config import load_recipe
    from itr.train import train

    from conftest import small_overrides

    spec = dict(RANDOM_FORWARD[name])
    recipe = ROOT / "recipes" / spec.pop("recipe", f"synthetic/{name}.yaml")
    shards = small_image_shards if spec.pop("images", False) else small_shards
    extra = {k: str(v).format(bert=tiny_bert) for k, v in spec.items()}
    over = small_overrides(shards, **extra)
    ref = train(load_recipe(recipe, over), tmp_path / "ref")
    assert ref["global_step"] == 20, ref
    monkeypatch.setenv("ITR_FAULT", "term@step 13")
    assert train(load_recipe(recipe, over), tmp_path / "cut") is None  # stopped, checkpointed
    assert read_meta(tmp_path / "cut" / "last")["train_state"]["global_step"] == 13
    monkeypatch.delenv("ITR_FAULT")
    res = train(load_recipe(recipe, over + ["train.resume=latest"]), tmp_path / "cut")
    for ck in ("last", "best"):
        a = load_file(str(tmp_path / "ref" / ck / "model.safetensors"))
        b = load_file(str(tmp_path / "cut" / ck / "model.safetensors"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), f"{name}: {ck} differs"
    assert res == ref


def test_a_run_directory_written_by_an_older_itr_resumes(small_shards, tmp_path):
    """tests/fixtures/run_49c3d5a: a tiny VSE++ run on small_shards written by itr at commit 49c3d5a (before the
    run-directory protocol, RNG files and TrainState) and stopped by SIGTERM at step 14 of 20. The current code
    resumes it and ends bitwise where its own uninterrupted run ends (VSE++ draws no random numbers in training)."""
    from itr.config import load_recipe
    from itr.train import train

    from conftest import small_overrides

    recipe = ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml"
    over = small_overrides(small_shards)
    ref = train(load_recipe(recipe, over), tmp_path / "ref")
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_49c3d5a", tmp_path / "old")
    assert read_meta(tmp_path / "old" / "last")["train_state"]["global_step"] == 14
    res = train(load_recipe(recipe, over + ["train.resume=latest"]), tmp_path / "old")
    for ck in ("last", "best"):
        a = load_file(str(tmp_path / "ref" / ck / "model.safetensors"))
        b = load_file(str(tmp_path / "old" / ck / "model.safetensors"))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), ck
    assert res == ref
