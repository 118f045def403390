"""VSE-infinity: GPO, the fragment encoders, the training-time augmentations, the model and a training run."""
import math

import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.modules.fragments import CaptionAugment, drop_regions
from itr.modules.gpo import GPO, positional_encoding_1d
from itr.modules.losses import hinge_loss

from conftest import ROOT, tiny_overrides

RECIPE = ROOT / "recipes" / "synthetic" / "vse_infty.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"] * 4


def _model(*overrides, img_dim=12, caps=CAPS):
    r = load_recipe(RECIPE, ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1", *overrides])
    tok = make_tokenizer(r, captions=caps)
    return build_model(r, img_dim, tok), tok


def _text(tok, caps):
    return collate_tokens([tok.encode(c) for c in caps], tok.pad_id)


# ----------------------------------------------------------------------------- GPO


def test_positional_encoding_by_hand():
    pe = positional_encoding_1d(4, 3)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    # position 1: sin(1 / 10000^(2i/d)), cos(...) for i = 0, 1 with d = 4
    assert torch.allclose(pe[1], torch.tensor([math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)]), atol=1e-6)


def test_gpo_weights_are_a_softmax_over_valid_positions_and_depend_on_the_length_only():
    torch.manual_seed(0)
    g = GPO()
    lens = torch.tensor([5, 2, 1])
    w, mask = g.pool_weights(lens, 5)
    assert torch.allclose(w.sum(1).squeeze(-1), torch.ones(3), atol=1e-6)
    assert (w.squeeze(-1)[~mask] == 0).all() and torch.equal(w[2, 0], torch.ones(1))
    w2, _ = g.pool_weights(torch.tensor([2]), 2)  # a set of 2 pools the same alone or beside longer ones
    assert torch.allclose(w2[0], w[1, :2], atol=1e-6)


def test_gpo_sorts_every_dimension_and_ignores_padding(monkeypatch):
    torch.manual_seed(0)
    g = GPO()
    x = torch.randn(2, 4, 3)
    lens = torch.tensor([4, 2])
    x_pad = x.clone()
    x_pad[1, 2:] = 1e3  # garbage in the padding must not matter
    out = g(x_pad, lens)
    w, _ = g.pool_weights(lens, 4)
    for b, n in enumerate(lens.tolist()):  # per sample: sort each dimension of the valid part, weight, sum
        ref = (x[b, :n].sort(dim=0, descending=True).values * w[b, :n]).sum(0)
        assert torch.allclose(out[b], ref, atol=1e-6)
    # with one-hot weights on the first rank GPO is max pooling; with uniform weights, mean pooling
    monkeypatch.setattr(g, "pool_weights", lambda l, m: (torch.nn.functional.one_hot(torch.zeros_like(l), m).float()[..., None],
                                                         torch.arange(m)[None] < l[:, None]))
    assert torch.allclose(g(x_pad, lens), torch.stack([x[0].max(0).values, x[1, :2].max(0).values]))
    monkeypatch.setattr(g, "pool_weights", lambda l, m: (((torch.arange(m)[None] < l[:, None]).float() / l[:, None])[..., None],
                                                         torch.arange(m)[None] < l[:, None]))
    assert torch.allclose(g(x_pad, lens), torch.stack([x[0].mean(0), x[1, :2].mean(0)]), atol=1e-6)


# ----------------------------------------------------------------------------- augmentations


def test_region_drop_keeps_order_at_least_one_and_zero_pads():
    torch.manual_seed(0)
    feats = torch.arange(1, 4 * 6 + 1, dtype=torch.float).reshape(4, 6, 1)
    out, lens = drop_regions(feats, 0.5)
    for b in range(4):
        kept = out[b, : lens[b], 0]
        assert (kept[1:] > kept[:-1]).all() and set(kept.tolist()) <= set(feats[b, :, 0].tolist())
        assert (out[b, lens[b]:] == 0).all()
    assert out.shape[1] == int(lens.max())
    one, lens1 = drop_regions(feats, 0.9999)
    assert (lens1 == 1).all() and one.shape == (4, 1, 1)
    same, lens0 = drop_regions(feats, 0.0)
    assert same is feats and (lens0 == 6).all()
    _, big = drop_regions(torch.zeros(64, 200, 1), 0.2)
    assert abs(big.float().mean().item() / 200 - 0.8) < 0.02


