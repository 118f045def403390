"""TGDT: global and local tokens, the three test modes, the CMC losses by hand, batched scores against a
per-pair loop, gradient accumulation, a training run whose checkpoint evaluates the same, 2-rank eval."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from itr.config import load_recipe
from itr.eval.metrics import KEYS
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.tgdt import mrsw
from itr.modules.losses import hinge_from_scores

from conftest import ROOT, assert_split_steps_equal

RECIPE = ROOT / "recipes" / "synthetic" / "tgdt.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus", "a green tree", "a boat near a bridge"]
SMALL = ["model.embed_dim=16", "model.ff_dim=32", "model.heads=2", "model.text.word_dim=8", "model.text.min_count=1",
         "model.dropout=0.0"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(*overrides, img_dim=12, bert=None):
    over = SMALL + (["model.text=hf_words", f"model.text.path={bert}", "model.bert_layers=1"] if bert else []) + list(overrides)
    if bert:
        over = [o for o in over if not o.startswith(("model.text.word_dim", "model.text.min_count"))]
    r = load_recipe(RECIPE, over)
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12, img_ids=None):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(n, regions, 2, generator=g)], dim=-1)
    return {"feats": torch.randn(n, regions, img_dim, generator=g), "boxes": boxes, "text_ids": ids,
            "text_lens": lens, "img_ids": torch.arange(n) if img_ids is None else img_ids}


@pytest.mark.parametrize("text", ["gru", "bert"])
def test_shapes_norms_and_caption_padding_invariance(text, tiny_bert):
    model, tok = _model(bert=tiny_bert if text == "bert" else None)
    model.eval()
    b = _batch(tok)
    im, cap = model.embed_images(b), model.embed_captions(b)
    assert im["glob"].shape == (8, 16) and im["regions"].shape == (8, 5, 16) and im["lens"].tolist() == [5] * 8
    assert torch.allclose(im["glob"].norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(im["regions"].norm(dim=-1), torch.ones(8, 5), atol=1e-5)
    lens = b["text_lens"] - (2 if text == "bert" else 0)  # BERT: [CLS] is the global slot, [SEP] is left out
    assert cap["lens"].tolist() == lens.tolist()
    for i, n in enumerate(lens.tolist()):
        assert torch.allclose(cap["words"][i, :n].norm(dim=-1), torch.ones(n), atol=1e-5)
        assert cap["words"][i, n:].abs().sum() == 0
    ids, l1 = collate_tokens([tok.encode(CAPS[3])], tok.pad_id)  # the shortest caption, alone: no padding
    alone = model.embed_captions({"text_ids": ids, "text_lens": l1})
    assert torch.allclose(alone["glob"][0], cap["glob"][3], atol=1e-5)
    n = int(alone["lens"][0])
    assert torch.allclose(alone["words"][0, :n], cap["words"][3, :n], atol=1e-5)


def test_mrsw_by_hand():
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # the third region is padding
    words = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [9.0, 9.0]]])  # the third word is padding
    s = mrsw(regions, torch.tensor([[True, True, False]]), words, torch.tensor([[True, True, False]]))
    assert s.item() == pytest.approx(0.8 + 1.0)  # max over regions, per word: 0.8 and 1.0, summed


def _ragged(seed=0, n_img=3, n_cap=4, d=6):
    g = torch.Generator().manual_seed(seed)
    img = {"glob": torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=-1),
           "regions": torch.nn.functional.normalize(torch.randn(n_img, 5, d, generator=g), dim=-1),
           "lens": torch.tensor([5, 3, 4][:n_img])}
    lens = torch.tensor([2, 7, 1, 4][:n_cap])
    words = torch.nn.functional.normalize(torch.randn(n_cap, 7, d, generator=g), dim=-1)
    words = words * (torch.arange(7)[None, :, None] < lens[:, None, None])
    cap = {"glob": torch.nn.functional.normalize(torch.randn(n_cap, d, generator=g), dim=-1), "words": words,
           "lens": lens}
    return img, cap


@pytest.mark.parametrize("mode", ["global", "local", "sum"])
def test_three_modes_equal_a_per_pair_loop_and_ignore_padding(mode):
    model, _ = _model(f"model.test_mode={mode}", "model.local_scale=10")  # the reference's x10
    img, cap = _ragged()
    got = model.score(img, cap)
    ref_g, ref_l = torch.zeros(3, 4), torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            r = img["regions"][i, :img["lens"][i]]
            w = cap["words"][j, :cap["lens"][j]]
            ref_g[i, j] = float(img["glob"][i] @ cap["glob"][j])
            ref_l[i, j] = 10.0 * float((r @ w.t()).amax(0).sum())  # max over regions, sum over words, x local_scale
    torch.testing.assert_close(model.global_score(img, cap), ref_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.local_score(img, cap), ref_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, {"global": ref_g, "local": ref_l, "sum": ref_g + ref_l}[mode], rtol=1e-5, atol=1e-5)
    padded = {**cap, "words": torch.nn.functional.pad(cap["words"], (0, 0, 0, 3))}  # extra zero padding
    padded_img = {**img, "regions": torch.nn.functional.pad(img["regions"], (0, 0, 0, 2))}
    torch.testing.assert_close(model.score(padded_img, padded), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["global", "local", "sum"])
def test_pair_score_is_the_score_of_aligned_rows(mode):
    model, _ = _model(f"model.test_mode={mode}")
    img, cap = _ragged(2)
    full = model.score(img, cap)  # (3, 4)
    i = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    c = torch.tensor([3, 0, 1, 2, 1, 3, 3])
    pairs = model.pair_score({k: v[i] for k, v in img.items()}, {k: v[c] for k, v in cap.items()})
    torch.testing.assert_close(pairs, full[i, c], rtol=0, atol=1e-5)


def test_sub_chunked_local_score_equals_one_chunk(monkeypatch):
    import itr.models.tgdt as tgdt

    model, _ = _model()
    img, cap = _ragged(1)
    whole = model.local_score(img, cap)
    monkeypatch.setattr(tgdt, "LOCAL_BUDGET", 1)  # one image x one caption per call, padded regions sliced along
    torch.testing.assert_close(model.local_score(img, cap), whole, rtol=0, atol=1e-6)
    monkeypatch.setattr(tgdt, "LOCAL_BUDGET", 40)  # captions grouped by length, a few images at a time
    torch.testing.assert_close(model.local_score(img, cap), whole, rtol=0, atol=1e-6)


def test_matrix_hinge_by_hand():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.4, 0.0], [0.2, 0.7, 0.6]])
    ids = torch.tensor([0, 1, 2])
    # image 0: captions 1 (0.2+0.8-0.9=0.1), 2 (0); caption 0: images 1 (0.2+0.5-0.9=-0.2->0), 2 (0)
    # image 1: captions 0 (0.2+0.5-0.4=0.3), 2 (0); caption 1: images 0 (0.2+0.8-0.4=0.6), 2 (0.2+0.7-0.4=0.5)
    # image 2: captions 0 (0), 1 (0.2+0.7-0.6=0.3); caption 2: images 0 (0), 1 (0)
    hard = hinge_from_scores(s, s.t(), ids, ids, 0, 0.2, True, True)
    assert hard.item() == pytest.approx(0.1 + 0.3 + 0.3 + 0.0 + 0.6 + 0.0)
    summed = hinge_from_scores(s, s.t(), ids, ids, 0, 0.2, False, True)
    assert summed.item() == pytest.approx(0.1 + 0.3 + 0.3 + 0.6 + 0.5)
    same = hinge_from_scores(s, s.t(), torch.tensor([0, 0, 2]), torch.tensor([0, 0, 2]), 0, 0.2, True, True)
    # pairs 0/1 show the same image: image 2 -> caption 1 (0.3) and caption 1 -> image 2 (0.5) remain
    assert same.item() == pytest.approx(0.3 + 0.5)


def test_loss_is_global_hinge_plus_consistency_plus_local_hinge():
    model, tok = _model("model.consistency_margin=0.05", "loss.warmup_epochs=0")
    model.eval()
    b = _batch(tok)
    out = model(b, epoch=0)
    img = {"glob": out["img"], "regions": out["img_regions"], "lens": out["img_lens"]}
    cap = {"glob": out["cap"], "words": out["cap_words"], "lens": out["cap_lens"]}
    ids = b["img_ids"]
    g, loc = model.global_score(img, cap), model.local_score(img, cap)
    hinge_g = hinge_from_scores(g, g.t(), ids, ids, 0, 0.2, True, True)
    hinge_l = hinge_from_scores(loc, loc.t(), ids, ids, 0, 0.2, True, True)
    si, st = out["img"] @ out["img"].t(), out["cap"] @ out["cap"].t()
    cons = sum(max(0.0, float((st[:, j] - si[:, j]).abs().max()) - 0.05) for j in range(8))
    assert cons > 0
    assert out["loss"].item() == pytest.approx(hinge_g.item() + cons + hinge_l.item(), rel=1e-5)


def test_a_few_steps_reduce_the_loss():
    model, tok = _model()
    b = _batch(tok)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(b, epoch=0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_accumulation_gives_the_whole_batch_step():
    ref = assert_split_steps_equal("tgdt", [(1, 2)])
    assert "txt_enc.rnn.weight_hh_l0" in ref["grads"] and "img_global.layers.0.linear1.weight" in ref["grads"]


def _overrides(data, **kw):
    o = {"data.root": data, "data.num_workers": 0, "data.shuffle_buffer": 200, "data.images_per_shard": 40,
         "model.embed_dim": 16, "model.ff_dim": 32, "model.heads": 2, "model.text.word_dim": 8,
         "model.text.min_count": 1, "train.batch_size": 32, "train.epochs": 1, "train.log_every": 2,
         "optim.lr": 2e-3, "optim.warmup_steps": 0, "eval.batch_size": 64, "eval.chunk_size": 16,
         "tracking.enabled": "false"}
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def test_train_one_epoch_then_the_checkpoint_evaluates_the_same_in_every_mode(tiny_data, tmp_path):
    from itr import checkpoint as ckpt
    from itr.data.sources import load_split
    from itr.eval.job import evaluate_model, run_eval
    from itr.train import train

    res = train(load_recipe(RECIPE, _overrides(tiny_data)), tmp_path / "run")
    assert res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
    model, tok, recipe, _ = ckpt.load_for_eval(tmp_path / "run" / "best")
    split = load_split(tiny_data, "test")
    got = {}
    for mode in ("global", "local", "sum"):
        model.cfg.test_mode = mode
        got[mode], sims = evaluate_model(model, split, tok, recipe.eval)
        assert got[mode]["rsum"] > 0
    assert got["sum"] == pytest.approx(res["test"])  # the recipe's mode
    # two-stage through `itr eval`: a shortlist of every caption reranks exactly like full scoring
    # (test split: 40 images, 200 captions); a short one loses recall, and the JSON records both
    full = run_eval(tmp_path / "run" / "best", tiny_data, "test", two_stage=200)
    assert {k: full[k] for k in KEYS} == pytest.approx(res["test"])
    short = run_eval(tmp_path / "run" / "best", tiny_data, "test", two_stage=2, compare_full=True,
                     json_out=tmp_path / "two.json")
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["two_stage"]["k"] == 2 and record["two_stage"]["full"]["rsum"] == pytest.approx(res["test"]["rsum"])
    # ranks are 0 or 1 inside a shortlist of 2, and a ground truth outside it is never a hit
    assert short["i2t_R5"] == short["i2t_R10"] and short["t2i_R5"] == short["t2i_R10"]
    assert record["two_stage"]["rsum_lost"] == pytest.approx(record["two_stage"]["full"]["rsum"] - short["rsum"])


@pytest.mark.slow
def test_eval_on_two_ranks_equals_one_rank(tiny_data, tmp_path):
    from itr.eval.job import run_eval
    from itr.train import train

    train(load_recipe(RECIPE, _overrides(tiny_data, **{"train.max_steps": 2})), tmp_path / "run")
    ref = run_eval(tmp_path / "run" / "best", tiny_data, "test", chunk_size=7, save_sims=tmp_path / "ref.npy")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "itr", "eval",
                        str(tmp_path / "run" / "best"), "--data", str(tiny_data), "--split", "test",
                        "--chunk-size", "7", "--json", str(tmp_path / "m.json"), "--save-sims", str(tmp_path / "s.npy")],
                       capture_output=True, text=True, errors="replace", timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "2 ranks" in p.stdout
    assert np.array_equal(np.load(tmp_path / "s.npy"), np.load(tmp_path / "ref.npy"))
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(ref)
