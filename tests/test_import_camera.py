"""`itr import --from camera`: a checkpoint in LgQu/CAMERA's exact layout (random weights, a tiny BERT under
``bert.`` with the old bert.py's LayerNorm gamma/beta, its options object) becomes an itr run directory that
evaluates; both embeddings are checked against the reference's forward written out by hand from the
checkpoint's tensors (captions padded to max_words, padding kept after BERT). Refusals: a tensor of another
shape, a --bert directory of another BERT, a second AGSA layer, a key of modified code, a forbidden pickle
global. The helpers here (the reference's layout and forward) serve test_import_selfalign_camera too."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from itr.errors import CheckpointError, ConfigError
from itr.imports import ImportRequest, import_checkpoint

E, D, R, K, HEADS, WORDS = 16, 12, 5, 3, 2, 12  # embed, image dim, regions, views, heads, --max_words
OUT_C, KSIZE, DILA, PADS = [256, 128, 128, 128, 128, 128, 128], [1, 3, 3, 3, 5, 5, 5], [1, 1, 2, 3, 1, 2, 3], \
    [0, 1, 2, 3, 2, 4, 6]  # models/Summarization.py
CAPS = ["a red dog near a cat", "there is a bike", "a photo of a blue car and a tree", "a dog"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the reference's layout


def rand(g, *shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


def linear(g, sd, name, out, inp):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(g, out, inp), rand(g, out, scale=0.1)


def batchnorm(g, sd, name, n):
    sd.update({f"{name}.weight": 1 + rand(g, n, scale=0.1), f"{name}.bias": rand(g, n, scale=0.1),
               f"{name}.running_mean": rand(g, n, scale=0.2), f"{name}.running_var": 0.5 + torch.rand(n, generator=g),
               f"{name}.num_batches_tracked": torch.tensor(100)})


def agsa_state(g, sd, p, dim=E, heads=HEADS):
    """models/AGSA.py, one layer, is_share=False."""
    dk = dim // heads
    for i in range(3):
        linear(g, sd, f"{p}att_layers.0.linears.{i}", dim, dim)
    linear(g, sd, f"{p}att_layers.0.fc_q", dk, dk)
    linear(g, sd, f"{p}att_layers.0.fc_k", dk, dk)
    linear(g, sd, f"{p}att_layers.0.fc_g", 2 * dk, dk)
    batchnorm(g, sd, f"{p}bns.0", dim)


def bert_state(bert_dir, seed, layernorm="gamma"):
    """A BERT of the directory's config with other random weights, as TextEncoder holds it (``bert.``, pooler
    included); ``gamma``: LayerNorm named as bert.py before LgQu's 2022 "update bert" commits."""
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertModel(BertConfig.from_pretrained(bert_dir))
    sd = {f"bert.{k}": v for k, v in bert.state_dict().items() if "position_ids" not in k}
    if layernorm == "gamma":
        sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in sd.items()}
    return sd


def camera_state(bert_dir, seed=0, layernorm="gamma"):
    """(image encoder, text encoder) state dicts of model.py's EncoderImagePrecompSelfAttn and TextEncoder."""
    g = torch.Generator().manual_seed(seed)
    img = {}
    linear(g, img, "fc", E, D)
    linear(g, img, "position_enc.proj", E, 6)
    agsa_state(g, img, "agsa.")
    for i, (c, ks) in enumerate(zip(OUT_C, KSIZE)):
        img[f"mvs.convs_dilate.{i}.weight"], img[f"mvs.convs_dilate.{i}.bias"] = rand(g, c, E, ks, scale=0.1), rand(g, c)
    linear(g, img, "mvs.convs_fc", K, sum(OUT_C))
    txt = bert_state(bert_dir, seed + 1, layernorm)
    hidden = txt["bert.embeddings.word_embeddings.weight"].shape[1]
    linear(g, txt, "mapping", E, hidden)
    agsa_state(g, txt, "agsa.")
    linear(g, txt, "fc1", E, E)
    linear(g, txt, "fc2", E, E)
    batchnorm(g, txt, "bn", E)
    return img, txt


