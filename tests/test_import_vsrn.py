"""`itr import --from vsrn`: checkpoints in KunpengLi1994/VSRN's exact layout (random weights, train.py's options,
its pickled vocabulary), the Flickr30K variant (``bn``, no L2 after the region FC) and the other one, become itr run
directories that evaluate and fine-tune without the captioner the checkpoint lacks; the embeddings are checked
against EncoderImagePrecompAttn / Rs_GCN / EncoderText written out by hand from the checkpoint's tensors.
Refusals: options itr's VSRN lacks, a wrong shape, a forbidden pickle global."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides
from test_import_vsepp import Evil, write_vocab

E, W, D, R = 16, 8, 32, 5  # embed (= GCN width), word dim, image feature dim, regions


def rnd(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def batchnorm(g, prefix, n):
    """BatchNorm1d state with non-trivial affine and running statistics (PyTorch 0.4.1 also stores the counter)."""
    return {f"{prefix}weight": 1 + rnd(g, n), f"{prefix}bias": rnd(g, n), f"{prefix}running_mean": rnd(g, n),
            f"{prefix}running_var": 0.5 + torch.rand(n, generator=g), f"{prefix}num_batches_tracked": torch.tensor(7)}


def gru(g, prefix, in_dim, hidden):
    return {f"{prefix}weight_ih_l0": rnd(g, 3 * hidden, in_dim), f"{prefix}weight_hh_l0": rnd(g, 3 * hidden, hidden),
            f"{prefix}bias_ih_l0": rnd(g, 3 * hidden, scale=0.1), f"{prefix}bias_hh_l0": rnd(g, 3 * hidden, scale=0.1)}


def vsrn_image_state(g, f30k):
    """EncoderImagePrecompAttn (model.py@eae3067): fc, Rs_GCN_1..4 (1x1 Conv1d g/theta/phi, W = Conv1d + BN), img_rnn,
    and ``bn`` on f30k_precomp."""
    img = {"fc.weight": rnd(g, E, D, scale=0.1), "fc.bias": rnd(g, E, scale=0.1)}
    for i in range(1, 5):
        for part in ("g", "theta", "phi", "W.0"):
            img[f"Rs_GCN_{i}.{part}.weight"] = rnd(g, E, E, 1, scale=0.1)  # small: the relation is cubic
            img[f"Rs_GCN_{i}.{part}.bias"] = rnd(g, E, scale=0.1)
        img.update(batchnorm(g, f"Rs_GCN_{i}.W.1.", E))
    img.update(gru(g, "img_rnn.", E, E))
    if f30k:
        img.update(batchnorm(g, "bn.", E))
    return img


def options(data_name, vocab_size, **opt):
    """train.py@0e75e2e's option names and defaults (README's --max_violation)."""
    o = dict(data_path="/data", data_name=data_name, vocab_path="./vocab/", margin=0.2, num_epochs=30, batch_size=128,
             word_dim=W, embed_size=E, grad_clip=2.0, crop_size=224, num_layers=1, learning_rate=2e-4,
             lr_update=10, workers=10, log_step=10, val_step=500, logger_name="runs/flickr_VSRN", resume="",
             max_violation=True, img_dim=D, finetune=False, cnn_type="vgg19", use_restval=False, measure="cosine",
             use_abs=False, no_imgnorm=False, reset_train=False, dim_vid=E, dim_hidden=512, bidirectional=0,
             input_dropout_p=0.2, rnn_type="gru", rnn_dropout_p=0.5, dim_word=300, max_len=60, vocab_size=vocab_size)
    o.update(opt)
    return argparse.Namespace(**o)


def vsrn_checkpoint(path, vocab_size, data_name="f30k_precomp", seed=0, img=None, **opt):
    """``{epoch, model: [img_enc, txt_enc], best_rsum, opt, Eiters}``; the captioner is not saved."""
    g = torch.Generator().manual_seed(seed)
    img = vsrn_image_state(g, data_name == "f30k_precomp") if img is None else img
    txt = {"embed.weight": rnd(g, vocab_size, W, scale=0.3), **gru(g, "rnn.", W, E)}
    torch.save({"epoch": 30, "model": [img, txt], "best_rsum": 480.0, "opt": options(data_name, vocab_size, **opt),
                "Eiters": 4321}, path)
    return img, txt


def l2(x, dim):
    """VSRN ``l2norm``: no epsilon; over dim=1, which for (B, N, D) regions is every channel over the regions."""
    return x / x.pow(2).sum(dim=dim, keepdim=True).sqrt()


def bn_eval(x, s, prefix):
    return F.batch_norm(x, s[f"{prefix}running_mean"], s[f"{prefix}running_var"], s[f"{prefix}weight"],
                        s[f"{prefix}bias"], training=False, eps=1e-5)


def reference_image(img, feats):
    """EncoderImagePrecompAttn.forward in eval mode; also the GCN output before its L2 (SelfAlign's context input)."""
    x = feats @ img["fc.weight"].t() + img["fc.bias"]
    if "bn.weight" not in img:  # data_name != 'f30k_precomp'
        x = l2(x, 1)
    v = x.permute(0, 2, 1)  # (B, D, N)
    for i in range(1, 5):
        s = {k[len(f"Rs_GCN_{i}."):]: t for k, t in img.items() if k.startswith(f"Rs_GCN_{i}.")}
        conv = {p: F.conv1d(v, s[f"{p}.weight"], s[f"{p}.bias"]) for p in ("g", "theta", "phi")}
        rel = conv["theta"].permute(0, 2, 1) @ conv["phi"] / v.shape[2]  # (B, N, N) / N
        y = (rel @ conv["g"].permute(0, 2, 1)).permute(0, 2, 1)
        v = v + bn_eval(F.conv1d(y, s["W.0.weight"], s["W.0.bias"]), s, "W.1.")  # W: Conv1d + BatchNorm1d
    gcn = v.permute(0, 2, 1)
    rnn = torch.nn.GRU(E, E, 1, batch_first=True)
    rnn.load_state_dict({k[8:]: t for k, t in img.items() if k.startswith("img_rnn.")})
    h = rnn(l2(gcn, 1))[1][0]
    if "bn.weight" in img:
        h = bn_eval(h, img, "bn.")
    return {"gcn": gcn, "emb": l2(h, 1)}


def reference_text(txt, ids, lens, project=None):
    """EncoderText: embed (-> local_fc, SelfAlign) -> GRU -> the state at the last valid word -> l2norm."""
    rnn = torch.nn.GRU(E, E, 1, batch_first=True) if project else torch.nn.GRU(W, E, 1, batch_first=True)
    rnn.load_state_dict({k[4:]: t for k, t in txt.items() if k.startswith("rnn.")})
    x = F.embedding(ids, txt["embed.weight"])
    x = project(x) if project else x
    out = rnn(x)[0]  # a GRU is causal: the state at the last valid word ignores the padding after it
    last = out[torch.arange(len(lens)), lens - 1]
    return {"emb": l2(last, 1), "states": out}


@pytest.mark.parametrize("data_name", ["f30k_precomp", "coco_precomp"])
def test_the_mapping_is_complete_and_the_forward_is_the_references(tmp_path, data_name):
    from itr.checkpoint import load_for_eval

    n = write_vocab(tmp_path / f"{data_name}_vocab.pkl")
    img, txt = vsrn_checkpoint(tmp_path / "model_fliker_1.pth.tar", n, data_name)
    best = import_checkpoint(ImportRequest(tmp_path / "model_fliker_1.pth.tar", "vsrn", tmp_path / "run",
                                           vocab=tmp_path / f"{data_name}_vocab.pkl"))
    model, tok, recipe, meta = load_for_eval(best)
    f30k = data_name == "f30k_precomp"
    m = recipe.model
    assert (m.name, m.embed_dim, m.gcn_layers, m.fc_norm, m.out_bn) == ("vsrn", E, 4, not f30k, f30k)
    assert m.caption_weight == 0 and model.caption is None and m.l2_axis == "regions"
    assert recipe.eval.protocol == ("1k" if f30k else "coco-5fold") and recipe.loss.max_violation
    assert recipe.optim.lr_update == 10 and meta["imported"]["options"]["max_len"] == 60
    torch.testing.assert_close(model.img_enc.gcn[2].theta.weight, img["Rs_GCN_3.theta.weight"][..., 0])
    torch.testing.assert_close(model.img_enc.gcn[0].bn.running_var, img["Rs_GCN_1.W.1.running_var"])
    torch.testing.assert_close(model.img_enc.rnn.weight_hh_l0, img["img_rnn.weight_hh_l0"])
    if f30k:
        torch.testing.assert_close(model.img_enc.out_bn.running_mean, img["bn.running_mean"])
    feats = torch.randn(3, R, D)
    ids = torch.tensor([tok.encode("a red dog runs") + [0, 0], tok.encode("the cat near a bike on")])
    lens = torch.tensor([6, 8])
    with torch.no_grad():
        torch.testing.assert_close(model.embed_images({"feats": feats}), reference_image(img, feats)["emb"],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.embed_captions({"text_ids": ids, "text_lens": lens}),
                                   reference_text(txt, ids, lens)["emb"], rtol=1e-4, atol=1e-5)


def test_the_imported_run_evaluates_and_fine_tunes_without_the_captioner(tmp_path):
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train
    from safetensors.torch import load_file

    n = write_vocab(tmp_path / "f30k_precomp_vocab.pkl")
    vsrn_checkpoint(tmp_path / "ck.pth.tar", n)
    best = import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "vsrn", tmp_path / "run",
                                           vocab=tmp_path / "f30k_precomp_vocab.pkl"))
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=R, seed=2)
    assert 0 <= run_eval(best, data, "test")["rsum"] <= 600
    over = tiny_overrides(data, **{"train.epochs": 1, "train.max_steps": 2, "optim.lr": 0.0,
                                   "tracking.enabled": "false", "model.embed_dim": E, "model.text.word_dim": W})
    over.append(f"train.init_from={tmp_path / 'run'}")
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    a, b = load_file(str(best / "model.safetensors")), load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "batches" not in k)


