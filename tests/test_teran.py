"""TERAN: encoders (CLS slot, box encoding, BERT cut, word selection), MrSw scores against per-pair and
reference-batch computations, padding invariance, the loss by hand, training steps, gradient accumulation
and a short run whose checkpoint evaluates to the same metrics."""
import math

import pytest
import torch
import torch.nn.functional as F

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.errors import DataError
from itr.models import build_model, make_tokenizer
from itr.models.teran import mrsw

from conftest import ROOT, assert_split_steps_equal

RECIPE = ROOT / "recipes" / "synthetic" / "teran.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def _model(bert, *overrides, img_dim=12):
    r = load_recipe(RECIPE, ["loss.warmup_epochs=0", "model.embed_dim=16", "model.heads=2", "model.image_layers=1", "model.layers=1",
                             "model.ff_dim=32", "model.text_layers=0", f"model.text.path={bert}", "model.text.freeze=false",
                             *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12, boxes=True):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    b = {"feats": torch.randn(n, regions, img_dim), "text_ids": ids, "text_lens": lens, "img_ids": torch.arange(n)}
    if boxes:
        xy = torch.rand(n, regions, 2) * 0.5
        b["boxes"] = torch.cat([xy, xy + 0.1 + torch.rand(n, regions, 2) * 0.4], dim=-1)
    return b


# ----------------------------------------------------------------------------- scores


def _reference_alignment(im_set, s_seq, im_len, s_len):
    """mesnico/TERAN models/loss.py@85c186b AlignmentContrastiveLoss, aggregation MrSw, return_similarity_mat."""
    im_set, s_seq = im_set[:, 1:, :], s_seq[:, 1:-2, :]
    im_len, s_len = [l - 1 for l in im_len], [l - 3 for l in s_len]
    nb_i, ni_len, nb_s, ns_len = im_set.size(0), im_set.size(1), s_seq.size(0), s_seq.size(1)
    al = torch.matmul(im_set.unsqueeze(1).expand(-1, nb_s, -1, -1), s_seq.unsqueeze(0).expand(nb_i, -1, -1, -1).permute(0, 1, 3, 2))
    im_mask = torch.zeros(nb_i, ni_len).bool()
    for m, l in zip(im_mask, im_len):
        m[l:] = True
    s_mask = torch.zeros(nb_s, ns_len).bool()
    for m, l in zip(s_mask, s_len):
        m[l:] = True
    mask = im_mask.unsqueeze(2).unsqueeze(1).expand(-1, nb_s, -1, ns_len) | s_mask.unsqueeze(1).unsqueeze(0).expand(nb_i, -1, ni_len, -1)
    return al.masked_fill(mask, 0).max(2)[0].sum(2)


def test_mrsw_equals_a_per_pair_loop_and_the_reference_batch():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 7, 16, generator=g), dim=-1)
    lens = torch.tensor([4, 9, 3, 6, 5, 9])  # tokens, [CLS] and [SEP] included
    seq = F.normalize(torch.randn(6, 9, 16, generator=g), dim=-1)
    n = lens - 3  # words kept (drop_last_word)
    words = seq[:, 1:] * (torch.arange(8)[None, :, None] < n[:, None, None])
    ours = mrsw(img, words, n)
    loop = torch.tensor([[float((img[i] @ words[c, : n[c]].t()).max(0).values.sum()) for c in range(6)] for i in range(5)])
    torch.testing.assert_close(ours, loop, rtol=0, atol=1e-5)
    cls = torch.cat([torch.zeros(5, 1, 16), img], dim=1)
    torch.testing.assert_close(ours, _reference_alignment(cls, seq, [8] * 5, lens.tolist()), rtol=0, atol=1e-5)
    # more padding, garbage beyond the lengths, and tiny sub-chunks: the same scores
    junk = torch.cat([words, torch.ones(6, 4, 16)], dim=1) + 5.0 * (torch.arange(12)[None, :, None] >= n[:, None, None])
    from itr.modules.xattn import tiled_pairs

    torch.testing.assert_close(tiled_pairs(mrsw, img, junk, n, budget=30), ours, rtol=0, atol=1e-5)


def test_mrsw_by_hand():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two regions
    words = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]]])
    # word 0: max(0.6, 0.8) = 0.8; word 1: max(1, 0) = 1; word 2: max(-1, 0) = 0 -> 1.8; two words only: 1.8
    assert mrsw(img, words, torch.tensor([3])).item() == pytest.approx(1.8)
    assert mrsw(img, words, torch.tensor([1])).item() == pytest.approx(0.8)


