"""SCAN (t2i and i2t): batched cross-attention scores against a port of the reference's per-caption loop,
padding invariance, encoders, the loss by hand, training steps, gradient accumulation, a 1-epoch run whose
checkpoint evaluates to the same metrics, and (slow) the evaluation job on 2 ranks."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.scan import AGG_FUNCS, RAW_NORMS, l1norm, l2norm, scan_i2t, scan_t2i
from itr.modules.losses import hinge_from_scores

from conftest import ROOT, assert_split_steps_equal, one_thread, tiny_overrides

RECIPE = ROOT / "recipes" / "synthetic" / "scan_t2i.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]


def _model(*overrides, img_dim=12):
    r = load_recipe(RECIPE, ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    return {"feats": torch.randn(n, regions, img_dim), "text_ids": ids, "text_lens": lens, "img_ids": torch.arange(n)}


# ----------------------------------------------------------------------------- the reference, one caption at a time
# kuanghuei/SCAN model.py@053693f func_attention / cosine_similarity / xattn_score_t2i / xattn_score_i2t


def _func_attention(query, context, norm, smooth):
    b, q_len = query.shape[:2]
    s_len = context.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))
    if norm == "softmax":
        attn = torch.softmax(attn.reshape(b * s_len, q_len), dim=1).view(b, s_len, q_len)
    elif norm in ("l2norm", "clipped_l2norm"):
        attn = l2norm(nn.LeakyReLU(0.1)(attn) if norm.startswith("clipped") else attn, 2)
    elif norm in ("l1norm", "clipped_l1norm"):
        attn = l1norm(nn.LeakyReLU(0.1)(attn) if norm.startswith("clipped") else attn, 2)
    elif norm == "clipped":
        attn = nn.LeakyReLU(0.1)(attn)
    attn = attn.transpose(1, 2).contiguous().view(b * q_len, s_len)
    attn = torch.softmax(attn * smooth, dim=1).view(b, q_len, s_len)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2)).transpose(1, 2)


def _cosine(x1, x2, dim, eps=1e-8):
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=eps)


def reference_scores(images, captions, lens, direction, lambda_softmax, lambda_lse, agg, norm):
    sims = []
    for i in range(captions.shape[0]):
        cap = captions[i, :lens[i]].unsqueeze(0).repeat(images.shape[0], 1, 1)
        if direction == "t2i":
            row = _cosine(cap, _func_attention(cap, images, norm, lambda_softmax), 2)
        else:
            row = _cosine(images, _func_attention(images, cap, norm, lambda_softmax), 2)
        if agg == "LogSumExp":
            row = torch.log(torch.exp(row * lambda_lse).sum(1, keepdim=True)) / lambda_lse
        elif agg == "Max":
            row = row.max(1, keepdim=True)[0]
        elif agg == "Sum":
            row = row.sum(1, keepdim=True)
        else:
            row = row.mean(1, keepdim=True)
        sims.append(row)
    return torch.cat(sims, 1)


def _ragged(n_img=5, n_cap=7, regions=6, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = l2norm(torch.randn(n_img, regions, dim, generator=g))
    lens = torch.tensor([3, 9, 1, 5, 2, 9, 4])[:n_cap]
    cap = l2norm(torch.randn(n_cap, 9, dim, generator=g)) * (torch.arange(9)[None, :, None] < lens[:, None, None])
    return img, cap, lens


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scores_equal_the_reference_loop(direction):
    img, cap, lens = _ragged()
    fn = scan_t2i if direction == "t2i" else scan_i2t
    lsm = 9.0 if direction == "t2i" else 4.0
    for norm in RAW_NORMS:
        for agg in AGG_FUNCS:
            ours = fn(img, cap, lens, lsm, 6.0, agg, norm)
            ref = reference_scores(img, cap, lens, direction, lsm, 6.0, agg, norm)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=f"{direction} {norm} {agg}")


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_model_score_in_sub_chunks_and_padding_invariance(direction):
    model, _ = _model(f"model.direction={direction}", "model.score_budget=50")  # forces many sub-chunks
    img, cap, lens = _ragged()
    ref = reference_scores(img, cap, lens, direction, model.cfg.lambda_softmax, model.cfg.lambda_lse, "LogSumExp",
                           "clipped_l2norm")
    torch.testing.assert_close(model.score(img, {"words": cap, "lens": lens}), ref, rtol=0, atol=1e-5)
    # more zero padding, or garbage beyond the lengths: the same scores
    padded = torch.cat([cap, torch.zeros(cap.shape[0], 5, cap.shape[2])], dim=1)
    torch.testing.assert_close(model.score(img, {"words": padded, "lens": lens}), ref, rtol=0, atol=1e-5)
    junk = padded + 3.0 * (torch.arange(14)[None, :, None] >= lens[:, None, None])
    torch.testing.assert_close(model.score(img, {"words": junk, "lens": lens}), ref, rtol=0, atol=1e-5)


def test_one_region_by_hand():
    """One region: every word attends to it fully, so the t2i score is LSE_l cos(w_l, v) with temperature 6."""
    img = torch.tensor([[[1.0, 0.0]]])
    cap = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    got = scan_t2i(img, cap, torch.tensor([2]), 9.0, 6.0).item()
    assert got == pytest.approx(math.log(math.exp(6 * 1.0) + math.exp(6 * 0.6)) / 6, abs=1e-6)
    assert scan_t2i(img, cap, torch.tensor([2]), 9.0, 6.0, agg="Mean").item() == pytest.approx(0.8, abs=1e-6)
    # i2t with one word: the region attends to it fully, score = cos(v, w)
    assert scan_i2t(img, cap, torch.tensor([1]), 4.0, 5.0).item() == pytest.approx(1.0, abs=1e-6)
    assert scan_i2t(img, cap[:, 1:], torch.tensor([1]), 4.0, 5.0).item() == pytest.approx(0.6, abs=1e-6)


# ----------------------------------------------------------------------------- encoders


def test_encoders_shapes_norms_and_padding():
    torch.manual_seed(0)
    model, tok = _model()
    model.eval()
    b = _batch(tok, n=3)
    img = model.embed_images(b)
    assert img.shape == (3, 5, 16) and torch.allclose(img.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
    cap = model.embed_captions(b)
    L = int(b["text_lens"].max())
    assert cap["words"].shape == (3, L, 16) and torch.equal(cap["lens"], b["text_lens"])
    valid = torch.arange(L)[None] < b["text_lens"][:, None]
    norms = cap["words"].norm(dim=-1)
    assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5) and (norms[~valid] == 0).all()
    ids1, lens1 = collate_tokens([tok.encode(CAPS[1])], tok.pad_id)
    alone = model.embed_captions({"text_ids": ids1, "text_lens": lens1})["words"]
    torch.testing.assert_close(cap["words"][1, : int(lens1[0])], alone[0], rtol=0, atol=1e-6)
    emb = model.embed(b)
    assert set(emb) == {"img", "cap", "cap_lens"} and not emb["cap_lens"].is_floating_point()


# ----------------------------------------------------------------------------- loss


def test_hinge_on_a_hand_checkable_score_matrix():
    s = torch.tensor([[0.9, 0.5], [0.8, 0.6]])  # rows: images, columns: captions, diagonal positive
    ids = torch.tensor([0, 1])
    # image 1 vs caption 0: 0.2 + 0.8 - 0.6 = 0.4; caption 0 vs image 1: 0.2 + 0.8 - 0.9 = 0.1;
    # caption 1 vs image 0: 0.2 + 0.5 - 0.6 = 0.1; image 0 vs caption 1: 0.2 + 0.5 - 0.9 < 0
    assert hinge_from_scores(s, s.t(), ids, ids).item() == pytest.approx(0.6, abs=1e-6)
    assert hinge_from_scores(s, s.t(), torch.tensor([0, 0]), torch.tensor([0, 0])).item() == 0.0  # same image
    s3 = torch.tensor([[0.9, 0.5, 0.85], [0.8, 0.6, 0.5], [0.0, 0.0, 0.7]])
    ids3 = torch.arange(3)
    # images: 0 -> caption 2: 0.15; 1 -> captions 0: 0.4 and 2: 0.1; 2 -> none.
    # captions: 0 -> image 1: 0.1; 1 -> image 0: 0.1; 2 -> image 0: 0.35 (image 1: 0.2 + 0.5 - 0.7 = 0)
    assert hinge_from_scores(s3, s3.t(), ids3, ids3).item() == pytest.approx(0.15 + 0.4 + 0.1 + 0.1 + 0.35, abs=1e-6)
    assert hinge_from_scores(s3, s3.t(), ids3, ids3, max_violation=False).item() == pytest.approx(1.2, abs=1e-6)
    # distributed form: this rank holds query 1 only (offset 1) against the 3 candidates
    assert hinge_from_scores(s3[1:2], s3.t()[1:2], ids3[1:2], ids3, offset=1).item() == pytest.approx(0.4 + 0.1, abs=1e-6)


def test_batch_loss_is_the_hinge_on_the_cross_attention_scores():
    torch.manual_seed(0)
    model, tok = _model("loss.mask_same_image=false", "loss.warmup_epochs=0")
    emb = model.embed(_batch(tok))
    s = reference_scores(emb["img"], emb["cap"], emb["cap_lens"], "t2i", 9.0, 6.0, "LogSumExp", "clipped_l2norm")
    # kuanghuei/SCAN ContrastiveLoss: cost_s.max(1) + cost_im.max(0) over the off-diagonal entries
    d = s.diag()[:, None]
    eye = torch.eye(8, dtype=torch.bool)
    cost_s = (0.2 + s - d).clamp(min=0).masked_fill(eye, 0)
    cost_im = (0.2 + s - d.t()).clamp(min=0).masked_fill(eye, 0)
    ref = cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
    assert model.batch_loss(emb, torch.arange(8), 0).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_a_few_steps_reduce_the_loss(direction):
    torch.manual_seed(0)
    model, tok = _model(f"model.direction={direction}", "loss.warmup_epochs=0")
    b = _batch(tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


# ----------------------------------------------------------------------------- gradient accumulation, ranks


@pytest.mark.parametrize("which", ["scan_t2i", "scan_i2t"])
def test_accumulation_gives_the_whole_batch_step(which):
    ref = assert_split_steps_equal(which, [(1, 2)])
    assert "fc.weight" in ref["grads"] and ref["loss"] > 0


@pytest.mark.slow
def test_two_ranks_give_the_whole_batch_step():
    assert_split_steps_equal("scan_t2i", [(2, 1)])


# ----------------------------------------------------------------------------- training run and the eval job


def _train_tiny(tiny_data, out, **extra):
    from itr.train import train

    over = tiny_overrides(tiny_data, **{"train.epochs": 1, "tracking.enabled": "false", **extra})
    return train(load_recipe(RECIPE, over), out)


def test_one_epoch_trains_and_the_checkpoint_evaluates_the_same(tiny_data, tmp_path):
    from itr.eval.job import run_eval

    res = _train_tiny(tiny_data, tmp_path / "run", **{"model.direction": "i2t", "eval.chunk_size": 16,
                                                       "train.max_steps": 8})
    assert math.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k", chunk_size=16)
    assert again == pytest.approx(res["test"])


@pytest.mark.slow
def test_eval_job_on_two_ranks_equals_one_rank(tiny_data, tmp_path):
    from itr.eval.job import run_eval

    _train_tiny(tiny_data, tmp_path / "run")
    with one_thread():  # as each rank below: bitwise comparisons need the same thread count
        ref = run_eval(tmp_path / "run" / "best", tiny_data, "test", chunk_size=16, save_sims=tmp_path / "ref.npy")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "itr", "eval",
                        str(tmp_path / "run" / "best"), "--data", str(tiny_data), "--split", "test",
                        "--chunk-size", "16", "--json", str(tmp_path / "m.json"), "--save-sims", str(tmp_path / "sims.npy")],
                       capture_output=True, text=True, errors="replace", timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "2 ranks" in p.stdout
    assert np.array_equal(np.load(tmp_path / "sims.npy"), np.load(tmp_path / "ref.npy"))
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(ref)