def camera_options(**over):
    """train.py's options (and the paths it adds), with the tiny sizes."""
    o = dict(data_path="/data", data_name="f30k_precomp", margin=0.2, num_epochs=30, batch_size=128, embed_size=E,
             grad_clip=2.0, learning_rate=1e-4, lr_update=10, lr_decay_gamma=0.1, workers=6, log_step=10,
             val_step=500, logger_name="runs/filker_CMSN", resume="", max_violation=True, img_dim=D, bert_path="bert/",
             max_words=WORDS, drop=0.0, head=HEADS, smry_k=K, smry_lamda=0.01, vocab_file="bert/vocab.txt",
             bert_config_file="bert/bert_config.json", init_checkpoint="bert/pytorch_model.bin", do_lower_case=True)
    o.update(over)
    return argparse.Namespace(**o)


def save(path, parts, opt):
    torch.save({"epoch": 12, "model": list(parts), "best_rsum": 430.0, "best_r1": 70.0, "opt": opt, "Eiters": 999}, path,
               _use_new_zipfile_serialization=False)  # PyTorch < 1.6's format, as the released files


# ----------------------------------------------------------------------------- the reference's forward


def lin(x, sd, name):
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def bn_eval(x, sd, name):
    return (x - sd[f"{name}.running_mean"]) / torch.sqrt(sd[f"{name}.running_var"] + 1e-5) * sd[f"{name}.weight"] \
        + sd[f"{name}.bias"]


def agsa_ref(x, pos, sd, p, heads=HEADS):
    """AGSA.forward (one layer, eval): x + BN(GatedQueryAttLayer(x * pos)), no mask."""
    b, n, d = x.shape
    dk, att = d // heads, f"{p}att_layers.0."
    inp = x * pos if pos is not None else x
    q, k, v = (lin(inp, sd, f"{att}linears.{i}").view(b, n, heads, dk).transpose(1, 2) for i in range(3))
    m = torch.sigmoid(lin(lin(q, sd, f"{att}fc_q") * lin(k, sd, f"{att}fc_k"), sd, f"{att}fc_g"))
    q, k = q * m[..., :dk], k * m[..., dk:]
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dk), dim=-1) @ v
    return x + bn_eval(a.transpose(1, 2).reshape(b, n, d), sd, f"{p}bns.0")


def image_ref(img, feats, boxes_px, wh):
    """EncoderImagePrecompSelfAttn.forward: (views (B, k, d), AGSA output before its L2)."""
    fc = lin(feats, img, "fc")
    fc = fc / fc.norm(dim=1, keepdim=True)  # l2norm(X, dim=1): over the regions
    x1, y1, x2, y2 = boxes_px.unbind(-1)
    w, h = x2 - x1, y2 - y1
    W, H = wh[:, 0:1], wh[:, 1:2]
    posi = torch.stack([x1 / W, y1 / H, w / W, h / H, w / h, w * h / (W * H)], dim=-1)  # absoluteEncode
    a = agsa_ref(fc, torch.sigmoid(lin(posi, img, "position_enc.proj")), img, "agsa.")
    an = a / a.norm(dim=1, keepdim=True)
    y = torch.cat([F.relu(F.conv1d(an.transpose(1, 2), img[f"mvs.convs_dilate.{i}.weight"],
                                   img[f"mvs.convs_dilate.{i}.bias"], padding=PADS[i], dilation=DILA[i]))
                   for i in range(len(OUT_C))], dim=1)
    smry = lin(y.transpose(1, 2), img, "mvs.convs_fc")
    views = torch.softmax(smry, dim=1).transpose(1, 2) @ an
    return F.normalize(views, dim=-1), a


def bert_ref(txt, bert_dir, ids, mask):
    """The checkpoint's BERT (bert.py's forward is transformers' BertModel's) on the padded captions."""
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig.from_pretrained(bert_dir)).eval()
    sd = {k[5:].replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in txt.items() if k.startswith("bert.")}
    bert.load_state_dict(sd, strict=False)
    return bert(input_ids=ids, attention_mask=mask).last_hidden_state


def padded(tok, caps, n=WORDS):
    """data.py convert_to_feature: [CLS] ... [SEP], then id 0 up to max_words; the mask of the real tokens."""
    ids = torch.zeros(len(caps), n, dtype=torch.long)
    for i, c in enumerate(caps):
        t = tok.encode(c)
        ids[i, :len(t)] = torch.tensor(t)
    return ids, (ids != 0).long()


