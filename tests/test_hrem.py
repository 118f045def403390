"""HREM: fragment-level encoders, the instance-level relations and losses, exactness of its batch-level
module under gradient accumulation and 2 ranks, and a training run."""
import math

import pytest
import torch
import torch.nn.functional as F

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.hrem import _batch_seed, _topk_filled
from itr.modules.fragments import avg_pool, maxk_pool
from itr.modules.losses import hinge_loss

from conftest import ROOT, assert_split_steps_equal, tiny_overrides

RECIPE = ROOT / "recipes" / "synthetic" / "hrem.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def _model(*overrides, img_dim=12):
    r = load_recipe(RECIPE, ["model.embed_dim=16", "model.nhead=4", "model.text.word_dim=8", "model.text.min_count=1",
                             "model.topk=3", "model.relation_words=12", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12, img_ids=None):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    return {"feats": torch.randn(n, regions, img_dim), "text_ids": ids, "text_lens": lens,
            "img_ids": torch.arange(n) if img_ids is None else img_ids}


# ----------------------------------------------------------------------------- fragment level


def test_maxk_and_avg_pooling_by_hand():
    x = torch.tensor([[[1.0], [5.0], [3.0], [100.0]], [[2.0], [-1.0], [7.0], [7.0]]])
    lens = torch.tensor([3, 1])
    assert torch.allclose(maxk_pool(x, lens, 2), torch.tensor([[4.0], [2.0]]))  # (5 + 3) / 2; one element: itself
    assert torch.allclose(avg_pool(x, lens), torch.tensor([[3.0], [2.0]]))


def test_encoders_residual_pooling_shapes_norms_and_padding():
    torch.manual_seed(0)
    model, tok = _model()
    model.eval()
    feats = torch.randn(3, 5, 12)
    img = model.embed_images({"feats": feats})
    assert img.shape == (3, 16) and torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    x = model.img_fc(feats)
    lens = torch.full((3,), 5)
    ref = 0.8 * maxk_pool(x, lens, 2) + 0.2 * model.img_rel.aggr(x).mean(1)  # lib/encoders.py EncoderImageAggr
    assert torch.allclose(img, ref / ref.norm(dim=1, keepdim=True), atol=1e-5)
    ids, lens = collate_tokens([tok.encode(c) for c in ["a dog", "a photo of a blue car and a tree"]], tok.pad_id)
    cap = model.embed_captions({"text_ids": ids, "text_lens": lens})
    ids1, lens1 = collate_tokens([tok.encode("a dog")], tok.pad_id)
    alone = model.embed_captions({"text_ids": ids1, "text_lens": lens1})
    assert torch.allclose(cap[0], alone[0], atol=1e-5)  # padding does not leak in


def test_training_embed_returns_fixed_size_fragments():
    torch.manual_seed(0)
    model, tok = _model("model.caption_aug=0")
    b = _batch(tok, regions=6)
    model.train()
    emb = model.embed(b)
    assert emb["img_frag"].shape == (8, 6, 16) and emb["cap_frag"].shape == (8, 12, 16)
    assert (emb["img_frag_len"] <= 6).all() and (emb["img_frag_len"] >= 1).all()
    assert torch.equal(emb["cap_frag_len"], b["text_lens"].clamp(max=12).float())
    assert not emb["img_frag"].requires_grad
    model.eval()
    assert set(model.embed(b)) == {"img", "cap"}


# ----------------------------------------------------------------------------- losses


def test_triplet_loss_by_hand():
    model, _ = _model()
    # rows: anchors; only negatives with similarity > 1 - 1.7^2 / 2 = -0.445 can be sampled (distance < 1.7).
    # (As in the reference, the weights are normalized by the row's largest log-weight, ineligible negatives
    # included: a negative at distance ~2 makes every other weight underflow and the row adds nothing.)
    sim = torch.tensor([[0.9, 0.8, -0.5],
                        [0.7, 0.6, -0.5],
                        [-0.5, -0.5, 0.8]])
    pos = torch.eye(3, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    # row 0: negative 1 -> 0.2 + 0.8 - 0.9; row 1: negative 0 -> 0.2 + 0.7 - 0.6; row 2: no negative
    assert model.triplet(sim, pos, 0, 3, gen).item() == pytest.approx(0.1 + 0.3, abs=1e-6)
    # columns as anchors: col 0: negative row 1 -> 0.2 + 0.7 - 0.9 = 0; col 1: row 0 -> 0.2 + 0.8 - 0.6; col 2: none
    assert model.triplet(sim.t(), pos, 0, 3, gen).item() == pytest.approx(0.4, abs=1e-6)
    assert model.triplet(sim, pos, 1, 2, gen).item() == pytest.approx(0.3, abs=1e-6)  # this rank's anchor only
    # same-image pairs are positives: anchor 0 also pairs with caption 1 (its image's), no negative left for it
    same = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert model.triplet(sim, same, 0, 3, gen).item() == pytest.approx(0.0, abs=1e-6)


def test_distance_weighted_sampling_follows_the_density():
    """p(negative) ~ d^(2 - n) (1 - d^2 / 4)^((3 - n) / 2) among negatives closer than the cut-off."""
    model, _ = _model("model.trip_dim=4", "model.trip_margin=1.0")
    s_neg = torch.tensor([0.5, 0.0, -0.3])
    sim = torch.zeros(4, 4)
    sim[0, 1:] = s_neg  # anchor 0, positive sim 0: the loss 1 + s_an tells which negative was drawn
    pos = torch.eye(4, dtype=torch.bool)
    d = (2 - 2 * s_neg).sqrt()
    p = d ** (2 - 4) * (1 - d ** 2 / 4) ** ((3 - 4) / 2)
    p = p / p.sum()
    counts = torch.zeros(3)
    for seed in range(1500):
        loss = model.triplet(sim, pos, 0, 1, torch.Generator().manual_seed(seed)).item()
        counts[int(torch.argmin((1 + s_neg - loss).abs()))] += 1
    assert torch.allclose(counts / counts.sum(), p, atol=0.04)


def test_vse_option_is_the_hinge_loss_with_same_image_masking():
    torch.manual_seed(0)
    model, _ = _model("model.base_loss=vse", "model.interaction_warmup_epochs=5")
    img, cap = F.normalize(torch.randn(6, 16), dim=1), F.normalize(torch.randn(6, 16), dim=1)
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    emb = {"img": img, "cap": cap}
    for epoch, mv in ((0, False), (1, True)):  # loss.warmup_epochs 1: summed violations, then the hardest
        ref = hinge_loss(img, cap, ids, margin=0.2, max_violation=mv, mask_same_image=True)
        assert model.batch_loss(emb, ids, epoch).item() == pytest.approx(ref.item(), rel=1e-6)


# ----------------------------------------------------------------------------- instance level


def _reference_scores(regions, words, w_lens, K):
    """lib/mca.py AdjacencyLearning.forward, one caption at a time (regions all valid)."""
    regions = F.normalize(regions, dim=-1)
    n = regions.shape[0]
    t_top, t_mean, i_top, i_mean = [], [], [], []
    for i in range(words.shape[0]):
        L = int(w_lens[i])
        cap = F.normalize(words[i, :max(K, L)], dim=-1).repeat(n, 1, 1)
        s = F.leaky_relu(torch.bmm(cap, regions.transpose(1, 2)), negative_slope=0.1)
        row = F.normalize(s, dim=1).max(dim=2)[0]
        t_mean.append(row[:, :L].mean(1))
        t_top.append(row.topk(K, dim=1)[0])
        col = F.normalize(s, dim=2)[:, :L, :].max(dim=1)[0]
        i_mean.append(col.mean(1))
        i_top.append(col.topk(K, dim=1)[0])
    return torch.stack(t_top), torch.stack(t_mean), torch.stack(i_top).transpose(0, 1), torch.stack(i_mean).t()


def test_fragment_scores_match_the_reference_loop():
    torch.manual_seed(0)
    model, _ = _model("model.topk=4")
    regions = torch.randn(5, 6, 16)
    w_lens = torch.tensor([7, 3, 9, 4, 2, 9])
    words = torch.randn(6, 9, 16) * (torch.arange(9)[None, :, None] < w_lens[:, None, None])  # zero padding
    ours = model.interaction.fragment_scores(regions, torch.full((5,), 6), words, w_lens, budget=200)
    for a, b in zip(ours, _reference_scores(regions, words, w_lens, 4)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_topk_with_filler():
    x = torch.tensor([[0.5, -0.2, 9.0, 9.0]])
    assert torch.equal(_topk_filled(x, torch.tensor([2]), 3), torch.tensor([[9.0, 0.5, -0.2]]))  # pos 2 < k counts
    assert torch.equal(_topk_filled(x[:, :2], torch.tensor([1]), 3), torch.tensor([[0.5, 0.0, -0.2]]))


def test_relation_mask_and_regularization():
    torch.manual_seed(0)
    model, _ = _model("model.topk=3", "model.mask_weight=1.5")
    inter = model.interaction
    n = 6
    img, cap = F.normalize(torch.randn(n, 16), dim=1), F.normalize(torch.randn(n, 16), dim=1)
    regions, words = torch.randn(n, 5, 16), torch.randn(n, 7, 16)
    r_lens, w_lens = torch.full((n,), 5), torch.full((n,), 7)
    mask, t2i, i2t = inter.relations(img, cap, regions, r_lens, words, w_lens)
    t_top, t_mean, i_top, i_mean = inter.fragment_scores(regions, r_lens, words, w_lens)
    assert torch.allclose(t2i, inter.mlp_t2i(t_top).squeeze(-1) + t_mean)
    assert torch.allclose(i2t, inter.mlp_i2t(i_top).squeeze(-1) + i_mean)
    k = n // 2

    def connect(s):
        return s >= s.topk(k, dim=1).values[:, -1:]

    blocks = [[(torch.exp(-torch.cdist(img, img)), connect(img @ cap.t())), (i2t, connect(i_mean))],
              [(t2i, connect(t_mean)), (torch.exp(-torch.cdist(cap, cap)), connect(cap @ img.t()))]]
    for bi in range(2):
        for bj in range(2):
            rel, con = blocks[bi][bj]
            got = mask[bi * n:(bi + 1) * n, bj * n:(bj + 1) * n]
            assert torch.equal(torch.isinf(got), ~con) and (con.sum(1) == k).all()
            assert torch.allclose(got[con], 1.5 * rel[con], atol=1e-6)
    # regularization: F.kl_div(log_softmax(guide), softmax(relation), batchmean), both directions
    guide = torch.exp(-torch.cdist(img, cap))
    r_i2t, r_t2i = inter.regularization_rows(t2i, i2t, img, cap)
    ref = F.kl_div(F.log_softmax(guide, -1), F.softmax(i2t, -1), reduction="batchmean") \
        + F.kl_div(F.log_softmax(guide.t(), -1), F.softmax(t2i, -1), reduction="batchmean")
    assert ((r_i2t.sum() + r_t2i.sum()) / n).item() == pytest.approx(ref.item(), rel=1e-5)


def test_interaction_warm_up_and_losses():
    torch.manual_seed(0)
    model, tok = _model("model.interaction_warmup_epochs=1", "model.base_loss=vse", "model.gnn_loss=vse")
    b = _batch(tok, img_ids=torch.tensor([0, 1, 2, 0, 3, 4, 2, 5]))
    model.train()
    loss0 = model(b, epoch=0)["loss"]
    loss0.backward()
    assert all(p.grad is None for p in model.interaction.parameters())  # not run during the warm-up
    model.zero_grad()
    torch.manual_seed(1)
    out = model(b, epoch=1)
    emb = {k: v.detach() for k, v in out.items() if k != "loss"}
    base = hinge_loss(emb["img"].float(), emb["cap"].float(), b["img_ids"], max_violation=True)
    assert out["loss"].item() > base.item()  # + the enhanced-embedding losses and the regularization
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.interaction.parameters())
    # the random parts of the interaction are a function of the batch: the same loss twice
    assert model.batch_loss(emb, b["img_ids"], 1).item() == pytest.approx(model.batch_loss(emb, b["img_ids"], 1).item())
    assert _batch_seed(b["img_ids"], 1) != _batch_seed(b["img_ids"].flip(0), 1) != _batch_seed(b["img_ids"], 2)


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model, tok = _model("model.interaction_warmup_epochs=0", "model.region_drop=0", "model.caption_aug=0")
    b = _batch(tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(b, epoch=1)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


# ----------------------------------------------------------------------------- exactness of the batch-level module


@pytest.mark.parametrize("loss", ["trip", "vse"])
def test_accumulation_gives_the_whole_batch_gradients(loss):
    ref = assert_split_steps_equal(f"hrem_{loss}", [(1, 2), (1, 4)])
    assert any(k.startswith("interaction.gnn.") for k in ref["grads"]) and "interaction.mlp_i2t.0.weight" in ref["grads"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["trip"])  # the vse variant shares the gather path (its loss is tested above)
def test_two_ranks_give_the_whole_batch_gradients(loss):
    assert_split_steps_equal(f"hrem_{loss}", [(2, 1), (2, 2)])  # ranks, and ranks and accumulation together


# ----------------------------------------------------------------------------- training run


def test_one_epoch_with_the_interaction_trains_and_evaluates_the_same(tiny_data, tmp_path):
    from itr import checkpoint as ckpt
    from itr.eval.job import run_eval
    from itr.train import train

    over = tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": "false", "model.nhead": 4,
                                        "model.interaction_warmup_epochs": 0, "train.grad_accum": 2})
    res = train(load_recipe(RECIPE, over), tmp_path / "run")
    assert math.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    _, _, recipe, _ = ckpt.load_for_eval(tmp_path / "run" / "best")
    assert recipe.model.name == "hrem"
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
