"""Exact resume for every model with randomness in its forward. (Kills at every point of the checkpoint protocol:
tests/test_run_protocol.py.)"""
import shutil

import pytest
from safetensors.torch import load_file

from itr.checkpoint import read_meta

from conftest import ROOT

# Every model with randomness in its forward (region drop, caption masking, dropout), at toy sizes. VSE++ and DIME
# have none; SCAN none in training either. The sentence matcher's dropout is covered by its own real-JPEG test.
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
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RANDOM_FORWARD))
def test_a_model_with_randomness_in_its_forward_resumes_exactly(name, small_shards, tiny_bert, tmp_path, monkeypatch):
    """Stopped by SIGTERM mid-epoch 2 (the test hook sends it at step 13), resumed: every weight and every reported
    number equal the uninterrupted run's. A resumed run creates its data iterator after restoring the RNG: the
    iterator must not draw from the global RNG (it did: VSE-infinity's region drops then shifted)."""
    from itr.config import load_recipe
    from itr.train import train

    from conftest import small_overrides

    extra = {k: str(v).format(bert=tiny_bert) for k, v in RANDOM_FORWARD[name].items()}
    recipe = ROOT / "recipes" / "synthetic" / f"{name}.yaml"
    over = small_overrides(small_shards, **extra)
    ref = train(load_recipe(recipe, over), tmp_path / "ref")
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
