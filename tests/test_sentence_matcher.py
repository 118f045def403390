"""The sentence-level xmatching model: encoders, frozen-backbone switches, the paired hinge rank loss,
a pretrained transformers ResNet from a local directory, training on real JPEG shards, and the
global batch over ranks / accumulation steps."""
import json
import shutil

import pytest
import torch

from itr.config import load_recipe
from itr.data.images import normalize
from itr.data.loader import collate_tokens
from itr.errors import ConfigError
from itr.models import build_model, make_tokenizer
from itr.models.sentence_matcher import FrozenBatchNorm2d, paired_hinge_loss

from conftest import F8K, F8K_IMAGES, ROOT, assert_split_steps_equal

TINY_RESNET = {"name": "xmatching_resnet", "depths": [1, 1], "hidden_sizes": [8, 16], "embedding_size": 8,
               "layer_type": "basic", "finetune": True, "freeze_stem": False, "frozen_bn": True}
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog",
        "a cat and a kite", "a green tree", "a boat near a bridge", "a yellow bird"]


def _recipe(tiny_bert, image=None, **model):
    m = {"name": "sentence_matcher", "embed_dim": 16, "mlp_dim": 24, "image": {**TINY_RESNET, **(image or {})},
         "text": {"name": "hf", "path": str(tiny_bert), "pool": "cls"}, **model}
    return load_recipe(raw={"model": m, "loss": {"margin": 0.5}})


def _model(tiny_bert, image=None, **model):
    r = _recipe(tiny_bert, image, **model)
    tok = make_tokenizer(r)
    torch.manual_seed(0)
    return build_model(r, 0, tok), tok


def _pixels(n, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _text(tok, caps):
    ids, lens = collate_tokens([tok.encode(c) for c in caps], tok.pad_id)
    return {"text_ids": ids, "text_lens": lens}


# ----------------------------------------------------------------------------- encoders


def test_shapes_unit_norms_cls_pooling_and_padding_invariance(tiny_bert):
    model, tok = _model(tiny_bert)
    model.eval()
    img = model.embed_images({"pixels": _pixels(3)})
    assert img.shape == (3, 16) and torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    batch = _text(tok, ["a dog", "a photo of a blue car and a tree"])
    assert (batch["text_ids"][:, 0] == tok.tok.cls_token_id).all()
    cap = model.embed_captions(batch)
    assert cap.shape == (2, 16) and torch.allclose(cap.norm(dim=1), torch.ones(2), atol=1e-5)
    alone = model.embed_captions(_text(tok, ["a dog"]))
    assert torch.allclose(cap[0], alone[0], atol=1e-5)  # the attention mask hides the padding
    # the [CLS] token, then the MLP: Linear(32 -> 24), ReLU, Dropout(0.3), Linear(24 -> 16)
    enc = model.txt_enc
    h = enc.backbone(input_ids=_text(tok, ["a dog"])["text_ids"]).last_hidden_state[:, 0]
    assert torch.allclose(cap[0], torch.nn.functional.normalize(enc.mlp(h), dim=1)[0], atol=1e-5)
    assert [type(m).__name__ for m in enc.mlp] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert enc.mlp[0].out_features == 24 and enc.mlp[2].p == 0.3
    assert model.score(img, cap).shape == (3, 2)


def test_pixels_are_imagenet_normalized_before_the_backbone(tiny_bert):
    model, _ = _model(tiny_bert)
    seen = {}
    model.img_enc.backbone.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["pixel_values"]), with_kwargs=True)
    pixels = _pixels(2)
    model.embed_images({"pixels": pixels})
    torch.testing.assert_close(seen["x"], normalize(pixels))
    gray = torch.tensor([0.485, 0.456, 0.406]).mul(255).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert normalize(gray).abs().max() < 0.02  # the ImageNet mean maps to ~0
    with pytest.raises(ConfigError, match="raw images"):
        model.embed_images({"feats": torch.randn(2, 1, 8)})