def test_caption_augmentation_proportions_and_specials():
    _, tok = _model()
    aug = CaptionAugment(tok, 0.2)
    assert aug.mask_id == tok.word2idx["<mask>"] == len(tok) - 1  # the bigru branch's added <mask> word
    torch.manual_seed(0)
    n, L = 4000, 12
    ids = torch.randint(4, len(tok) - 1, (n, L))
    ids[:, 0], ids[:, -1] = 1, 2  # <start> ... <end>
    lens = torch.full((n,), L)
    out, new = aug(ids, lens)
    assert (out[:, 0] == 1).all() and (out[torch.arange(n), new - 1] == 2).all()
    words = n * (L - 2)
    deleted = (lens - new).sum().item() / words
    masked = (out == aug.mask_id).sum().item() / words
    assert abs(deleted - 0.2 * 0.4) < 0.01 and abs(masked - 0.2 * 0.5) < 0.01
    kept = out[new == L]  # rows without deletions: replaced tokens are the rest of the changes
    changed = ((kept != ids[new == L]) & (kept != aug.mask_id)).sum().item() / (kept.shape[0] * (L - 2))
    assert 0.005 < changed < 0.02  # 2% replaced by a random id (sometimes the same one)
    off = CaptionAugment(tok, 0.0)
    assert off(ids, lens)[0] is ids


def test_caption_augmentation_treats_word_pieces_as_one_word(tmp_path, monkeypatch):
    import itertools

    from transformers import BertTokenizerFast

    from itr.data.text import HFTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "run", "##s", "##ning", "fast"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)  # transformers 5: vocab=
    tok = HFTokenizer(str(tmp_path))
    ids = torch.tensor([tok.encode("a dog runs running fast")] * 3000)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 7, 9, 10, 3]
    aug = CaptionAugment(tok, 0.2)
    assert aug.mask_id == 4
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, **kw: real_randint(1, 2, size, **kw))  # random id: [UNK]
    torch.manual_seed(0)
    out, lens = aug(ids, torch.full((3000,), 9))
    # every output is a per-word choice of keep / mask all pieces / replace all pieces / delete the word
    words = [[5], [6], [7, 8], [7, 9], [10]]
    options = [[w, [4] * len(w), [1] * len(w), []] for w in words]
    possible = {tuple([2] + sum(choice, []) + [3]) for choice in itertools.product(*options)}
    rows = {tuple(r[:n]) for r, n in zip(out.tolist(), lens.tolist())}
    assert rows <= possible
    assert any(r[3:5] == (4, 4) for r in rows) and any(len(r) == 7 and 8 not in r for r in rows)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("mlp", [True, False])
def test_shapes_norms_padding_invariance_and_pooled_features(mlp):
    torch.manual_seed(0)
    model, tok = _model(f"model.image_mlp={str(mlp).lower()}")
    model.eval()
    img = model.embed_images({"feats": torch.randn(3, 5, 12)})
    assert img.shape == (3, 16) and torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    ids, lens = _text(tok, ["a dog", "a photo of a blue car and a tree"])
    cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
    alone = model.embed_captions(dict(zip(("text_ids", "text_lens"), _text(tok, ["a dog"]))))
    assert cap.shape == (2, 16) and torch.allclose(cap[0], alone[0], atol=1e-6)
    # pooled features (one region per image, the f8k data): GPO over one element returns it
    x = torch.randn(4, 1, 12)
    one = model.embed_images({"feats": x})
    fc = model.img_fc(x)[:, 0]
    assert torch.allclose(one, fc / fc.norm(dim=1, keepdim=True), atol=1e-5)


