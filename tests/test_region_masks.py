"""Variable region counts in VSE++ (precomp pooling), SCAN (both directions), TERAN, TGDT and DIME: a padded batch
scores exactly as each image alone with only its real regions, whatever the padding holds; a few training steps on
TSV shards."""
import math

import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.base import loss_inputs
from itr.modules.losses import hinge_from_scores

from conftest import ROOT, assert_same_step, assert_split_steps_equal, launch_steps, one_thread
from test_variable_regions import _tsv_shards

CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "an image showing a bus"]
LENS = torch.tensor([3, 7, 1, 5, 7, 2])  # real regions per image; the batch is padded to 7
DIM = 12


def _model(recipe, *overrides, text=("model.text.word_dim=8", "model.text.min_count=1")):
    r = load_recipe(ROOT / "recipes" / "synthetic" / recipe, ["model.embed_dim=16", *text, *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(r, DIM, tok).eval()
    with torch.no_grad():  # biases as training leaves them: a zero FC bias would map zero padding to zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model, tok


def _padded(garbage=0.0, seed=1):
    """(6, 7, DIM) features, each image's real regions first and ``garbage`` past them, and the real ones alone."""
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(int(n), DIM, generator=g) for n in LENS]
    feats = torch.full((len(LENS), int(LENS.max()), DIM), garbage)
    for f, r in zip(feats, real):
        f[:len(r)] = r
    return feats, real


def _captions(tok):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS], tok.pad_id)
    return {"text_ids": ids, "text_lens": lens}


# ----------------------------------------------------------------------------- VSE++


@pytest.mark.parametrize("over", [[], ["model.image.pool=max"], ["model.image.head=mlp", "model.image.head_hidden=8"]])
def test_vsepp_pools_over_each_images_own_regions(over):
    model, _ = _model("vsepp_gru.yaml", *over)
    feats, real = _padded()
    with torch.no_grad():
        got = model.embed_images({"feats": feats, "feat_lens": LENS})
        alone = torch.cat([model.embed_images({"feats": r[None]}) for r in real])
        torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)
        garbage = model.embed_images({"feats": _padded(1e6)[0], "feat_lens": LENS})
        assert torch.equal(garbage, got)  # zeroed before the FC: bitwise what zero padding gives
        assert not torch.allclose(model.embed_images({"feats": feats}), got, atol=1e-3)  # without counts it would count


# ----------------------------------------------------------------------------- SCAN

SCAN_CASES = [("t2i", "clipped_l2norm", "LogSumExp"),  # the t2i shortcut (no softmax max / normaliser passes)
              ("t2i", "softmax", "Mean"),  # the general softmax over the regions
              ("i2t", "clipped_l2norm", "LogSumExp"),  # L2 over the regions, LSE over the regions
              ("i2t", "softmax", "Mean"),  # a softmax over the regions, then the mean over them
              ("i2t", "l1norm", "Max")]


def _scan(direction, norm, agg, *over):
    lam = ["model.lambda_softmax=4", "model.lambda_lse=5"] if direction == "i2t" else []
    return _model("scan_t2i.yaml", f"model.direction={direction}", f"model.raw_feature_norm={norm}",
                  f"model.agg_func={agg}", *lam, *over)