def test_frozen_batchnorm_stem_and_backbone_switches(tiny_bert):
    model, _ = _model(tiny_bert, {"freeze_stem": True})
    bb = model.img_enc.backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert not any(p.requires_grad for p in bb.embedder.parameters())
    assert not any(p.requires_grad for p in bb.encoder.stages[0].parameters())
    assert all(p.requires_grad for p in bb.encoder.stages[1].parameters())
    # BERT's pooler is not used by the [CLS] + MLP head: dropped, so DDP does not wait for its gradient
    assert model.txt_enc.backbone.pooler is None

    fixed, _ = _model(tiny_bert, {"finetune": False, "frozen_bn": False})
    assert not any(p.requires_grad for p in fixed.img_enc.backbone.parameters())
    assert all(p.requires_grad for p in fixed.img_enc.mlp.parameters())
    fixed.train()
    assert not fixed.img_enc.backbone.training and fixed.img_enc.mlp.training  # BN statistics stay put
    before = {k: v.clone() for k, v in fixed.img_enc.backbone.state_dict().items()}
    fixed.embed_images({"pixels": _pixels(4)}).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in fixed.img_enc.backbone.state_dict().items())

    live, _ = _model(tiny_bert, {"frozen_bn": False})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in live.img_enc.backbone.modules())
    with pytest.raises(ConfigError, match="layer_type"):
        _model(tiny_bert, {"layer_type": "resnext"})
    with pytest.raises(ConfigError, match="raw images"):
        build_model(_recipe(tiny_bert), 512, make_tokenizer(_recipe(tiny_bert)))


def test_frozen_batchnorm_equals_batchnorm_in_eval_mode():
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    seq = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), bn)
    x = torch.randn(3, 2, 5, 5)
    want = seq.eval()(x)
    FrozenBatchNorm2d.convert(seq)
    assert isinstance(seq[1], FrozenBatchNorm2d)
    torch.testing.assert_close(seq.train()(x), want)  # frozen: the same in train mode


# ----------------------------------------------------------------------------- loss


IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
CAP = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])


def test_paired_hinge_loss_by_hand():
    # partners (i + 2) % 4: 0<->2, 1<->3. cost_i = max(0, 0.5 - <c_i, v_i> + <c_i, v_partner>)
    #   0: 0.5 - 1 + 0.6 = 0.1;  1: 0.5 - 1 + 0.6 = 0.1;  2: 0.5 - 0.6 + 1 = 0.9;  3: 0.5 - 0.96 + 0.8 = 0.34
    ids = torch.arange(4)
    assert paired_hinge_loss(CAP, IMG, ids, reduction="sum").item() == pytest.approx(1.44)
    assert paired_hinge_loss(CAP, IMG, ids).item() == pytest.approx(0.36)  # mean over the batch
    # the queries of a second rank (rows 2, 3) against the whole batch: their costs over the global size
    assert paired_hinge_loss(CAP[2:], IMG, ids, offset=2).item() == pytest.approx(1.24 / 4)
    assert paired_hinge_loss(CAP, IMG, ids, margin=0.1, reduction="sum").item() == pytest.approx(0.5 + 0.0)
    # odd batch: partners (i + 1) % 3. 0: 0.5 - 1 + 0 = 0 (clamped); 1: 0.5 - 1 + 0.8 = 0.3; 2: 0.5 - 0.6 + 1 = 0.9
    assert paired_hinge_loss(CAP[:3], IMG[:3], ids[:3], reduction="sum").item() == pytest.approx(1.2)
    # the gradient reaches the partner image (the negative) with the sign that pushes it away
    img = IMG.clone().requires_grad_()
    paired_hinge_loss(CAP, img, ids, reduction="sum").backward()
    torch.testing.assert_close(img.grad[3], -CAP[3] + CAP[1])  # positive of query 3, negative of query 1


def test_pairs_showing_the_same_image_are_masked(tiny_bert):
    ids = torch.tensor([0, 1, 0, 2])  # 0 and 2 (partners) show the same image
    assert paired_hinge_loss(CAP, IMG, ids, reduction="sum").item() == pytest.approx(0.1 + 0.34)
    assert paired_hinge_loss(CAP, IMG, ids, mask_same_image=False, reduction="sum").item() == pytest.approx(1.44)
    assert paired_hinge_loss(CAP[:1], IMG[:1], ids[:1]).item() == 0.0  # a batch of one has no negative
    model, _ = _model(tiny_bert)
    emb = {"img": IMG, "cap": CAP}
    assert model.batch_loss(emb, ids, 0).item() == pytest.approx(0.44 / 4)
    model.loss_cfg.mask_same_image = False
    assert model.batch_loss(emb, ids, 0).item() == pytest.approx(1.44 / 4)
    summed, _ = _model(tiny_bert, loss_reduction="sum")
    assert summed.batch_loss(emb, ids, 0).item() == pytest.approx(0.44)


def test_a_few_steps_reduce_the_loss(tiny_bert):
    model, tok = _model(tiny_bert, dropout=0.0)
    model.eval()  # no dropout anywhere: a deterministic objective on a fixed batch
    batch = {"pixels": _pixels(8), **_text(tok, CAPS), "img_ids": torch.arange(8)}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.2 and min(losses[-5:]) < 0.3 * losses[0]


