import math

import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.errors import ConfigError
from itr.eval.job import run_eval
from itr.models import build_model, make_tokenizer
from itr.models.vsrn import CaptionModel, RsGCN
from itr.train import train

from conftest import ROOT, tiny_overrides

RECIPE = ROOT / "recipes" / "synthetic" / "vsrn.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"] * 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(n)


def _model(*overrides, img_dim=12):
    r = load_recipe(RECIPE, ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1",
                             "model.caption_hidden=8", "model.caption_word_dim=6", "loss.max_violation=false",
                             "loss.warmup_epochs=0", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    return {"feats": torch.randn(n, regions, img_dim, generator=g), "text_ids": ids, "text_lens": lens,
            "img_ids": torch.arange(n)}


def test_shapes_norms_and_padding_invariance():
    model, tok = _model()
    model.eval()
    b = _batch(tok)
    img, cap = model.embed_images(b), model.embed_captions(b)
    assert img.shape == (8, 16) and cap.shape == (8, 16)
    assert torch.allclose(img.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(cap.norm(dim=1), torch.ones(8), atol=1e-5)
    ids, lens = collate_tokens([tok.encode(CAPS[3])], tok.pad_id)
    alone = model.embed_captions({"text_ids": ids, "text_lens": lens})
    assert torch.allclose(alone[0], cap[3], atol=1e-6)
    # pooled features (one "region" per image) work too
    assert model.embed_images({"feats": torch.randn(3, 1, 12)}).shape == (3, 16)


def test_region_features_are_normalized_over_the_regions_as_the_reference():
    model, _ = _model()
    im = model.img_enc(torch.randn(3, 5, 12))
    assert torch.allclose(im["fc"].norm(dim=1), torch.ones(3, 16), atol=1e-5)  # l2norm(X): dim=1 of (B, R, D)
    assert torch.allclose(im["gcn_n"].norm(dim=1), torch.ones(3, 16), atol=1e-5)
    per_region, _ = _model("model.l2_axis=features")
    im = per_region.img_enc(torch.randn(3, 5, 12))
    assert torch.allclose(im["fc"].norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    with pytest.raises(ConfigError, match="model.l2_axis"):
        _model("model.l2_axis=rows")


def test_rs_gcn_starts_as_identity_and_computes_the_relation_update():
    torch.manual_seed(0)
    gcn = RsGCN(6)
    v = torch.randn(2, 4, 6)
    assert torch.allclose(gcn(v), v)  # BatchNorm weight and bias start at 0 (Rs_GCN.py)
    gcn.eval()
    gcn.bn.reset_running_stats()
    torch.nn.init.ones_(gcn.bn.weight)  # running stats (0, 1): BN is x / sqrt(1 + eps)
    rel = gcn.theta(v) @ gcn.phi(v).transpose(1, 2) / 4  # R / N
    expected = v + gcn.W(rel @ gcn.g(v)) / math.sqrt(1 + gcn.bn.eps)
    assert torch.allclose(gcn(v), expected, atol=1e-5)


def test_caption_loss_scores_the_reference_positions():
    """With a uniform output layer every scored token costs log V: the count checks the mask rule of
    VSRN's data.py (tokens 1..len, i.e. the words, <end> and one padding token) and the max_len cut."""
    torch.manual_seed(0)
    vocab = 11
    cap = CaptionModel(vocab, dim_vid=6, hidden=5, dim_word=4, max_len=60, dropout=0.0)
    torch.nn.init.zeros_(cap.out.weight)
    torch.nn.init.zeros_(cap.out.bias)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 6, 7, 8, 2]])
    lens = torch.tensor([4, 6])
    regions = torch.randn(2, 3, 6)
    assert cap.nll(regions, ids, lens).item() == pytest.approx((4 + 6) * math.log(vocab), rel=1e-5)
    cap.max_len = 4  # 3 decoding steps: at most 3 tokens per caption
    assert cap.nll(regions, ids, lens).item() == pytest.approx((3 + 3) * math.log(vocab), rel=1e-5)


def test_caption_loss_does_not_depend_on_padding_or_batch():
    torch.manual_seed(0)
    cap = CaptionModel(11, dim_vid=6, hidden=5, dim_word=4, dropout=0.0)
    regions = torch.randn(2, 3, 6)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 6, 7, 8, 2]])
    lens = torch.tensor([4, 6])
    both = cap.nll(regions, ids, lens)
    first = cap.nll(regions[:1], ids[:1, :4], lens[:1])
    second = cap.nll(regions[1:], ids[1:], lens[1:])
    assert both.item() == pytest.approx((first + second).item(), rel=1e-5)


def test_loss_is_hinge_plus_normalized_caption_loss():
    model, tok = _model("model.caption_norm=4", "model.caption_weight=0.5")
    model.eval()  # no dropout: the two forward passes agree
    b = _batch(tok)
    out = model(b, epoch=0)
    im = model.img_enc(b["feats"])
    nll = model.caption.nll(im["gcn_n"], b["text_ids"], b["text_lens"])
    hinge = model.criterion({"img": out["img"], "cap": out["cap"]}, {"img_ids": b["img_ids"]}, 0)
    assert out["aux_loss"].item() == pytest.approx(0.5 * nll.item() / 4, rel=1e-5)
    assert out["loss"].item() == pytest.approx(hinge.item() + 0.5 * nll.item() / 4, rel=1e-5)
    no_cap, _ = _model("model.caption_weight=0")
    assert no_cap.caption is None and "aux_loss" not in no_cap.embed(b)


def test_a_few_steps_reduce_the_loss():
    model, tok = _model()
    b = _batch(tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    torch.manual_seed(1)
    for _ in range(12):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_train_one_epoch_then_the_checkpoint_evaluates_the_same(tiny_data, tmp_path):
    o = tiny_overrides(tiny_data, **{"train.epochs": 1, "train.max_steps": 8, "model.caption_hidden": 16,
                                     "model.caption_word_dim": 8, "tracking.enabled": "false"})
    res = train(load_recipe(RECIPE, o), tmp_path / "run")
    assert res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