@pytest.mark.parametrize("budget", [1 << 20, 300])  # one call, and image sub-chunks x caption length groups
@pytest.mark.parametrize("direction,norm,agg", SCAN_CASES)
def test_scan_scores_with_variable_regions_equal_each_image_alone(direction, norm, agg, budget):
    model, tok = _scan(direction, norm, agg, f"model.score_budget={budget}")
    feats, real = _padded()
    with torch.no_grad():
        cap = model.embed_captions(_captions(tok))
        img = model.embed_images({"feats": feats, "feat_lens": LENS})
        assert set(img) == {"regions", "lens"} and not img["regions"][0, 3:].any()
        got = model.score(img, cap)
        alone = torch.cat([model.score(model.embed_images({"feats": r[None]}), cap) for r in real])
        torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)
        # garbage in the features' padding, and in the embeddings' padding (the scores mask it themselves)
        assert torch.equal(model.score(model.embed_images({"feats": _padded(1e6)[0], "feat_lens": LENS}), cap), got)
        dirty = img["regions"].clone()
        dirty[torch.arange(dirty.shape[1])[None] >= LENS[:, None]] = 1e3
        torch.testing.assert_close(model.score({"regions": dirty, "lens": LENS}, cap), got, atol=1e-6, rtol=0)
        assert not torch.allclose(model.score(model.embed_images({"feats": feats}), cap), got, atol=1e-4)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scan_batch_loss_with_variable_regions_is_the_hinge_on_each_images_own_scores(direction):
    model, tok = _scan(direction, "clipped_l2norm", "LogSumExp", "loss.warmup_epochs=0")
    feats, real = _padded()
    batch = {"feats": _padded(1e6)[0], "feat_lens": LENS, "img_ids": torch.arange(6), **_captions(tok)}
    emb = model.embed(batch)
    assert not emb["img_lens"].is_floating_point()
    loss = model.batch_loss(loss_inputs(emb), batch["img_ids"], 0)
    with torch.no_grad():
        cap = model.embed_captions(batch)
        s = torch.cat([model.score(model.embed_images({"feats": r[None]}), cap) for r in real])
    ref = hinge_from_scores(s, s.t(), batch["img_ids"], batch["img_ids"])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    loss.backward()
    assert torch.isfinite(model.fc.weight.grad).all() and model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_scan_micro_batches_padded_to_their_own_longest_give_the_whole_batch_step(direction):
    """Exact accumulation joins micro-batches padded to different region counts (``pad_cat``): the loss and the
    summed gradient are the whole batch's."""
    from itr.distributed import pad_cat

    model, tok = _scan(direction, "clipped_l2norm", "LogSumExp", "loss.warmup_epochs=0")
    feats, _ = _padded()
    batch = {"feats": feats, "feat_lens": LENS, "img_ids": torch.arange(6), **_captions(tok)}
    whole = model(batch)["loss"]
    ref = torch.autograd.grad(whole, model.fc.weight)[0]
    rows = [(0, 1), (1, 2), (2, 4), (4, 6)]  # each micro-batch padded to its own longest image: 3, 7, 5, 7
    parts = [{**{k: v[lo:hi] for k, v in batch.items()}, "feats": feats[lo:hi, :int(LENS[lo:hi].max())]}
             for lo, hi in rows]
    with torch.no_grad():
        embs = [loss_inputs(model(p, mode="embed")) for p in parts]
    context = {k: pad_cat([e[k] for e in embs]) for k in embs[0]}
    assert context["img"].shape[1] == 7 and [e["img"].shape[1] for e in embs] == [3, 7, 5, 7]
    grad, losses = torch.zeros_like(ref), []
    for p, (lo, hi) in zip(parts, rows):
        loss = model(p, context={"emb": context, "rows": (lo, hi), "img_ids": batch["img_ids"]})["loss"]
        grad += torch.autograd.grad(loss, model.fc.weight)[0]
        losses.append(loss.item())
    assert losses == pytest.approx([whole.item()] * 4, abs=1e-5)
    torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["vsepp_regions", "scan_t2i_regions", "scan_i2t_regions"])
def test_accumulation_over_micro_batches_of_variable_regions_gives_the_whole_batch_step(name):
    ref = assert_split_steps_equal(name, [(1, 2), (1, 4)])  # micro-batches padded to 4, 3 / 4, 3, 3, 2 regions
    assert ref["loss"] > 0 and any(k.endswith("fc.weight") for k in ref["grads"])


