"""DIME: encoders, routing by hand, batched all-pairs scores against a per-pair loop (ragged captions, padding),
the loss = hinge + path regularization, gradient accumulation, a training run whose checkpoint evaluates the same."""
import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.dime import Router, route_many, route_one
from itr.modules.losses import hinge_from_scores

from conftest import ROOT, assert_split_steps_equal

RECIPE = ROOT / "recipes" / "synthetic" / "dime_t2i.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(bert, direction="t2i", *overrides, img_dim=12):
    r = load_recipe(RECIPE, [f"model.text.path={bert}", "model.embed_dim=16", "model.heads=2", "model.hid_imrc=16",
                             "model.hid_router=16", "model.path_hid=8", f"model.direction={direction}", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12, img_ids=None):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    return {"feats": torch.randn(n, regions, img_dim, generator=g), "text_ids": ids, "text_lens": lens,
            "img_ids": torch.arange(n) if img_ids is None else img_ids}


def test_router_and_routing_by_hand():
    r = Router(2, 3, 4)
    torch.nn.init.zeros_(r.mlp[2].weight)  # only the 1.5 bias remains
    x = torch.randn(1, 3, 2)
    assert torch.allclose(r(x, torch.ones(1, 3, dtype=torch.bool)), torch.full((1, 4), float(torch.tanh(torch.tensor(1.5)))))
    e = [torch.full((1, 1, 2), float(v)) for v in (1, 2, 3, 4)]
    probs = [torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    outs, allp = route_many(e, probs, e[0])
    assert outs[0].flatten().tolist() == pytest.approx([1.5, 1.5])  # (0.5 x 1 + 0.5 x 2) / (0.5 + 0.5)
    assert outs[1].flatten().tolist() == pytest.approx([1.0, 1.0])  # all ~0: the identity cell's skip
    p = [torch.tensor([0.2]), torch.tensor([0.6]), torch.tensor([0.0]), torch.tensor([0.0])]
    x_in = [torch.full((1, 2), 10.0 * (k + 1)) for k in range(4)]
    (out,), _ = route_one([v[0] for v in e], p, x_in)
    # (0.2 x 1 + 0.6 x 2 + 30 + 40) / (0.2 + 0.6 + 1 + 1): cells 3 and 4 are skipped with their inputs
    assert out.flatten().tolist() == pytest.approx([(0.2 + 1.2 + 30 + 40) / 2.8] * 2)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scores_equal_a_per_pair_loop_without_padding(tiny_bert, direction):
    model, tok = _model(tiny_bert, direction)
    model.eval()
    b = _batch(tok)
    im, cap = model.embed_images(b), model.embed_captions(b)
    assert im["img"].shape == (8, 16) and im["rgn"].shape == (8, 5, 16) and cap["stc"].shape == (8, 16)
    assert torch.allclose(cap["stc"].norm(dim=-1), torch.ones(8), atol=1e-5)
    got = model.score(im, cap)
    for j, c in enumerate(CAPS):
        ids, lens = collate_tokens([tok.encode(c)], tok.pad_id)  # alone: no padding at all
        one = model.embed_captions({"text_ids": ids, "text_lens": lens})
        torch.testing.assert_close(one["stc"][0], cap["stc"][j], rtol=1e-5, atol=1e-5)
        for i in range(8):
            s = model.score({k: v[i:i + 1] for k, v in im.items()}, one)
            torch.testing.assert_close(s[0, 0], got[i, j], rtol=1e-4, atol=1e-5)
    padded = {**cap, "wrd": torch.nn.functional.pad(cap["wrd"], (0, 0, 0, 4))}  # extra zero padding
    torch.testing.assert_close(model.score(im, padded), got, rtol=0, atol=1e-5)


def test_sub_chunks_give_the_same_scores(tiny_bert, monkeypatch):
    import itr.models.dime as dime

    model, tok = _model(tiny_bert, "i2t")
    model.eval()
    b = _batch(tok)
    im, cap = model.embed_images(b), model.embed_captions(b)
    whole = model.score(im, cap)
    monkeypatch.setattr(dime, "caption_chunks", lambda n_img, n_cap, per: [(j, j + 1) for j in range(n_cap)])
    torch.testing.assert_close(model.score(im, cap), whole, rtol=1e-5, atol=1e-6)


def test_loss_is_hinge_plus_half_the_path_regularizer(tiny_bert):
    model, tok = _model(tiny_bert)
    b = _batch(tok)
    out = model(b, epoch=0)
    s, paths = model.interact(out["img"], out["rgn"], out["cap"], out["wrd"], out["cap_lens"])
    assert paths.shape == (8, 8, 36)
    hinge = hinge_from_scores(s, s.t(), b["img_ids"], b["img_ids"], 0, 0.2, True, True)
    vec = torch.nn.functional.normalize(model.path_mapping(paths.mean(0)), dim=-1)  # t2i: per caption
    reg = ((vec @ vec.t() - out["bert"] @ out["bert"].t()) ** 2).sum() / 8
    assert out["loss"].item() == pytest.approx(hinge.item() + 0.5 * reg.item(), rel=1e-5)
    assert not out["bert"].requires_grad and not any(p.requires_grad for p in model.txt_enc.backbone.parameters())


def test_a_few_steps_reduce_the_loss(tiny_bert):
    model, tok = _model(tiny_bert, "i2t")
    b = _batch(tok)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_accumulation_gives_the_whole_batch_step(tiny_bert):
    ref = assert_split_steps_equal("dime_i2t", [(1, 2)], bert=tiny_bert)
    assert "path_mapping.weight" in ref["grads"] and "layers.2.sa.q.weight" in ref["grads"]


def test_train_one_epoch_then_the_checkpoint_evaluates_the_same(tiny_data, tiny_bert, tmp_path):
    from itr.eval.job import run_eval
    from itr.train import train

    o = {"data.root": tiny_data, "data.num_workers": 0, "data.shuffle_buffer": 200, "data.images_per_shard": 40,
         "model.text.path": str(tiny_bert), "model.embed_dim": 16, "model.heads": 2, "model.hid_imrc": 16,
         "model.hid_router": 16, "train.batch_size": 16, "train.epochs": 1, "train.max_steps": 6,
         "train.log_every": 2, "optim.lr": 2e-3, "eval.batch_size": 64, "eval.chunk_size": 16,
         "tracking.enabled": "false"}
    res = train(load_recipe(RECIPE, [f"{k}={v}" for k, v in o.items()]), tmp_path / "run")
    assert res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
