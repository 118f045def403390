"""Variable region counts in VSRN, CAMERA and SelfAlign on them: a padded batch embeds (and its region-level losses
come out) as each image alone with only its real regions, whatever the padding holds; a few training steps on TSV
shards. The pattern of tests/test_region_masks.py."""
import math

import pytest
import torch

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.models import build_model, make_tokenizer
from itr.models.base import loss_inputs

from conftest import ROOT, assert_same_step, assert_split_steps_equal, launch_steps, one_thread
from test_region_masks import CAPS, DIM, LENS, _padded, train_a_few_steps
from test_variable_regions import _tsv_shards

VSRN = ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1", "model.caption_hidden=8",
        "model.caption_word_dim=6"]
CAMERA = ["model.embed_dim=16", "model.heads=2", "model.views=3"]
SELFALIGN = ["model.prototypes=24", "model.negatives=7", "data.max_words=12"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _build(recipe, over, bert=None):
    r = load_recipe(ROOT / "recipes" / "synthetic" / recipe,
                    [*over, *([f"model.text.path={bert}"] if bert else []), "loss.warmup_epochs=0"])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    model = build_model(r, DIM, tok).eval()
    with torch.no_grad():  # as training leaves them: BatchNorms that act (VSRN's start at zero), biases that move
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif ".bn" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model, tok


def _boxes(seed=2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(len(LENS), int(LENS.max()), 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(len(LENS), int(LENS.max()), 2, generator=g)], dim=-1)
    return boxes.masked_fill((torch.arange(boxes.shape[1])[None] >= LENS[:, None])[..., None], 0)


def _images(garbage=0.0):
    """The padded batch (features and boxes) and each image alone with its real regions."""
    feats, real = _padded(garbage)
    boxes = _boxes()
    if garbage:
        boxes = boxes.masked_fill((torch.arange(boxes.shape[1])[None] >= LENS[:, None])[..., None], garbage)
    alone = [{"feats": r[None], "boxes": boxes[i:i + 1, :len(r)]} for i, r in enumerate(real)]
    return {"feats": feats, "boxes": boxes, "feat_lens": LENS}, alone


def _captions(tok):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS], tok.pad_id)
    return {"text_ids": ids, "text_lens": lens, "img_ids": torch.arange(len(CAPS))}


def _embeds_as_each_image_alone(model):
    batch, alone = _images()
    with torch.no_grad():
        got = model.embed_images(batch)
        ref = torch.cat([model.embed_images(a) for a in alone])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert torch.equal(model.embed_images(_images(1e6)[0]), got)  # garbage in the padding reaches nothing
        unmasked = {k: v for k, v in batch.items() if k != "feat_lens"}
        assert not torch.allclose(model.embed_images(unmasked), got, atol=1e-3)  # without counts it would count
    return got


# ----------------------------------------------------------------------------- VSRN


@pytest.mark.parametrize("over", [[], ["model.l2_axis=features"], ["model.fc_norm=false", "model.out_bn=true"]])
def test_vsrn_embeds_each_image_over_its_own_regions(over):
    model, _ = _build("vsrn.yaml", VSRN + over)
    _embeds_as_each_image_alone(model)


def test_vsrn_caption_loss_with_variable_regions_is_the_sum_of_each_images_own():
    model, tok = _build("vsrn.yaml", VSRN)
    batch, alone = _images()
    caps = _captions(tok)
    with torch.no_grad():
        got = model.embed({**batch, **caps})["aux_loss"]
        ref = sum(model.embed({**a, **{k: v[i:i + 1] for k, v in caps.items()}})["aux_loss"]
                  for i, a in enumerate(alone))
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.equal(model.embed({**_images(1e6)[0], **caps})["aux_loss"], got)