@pytest.mark.slow
def test_ranks_of_variable_regions_give_the_whole_batch_step(tiny_bert):
    """Ranks gather images padded to different region counts with their counts (one launch for all)."""
    runs = [("scan_i2t_regions", 1, {}), ("scan_i2t_regions", 2, {}), ("scan_t2i_regions", 1, {}),
            ("vsepp_regions", 2, {}), ("teran_regions", 1, {}), ("tgdt_regions", 2, {})]
    # (not DIME: its score BatchNorm sees each rank's own pairs in training, by design; micro-batches are tested)
    refs = launch_steps(1, *[(name, 1, {}) for name, _, _ in runs], bert=tiny_bert)
    for (name, accum, _), ref, got in zip(runs, refs, launch_steps(2, *runs, bert=tiny_bert)):
        assert_same_step(got, ref, f"{name}, 2 ranks x {accum} micro-batches")


def test_scan_alignment_covers_the_real_regions_only():
    model, tok = _scan("t2i", "clipped_l2norm", "LogSumExp")
    feats, real = _padded()
    with torch.no_grad():
        img = model.embed_images({"feats": feats, "feat_lens": LENS})
        cap = model.embed_captions(_captions(tok))
        a = model.alignment({k: v[1:2] for k, v in img.items()}, {k: v[:1] for k, v in cap.items()})
        ref = model.alignment(model.embed_images({"feats": real[1][None]}), {k: v[:1] for k, v in cap.items()})
    assert a["weights"].shape == (int(cap["lens"][0]), 7)
    torch.testing.assert_close(a["weights"], ref["weights"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- TERAN and TGDT (region transformers)

TRANSFORMER = ["model.heads=2", "model.ff_dim=32", "model.dropout=0.1"]
TERAN = [*TRANSFORMER, "model.image_layers=1", "model.layers=1", "model.text_layers=0", "model.text.freeze=false"]
TGDT = [*TRANSFORMER, "model.text.word_dim=8", "model.text.min_count=1"]


def _tf(name, bert, *over):
    """TERAN (a tiny BERT) or TGDT (a word GRU), in eval mode, biases perturbed."""
    if name == "teran":
        return _model("teran.yaml", *TERAN, *over, text=(f"model.text.path={bert}",))
    return _model("tgdt.yaml", *TGDT, *over, text=())


def _images(garbage=0.0):
    """The padded batch (features and boxes, ``garbage`` past each count) and each image alone."""
    feats, real = _padded(garbage)
    g = torch.Generator().manual_seed(2)
    xy = [torch.rand(int(n), 2, generator=g) * 0.5 for n in LENS]
    boxes = [torch.cat([p, p + 0.1 + 0.4 * torch.rand(p.shape, generator=g)], -1) for p in xy]
    padded = torch.full((len(LENS), int(LENS.max()), 4), garbage)
    for b, r in zip(padded, boxes):
        b[:len(r)] = r
    return {"feats": feats, "boxes": padded, "feat_lens": LENS}, [{"feats": f[None], "boxes": b[None]}
                                                                  for f, b in zip(real, boxes)]


def _regions_of(name, img):
    return img["regions"] if name == "tgdt" or isinstance(img, dict) else img


TF_CASES = [("teran", []), ("teran", ["model.score_budget=300"]),  # one call; image sub-chunks x caption groups
            ("teran", ["model.pos_encoding=none", "model.shared_transformer=true", "model.drop_last_word=true"]),
            ("tgdt", []), ("tgdt", ["model.test_mode=local", "budget"]),
            ("tgdt", ["model.test_mode=global", "model.global_layers=0", "model.box_encoding=false"])]


@pytest.mark.parametrize("name,over", TF_CASES)
def test_region_transformers_score_variable_regions_as_each_image_alone(name, over, tiny_bert, monkeypatch):
    """The padding is masked in the region transformers (so the other regions' and the global token's outputs do
    not see it) and in the max over the regions of the local score."""
    if "budget" in over:  # TGDT's local scores in sub-chunks
        monkeypatch.setattr("itr.models.tgdt.LOCAL_BUDGET", 300)
        over = [o for o in over if o != "budget"]
    model, tok = _tf(name, tiny_bert, *over)
    batch, alone = _images()
    with torch.no_grad():
        cap = model.embed_captions(_captions(tok))
        img = model.embed_images(batch)
        assert set(img) >= {"regions", "lens"} and torch.equal(img["lens"], LENS)
        assert not img["regions"][0, 3:].any() and img["regions"][0, :3].abs().sum(-1).gt(0).all()
        got = model.score(img, cap)
        singles = [model.embed_images(a) for a in alone]
        torch.testing.assert_close(got, torch.cat([model.score(s, cap) for s in singles]), atol=1e-5, rtol=0)
        if name == "tgdt":  # the global token: the transformers mask the padding
            torch.testing.assert_close(img["glob"], torch.cat([s["glob"] for s in singles]), atol=1e-6, rtol=0)
        # garbage in the features' and boxes' padding, and in the embeddings' (the scores mask it themselves)
        assert torch.equal(model.score(model.embed_images(_images(1e6)[0]), cap), got)
        dirty = img["regions"].clone()
        dirty[torch.arange(dirty.shape[1])[None] >= LENS[:, None]] = 1e3
        torch.testing.assert_close(model.score({**img, "regions": dirty}, cap), got, atol=1e-5, rtol=0)
        counted = model.score(model.embed_images({k: v for k, v in batch.items() if k != "feat_lens"}), cap)
        assert not torch.allclose(counted, got, atol=1e-4)  # without the counts the padding would count


def _tgdt_reference_loss(model, batch, alone, ids):
    """TGDT's loss from each image embedded alone: the global hinge + consistency, and the local hinge."""
    c = model.cfg
    cap = model.embed_captions(batch)
    singles = [model.embed_images(a) for a in alone]
    g = torch.cat([model.global_score(s, cap) for s in singles])
    loc = torch.cat([model.local_score(s, cap) for s in singles])
    glob = torch.cat([s["glob"] for s in singles])
    return (c.global_weight * (hinge_from_scores(g, g.t(), ids, ids) + c.consistency_weight
                               * model.consistency(glob, cap["glob"]))
            + c.local_weight * hinge_from_scores(loc, loc.t(), ids, ids))


@pytest.mark.parametrize("name", ["teran", "tgdt"])
def test_region_transformers_batch_loss_is_the_hinge_on_each_images_own_scores(name, tiny_bert):
    model, tok = _tf(name, tiny_bert, "loss.warmup_epochs=0")
    batch, alone = _images(1e6)
    batch = {**batch, "img_ids": torch.arange(6), **_captions(tok)}
    emb = model.embed(batch)
    assert not emb["img_lens"].is_floating_point()
    loss = model.batch_loss(loss_inputs(emb), batch["img_ids"], 0)
    with torch.no_grad():
        if name == "teran":
            cap = model.embed_captions(batch)
            s = torch.cat([model.score(model.embed_images(a), cap) for a in alone])
            ref = hinge_from_scores(s, s.t(), batch["img_ids"], batch["img_ids"])
        else:
            ref = _tgdt_reference_loss(model, batch, alone, batch["img_ids"])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    loss.backward()
    grad = model.img_proj.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["teran_regions", "tgdt_regions"])
def test_region_transformers_accumulate_micro_batches_of_variable_regions(name, tiny_bert):
    ref = assert_split_steps_equal(name, [(1, 2), (1, 4)], bert=tiny_bert)  # micro-batches padded to 4, 3 / 4, 3, 3, 2
    assert ref["loss"] > 0 and any(k.endswith("img_proj.weight") for k in ref["grads"])


@pytest.mark.parametrize("name", ["teran", "tgdt"])
def test_region_transformers_alignment_covers_the_real_regions_only(name, tiny_bert):
    model, tok = _tf(name, tiny_bert)
    batch, alone = _images(1e6)
    with torch.no_grad():
        img = model.embed_images(batch)
        cap = {k: v[:1] for k, v in model.embed_captions(_captions(tok)).items()}
        a = model.alignment({k: v[:1] for k, v in img.items()}, cap)  # image 0: 3 of the 7 regions
        ref = model.alignment(model.embed_images(alone[0]), cap)
    assert a["weights"].shape == (int(cap["lens"][0]), 3)
    torch.testing.assert_close(a["weights"], ref["weights"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- DIME

DIME = ["model.heads=2", "model.hid_imrc=16", "model.hid_router=16", "model.path_hid=8"]


def _dime(bert, direction, *over):
    return _model("dime_t2i.yaml", *DIME, f"model.direction={direction}", *over, text=(f"model.text.path={bert}",))


def _interact(model, img, cap, rlens=None):
    return model.interact(img["img"], img["rgn"], cap["stc"], cap["wrd"], cap["lens"], rlens)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])  # the regions interact / the regions are attended to
def test_dime_scores_variable_regions_as_each_image_alone(direction, tiny_bert):
    model, tok = _dime(tiny_bert, direction)
    feats, real = _padded()
    with torch.no_grad():
        cap = model.embed_captions(_captions(tok))
        img = model.embed_images({"feats": feats, "feat_lens": LENS})
        assert torch.equal(img["lens"], LENS) and not img["rgn"][0, 3:].any()
        got, paths = _interact(model, img, cap, LENS)
        singles = [model.embed_images({"feats": r[None]}) for r in real]
        torch.testing.assert_close(img["img"], torch.cat([s["img"] for s in singles]), atol=1e-6, rtol=0)
        alone = [_interact(model, s, cap) for s in singles]
        torch.testing.assert_close(got, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=0)
        torch.testing.assert_close(paths, torch.cat([a[1] for a in alone]), atol=1e-5, rtol=0)
        assert torch.equal(model.score(img, cap), got)
        assert torch.equal(model.score(model.embed_images({"feats": _padded(1e6)[0], "feat_lens": LENS}), cap), got)
        dirty = img["rgn"].clone()
        dirty[torch.arange(dirty.shape[1])[None] >= LENS[:, None]] = 1e3
        torch.testing.assert_close(model.score({**img, "rgn": dirty}, cap), got, atol=1e-5, rtol=0)
        assert not torch.allclose(model.score(model.embed_images({"feats": feats}), cap), got, atol=1e-4)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_dime_batch_loss_with_variable_regions_is_that_of_each_images_own_scores_and_paths(direction, tiny_bert):
    """The hinge on each image's own scores plus the path regularizer on each image's own path probabilities."""
    model, tok = _dime(tiny_bert, direction, "loss.warmup_epochs=0")
    feats, real = _padded()
    batch = {"feats": _padded(1e6)[0], "feat_lens": LENS, "img_ids": torch.arange(6), **_captions(tok)}
    emb = model.embed(batch)
    assert not emb["img_lens"].is_floating_point()
    loss = model.batch_loss(loss_inputs(emb), batch["img_ids"], 0)
    with torch.no_grad():
        cap = model.embed_captions(batch)
        alone = [_interact(model, model.embed_images({"feats": r[None]}), cap) for r in real]
        s, paths = torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone])
        vec = model.path_vectors(paths, 0 if direction == "t2i" else 1)
        reg = ((vec @ vec.t() - emb["bert"] @ emb["bert"].t()) ** 2).sum() / 6
        ref = hinge_from_scores(s, s.t(), batch["img_ids"], batch["img_ids"]) + model.cfg.trade_off * reg
    assert reg > 0 and loss.item() == pytest.approx(ref.item(), abs=1e-5)
    loss.backward()
    assert torch.isfinite(model.img_fc.weight.grad).all() and model.img_fc.weight.grad.abs().sum() > 0


