import pytest
import torch
import torch.nn.functional as F

from itr.config import load_recipe
from itr.data.loader import collate_tokens
from itr.errors import ConfigError
from itr.eval.job import run_eval
from itr.models import build_model, make_tokenizer
from itr.modules.alignment import ConceptAlignment, cra_loss, sinkhorn
from itr.train import train

from conftest import ROOT, assert_same_step, assert_split_steps_equal, launch_steps, tiny_overrides

VSRN_RECIPE = ROOT / "recipes" / "synthetic" / "selfalign_vsrn.yaml"
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"] * 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(n)


def _model(*overrides, img_dim=12):
    r = load_recipe(VSRN_RECIPE, ["model.embed_dim=16", "model.text.word_dim=8", "model.text.min_count=1",
                                  "model.caption_hidden=8", "model.caption_word_dim=6", "model.prototypes=24",
                                  "data.max_words=12", "loss.warmup_epochs=0", *overrides])
    tok = make_tokenizer(r, captions=CAPS)
    torch.manual_seed(0)
    return build_model(r, img_dim, tok), tok


def _batch(tok, n=8, regions=5, img_dim=12):
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS[:n]], tok.pad_id)
    g = torch.Generator().manual_seed(0)
    return {"feats": torch.randn(n, regions, img_dim, generator=g), "text_ids": ids, "text_lens": lens,
            "img_ids": torch.arange(n)}


# ----------------------------------------------------------------------------- the objectives by hand