def text_ref(txt, bert_dir, ids, mask, norm_words=False):
    """TextEncoder.forward (eval): (caption embedding, AGSA output); every one of the padded tokens counts."""
    x = lin(bert_ref(txt, bert_dir, ids, mask), txt, "mapping")
    if norm_words:  # SelfAlign's TextEncoder: l2norm(locals), dim=1
        x = x / x.norm(dim=1, keepdim=True)
    a = agsa_ref(x, None, txt, "agsa.")
    y = a + bn_eval(lin(F.relu(lin(a, txt, "fc1")), txt, "fc2"), txt, "bn")
    return F.normalize(y.mean(1), dim=-1), a


def inputs(tok, seed=1, wh=200.0):
    """Features, pixel boxes of square images (the reference's w/h is in pixels: equal here) and itr's batch."""
    from itr.data.loader import collate_tokens

    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(CAPS), R, D, generator=g)
    xy = torch.rand(len(CAPS), R, 2, generator=g) * 0.5 * wh
    boxes_px = torch.cat([xy, xy + wh * (0.1 + 0.4 * torch.rand(len(CAPS), R, 2, generator=g))], dim=-1)
    ids, lens = collate_tokens([tok.encode(c) for c in CAPS], tok.pad_id)
    batch = {"feats": feats, "boxes": boxes_px / wh, "text_ids": ids, "text_lens": lens}
    return batch, boxes_px, torch.full((len(CAPS), 2), wh)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def imported(tmp_path, tiny_bert):
    img, txt = camera_state(tiny_bert)
    save(tmp_path / "model_flickr_2.pth.tar", (img, txt), camera_options())
    best = import_checkpoint(ImportRequest(tmp_path / "model_flickr_2.pth.tar", "camera", tmp_path / "run", bert=tiny_bert))
    return best, img, txt


def test_the_mapping_is_complete_and_the_forward_is_the_references(imported, tiny_bert):
    from itr.checkpoint import load_for_eval

    best, img, txt = imported
    model, tok, recipe, meta = load_for_eval(best)  # a strict load: every itr key came from the checkpoint
    m = recipe.model
    assert meta["img_dim"] == D and meta["imported"]["family"] == "camera" and meta["imported"]["options"]["head"] == HEADS
    assert (m.name, m.embed_dim, m.heads, m.views, m.div_weight, m.pad_tokens) == ("camera", E, HEADS, K, 0.01, WORDS)
    assert recipe.data.max_words == WORDS - 2 and recipe.data.name == "f30k" and recipe.loss.max_violation
    assert recipe.optim.lr_update == 10 and m.text.freeze and recipe.eval.protocol == "1k"
    torch.testing.assert_close(model.img_enc.agsa.att.k.weight, img["agsa.att_layers.0.linears.1.weight"])
    torch.testing.assert_close(model.img_enc.mvs.convs[6].weight, img["mvs.convs_dilate.6.weight"])
    torch.testing.assert_close(model.txt_enc.agsa.bn.running_var, txt["agsa.bns.0.running_var"])
    torch.testing.assert_close(model.txt_enc.backbone.encoder.layer[1].output.LayerNorm.weight,
                               txt["bert.encoder.layer.1.output.LayerNorm.gamma"])  # the checkpoint's, not --bert's
    batch, boxes_px, wh = inputs(tok)
    with torch.no_grad():
        views, _ = image_ref(img, batch["feats"], boxes_px, wh)
        torch.testing.assert_close(model.embed_images(batch), views, atol=1e-5, rtol=1e-4)
        ids, mask = padded(tok, CAPS)
        assert ids.shape[1] > batch["text_ids"].shape[1]  # the reference's padding, beyond the batch's
        emb, _ = text_ref(txt, tiny_bert, ids, mask)
        torch.testing.assert_close(model.embed_captions(batch), emb, atol=1e-5, rtol=1e-4)