def test_dime_accumulates_micro_batches_of_variable_regions(tiny_bert):
    ref = assert_split_steps_equal("dime_i2t_regions", [(1, 2), (1, 4)], bert=tiny_bert)
    assert ref["loss"] > 0 and "img_fc.weight" in ref["grads"]


# ----------------------------------------------------------------------------- training steps on TSV shards


@pytest.fixture(scope="module")
def tsv_train(tmp_path_factory):
    return _tsv_shards(tmp_path_factory.mktemp("tsv"), splits=(("train", 40),))


WORDS = ["model.text.word_dim=8", "model.text.min_count=1"]


@pytest.mark.parametrize("recipe,over", [("vsepp_gru.yaml", WORDS), ("scan_t2i.yaml", [*WORDS, "model.direction=t2i"]),
                                         ("scan_t2i.yaml", [*WORDS, "model.direction=i2t"]),
                                         ("teran.yaml", [*TERAN, "model.text.path=BERT"]), ("tgdt.yaml", TGDT),
                                         ("dime_t2i.yaml", [*DIME, "model.text.path=BERT"]),
                                         ("dime_t2i.yaml", [*DIME, "model.text.path=BERT", "model.direction=i2t"])])
def test_a_few_training_steps_on_variable_region_tsv_shards(tsv_train, recipe, over, tiny_bert):
    train_a_few_steps(tsv_train, recipe, ["model.embed_dim=16", *over], tiny_bert)


