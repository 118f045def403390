"""loss.name=infonce: CLIP's symmetric InfoNCE with a learnable temperature over global-batch negatives."""
import math

import pytest
import torch

from conftest import assert_split_steps_equal
from itr.config import ConfigError, LossConfig, load_recipe
from itr.modules.losses import InfoNCELoss, infonce_from_scores

# img = I makes the scores img @ cap.T = cap.T, so scores[i, j] = S[i, j] exactly.
S = [[0.5, 0.6, 0.4],
     [0.2, 0.9, 0.8],
     [0.4, 0.3, 0.7]]


def _ce(row, target, scale, drop=()):
    """-log softmax(scale * row)[target] by hand, leaving out the columns in ``drop``."""
    den = sum(math.exp(scale * v) for j, v in enumerate(row) if j not in drop)
    return -(scale * row[target] - math.log(den))


def _loss(ids, **kw):
    cfg = LossConfig(name="infonce", temperature=0.5, **kw)  # logit scale 2
    img = torch.eye(3)
    cap = torch.tensor(S).t().contiguous()
    return InfoNCELoss(cfg)({"img": img, "cap": cap}, {"img_ids": torch.tensor(ids)}, 0).item()


def test_hand_computed_symmetric_cross_entropy():
    cols = [[S[i][j] for i in range(3)] for j in range(3)]  # caption j against the images
    i2t = sum(_ce(S[i], i, 2.0) for i in range(3))
    t2i = sum(_ce(cols[j], j, 2.0) for j in range(3))
    assert _loss([0, 1, 2]) == pytest.approx((i2t + t2i) / 6, rel=1e-6)


def test_same_image_captions_masked_negative_or_positive():
    ids = [7, 7, 3]  # pairs 0 and 1 show the same image
    cols = [[S[i][j] for i in range(3)] for j in range(3)]
    # masked: query 0 leaves out candidate 1, query 1 candidate 0 (both directions); pair 2 unchanged
    masked = (_ce(S[0], 0, 2, {1}) + _ce(S[1], 1, 2, {0}) + _ce(S[2], 2, 2)
              + _ce(cols[0], 0, 2, {1}) + _ce(cols[1], 1, 2, {0}) + _ce(cols[2], 2, 2)) / 6
    assert _loss(ids) == pytest.approx(masked, rel=1e-6)
    plain = sum(_ce(S[i], i, 2) + _ce(cols[i], i, 2) for i in range(3)) / 6
    assert _loss(ids, mask_same_image=False) == pytest.approx(plain, rel=1e-6)
    # multi-positive: queries 0 and 1 have targets uniform over candidates {0, 1}
    multi = sum(0.5 * (_ce(r, 0, 2) + _ce(r, 1, 2)) for r in (S[0], S[1], cols[0], cols[1]))
    multi = (multi + _ce(S[2], 2, 2) + _ce(cols[2], 2, 2)) / 6
    assert _loss(ids, multi_positive=True) == pytest.approx(multi, rel=1e-6)
    assert len({round(v, 6) for v in (masked, plain, multi)}) == 3  # the three cases really differ


def test_rank_shares_add_up_to_the_global_mean():
    """Two 'ranks' (rows 0-1 and 2-3 of the queries against all candidates) add up to the one-process loss."""
    g = torch.Generator().manual_seed(0)
    s_i2t, s_t2i = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    ids = torch.tensor([0, 1, 0, 2])
    whole = infonce_from_scores(s_i2t, s_t2i, ids, ids, 0, 3.0)
    parts = sum(infonce_from_scores(s_i2t[lo:lo + 2], s_t2i[lo:lo + 2], ids[lo:lo + 2], ids, lo, 3.0, n_global=4)
                for lo in (0, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_temperature_is_trained_clamped_and_saved():
    from itr.models import build_model, make_tokenizer
    from itr.optim import make_optimizer

    recipe = load_recipe(raw={"model": {"name": "vsepp", "embed_dim": 8, "text": {"name": "gru", "word_dim": 4,
                                                                                   "min_count": 1}},
                              "loss": {"name": "infonce"}, "optim": {"lr": 0.5, "weight_decay": 0.1}})
    tok = make_tokenizer(recipe, captions=["a dog", "a cat", "a red bus"])
    model = build_model(recipe, 6, tok)
    assert model.loss_reduction == "mean"
    p = dict(model.named_parameters())["criterion.logit_scale"]
    assert p.item() == pytest.approx(math.log(1 / 0.07))
    opt, _ = make_optimizer(model, recipe.optim)
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    assert group["weight_decay"] == 0.0  # never decayed (OpenCLIP)
    ids, lens = torch.tensor([[1, 2, 0], [1, 3, 0], [1, 4, 5]]), torch.tensor([2, 2, 3])
    batch = {"feats": torch.randn(3, 2, 6), "text_ids": ids, "text_lens": lens, "img_ids": torch.arange(3)}
    before = p.item()
    model(batch)["loss"].backward()
    assert p.grad is not None and p.grad.item() != 0.0
    opt.step()
    assert p.item() != before
    with torch.no_grad():
        p.fill_(9.0)
    assert model.criterion.scale().item() == pytest.approx(100.0)  # the forward's clamp
    model.after_optimizer_step()
    assert p.item() == pytest.approx(math.log(100))  # OpenCLIP's clamp after the step
    assert "criterion.logit_scale" in model.state_dict()
    fixed = build_model(load_recipe(raw={**recipe_dict(recipe), "loss": {"name": "infonce",
                                                                         "learn_temperature": False}}), 6, tok)
    assert "criterion.logit_scale" not in dict(fixed.named_parameters())
    assert "criterion.logit_scale" in fixed.state_dict()


def recipe_dict(recipe):
    from itr.config import to_dict

    return to_dict(recipe)


def test_token_level_models_refuse_infonce():
    from itr.models import build_model, make_tokenizer

    recipe = load_recipe(raw={"model": {"name": "scan", "embed_dim": 8, "text": {"name": "gru_words",
                                                                                  "word_dim": 4, "min_count": 1}},
                              "loss": {"name": "infonce"}})
    tok = make_tokenizer(recipe, captions=["a dog"])
    with pytest.raises(ConfigError, match="loss.name=infonce: SCAN .*token-level"):
        build_model(recipe, 6, tok)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vsepp_infonce", "vsepp_infonce_multi"])
def test_ranks_and_accumulation_give_the_whole_batch_step(name):
    ref = assert_split_steps_equal(name, [(1, 2), (1, 4), (2, 1), (2, 2)])
    assert ref["grads"]["criterion.logit_scale"].abs().item() > 0  # the temperature's gradient is exact too


@pytest.mark.parametrize("name", ["hrem_vse", "selfalign_camera", "sentence_matcher"])
def test_every_kind_of_global_model_takes_infonce_exactly_under_accumulation(name, tiny_bert, monkeypatch):
    """HREM (its VSE terms), CAMERA's best-view score (``with_score``) and the sentence matcher with
    loss.name=infonce: 2 micro-batches give the whole batch's step, the temperature's gradient included."""
    from conftest import _step_module

    models = _step_module().MODELS
    entry = models[name]
    recipe = {**entry["recipe"], "loss": {**entry["recipe"].get("loss", {}), "name": "infonce"}}
    monkeypatch.setitem(models, name + "_infonce", {**entry, "recipe": recipe})
    ref = assert_split_steps_equal(name + "_infonce", [(1, 2)], bert=tiny_bert)
    assert ref["grads"]["criterion.logit_scale"].abs().item() > 0
