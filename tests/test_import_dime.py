"""`itr import --from dime`: checkpoints in LgQu/DIME's exact layout (i2t and t2i; random weights, a tiny BERT
with the old LayerNorm gamma/beta, Conv2d text kernels, its options object) become itr run directories that
evaluate. The encoders and the first routing layer's path probabilities are checked against the reference's
forward written out by hand from the checkpoint's tensors (captions padded to max_words, padding kept after
BERT; t2i routes over all those positions). Refusals: a tensor of another shape, an option itr's model does
not implement, a key of modified code, a forbidden pickle global."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from test_import_camera import CAPS, batchnorm, bert_ref, bert_state, fine_tune, lin, linear, padded, rand

E, D, R, HID, PATH_HID, WORDS = 16, 12, 5, 16, 8, 12  # embed, image dim, regions, hid_IMRC = hid_router, path_hid
CELLS = ("ric", "glgc", "imrc", "cmrc")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dime_state(bert_dir, seed=0, layernorm="gamma"):
    """[EncoderImagePrecomp, EncoderText, InteractionModule] state dicts (models/*.py@85062e2)."""
    g = torch.Generator().manual_seed(seed)
    img = {}
    linear(g, img, "fc", E, D)
    batchnorm(g, img, "bn", E)
    txt = bert_state(bert_dir, seed + 1, layernorm)
    hidden = txt["bert.embeddings.word_embeddings.weight"].shape[1]
    linear(g, txt, "fc", E, hidden)
    for i, k in enumerate((1, 2, 3)):
        txt[f"convs1.{i}.weight"], txt[f"convs1.{i}.bias"] = rand(g, E, 1, k, hidden, scale=0.1), rand(g, E, scale=0.1)
    linear(g, txt, "mapping", E, 3 * E)
    itr = {}
    for n, paths in enumerate((4, 4, 1)):
        p = f"dynamic_itr_l{n}."
        for cell in CELLS:
            linear(g, itr, f"{p}{cell}.router.mlp.0", HID, E)
            linear(g, itr, f"{p}{cell}.router.mlp.2", paths, HID)
        for i in range(3):
            linear(g, itr, f"{p}imrc.sa.att_layer.linears.{i}", E, E)
        linear(g, itr, f"{p}imrc.sa.feed_forward_layer.fc1", HID, E)
        linear(g, itr, f"{p}imrc.sa.feed_forward_layer.fc2", E, HID)
        for name in ("glgc.fc_1", "glgc.fc_2", "cmrc.refine.fc_scale", "cmrc.refine.fc_shift", "cmrc.refine.fc_1",
                     "cmrc.refine.fc_2"):
            linear(g, itr, p + name, E, E)
    linear(g, itr, "path_mapping", PATH_HID, 36)
    batchnorm(g, itr, "bn", E)
    return img, txt, itr


def dime_options(direction, **over):
    """train.py@85062e2's options, with the tiny sizes."""
    o = dict(logger_name="runs/coco_DIME", data_path="/data", data_name="coco_precomp", bert_path="bert",
             max_words=WORDS, extra_stc=int(direction == "i2t"), extra_img=int(direction == "t2i"), num_epochs=30,
             batch_size=32, learning_rate=2e-4, lr_update=15, grad_clip=2.0, drop=0.0, margin=0.2, max_violation=True,
             trade_off=0.5, img_dim=D, embed_size=E, direction=direction, workers=2, log_step=10, val_step=2000,
             resume="", finetune=False, use_restval=False, measure="cosine", use_abs=False, no_imgnorm=False,
             reset_train=False, num_head_IMRC=2, hid_IMRC=HID, raw_feature_norm_CMRC="clipped_l2norm",
             lambda_softmax_CMRC=4.0 if direction == "i2t" else 9.0, hid_router=HID, vocab_file="bert/vocab.txt",
             bert_config_file="bert/bert_config.json", init_checkpoint="bert/pytorch_model.bin", do_lower_case=True)
    o.update(over)
    return argparse.Namespace(**o)


def save(path, parts, opt):
    torch.save({"epoch": 20, "model": list(parts), "best_rsum": 420.0, "best_r1": 70.0, "opt": opt, "Eiters": 999}, path,
               _use_new_zipfile_serialization=False)  # PyTorch < 1.6's format, as the released files


def text_ref(txt, bert_dir, ids, mask):
    """EncoderText.forward (eval) on the padded captions: (sentence, words), every position a word."""
    h = bert_ref(txt, bert_dir, ids, mask)
    x = h.unsqueeze(1)
    x_emb = lin(h, txt, "fc")
    conv = [F.relu(F.conv2d(xi, txt[f"convs1.{i}.weight"], txt[f"convs1.{i}.bias"])).squeeze(3)
            for i, xi in enumerate((x, F.pad(x, (0, 0, 0, 1)), F.pad(x, (0, 0, 1, 1))))]
    words = lin(torch.cat(conv, dim=1).transpose(1, 2), txt, "mapping") + x_emb
    stc = lin(torch.cat([c.max(2).values for c in conv], dim=1), txt, "mapping") + x_emb.mean(1)
    return F.normalize(stc, dim=-1), F.normalize(words, dim=-1)


def layer0_paths(itr, locals_):
    """DynamicInteraction_Layer0: each cell's Router on the mean of the interacting locals, normalized over cells."""
    probs = [F.relu(torch.tanh(lin(F.relu(lin(locals_.mean(-2), itr, f"dynamic_itr_l0.{c}.router.mlp.0")),
                                   itr, f"dynamic_itr_l0.{c}.router.mlp.2"))) for c in CELLS]
    allp = torch.stack(probs, dim=-1)  # (n, paths, cells)
    return allp / (allp.sum(-1, keepdim=True) + 1e-8)


def _import(tmp_path, bert, direction, name="MSCOCO_DIME_it.pth.tar", **opt):
    parts = dime_state(bert)
    save(tmp_path / name, parts, dime_options(direction, **opt))
    return import_checkpoint(ImportRequest(tmp_path / name, "dime", tmp_path / f"run_{direction}", bert=bert)), parts


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_the_mapping_is_complete_and_the_forward_is_the_references(tmp_path, tiny_bert, direction):
    from itr.checkpoint import load_for_eval
    from itr.data.loader import collate_tokens

    best, (img, txt, itr) = _import(tmp_path, tiny_bert, direction)
    model, tok, recipe, meta = load_for_eval(best)  # a strict load: every itr key came from the checkpoint
    m = recipe.model
    assert (m.direction, m.embed_dim, m.heads, m.hid_imrc, m.hid_router, m.path_hid, m.pad_tokens) == \
        (direction, E, 2, HID, HID, PATH_HID, WORDS)
    assert m.lambda_softmax == (4.0 if direction == "i2t" else 9.0) and recipe.data.name == "coco"
    assert recipe.eval.protocol == "coco-5fold" and recipe.data.max_words == WORDS - 2 and recipe.train.batch_size == 32
    assert (model.img_bn is not None) == (direction == "t2i")  # EncoderImagePrecomp.bn: read by t2i only
    torch.testing.assert_close(model.layers[1].routers[2].mlp[2].weight, itr["dynamic_itr_l1.imrc.router.mlp.2.weight"])
    torch.testing.assert_close(model.layers[2].sa.v.bias, itr["dynamic_itr_l2.imrc.sa.att_layer.linears.2.bias"])
    torch.testing.assert_close(model.layers[0].fc_shift.weight, itr["dynamic_itr_l0.cmrc.refine.fc_shift.weight"])
    torch.testing.assert_close(model.score_bn.running_mean, itr["bn.running_mean"])
    torch.testing.assert_close(model.convs[2].weight, txt["convs1.2.weight"][:, 0].transpose(1, 2))
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(CAPS), R, D, generator=g)
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS], tok.pad_id)
    with torch.no_grad():
        im, cap = model.embed_images({"feats": feats}), model.embed_captions({"text_ids": ids, "text_lens": lens})
        rgn = lin(feats, img, "fc")  # VisNet: mean of the regions (-> bn in t2i) -> L2; regions L2
        glob = bn_ref(rgn.mean(1), img, "bn") if direction == "t2i" else rgn.mean(1)
        torch.testing.assert_close(im["img"], F.normalize(glob, dim=-1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(im["rgn"], F.normalize(rgn, dim=-1), atol=1e-5, rtol=1e-4)
        stc, wrd = text_ref(txt, tiny_bert, *padded(tok, CAPS))
        torch.testing.assert_close(cap["stc"], stc, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cap["wrd"], wrd, atol=1e-5, rtol=1e-4)  # all 12 positions, padding included
        assert cap["lens"].tolist() == (lens.tolist() if direction == "i2t" else [WORDS] * len(CAPS))
        _, paths = model.interact(im["img"], im["rgn"], cap["stc"], cap["wrd"][:, :int(cap["lens"].max())], cap["lens"])
        by_hand = layer0_paths(itr, F.normalize(rgn, dim=-1) if direction == "i2t" else wrd)  # (images | captions)
        expect = by_hand[:, None] if direction == "i2t" else by_hand[None]
        torch.testing.assert_close(paths[..., :16], expect.flatten(-2).expand_as(paths[..., :16]), atol=1e-5, rtol=1e-4)


def bn_ref(x, sd, name):
    return (x - sd[f"{name}.running_mean"]) / torch.sqrt(sd[f"{name}.running_var"] + 1e-5) * sd[f"{name}.weight"] \
        + sd[f"{name}.bias"]


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_the_imported_run_evaluates_and_fine_tunes(tmp_path, tiny_bert, direction):
    best, _ = _import(tmp_path, tiny_bert, direction, data_name="f30k_precomp")
    fine_tune(best, tmp_path, regions=R, dim=D)


def _refused(tmp_path, bert, parts, opt):
    save(tmp_path / "ck.pth.tar", parts, opt)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "dime", tmp_path / "run", bert=bert))
    assert not (tmp_path / "run" / "best").exists()
    return str(e.value)


def test_a_tensor_of_another_shape_is_named(tmp_path, tiny_bert):
    img, txt, itr = dime_state(tiny_bert)
    itr["path_mapping.weight"] = torch.zeros(PATH_HID, 30)
    msg = _refused(tmp_path, tiny_bert, (img, txt, itr), dime_options("i2t"))
    assert "path_mapping.weight: itr expects (8, 36), the checkpoint has (8, 30)" in msg
    img, txt, itr = dime_state(tiny_bert)
    txt["convs1.1.weight"] = torch.zeros(E, 2, 32)
    assert "convs1.1.weight is (16, 2, 32), expected TextNet's" in _refused(tmp_path, tiny_bert, (img, txt, itr),
                                                                             dime_options("i2t"))


def test_options_and_code_the_model_does_not_have_are_refused(tmp_path, tiny_bert):
    parts = dime_state(tiny_bert)
    assert "raw_feature_norm_CMRC='softmax'" in _refused(tmp_path, tiny_bert, parts,
                                                         dime_options("t2i", raw_feature_norm_CMRC="softmax"))
    assert "direction='both'" in _refused(tmp_path, tiny_bert, parts, dime_options("both"))
    assert "no_imgnorm=True" in _refused(tmp_path, tiny_bert, parts, dime_options("i2t", no_imgnorm=True))
    img, txt, itr = dime_state(tiny_bert)
    itr["dynamic_itr_l3.ric.router.mlp.0.weight"] = torch.zeros(HID, E)
    assert "interaction module keys ['dynamic_itr_l3.ric.router.mlp.0.weight']" in \
        _refused(tmp_path, tiny_bert, (img, txt, itr), dime_options("i2t"))
    assert "the 3 state dicts [image encoder, text encoder, interaction module]" in \
        _refused(tmp_path, tiny_bert, (img, txt), dime_options("i2t"))


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/itr-import-dime-ran", "w"))


def test_a_forbidden_pickle_global_is_refused(tmp_path, tiny_bert):
    import os

    torch.save({"model": list(dime_state(tiny_bert)), "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "dime", tmp_path / "run", bert=tiny_bert))
    assert not os.path.exists("/tmp/itr-import-dime-ran")
