"""Variable region counts (bottom-up TSVs): a count per sample, padding in the batch, the mask in the model."""
import numpy as np
import pytest
import torch
from convert_inputs import karpathy_json, tsv_rows

from itr.config import load_recipe
from itr.data.manifest import load_manifest
from itr.errors import ConfigError
from itr.modules.fragments import drop_regions
from itr.shards.tsv import shard_tsv

from conftest import ROOT

RECIPE = ROOT / "recipes" / "synthetic" / "vse_infty.yaml"


def _tsv_shards(tmp, splits=(("train", 40), ("dev", 10), ("test", 10)), dim=16):
    """TSV shards whose region count varies per image (1..9), features that tell images apart."""
    out = tmp / "shards"
    for s, n in splits:
        karpathy_json(tmp / f"{s}.json", n, split=s)
        tsv_rows(tmp / f"{s}.tsv", range(1000, 1000 + n), [1 + (i * 5) % 9 for i in range(n)], dim=dim, seed=len(s))
        shard_tsv([tmp / f"{s}.tsv"], tmp / f"{s}.json", s, out, images_per_shard=8, progress=False)
    return out


def test_the_loader_pads_each_batch_and_counts_the_regions(tmp_path):
    from itr.data.loader import TrainLoader
    from itr.data.text import WordVocab

    out = _tsv_shards(tmp_path, splits=(("train", 40),))
    m = load_manifest(out, "train")
    vocab = WordVocab.build([c for c in (out / "train.captions.txt").read_text().splitlines()])
    n = 0
    for batch in TrainLoader(m, vocab, 10, num_workers=0, shuffle_buffer=20).epoch(0):
        lens, feats, boxes = batch["feat_lens"], batch["feats"], batch["boxes"]
        assert feats.shape[1] == int(lens.max()) <= 9 and boxes.shape[:2] == feats.shape[:2]  # the batch's longest
        for f, b, r, img in zip(feats, boxes, lens, batch["img_ids"]):
            assert r == 1 + (int(img) * 5) % 9  # the image's own count
            assert f[:r].abs().sum(1).gt(0).all() and not f[r:].any() and not b[r:].any()
        n += len(lens)
    assert n == 200  # every pair of the epoch


def test_region_drop_never_keeps_padding():
    torch.manual_seed(0)
    feats = torch.randn(64, 6, 3)
    lens = torch.randint(1, 7, (64,))
    feats[torch.arange(6)[None] >= lens[:, None]] = 0
    out, kept = drop_regions(feats, 0.5, lens)
    assert (kept >= 1).all() and (kept <= lens).all()
    for f, o, k, r in zip(feats, out, kept, lens):
        real = {tuple(x.tolist()) for x in f[:r]}
        assert all(tuple(x.tolist()) in real for x in o[:k]) and not o[k:].any()


@pytest.mark.parametrize("name", ["vse_infty", "hrem"])
def test_region_models_pool_over_the_real_regions_only(name):
    from itr.data.text import WordVocab
    from itr.models import build_model

    vocab = WordVocab.build(["a dog"])
    recipe = load_recipe(ROOT / "recipes" / "synthetic" / f"{name}.yaml", ["model.embed_dim=16", "model.text.word_dim=4"]
                         + (["model.nhead=2"] if name == "hrem" else []))
    torch.manual_seed(0)
    model = build_model(recipe, 5, vocab).eval()
    x = torch.randn(3, 4, 5)
    padded = torch.cat([x, torch.zeros(3, 3, 5)], 1)
    same = model.embed_images({"feats": padded, "feat_lens": torch.tensor([4, 4, 4])})
    torch.testing.assert_close(same, model.embed_images({"feats": x}))
    assert not torch.allclose(same, model.embed_images({"feats": padded}))  # the padding would count


def test_models_that_would_count_padding_refuse_variable_regions():
    from itr.data.text import WordVocab
    from itr.models import build_model
    from itr.models.vsepp import VSEPP

    class MeanOverAll(VSEPP):  # a region model that does not read the counts
        takes_region_lens = False

    vocab = WordVocab.build(["a dog"])
    padded = torch.cat([torch.randn(3, 4, 5), torch.zeros(3, 3, 5)], 1)
    recipe = load_recipe(ROOT / "recipes" / "synthetic" / "vsepp_gru.yaml", ["model.embed_dim=16"])
    model = MeanOverAll(build_model(recipe, 5, vocab).cfg, 5, vocab)
    batch = {"feats": padded, "feat_lens": torch.tensor([4, 4, 4]), "text_ids": torch.ones(3, 2, dtype=torch.long),
             "text_lens": torch.tensor([2, 2, 2]), "img_ids": torch.arange(3)}
    with pytest.raises(ConfigError, match="variable number of regions"):
        model(batch)


WORDS = ["model.text.word_dim=4", "model.text.min_count=1"]
BERT = ["model.text.path=BERT", "model.heads=1"]


@pytest.mark.parametrize("recipe,over", [("vsepp_gru.yaml", WORDS), ("scan_t2i.yaml", WORDS), ("vsrn.yaml", WORDS),
                                         ("tgdt.yaml", [*WORDS, "model.heads=1"]),
                                         ("teran.yaml", [*BERT, "model.text_layers=0"]), ("dime_t2i.yaml", BERT)])
def test_models_that_mask_the_padding_take_variable_regions(recipe, over, tiny_bert):
    from itr.models import build_model, make_tokenizer

    over = [o.replace("=BERT", f"={tiny_bert}") for o in over]
    r = load_recipe(ROOT / "recipes" / "synthetic" / recipe, ["model.embed_dim=16", *over])
    model = build_model(r, 5, make_tokenizer(r, captions=["a dog"]))
    batch = {"feats": torch.randn(3, 7, 5), "boxes": torch.rand(3, 7, 4), "feat_lens": torch.tensor([4, 7, 1]),
             "img_ids": torch.arange(3), "text_ids": torch.ones(3, 3, dtype=torch.long),
             "text_lens": torch.tensor([3, 3, 3])}
    assert torch.isfinite(model(batch)["loss"])  # the tests of the masks: tests/test_region_masks*.py


@pytest.mark.slow
def test_vse_infinity_trains_and_evaluates_on_tsv_shards_with_variable_regions(tmp_path):
    from itr.eval.job import run_eval
    from itr.train import train

    out = _tsv_shards(tmp_path)
    assert load_manifest(out, "train")["variable_regions"]
    o = {"data.root": out, "data.num_workers": 0, "data.shuffle_buffer": 50, "train.batch_size": 20,
         "train.epochs": 1, "train.log_every": 2, "tracking.enabled": "false", "model.embed_dim": 16,
         "model.text.word_dim": 8, "eval.batch_size": 16, "optim.lr": 2e-3}
    res = train(load_recipe(RECIPE, [f"{k}={v}" for k, v in o.items()]), tmp_path / "run")
    assert np.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", out, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