def fine_tune(best, tmp_path, regions=R, dim=D):
    """One epoch at lr 0 from the imported run (the reference's padding in training too): the weights stay."""
    from safetensors.torch import load_file

    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train

    data = generate(tmp_path / "data", splits=(("train", 16), ("dev", 6), ("test", 6)), dim=dim, regions=regions, seed=2)
    assert 0 <= run_eval(best, data, "test")["rsum"] <= 600
    over = [f"data.root={data}", "data.num_workers=0", "data.images_per_shard=16", "data.shuffle_buffer=50",
            "train.epochs=1", "train.batch_size=8", "optim.lr=0.0", "tracking.enabled=false", "eval.batch_size=16",
            f"train.init_from={best.parent}"]
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    a, b = load_file(str(best / "model.safetensors")), load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert a.keys() == b.keys()
    for k in params:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)


def test_the_imported_run_evaluates_and_fine_tunes(imported, tmp_path):
    fine_tune(imported[0], tmp_path)


def test_a_caption_longer_than_the_reference_padding_is_a_clear_error(imported):
    from itr.checkpoint import load_for_eval

    model, _, _, _ = load_for_eval(imported[0])
    ids = torch.full((1, WORDS + 1), 5)
    with pytest.raises(ConfigError, match=r"longer than model.pad_tokens=12: set data.max_words=10"):
        model.embed_captions({"text_ids": ids, "text_lens": torch.tensor([WORDS + 1])})


def test_the_layernorm_weight_bias_naming_imports_the_same(imported, tmp_path, tiny_bert):
    from safetensors.torch import load_file

    save(tmp_path / "new.pth.tar", camera_state(tiny_bert, layernorm="weight"), camera_options())
    best = import_checkpoint(ImportRequest(tmp_path / "new.pth.tar", "camera", tmp_path / "run2", bert=tiny_bert))
    a, b = load_file(str(imported[0] / "model.safetensors")), load_file(str(best / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _refused(tmp_path, bert, parts, opt=None, **req):
    save(tmp_path / "ck.pth.tar", parts, opt or camera_options())
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(ImportRequest(tmp_path / "ck.pth.tar", "camera", tmp_path / "run", bert=bert, **req))
    assert not (tmp_path / "run" / "best").exists()
    return str(e.value)


def test_a_tensor_of_another_shape_is_named(tmp_path, tiny_bert):
    img, txt = camera_state(tiny_bert)
    img["position_enc.proj.weight"] = torch.zeros(E, 4)
    assert "img_enc.pos.proj.weight: itr expects (16, 6), the checkpoint has (16, 4)" in _refused(tmp_path, tiny_bert, (img, txt))


def test_a_bert_directory_of_another_bert_is_named(tmp_path, tiny_bert):
    import shutil

    other = tmp_path / "bert_large"
    shutil.copytree(tiny_bert, other)
    cfg = (other / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (other / "config.json").write_text(cfg)
    msg = _refused(tmp_path, other, camera_state(tiny_bert))
    assert f"--bert {other}" in msg and "num_hidden_layers 3 there, 2 in the checkpoint" in msg


def test_code_the_reference_never_builds_is_refused(tmp_path, tiny_bert):
    img, txt = camera_state(tiny_bert)
    txt["agsa.att_layers.1.fc_q.weight"] = torch.zeros(E // HEADS, E // HEADS)
    assert "more than one layer" in _refused(tmp_path, tiny_bert, (img, txt))
    img, txt = camera_state(tiny_bert)
    img["extra_head.weight"] = torch.zeros(2)
    assert "image encoder keys ['extra_head.weight']" in _refused(tmp_path, tiny_bert, (img, txt))
    assert "expected 'model' to be the 2 state dicts" in _refused(tmp_path, tiny_bert, (img,))


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/itr-import-camera-ran", "w"))


def test_a_forbidden_pickle_global_and_a_missing_bert_are_refused(tmp_path, tiny_bert):
    import os

    img, txt = camera_state(tiny_bert)
    torch.save({"model": [img, txt], "opt": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth\.tar: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth.tar", "camera", tmp_path / "run", bert=tiny_bert))
    assert not os.path.exists("/tmp/itr-import-camera-ran")
    save(tmp_path / "ok.pth.tar", (img, txt), camera_options())
    with pytest.raises(ConfigError, match="pass --bert BERT_DIR"):
        import_checkpoint(ImportRequest(tmp_path / "ok.pth.tar", "camera", tmp_path / "run"))