# ----------------------------------------------------------------------------- encoders


def test_encoders_shapes_norms_word_selection_and_padding(tiny_bert):
    torch.manual_seed(0)
    model, tok = _model(tiny_bert)
    model.eval()
    b = _batch(tok, n=3)
    img = model.embed_images(b)
    assert img.shape == (3, 5, 16) and torch.allclose(img.norm(dim=-1), torch.ones(3, 5), atol=1e-5)  # CLS slot left out
    cap = model.embed_captions(b)
    assert torch.equal(cap["lens"], b["text_lens"] - 2)  # without [CLS] and [SEP]
    valid = torch.arange(cap["words"].shape[1])[None] < cap["lens"][:, None]
    norms = cap["words"].norm(dim=-1)
    assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5) and (norms[~valid] == 0).all()
    ids1, lens1 = collate_tokens([tok.encode(CAPS[1])], tok.pad_id)
    alone = model.embed_captions({"text_ids": ids1, "text_lens": lens1})
    k = int(alone["lens"][0])
    torch.testing.assert_close(cap["words"][1, :k], alone["words"][0, :k], rtol=0, atol=1e-5)
    # the boxes matter (positional encoding), and data without boxes is an error unless pos_encoding=none
    b2 = dict(b, boxes=b["boxes"].flip(1))
    assert not torch.allclose(model.embed_images(b2), img, atol=1e-4)
    with pytest.raises(DataError, match="pos_encoding"):
        model.embed_images({"feats": b["feats"]})
    plain, _ = _model(tiny_bert, "model.pos_encoding=none")
    assert plain.embed_images({"feats": b["feats"]}).shape == (3, 5, 16)
    dropped, _ = _model(tiny_bert, "model.drop_last_word=true")
    assert torch.equal(dropped.embed_captions(b)["lens"], b["text_lens"] - 3)


def test_text_backbone_is_cut_to_text_layers(tiny_bert):
    model, _ = _model(tiny_bert, "model.text_layers=1")
    assert len(model.txt_enc.backbone.encoder.layer) == 1 and model.txt_enc.backbone.config.num_hidden_layers == 1
    assert model.pretrained_parameters()  # the backbone trains at optim.text_lr_mult


# ----------------------------------------------------------------------------- loss and training


def test_batch_loss_is_the_hinge_on_the_alignment_scores(tiny_bert):
    torch.manual_seed(0)
    model, tok = _model(tiny_bert, "loss.mask_same_image=false")
    model.eval()
    emb = model.embed(_batch(tok))
    s = mrsw(emb["img"], emb["cap"], emb["cap_lens"])
    d = s.diag()[:, None]
    eye = torch.eye(8, dtype=torch.bool)
    ref = (0.2 + s - d).clamp(min=0).masked_fill(eye, 0).max(1)[0].sum() \
        + (0.2 + s - d.t()).clamp(min=0).masked_fill(eye, 0).max(0)[0].sum()  # models/loss.py Contrastive
    assert model.batch_loss(emb, torch.arange(8), 0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_a_few_steps_reduce_the_loss(tiny_bert):
    torch.manual_seed(0)
    model, tok = _model(tiny_bert, "model.dropout=0")
    b = _batch(tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_accumulation_gives_the_whole_batch_step(tiny_bert):
    ref = assert_split_steps_equal("teran", [(1, 2)], bert=tiny_bert)
    assert "pos.map.0.weight" in ref["grads"] and any(k.startswith("txt_enc.backbone.") for k in ref["grads"])


def test_short_run_trains_and_the_checkpoint_evaluates_the_same(tiny_data, tiny_bert, tmp_path):
    from itr.eval.job import run_eval
    from itr.train import train

    over = {"data.root": tiny_data, "data.num_workers": 0, "data.shuffle_buffer": 200, "data.images_per_shard": 40,
            "model.embed_dim": 32, "model.image_layers": 1, "model.layers": 1, "model.ff_dim": 64,
            "model.text_layers": 1, "model.text.path": tiny_bert, "model.text.freeze": "false", "train.batch_size": 32, "train.epochs": 1,
            "train.max_steps": 6, "train.log_every": 2, "optim.lr": 1e-3, "optim.warmup_steps": 0,
            "eval.batch_size": 64, "eval.chunk_size": 16, "tracking.enabled": "false"}
    res = train(load_recipe(RECIPE, [f"{k}={v}" for k, v in over.items()]), tmp_path / "run")
    assert math.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k", chunk_size=16)
    assert again == pytest.approx(res["test"])