def train_a_few_steps(out, recipe, over, bert=None, epoch_arg=0, watch=lambda m: next(m.parameters())):
    """Ten Adam steps on the TSV shards in ``out`` ("=BERT" in ``over``: the tiny BERT): finite losses and
    gradients, the batches really of varied region counts, and the ``watch``ed weight moved."""
    from itr.data.loader import TrainLoader
    from itr.data.manifest import load_manifest

    m = load_manifest(out, "train")
    over = [o.replace("=BERT", f"={bert}") for o in over]
    r = load_recipe(ROOT / "recipes" / "synthetic" / recipe, [*over, "loss.warmup_epochs=0"])
    tok = make_tokenizer(r, captions=(out / "train.captions.txt").read_text().splitlines())
    torch.manual_seed(0)
    model = build_model(r, m["feature_shape"][1], tok)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, varied = [], False
    before = watch(model).detach().clone()
    with one_thread():
        for epoch in range(2):
            for batch in TrainLoader(m, tok, 40, num_workers=0, shuffle_buffer=20).epoch(epoch):
                varied |= bool((batch["feat_lens"] < batch["feats"].shape[1]).any())
                loss = model(batch, epoch=epoch_arg)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
    assert varied and len(losses) == 10 and all(math.isfinite(x) for x in losses)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert not torch.equal(before, watch(model).detach())