def test_loss_warms_up_with_summed_violations_then_hardest_negative():
    torch.manual_seed(0)
    model, _ = _model("loss.warmup_epochs=1", "loss.mask_same_image=false")
    img = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    ids = torch.arange(4)
    emb = {"img": img, "cap": cap}
    s = img @ cap.t()
    d = s.diag()
    cost_c = (0.2 + s - d[:, None]).clamp(min=0).fill_diagonal_(0)  # image queries
    cost_i = (0.2 + s - d[None, :]).clamp(min=0).fill_diagonal_(0)  # caption queries (columns)
    assert model.batch_loss(emb, ids, 0).item() == pytest.approx((cost_c.sum() + cost_i.sum()).item(), rel=1e-5)
    assert model.batch_loss(emb, ids, 1).item() == pytest.approx(
        (cost_c.max(1).values.sum() + cost_i.max(0).values.sum()).item(), rel=1e-5)
    assert model.batch_loss(emb, ids, 1).item() == pytest.approx(
        hinge_loss(img, cap, ids, mask_same_image=False).item(), rel=1e-6)


def test_training_embed_augments_and_eval_does_not():
    torch.manual_seed(0)
    model, tok = _model()
    ids, lens = _text(tok, CAPS[:8])
    batch = {"feats": torch.randn(8, 6, 12), "text_ids": ids, "text_lens": lens}
    model.train()
    a, b = model.embed(batch), model.embed(batch)
    assert not torch.allclose(a["img"], b["img"])  # different region drops
    model.eval()
    c, d = model.embed(batch), model.embed(batch)
    assert torch.equal(c["img"], d["img"]) and torch.equal(c["cap"], d["cap"])


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model, tok = _model()
    ids, lens = _text(tok, CAPS[:8])
    batch = {"feats": torch.randn(8, 5, 12), "text_ids": ids, "text_lens": lens, "img_ids": torch.arange(8)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(batch, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_bert_text_encoder(tiny_bert):
    torch.manual_seed(0)
    model, tok = _model(f"model.text={{name: hf_words, path: {tiny_bert}}}")
    model.eval()
    ids, lens = _text(tok, ["a red dog", "a photo of a blue car and a tree"])
    cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
    alone = model.embed_captions(dict(zip(("text_ids", "text_lens"), _text(tok, ["a red dog"]))))
    assert cap.shape == (2, 16) and torch.allclose(cap[0], alone[0], atol=1e-5)
    assert model.augment.mask_id == tok.tok.mask_token_id
    pre = {id(p) for p in model.pretrained_parameters()}
    assert pre and pre == {id(p) for p in model.txt_enc.backbone.parameters()}
    assert not hasattr(model.txt_enc.backbone, "pooler") or model.txt_enc.backbone.pooler is None


def test_bert_model_rebuilds_from_a_checkpoint_text_model_directory(tiny_bert, tmp_path):
    """A checkpoint keeps the BERT config and tokenizer only (text_model/); the weights come from the state dict."""
    from itr.checkpoint import save_tokenizer

    model, tok = _model(f"model.text={{name: hf_words, path: {tiny_bert}}}")
    save_tokenizer(tok, model, tmp_path)
    again, _ = _model(f"model.text={{name: hf_words, path: {tmp_path / 'text_model'}}}")
    missing, unexpected = again.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected


def test_one_epoch_trains_and_the_checkpoint_evaluates_the_same(tiny_data, tmp_path):
    from itr import checkpoint as ckpt
    from itr.eval.job import run_eval
    from itr.train import train

    res = train(load_recipe(RECIPE, tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": "false"})),
                tmp_path / "run")
    assert res["test"]["rsum"] > 0
    model, tok, recipe, _ = ckpt.load_for_eval(tmp_path / "run" / "best")
    assert recipe.model.name == "vse_infty" and "<mask>" in tok.word2idx
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
