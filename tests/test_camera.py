import shutil

import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.errors import DataError
from itr.eval.job import run_eval
from itr.models import build_model, make_tokenizer
from itr.models.camera import box_features, multiview_score
from itr.modules.ops import diversity_regularizer
from itr.modules.losses import hinge_loss
from itr.train import train

from conftest import ROOT

RECIPE = ROOT / "recipes" / "synthetic" / "camera.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"] * 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(n)


def _model(bert, *overrides, img_dim=12):
    r = load_recipe(RECIPE, [f"model.text.path={bert}", "model.embed_dim=16", "model.heads=2", "model.views=3",
                             "loss.warmup_epochs=0", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(n, regions, 2, generator=g)], dim=-1)
    return {"feats": torch.randn(n, regions, img_dim, generator=g), "boxes": boxes, "text_ids": ids,
            "text_lens": lens, "img_ids": torch.arange(n)}


def test_box_features_by_hand():
    f = box_features(torch.tensor([[[0.1, 0.2, 0.5, 0.4]]]))[0, 0]
    assert torch.allclose(f, torch.tensor([0.1, 0.2, 0.4, 0.2, 2.0, 0.08]), atol=1e-6)


def test_shapes_norms_padding_invariance_and_frozen_bert(tiny_bert):
    model, tok = _model(tiny_bert)
    model.eval()
    b = _batch(tok)
    img, cap = model.embed_images(b), model.embed_captions(b)
    assert img.shape == (8, 3, 16) and cap.shape == (8, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(8, 3), atol=1e-5)
    assert torch.allclose(cap.norm(dim=-1), torch.ones(8), atol=1e-5)
    ids, lens = collate_tokens([tok.encode(CAPS[3])], tok.pad_id)
    alone = model.embed_captions({"text_ids": ids, "text_lens": lens})
    assert torch.allclose(alone[0], cap[3], atol=1e-5)  # padding is masked in the attention, BN and mean
    assert model.score(img, cap).shape == (8, 8)
    assert not any(p.requires_grad for p in model.txt_enc.backbone.parameters())  # CAMERA freezes BERT
    assert model.pretrained_parameters()  # the backbone, trained at optim.text_lr_mult when unfrozen


def test_multiview_score_is_the_best_view():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, -0.6]]])
    cap = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = torch.tensor([[1.0, 1.0], [0.8, 0.8]])
    assert torch.allclose(multiview_score(img, cap), expected)


def test_score_hinge_with_one_view_is_the_vsepp_hinge(tiny_bert):
    model, _ = _model(tiny_bert, "loss.max_violation=true")
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    ids = torch.tensor([0, 1, 2, 0, 3, 4])
    for epoch in (0, 1):
        got = model.criterion.with_score(multiview_score, img[:, None], cap, ids, epoch)
        assert got.item() == pytest.approx(hinge_loss(img, cap, ids).item(), rel=1e-6)


def test_diversity_regularizer_by_hand():
    smry = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # orthogonal columns: no penalty
    assert diversity_regularizer(smry).item() == pytest.approx(0.0)
    same = torch.tensor([[[1.0, 3.0], [1.0, 3.0]]])  # identical directions: off-diagonals 1, twice
    assert diversity_regularizer(same).item() == pytest.approx(2.0, rel=1e-6)
    assert diversity_regularizer(torch.cat([smry, same])).item() == pytest.approx(2.0, rel=1e-6)  # a batch sum


def test_loss_is_multiview_hinge_plus_diversity(tiny_bert):
    model, tok = _model(tiny_bert, "model.div_weight=0.5")
    model.eval()
    b = _batch(tok)
    out = model(b, epoch=0)
    im = model.img_enc(b["feats"], b["boxes"])
    div = diversity_regularizer(im["smry"])
    hinge = model.criterion.with_score(multiview_score, out["img"], out["cap"], b["img_ids"], 0)
    assert out["loss"].item() == pytest.approx(hinge.item() + 0.5 * div.item(), rel=1e-5)


def test_a_few_steps_reduce_the_loss(tiny_bert):
    model, tok = _model(tiny_bert)
    b = _batch(tok)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _overrides(data, bert, **kw):
    o = {"data.root": data, "data.num_workers": 0, "data.shuffle_buffer": 200, "data.images_per_shard": 40,
         "model.text.path": str(bert), "model.embed_dim": 32, "model.heads": 4, "model.views": 3,
         "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 8, "train.log_every": 2, "optim.lr": 2e-3,
         "eval.batch_size": 64, "tracking.enabled": "false"}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def test_train_one_epoch_then_the_checkpoint_evaluates_the_same(tiny_data, tiny_bert, tmp_path):
    res = train(load_recipe(RECIPE, _overrides(tiny_data, tiny_bert)), tmp_path / "run")
    assert res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])


def test_data_without_boxes_fails_naming_the_model_and_the_boxes(tiny_data, tiny_bert, tmp_path):
    pooled = tmp_path / "pooled"
    shutil.copytree(tiny_data, pooled)
    for split in ("train", "dev", "test"):
        (pooled / f"{split}_boxes.npy").unlink()
    with pytest.raises(DataError, match=r"model.name=camera needs region boxes"):
        train(load_recipe(RECIPE, _overrides(pooled, tiny_bert)), tmp_path / "run")
