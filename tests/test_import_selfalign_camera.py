"""`itr import --from selfalign_camera`: a checkpoint in Zjamie813/SelfAlign camera_SelfAlign's exact layout
(CAMERA's encoders with the context heads, transformers' BertModel under ``bert.``, the LCA prototypes, its
options object) becomes an itr run directory whose evaluation embeddings are the reference's
(evaluation_SelfAlign.py encode_data), written out by hand from the checkpoint's tensors. Refusals: a
missing part, a tensor of another shape, a forbidden pickle global."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError, ConfigError
from itr.imports import ImportRequest, import_checkpoint

from test_import_camera import (CAPS, E, HEADS, K, WORDS, batchnorm, bn_eval, camera_options, camera_state, fine_tune,
                                image_ref, inputs, lin, linear, padded, text_ref)

PROTOS = 24


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def context_state(g, sd):
    """model_SelfAlign.py's CRA head: ctx_fc, ctx_fc_bn1, ctx_fc_bn2, fusion_fn (Linear, ReLU, Linear)."""
    linear(g, sd, "ctx_fc", E, E)
    batchnorm(g, sd, "ctx_fc_bn1", E)
    batchnorm(g, sd, "ctx_fc_bn2", E)
    linear(g, sd, "fusion_fn.0", E, 2 * E)
    linear(g, sd, "fusion_fn.2", 1, E)


def selfalign_state(bert_dir, seed=0):
    img, txt = camera_state(bert_dir, seed, layernorm="weight")  # transformers' BertModel (README: 2.1.1)
    g = torch.Generator().manual_seed(seed + 7)
    context_state(g, img)
    context_state(g, txt)
    return img, txt, {"v_prototypes.weight": F.normalize(torch.randn(PROTOS, E, generator=g), dim=1)}  # LCA_loss keeps them unit


def save(path, parts, **over):
    o = vars(camera_options(logger_name="runs/flickr", max_violation=True, **over))
    o.update(ctx_fc_relu=1, local_clu_num=PROTOS, v5_tao=0.7, v6_tao=0.7, local_tea="CRS")
    torch.save({"epoch": 25, "model": list(parts), "best_rsum": 440.0, "best_r1": 75.0,
                "opt": argparse.Namespace(**o), "Eiters": 999}, path)


def context_ref(sd, feats):
    """(fused, mean of the locals): the head on all positions, ReLU (ctx_fc_relu 1), each output L2."""
    avg = feats.mean(1)
    glo = F.relu(bn_eval(lin(avg, sd, "ctx_fc"), sd, "ctx_fc_bn1"))
    loc = F.normalize(F.relu(bn_eval(feats, sd, "ctx_fc_bn2")), dim=-1)
    g = torch.sigmoid(lin(F.relu(lin(torch.cat([avg, glo], dim=-1), sd, "fusion_fn.0")), sd, "fusion_fn.2"))
    return F.normalize(g * avg + (1 - g) * glo, dim=-1), loc.mean(1)


def test_the_mapping_is_complete_and_the_evaluation_embedding_is_the_references(tmp_path, tiny_bert):
    from itr.checkpoint import load_for_eval
    from itr.config import load_recipe
    from itr.models import build_model, make_tokenizer

    img, txt, lca = selfalign_state(tiny_bert)
    save(tmp_path / "model_best.pth.tar", (img, txt, lca))
    best = import_checkpoint(ImportRequest(tmp_path / "model_best.pth.tar", "selfalign_camera", tmp_path / "run",
                                           bert=tiny_bert))
    model, tok, recipe, meta = load_for_eval(best)
    m = recipe.model
    assert (m.name, m.embed_dim, m.heads, m.views, m.prototypes, m.pad_tokens, m.ctx_relu) == \
        ("selfalign_camera", E, HEADS, K, PROTOS, WORDS, True)
    assert m.concept and m.context and m.tau_image_locals == 0.7 and recipe.data.max_words == WORDS - 2
    torch.testing.assert_close(model.lca.prototypes.weight, lca["v_prototypes.weight"])
    torch.testing.assert_close(model.img_ctx.bn_loc.running_mean, img["ctx_fc_bn2.running_mean"])
    torch.testing.assert_close(model.txt_ctx.fusion[2].weight, txt["fusion_fn.2.weight"])
    batch, boxes_px, wh = inputs(tok)
    with torch.no_grad():
        views, a = image_ref(img, batch["feats"], boxes_px, wh)
        fused, mean_locals = context_ref(img, a)  # forward_emb(volatile=True): both x 0.5
        extra = 0.5 * torch.cat([mean_locals, fused], dim=-1)
        expect = torch.cat([views, extra[:, None].expand(-1, K, -1)], dim=-1)
        torch.testing.assert_close(model.embed_images(batch), expect, atol=1e-5, rtol=1e-4)
        emb, a = text_ref(txt, tiny_bert, *padded(tok, CAPS), norm_words=True)
        fused, mean_locals = context_ref(txt, a)
        torch.testing.assert_close(model.embed_captions(batch), torch.cat([emb, fused, mean_locals], dim=-1),
                                   atol=1e-5, rtol=1e-4)
    fine_tune(best, tmp_path, regions=5, dim=img["fc.weight"].shape[1])  # the concept and context losses train
    with pytest.raises(ConfigError, match=r"model.pad_tokens=12 but the word features are gathered in 10 slots"):
        build_model(load_recipe(best / "recipe.yaml", ["data.max_words=8"]), meta["img_dim"], make_tokenizer(
            load_recipe(best / "recipe.yaml", ["data.max_words=8"])))


def _refused(tmp_path, bert, parts):
    save(tmp_path / "ck.pth.tar", parts)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "selfalign_camera", tmp_path / "run", bert=bert))
    assert not (tmp_path / "run" / "best").exists()
    return str(e.value)


def test_a_plain_camera_checkpoint_and_a_wrong_shape_are_named(tmp_path, tiny_bert):
    img, txt = camera_state(tiny_bert)
    assert "the 3 state dicts [image encoder, text encoder, LCA loss]" in _refused(tmp_path, tiny_bert, (img, txt))
    assert "image encoder has no ctx_fc.weight" in _refused(tmp_path, tiny_bert, (img, txt, {"v_prototypes.weight": torch.zeros(2, E)}))
    img, txt, lca = selfalign_state(tiny_bert)
    txt["fusion_fn.2.weight"] = torch.zeros(2, E)
    assert "txt_ctx.fusion.2.weight: itr expects (1, 16), the checkpoint has (2, 16)" in _refused(tmp_path, tiny_bert, (img, txt, lca))


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/itr-import-selfalign-ran", "w"))


def test_a_forbidden_pickle_global_is_refused(tmp_path, tiny_bert):
    import os

    torch.save({"model": list(selfalign_state(tiny_bert)), "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "selfalign_camera", tmp_path / "run", bert=tiny_bert))
    assert not os.path.exists("/tmp/itr-import-selfalign-ran")