@pytest.mark.parametrize("opt,words", [
    ({"no_imgnorm": True}, "no_imgnorm=True"),
    ({"measure": "order", "use_abs": True}, "measure=order"),
])
def test_options_itr_does_not_implement_are_refused_by_name(tmp_path, opt, words):
    n = write_vocab(tmp_path / "v.pkl")
    vsrn_checkpoint(tmp_path / "ck.pth.tar", n, **opt)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl"))
    assert words in str(e.value) and "ck.pth.tar" in str(e.value)


def test_full_image_and_selfalign_state_dicts_are_refused(tmp_path):
    n = write_vocab(tmp_path / "v.pkl")
    g = torch.Generator().manual_seed(1)
    full = {"cnn.features.0.weight": rnd(g, 4, 3, 3, 3), **vsrn_image_state(g, False)}
    vsrn_checkpoint(tmp_path / "full.pth.tar", n, img=full, data_name="coco")
    with pytest.raises(CheckpointError, match="full-image model"):
        import_checkpoint(ImportRequest(tmp_path / "full.pth.tar", "vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl"))
    sa = {"ctx_fc.weight": rnd(g, E, E), **vsrn_image_state(g, True)}
    vsrn_checkpoint(tmp_path / "sa.pth.tar", n, img=sa)
    with pytest.raises(CheckpointError, match="selfalign_vsrn"):
        import_checkpoint(ImportRequest(tmp_path / "sa.pth.tar", "vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl"))


def test_a_wrong_shape_and_a_forbidden_global_give_clear_errors(tmp_path):
    n = write_vocab(tmp_path / "v.pkl")
    g = torch.Generator().manual_seed(2)
    img = vsrn_image_state(g, True)
    img["Rs_GCN_2.phi.weight"] = rnd(g, E, E, 3)  # a kernel-3 convolution is not Rs_GCN's per-region map
    _, txt = vsrn_checkpoint(tmp_path / "ck.pth.tar", n, img=img)
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl"))
    assert f"img_enc.gcn.1.phi.weight: itr expects ({E}, {E}), the checkpoint has ({E}, {E}, 3)" in str(e.value)
    torch.save({"model": [img, txt], "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "vsrn", tmp_path / "run", vocab=tmp_path / "v.pkl"))
    assert not (tmp_path / "run" / "best").exists()