def test_vsrn_garbage_in_the_padding_changes_no_training_step():
    """Training mode (batch-statistics BatchNorm in the GCN): the loss and every gradient ignore the padding."""
    model, tok = _build("vsrn.yaml", VSRN + ["model.caption_dropout=0"])
    model.train()
    steps = []
    for garbage in (0.0, 1e3):
        loss = model({**_images(garbage)[0], **_captions(tok)})["loss"]
        model.zero_grad()
        loss.backward()
        steps.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert steps[0][0] == pytest.approx(steps[1][0], rel=1e-6)
    for k, g in steps[0][1].items():
        torch.testing.assert_close(steps[1][1][k], g, atol=1e-6, rtol=1e-5, msg=k)
    assert steps[0][1]["img_enc.gcn.0.W.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- CAMERA


@pytest.mark.parametrize("over", [[], ["model.l2_axis=features"]])
def test_camera_embeds_each_image_over_its_own_regions(tiny_bert, over):
    model, _ = _build("camera.yaml", CAMERA + over, tiny_bert)
    _embeds_as_each_image_alone(model)


def test_camera_diversity_regularizer_with_variable_regions_is_the_sum_of_each_images_own(tiny_bert):
    from itr.modules.ops import diversity_regularizer

    model, _ = _build("camera.yaml", CAMERA, tiny_bert)
    batch, alone = _images()
    with torch.no_grad():
        got = diversity_regularizer(model.image_features(batch)["smry"])
        ref = sum(diversity_regularizer(model.image_features(a)["smry"]) for a in alone)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        unmasked = model.image_features({k: v for k, v in batch.items() if k != "feat_lens"})["smry"]
        assert diversity_regularizer(unmasked).item() != pytest.approx(got.item(), rel=1e-3)


# ----------------------------------------------------------------------------- SelfAlign on VSRN and CAMERA

SELFALIGN_CASES = [("selfalign_vsrn.yaml", VSRN + SELFALIGN, False),
                   ("selfalign_camera.yaml", CAMERA + SELFALIGN, True)]


@pytest.mark.parametrize("recipe,over,bert", SELFALIGN_CASES)
def test_selfalign_embeds_each_image_over_its_own_regions(tiny_bert, recipe, over, bert):
    model, _ = _build(recipe, over, tiny_bert if bert else None)
    _embeds_as_each_image_alone(model)


def _wider(batch, regions, garbage):
    """The same images padded further, with ``garbage`` in all of their padding."""
    out = dict(batch)
    for k in ("feats", "boxes"):
        v = torch.full((*batch[k].shape[:1], regions, batch[k].shape[2]), garbage)
        v[:, :batch[k].shape[1]] = batch[k]
        v[torch.arange(regions)[None] >= LENS[:, None]] = garbage
        out[k] = v
    return out


@pytest.mark.parametrize("recipe,over,bert", SELFALIGN_CASES)
def test_selfalign_losses_leave_the_padding_out(tiny_bert, recipe, over, bert):
    """Concept (Sinkhorn codes over the real regions only, words matched to real regions) and context (the image
    locals as keys): the loss and its gradient do not change when the batch is padded further with garbage, and
    with every region real the counts give the fixed-region loss."""
    model, tok = _build(recipe, over, tiny_bert if bert else None)
    batch = {**_images()[0], **_captions(tok)}

    def step(b):
        emb = model.embed(b)
        loss = model.batch_loss(loss_inputs(emb), b["img_ids"], 1)
        model.zero_grad()
        loss.backward()
        return loss.item(), model.img_enc.fc.weight.grad.clone()

    loss, grad = step(batch)
    wide_loss, wide_grad = step(_wider(batch, 11, 1e3))
    assert wide_loss == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(wide_grad, grad, atol=1e-6, rtol=1e-4)
    assert step({k: v for k, v in batch.items() if k != "feat_lens"})[0] != pytest.approx(loss, rel=1e-3)
    full = {**batch, "feat_lens": torch.full_like(LENS, int(LENS.max()))}
    assert step(full)[0] == pytest.approx(step({k: v for k, v in full.items() if k != "feat_lens"})[0], rel=1e-5)


@pytest.mark.parametrize("name", ["vsrn_regions", "selfalign_vsrn_regions"])
def test_accumulation_over_micro_batches_of_variable_regions_gives_the_whole_batch_step(name):
    ref = assert_split_steps_equal(name, [(1, 2), (1, 4)])  # micro-batches padded to 4, 3 / 4, 3, 3, 2 regions
    assert ref["loss"] > 0 and any(k.endswith("gcn.0.W.weight") for k in ref["grads"])


@pytest.mark.parametrize("name", ["camera_regions", "selfalign_camera_regions"])
def test_bert_accumulation_over_micro_batches_of_variable_regions_gives_the_whole_batch_step(tiny_bert, name):
    ref = assert_split_steps_equal(name, [(1, 2), (1, 4)], bert=tiny_bert)
    assert ref["loss"] > 0 and any(k.endswith("agsa.att.q.weight") for k in ref["grads"])


@pytest.mark.slow
def test_ranks_of_variable_regions_give_the_whole_batch_step(tiny_bert):
    """Ranks gather region features padded to different region counts with their counts (one launch for all)."""
    runs = [("selfalign_vsrn_regions", 1, {}), ("selfalign_camera_regions", 2, {}), ("vsrn_regions", 1, {})]
    refs = launch_steps(1, *[(name, 1, {}) for name, _, _ in runs], bert=tiny_bert)
    for (name, accum, _), ref, got in zip(runs, refs, launch_steps(2, *runs, bert=tiny_bert)):
        assert_same_step(got, ref, f"{name}, 2 ranks x {accum} micro-batches")


# ----------------------------------------------------------------------------- training steps on TSV shards


@pytest.fixture(scope="module")
def tsv_train(tmp_path_factory):
    return _tsv_shards(tmp_path_factory.mktemp("tsv"), splits=(("train", 40),))


def _train_a_few_steps(out, recipe, over, bert=None):
    train_a_few_steps(out, recipe, [*over, *(["model.text.path=BERT"] if bert else [])], bert, epoch_arg=1,
                      watch=lambda m: m.img_enc.fc.weight)

@pytest.mark.parametrize("recipe,over", [("vsrn.yaml", VSRN), ("selfalign_vsrn.yaml", VSRN + SELFALIGN)])
def test_a_few_training_steps_on_variable_region_tsv_shards(tsv_train, recipe, over):
    _train_a_few_steps(tsv_train, recipe, over)


@pytest.mark.parametrize("recipe,over", [("camera.yaml", CAMERA), ("selfalign_camera.yaml", CAMERA + SELFALIGN)])
def test_a_few_bert_training_steps_on_variable_region_tsv_shards(tsv_train, tiny_bert, recipe, over):
    _train_a_few_steps(tsv_train, recipe, over, tiny_bert)


@pytest.mark.slow
def test_vsrn_trains_and_evaluates_on_tsv_shards_with_variable_regions(tmp_path):
    """Evaluation pads every image to the split's largest count; the checkpoint evaluates as training did."""
    from itr.data.manifest import load_manifest
    from itr.eval.job import run_eval
    from itr.train import train

    out = _tsv_shards(tmp_path)
    assert load_manifest(out, "test")["variable_regions"]
    o = {"data.root": out, "data.num_workers": 0, "data.shuffle_buffer": 50, "train.batch_size": 20,
         "train.epochs": 1, "train.log_every": 2, "tracking.enabled": "false", "model.embed_dim": 16,
         "model.text.word_dim": 8, "model.text.min_count": 1, "model.caption_hidden": 8,
         "model.caption_word_dim": 6, "eval.batch_size": 16, "optim.lr": 2e-3}
    res = train(load_recipe(ROOT / "recipes" / "synthetic" / "vsrn.yaml", [f"{k}={v}" for k, v in o.items()]),
                tmp_path / "run")
    assert math.isfinite(res["test"]["rsum"]) and res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", out, "test", protocol="1k")
    assert again == pytest.approx(res["test"])