# ----------------------------------------------------------------------------- pretrained ResNet


@pytest.mark.parametrize("head", [False, True])
def test_local_pretrained_resnet_loads_exactly(tiny_bert, tmp_path, head):
    """A ResNet saved with save_pretrained (bare, or with the classification head as
    microsoft/resnet-50 is) loads through backbone_path with every weight and BN statistic."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    cfg = ResNetConfig(depths=[1, 2], hidden_sizes=[8, 16], embedding_size=8, layer_type="bottleneck", num_labels=3)
    torch.manual_seed(3)
    src = ResNetForImageClassification(cfg) if head else ResNetModel(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a skipped buffer would show
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
    src.save_pretrained(tmp_path / "resnet")
    base = src.resnet if head else src

    model, _ = _model(tiny_bert, {"backbone_path": str(tmp_path / "resnet"), "depths": [9], "freeze_stem": True})
    bb = model.img_enc.backbone
    assert bb.config.depths == [1, 2] and bb.config.layer_type == "bottleneck"  # the directory's config wins
    want = {k: v for k, v in base.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = bb.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    x = normalize(_pixels(2))
    torch.testing.assert_close(bb(pixel_values=x).pooler_output, base.eval()(pixel_values=x).pooler_output)

    with pytest.raises(ConfigError, match="no config.json"):
        _model(tiny_bert, {"backbone_path": str(tmp_path)})
    (tmp_path / "cfg_only").mkdir()
    shutil.copy(tmp_path / "resnet" / "config.json", tmp_path / "cfg_only")
    with pytest.raises(ConfigError, match="no model.safetensors"):
        _model(tiny_bert, {"backbone_path": str(tmp_path / "cfg_only")})


# ----------------------------------------------------------------------------- training on real JPEGs


@pytest.fixture
def f8k_image_shards(tmp_path):
    """Shards of the 100 real Flickr8k JPEGs, split 80/20 as tests/test_images.py does."""
    if not (F8K_IMAGES / "ids.txt").is_file():
        pytest.skip(f"real Flickr8k images not found at {F8K_IMAGES} (../shared/data beside the checkout; CI has it)")
    from itr.shards.images import shard_images

    ids = (F8K_IMAGES / "ids.txt").read_text().split()
    caps = (F8K / "dev_caps.txt").read_text().splitlines()
    images = [{"filename": f, "imgid": i, "split": "test" if i < 20 else "train",
               "sentences": [{"raw": c} for c in caps[5 * i:5 * i + 5]]} for i, f in enumerate(ids)]
    p = tmp_path / "dataset_f8k.json"
    p.write_text(json.dumps({"images": images}))
    for split in ("train", "test"):
        shard_images(p, F8K_IMAGES, split, tmp_path / "shards", images_per_shard=40, progress=False)
    return tmp_path / "shards"


@pytest.mark.slow
def test_train_on_real_jpegs_then_the_best_checkpoint_evaluates_the_same(tiny_bert, f8k_image_shards, tmp_path):
    from itr.checkpoint import load_for_eval
    from itr.eval.job import run_eval
    from itr.train import train

    recipe = load_recipe(ROOT / "recipes" / "f8k" / "sentence_matcher_images.yaml", [
        f"data.root={f8k_image_shards}", f"model.text.path={tiny_bert}", "model.embed_dim=32", "model.mlp_dim=64",
        "model.image.hidden_sizes=[8, 16]", "model.image.embedding_size=8", "data.image_size=32",
        "data.num_workers=0", "data.shuffle_buffer=100", "train.epochs=2", "train.batch_size=40",
        "train.log_every=2", "optim.lr=1e-3", "tracking.enabled=false"])
    res = train(recipe, tmp_path / "run")
    assert res["global_step"] == 2 * (400 // 40) and res["best_epoch"] in (1, 2)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    model, _, r, meta = load_for_eval(tmp_path / "run" / "best")
    assert meta["img_dim"] == 0 and r.model.name == "sentence_matcher"
    again = run_eval(tmp_path / "run" / "best", f8k_image_shards, "test", device="cpu")
    assert again == pytest.approx(saved["test"])
    assert 0 < saved["test"]["rsum"] <= 600


# ----------------------------------------------------------------------------- global batch


@pytest.mark.slow
def test_two_ranks_and_accumulation_give_the_whole_batch_loss_and_gradients(tiny_bert):
    # 2 ranks: partners on the other rank, gathered with gradients
    ref = assert_split_steps_equal("sentence_matcher", [(1, 2), (2, 1), (2, 2)], bert=tiny_bert)
    assert ref["loss"] > 0 and any("img_enc.backbone" in k for k in ref["grads"])