E2E = {"scan": ("scan_t2i.yaml", [*WORDS, "model.direction=i2t"], "SCAN i2t attention"),
       "teran": ("teran.yaml", [*TERAN, "model.text.path=BERT"], "TERAN region-word alignment"),
       "tgdt": ("tgdt.yaml", TGDT, "TGDT local alignment"),
       "dime": ("dime_t2i.yaml", [*DIME, "model.text.path=BERT"], None)}  # no alignment figures


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_trains_evaluates_and_reports_on_tsv_shards_with_variable_regions(name, tmp_path, tiny_bert):
    """The evaluation path carries the image embeddings and their region counts through the tiles, and the report
    draws the attention / alignment over each image's own boxes."""
    from itr.data.manifest import load_manifest
    from itr.eval.job import run_eval
    from itr.train import train

    recipe, over, kind = E2E[name]
    out = _tsv_shards(tmp_path)
    assert load_manifest(out, "test")["variable_regions"]
    o = {"data.root": out, "data.num_workers": 0, "data.shuffle_buffer": 50, "train.batch_size": 20,
         "train.epochs": 1, "train.log_every": 2, "tracking.enabled": "false", "model.embed_dim": 16,
         "eval.batch_size": 16, "optim.lr": 2e-3, "eval.chunk_size": 8}
    over = [o.replace("=BERT", f"={tiny_bert}") for o in over]
    res = train(load_recipe(ROOT / "recipes" / "synthetic" / recipe, [f"{k}={v}" for k, v in o.items()] + over),
                tmp_path / "run")
    assert math.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", out, "test", protocol="1k", chunk_size=8, report=tmp_path / "rep")
    assert again == pytest.approx(res["test"])
    page = (tmp_path / "rep" / "index.html").read_text()
    if kind is not None:  # DIME draws no alignment
        assert kind in page
        assert page.count("with its ground truth") == 10  # every text query's own image, whatever its region count