def _reference_sinkhorn(out, epsilon, iterations):
    """loss_SelfAlign.py distributed_sinkhorn, transcribed."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def test_sinkhorn_matches_the_reference_and_balances_the_prototypes():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    codes = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(codes, _reference_sinkhorn(scores, 0.05, 3), atol=1e-6)
    assert torch.allclose(codes.sum(1), torch.ones(12), atol=1e-5)  # each sample: an assignment
    many = sinkhorn(scores, 0.05, 200)
    assert torch.allclose(many.sum(0), torch.full((5,), 12 / 5), atol=1e-3)  # prototypes equally used
    assert torch.allclose(sinkhorn(torch.zeros(4, 2), 0.05, 2), torch.full((4, 2), 0.5))


def test_concept_alignment_by_hand():
    """One pair, two regions, two words, two prototypes: words pick their nearest region and must
    predict its Sinkhorn code with softmax(prototype scores / 0.1)."""
    lca = ConceptAlignment(2, prototypes=2, student_temp=0.1, epsilon=0.05, iterations=3)
    with torch.no_grad():
        lca.prototypes.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))  # normalized to the identity
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    words = F.normalize(torch.tensor([[[0.9, 0.1], [0.2, 0.8], [5.0, 5.0]]]), dim=-1)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third word is padding
    got = lca(regions, words, mask, offset=0, n_global=1)
    assert torch.allclose(lca.prototypes.weight, torch.eye(2))
    codes = _reference_sinkhorn(regions[0] @ torch.eye(2), 0.05, 3)  # (regions, prototypes)
    expected = 0.0
    for w, region in ((words[0, 0], 0), (words[0, 1], 1)):
        expected -= (codes[region] * F.log_softmax(w / 0.1, dim=-1)).sum() / 2
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert lca(regions, words, mask, offset=0, n_global=4).item() == pytest.approx(expected.item() / 4, rel=1e-5)


def _reference_cra(l, m, tau, neg_num):
    """loss_SelfAlign.py CRA_loss, transcribed: l (B, dim, n_locals) keys, m (B, dim, 1) queries."""
    n, units, n_locals = l.shape
    n_multis = m.shape[2]
    l_p, m_p = l.permute(0, 2, 1), m.permute(0, 2, 1)
    u_p = torch.matmul(l_p, m).unsqueeze(2) / tau
    u_n = torch.mm(m_p.reshape(-1, units), l_p.reshape(-1, units).t()) / tau
    u_n = u_n.reshape(n, n_multis, n, n_locals).permute(0, 2, 3, 1)
    n_mask = (1 - torch.eye(n))[:, :, None, None].expand(-1, -1, n_locals, n_multis)
    u_n = (n_mask * u_n) - (10.0 * (1 - n_mask))
    u_n = u_n.reshape(n, n * n_locals, n_multis).unsqueeze(1).expand(-1, n_locals, -1, -1)
    top, _ = torch.topk(u_n, dim=2, k=neg_num)
    return -F.log_softmax(torch.cat([u_p, top], dim=2), dim=2)[:, :, 0].mean()


def test_cra_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    n, nl, d = 5, 3, 8
    keys = F.normalize(torch.randn(n, nl, d, generator=g), dim=-1)
    queries = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    negs = (n - 1) * nl  # every other pair's local: the reference's -10 fillers are never in its top-k
    ref = _reference_cra(keys.permute(0, 2, 1), queries.unsqueeze(-1), 0.7, negs)
    assert cra_loss(keys, queries, 0, n, n, 0.7, negs).item() == pytest.approx(ref.item(), rel=1e-5)
    fewer = _reference_cra(keys.permute(0, 2, 1), queries.unsqueeze(-1), 0.7, 4)
    assert cra_loss(keys, queries, 0, n, n, 0.7, 4).item() == pytest.approx(fewer.item(), rel=1e-5)
    # this rank's rows of a global batch: the sum over ranks is the whole batch's mean
    parts = cra_loss(keys, queries, 0, 2, n, 0.7, negs) + cra_loss(keys, queries, 2, 3, n, 0.7, negs)
    assert parts.item() == pytest.approx(ref.item(), rel=1e-5)


def test_cra_masks_padding_keys_and_same_image_pairs():
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(3, 4, 6, generator=g), dim=-1)
    queries = F.normalize(torch.randn(3, 6, generator=g), dim=-1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    got = cra_loss(keys, queries, 0, 3, 3, 0.7, 100, key_mask_all=mask)
    garbage = keys.clone()
    garbage[mask == 0] = 7.0  # padding keys must not matter
    assert cra_loss(garbage, queries, 0, 3, 3, 0.7, 100, key_mask_all=mask).item() == pytest.approx(got.item())
    same = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])  # pairs 0, 2: one image
    masked = cra_loss(keys, queries, 0, 3, 3, 0.7, 100, same=same)
    by_hand = 0.0
    for b in range(3):
        others = [j for j in range(3) if not same[b, j]]
        negs = torch.cat([keys[j] @ queries[b] for j in others]) / 0.7 if others else torch.empty(0)
        for i in range(4):
            pos = keys[b, i] @ queries[b] / 0.7
            by_hand -= (pos - torch.logsumexp(torch.cat([pos[None], negs]), 0)) / 4 / 3
    assert masked.item() == pytest.approx(float(by_hand), rel=1e-5)


# ----------------------------------------------------------------------------- the models


def test_switches_shapes_and_eval_embeddings_match_training():
    model, tok = _model()
    model.eval()
    b = _batch(tok)
    out = model.embed(b)
    assert out["img"].shape == (8, 48) and out["cap"].shape == (8, 48)  # [global; 2 context parts]
    assert out["cap_words"].shape == (8, 14, 16) and out["cap_mask"].shape == (8, 14)  # <start> + 12 + <end>
    assert torch.allclose(model.embed_images(b), out["img"], atol=1e-6)
    assert torch.allclose(model.embed_captions(b), out["cap"], atol=1e-6)
    ids, lens = collate_tokens([tok.encode(CAPS[3])], tok.pad_id)
    assert torch.allclose(model.embed_captions({"text_ids": ids, "text_lens": lens})[0], out["cap"][3], atol=1e-5)
    plain, _ = _model("model.concept=false", "model.context=false")
    assert plain.lca is None and not hasattr(plain, "img_ctx")
    e = plain.embed(b)
    assert e["img"].shape == (8, 16) and set(e) == {"img", "cap", "aux_loss"}
    only_concept, _ = _model("model.context=false")
    assert only_concept.embed(b)["img"].shape == (8, 16)


def test_prototypes_are_unit_length_and_frozen_in_the_first_epoch():
    model, tok = _model()
    b = _batch(tok)
    model(b, epoch=0)["loss"].backward()
    w = model.lca.prototypes.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(24), atol=1e-5)
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0  # present for DDP, but zero
    model.zero_grad()
    model(b, epoch=1)["loss"].backward()
    assert w.grad.abs().sum() > 0


def test_loss_adds_the_alignment_terms_with_their_weights():
    b = None
    losses = {}
    for name, ov in {"base": ("model.concept=false", "model.context=false"), "lca": ("model.context=false",),
                     "both": (), "double": ("model.concept_weight=2", "model.context_weight=2")}.items():
        model, tok = _model(*ov)
        model.eval()
        b = b or _batch(tok)
        out = model(b, epoch=1)
        hinge = model.criterion({"img": out["img"], "cap": out["cap"]}, {"img_ids": b["img_ids"]}, 1)
        losses[name] = (out["loss"] - hinge - out["aux_loss"]).item()
    assert losses["base"] == pytest.approx(0.0, abs=1e-5)
    assert losses["lca"] > 0
    assert losses["both"] > 0 and losses["double"] == pytest.approx(2 * losses["both"], rel=1e-4)


def test_word_features_need_a_fixed_length():
    with pytest.raises(ConfigError, match="data.max_words"):
        _model("data.max_words=0")
    model, _ = _model("data.max_words=0", "model.word_slots=20")
    assert model.word_slots == 20
    plain, _ = _model("data.max_words=0", "model.concept=false", "model.context=false")  # nothing to gather


def test_camera_variant_shapes(tiny_bert):
    r = load_recipe(ROOT / "recipes" / "synthetic" / "selfalign_camera.yaml",
                    [f"model.text.path={tiny_bert}", "model.embed_dim=16", "model.heads=2", "model.views=3",
                     "model.prototypes=24", "data.max_words=12"])
    tok = make_tokenizer(r, captions=CAPS)
    model = build_model(r, 12, tok).eval()
    b = _batch(tok)
    b["boxes"] = torch.tensor([0.1, 0.1, 0.6, 0.7]).expand(8, 5, 4)
    out = model(b, epoch=1)
    assert out["img"].shape == (8, 3, 48) and out["cap"].shape == (8, 48) and out["loss"].isfinite()
    assert torch.allclose(model.embed_images(b), out["img"], atol=1e-6)
    assert model.score(out["img"], out["cap"]).shape == (8, 8)


def test_train_one_epoch_then_the_checkpoint_evaluates_the_same(tiny_data, tmp_path):
    o = tiny_overrides(tiny_data, **{"train.epochs": 1, "train.max_steps": 8, "model.caption_hidden": 16,
                                     "model.caption_word_dim": 8, "model.prototypes": 64, "data.max_words": 20,
                                     "tracking.enabled": "false"})
    res = train(load_recipe(VSRN_RECIPE, o), tmp_path / "run")
    assert res["test"]["rsum"] > 0
    again = run_eval(tmp_path / "run" / "best", tiny_data, "test", protocol="1k")
    assert again == pytest.approx(res["test"])


# ----------------------------------------------------------------------------- global batch


@pytest.mark.parametrize("kind", ["vsrn", "camera"])
def test_accumulation_gives_the_whole_batch_gradients_prototypes_included(kind, tiny_bert):
    ref = assert_split_steps_equal(f"selfalign_{kind}", [(1, 2), (1, 4)], bert=tiny_bert)
    assert ref["grads"]["lca.prototypes.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def two_ranks():
    """The 2-rank runs of the next two tests, in one launch: {(kind, accum, global_negatives): result}."""
    runs = [("vsrn", 1, True), ("vsrn", 2, True), ("vsrn", 1, False)]
    return dict(zip(runs, launch_steps(2, *[(f"selfalign_{k}", a, {"global_negatives": g}) for k, a, g in runs])))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vsrn"])  # camera: the same batch-level code; its accumulation test runs above
def test_two_ranks_give_the_whole_batch_gradients_prototypes_included(two_ranks, kind):
    ref = launch_steps(1, f"selfalign_{kind}")[0]
    assert_same_step(two_ranks[kind, 1, True], ref, "2 ranks")
    assert_same_step(two_ranks[kind, 2, True], ref, "2 ranks x 2")  # ranks and accumulation together


@pytest.mark.slow
def test_per_rank_alignment_differs_from_the_global_batch(two_ranks):
    ref = launch_steps(1, "selfalign_vsrn")[0]
    local = two_ranks["vsrn", 1, False]
    assert not torch.allclose(local["grads"]["lca.prototypes.weight"], ref["grads"]["lca.prototypes.weight"])


# ----------------------------------------------------------------------------- recipes, precision

MY_RECIPES = [f"{d}/{m}.yaml" for d in ("f30k", "coco") for m in ("vsrn", "camera", "selfalign_vsrn", "selfalign_camera")]
MY_RECIPES += ["f8k/vsrn.yaml", "f8k/selfalign_vsrn.yaml"]


@pytest.mark.parametrize("name", MY_RECIPES)
def test_the_dataset_recipes_build(name, tiny_bert):
    r = load_recipe(ROOT / "recipes" / name)
    raw = {"embed_dim": 16, "heads": 2} if r.model.name.endswith("camera") else {"embed_dim": 16, "caption_hidden": 8}
    over = [f"model.{k}={v}" for k, v in raw.items()]
    if r.model.text.name == "hf":
        over.append(f"model.text.path={tiny_bert}")
    r = load_recipe(ROOT / "recipes" / name, over + ["model.text.min_count=1"] * (r.model.text.name == "gru"))
    model = build_model(r, 12, make_tokenizer(r, captions=CAPS))
    assert model.cfg.embed_dim == 16


@pytest.mark.parametrize("name", ["selfalign_vsrn", "selfalign_camera"])
def test_bf16_autocast_forward(name, tiny_bert):
    over = ["model.embed_dim=16", "model.prototypes=24", "data.max_words=12", "loss.warmup_epochs=0"]
    over += [f"model.text.path={tiny_bert}", "model.heads=2", "model.views=3"] if name.endswith("camera") else \
        ["model.text.word_dim=8", "model.text.min_count=1", "model.caption_hidden=8"]
    r = load_recipe(ROOT / "recipes" / "synthetic" / f"{name}.yaml", over)
    tok = make_tokenizer(r, captions=CAPS)
    model = build_model(r, 12, tok)
    b = _batch(tok)
    b["boxes"] = torch.tensor([0.1, 0.1, 0.6, 0.7]).expand(8, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(b, epoch=1)["loss"]
    loss.backward()
    assert loss.isfinite() and model.lca.prototypes.weight.grad.isfinite().all()
