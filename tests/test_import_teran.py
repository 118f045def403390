"""`itr import --from teran`: a checkpoint in mesnico/TERAN's exact layout (train.py's dict in torch 1.3's legacy
format, the model's state dict with the transformers-2.3 BERT under ``img_txt_enc.txt_enc.bert_model.``, the
training YAML as ``config``; random weights, a tiny BERT) becomes an itr run directory that evaluates and
fine-tunes; its alignment scores equal a forward written out from the checkpoint's tensors in the reference's
(sequence, batch, dim) layout. Refusals: options itr's teran does not compute, a stray tensor, a wrong shape, a
forbidden pickle global. The builders here serve tests/test_import_tgdt.py too."""
import argparse
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.errors import CheckpointError, ConfigError
from itr.imports import ImportRequest, import_checkpoint

from conftest import tiny_overrides

D, E, H = 12, 16, 32  # region feature size, embed size, the tiny BERT's hidden size
BERT = "img_txt_enc.txt_enc.bert_model."
CAPS = ["a red dog near a cat", "a bike", "there is a blue car and a tree"]


def config(**changes):
    """configs/teran_f30k_MrSw.yaml@85c186b at tiny sizes; ``changes``: {"training.loss-type": ...}."""
    c = {"dataset": {"name": "f30k", "images-path": "data/f30k/images", "data": "data", "restval": True,
                     "pre-extracted-features": False},
         "text-model": {"name": "bert", "pretrain": "bert-base-uncased", "word-dim": H, "extraction-hidden-layer": 1,
                        "fine-tune": True, "pre-extracted": False, "layers": 0, "dropout": 0.1},
         "image-model": {"name": "bottomup", "pre-extracted-features-root": "data/f30k/features_36",
                         "transformer-layers": 2, "dropout": 0.1, "pos-encoding": "concat-and-process",
                         "crop-size": 224, "fine-tune": False, "feat-dim": D, "norm": True},
         "model": {"name": "teran", "embed-size": E, "text-aggregation": "first", "image-aggregation": "first",
                   "layers": 2, "exclude-stopwords": False, "shared-transformer": False, "dropout": 0.1},
         "training": {"lr": 1e-5, "grad-clip": 2.0, "max-violation": True, "loss-type": "alignment",
                      "alignment-mode": "MrSw", "measure": "dot", "margin": 0.2, "bs": 30, "scheduler": "steplr",
                      "gamma": 0.1, "step-size": 20, "warmup": "linear", "warmup-period": 1000}}
    for key, value in changes.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def tf(dim, layers):
    """The reference's transformers: nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2048), sequence first."""
    layer = nn.TransformerEncoderLayer(dim, 4, 2048, 0.1, "relu")
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def teran_modules(bert_dir, cfg):
    """prefix -> module of JointTextImageTransformerEncoder (models/teran.py@85c186b), built as the reference does."""
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig.from_pretrained(bert_dir, num_hidden_layers=cfg["text-model"]["extraction-hidden-layer"])
    pos = {"concat-and-process": nn.Sequential(nn.Linear(D + 5, D), nn.ReLU(), nn.Linear(D, D)),
           "project-and-sum": nn.Linear(5, D)}.get(cfg["image-model"]["pos-encoding"])
    mods = {BERT: BertModel(bert_cfg),  # with its pooler, as EncoderTextBERT's BertModel.from_pretrained
            "img_txt_enc.txt_enc.map.": nn.Linear(H, E),
            "img_txt_enc.img_enc.transformer_encoder.": tf(D, cfg["image-model"]["transformer-layers"]),
            **({"img_txt_enc.img_enc.pos_encoding_image.map.": pos} if pos is not None else {}),
            "img_txt_enc.img_enc.fc.": nn.Linear(D, E),
            "img_txt_enc.img_proj.": nn.Linear(D, E), "img_txt_enc.cap_proj.": nn.Linear(H, E),
            "img_txt_enc.transformer_encoder_1.": tf(E, cfg["model"]["layers"])}
    if not cfg["model"]["shared-transformer"]:
        mods["img_txt_enc.transformer_encoder_2."] = tf(E, cfg["model"]["layers"])
    return mods


def state_of(mods, seed):
    """Their state dict under the reference's key names, every tensor randomly perturbed (no zero biases left)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, m in mods.items():
        for k, v in m.state_dict().items():
            state[prefix + k] = v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    state["img_txt_enc.txt_enc.word_embeddings.weight"] = state[BERT + "embeddings.word_embeddings.weight"]
    return state


def save_reference(path, state, cfg, num_epochs=30):
    """train.py's save_checkpoint dict, in torch 1.3's (legacy) serialization."""
    opt = argparse.Namespace(num_epochs=num_epochs, lr_update=15, workers=10, log_step=10, val_step=500,
                             test_step=100000000, logger_name="runs/teran", resume="", load_model="",
                             use_restval=False, reinitialize_scheduler=False, config="configs/teran_f30k_MrSw.yaml")
    optimizer = {"state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                   "amsgrad": False, "params": [0]}]}
    scheduler = {"step_size": 20, "gamma": 0.1, "base_lrs": [1e-5, 1e-5], "last_epoch": 20, "_step_count": 1}
    torch.save({"epoch": 21, "model": state, "optimizer": optimizer, "scheduler": scheduler, "opt": opt,
                "config": cfg, "Eiters": 12345}, path, _use_new_zipfile_serialization=False)


def teran_checkpoint(path, bert_dir, seed=0, **changes):
    cfg = config(**changes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = state_of(teran_modules(bert_dir, cfg), seed)
    save_reference(path, state, cfg)
    return state, cfg


# ----------------------------------------------------------------------------- the reference's forward, written out


def sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def ref_tf(state, prefix, dim):
    n = len({k.split(".")[1] for k in sub(state, prefix) if k.startswith("layers.")})
    enc = tf(dim, n).eval()
    enc.load_state_dict(sub(state, prefix))
    return enc


def ref_boxes(state, feats, boxes):
    """PositionalEncodingImageBoxes('concat-and-process') over [CLS slot; regions] by hand: (S, B, D)."""
    x = torch.cat([feats.new_zeros(feats.shape[0], 1, D), feats], 1)
    b = torch.cat([boxes.new_zeros(boxes.shape[0], 1, 4), boxes], 1)
    info = torch.cat([b, ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None]], 2)
    m = sub(state, "img_txt_enc.img_enc.pos_encoding_image.map.")
    x = torch.cat([x, info], 2).permute(1, 0, 2)
    return F.linear(F.relu(F.linear(x, m["0.weight"], m["0.bias"])), m["2.weight"], m["2.bias"])


def ref_image_stage1(state, feats, boxes):
    """TransformerPostProcessing, img_proj, transformer_encoder_2: (S, B, E), slot 0 = CLS."""
    if sub(state, "img_txt_enc.img_enc.pos_encoding_image."):
        x = ref_boxes(state, feats, boxes)
    else:  # pos-encoding null: the features alone
        x = torch.cat([feats.new_zeros(feats.shape[0], 1, D), feats], 1).permute(1, 0, 2)
    x = ref_tf(state, "img_txt_enc.img_enc.transformer_encoder.", D)(x)
    x = F.linear(x, state["img_txt_enc.img_proj.weight"], state["img_txt_enc.img_proj.bias"])
    return ref_tf(state, "img_txt_enc.transformer_encoder_2.", E)(x)


def ref_text_stage1(state, bert_dir, ids, lens):
    """EncoderTextBERT (the last hidden layer), cap_proj, transformer_encoder_1 with the padding mask: (S, B, E)."""
    from transformers import BertConfig, BertModel

    bert_state = sub(state, BERT)
    n = len({k.split(".")[2] for k in bert_state if k.startswith("encoder.layer.")})
    bert = BertModel(BertConfig.from_pretrained(bert_dir, num_hidden_layers=n)).eval()
    bert.load_state_dict(bert_state)
    mask = torch.arange(ids.shape[1])[None] < lens[:, None]
    out = bert(ids, attention_mask=mask.long()).last_hidden_state
    c = F.linear(out, state["img_txt_enc.cap_proj.weight"], state["img_txt_enc.cap_proj.bias"]).permute(1, 0, 2)
    return ref_tf(state, "img_txt_enc.transformer_encoder_1.", E)(c, src_key_padding_mask=~mask)


def ref_mrsw(im_set, s_seq, im_len, s_len, scale=1.0):
    """models/loss.py@85c186b AlignmentContrastiveLoss(MrSw, return_similarity_mat=True): (B_im, B_s)."""
    im_set, s_seq = im_set[:, 1:], s_seq[:, 1:-2]
    im_len, s_len = [n - 1 for n in im_len], [n - 3 for n in s_len]
    a = torch.einsum("ird,cld->icrl", im_set, s_seq)
    im_mask = torch.arange(im_set.shape[1])[None] >= torch.tensor(im_len)[:, None]
    s_mask = torch.arange(s_seq.shape[1])[None] >= torch.tensor(s_len)[:, None]
    a = a.masked_fill(im_mask[:, None, :, None] | s_mask[None, :, None, :], 0)
    return a.max(2)[0].sum(2) * scale


def tokens(tok, caps=CAPS):
    from itr.data.loader import collate_tokens

    return collate_tokens([tok.encode(c) for c in caps], tok.pad_id)


def batch(n=4, regions=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + 0.4 * torch.rand(n, regions, 2, generator=g)], -1)
    return torch.randn(n, regions, D, generator=g), boxes


# ----------------------------------------------------------------------------- tests


@pytest.fixture
def imported(tmp_path, tiny_bert):
    state, cfg = teran_checkpoint(tmp_path / "model_best_rsum.pth", tiny_bert)
    best = import_checkpoint(ImportRequest(tmp_path / "model_best_rsum.pth", "teran", tmp_path / "run", bert=tiny_bert))
    return best, state


def test_the_mapping_is_complete_and_the_scores_are_the_references(imported, tiny_bert):
    from itr.checkpoint import load_for_eval

    best, state = imported
    model, tok, recipe, meta = load_for_eval(best)
    assert meta["img_dim"] == D and meta["imported"]["family"] == "teran"
    shown = meta["imported"]["options"]
    assert shown["training.alignment-mode"] == "MrSw" and shown["num_epochs"] == 30
    m = recipe.model
    assert (m.name, m.embed_dim, m.image_layers, m.layers, m.heads, m.ff_dim) == ("teran", E, 2, 2, 4, 2048)
    assert m.text_layers == 1
    assert m.drop_last_word and m.pos_encoding == "concat-and-process" and not m.shared_transformer
    assert recipe.data.name == "f30k" and recipe.eval.protocol == "1k" and recipe.optim.warmup_steps == 1000
    o = recipe.optim
    assert (o.lr, o.lr_update, o.lr_decay, recipe.train.batch_size, recipe.loss.max_violation) == (1e-5, 20, 0.1, 30, True)
    torch.testing.assert_close(model.txt_enc.backbone.encoder.layer[0].attention.self.query.weight,
                               state[BERT + "encoder.layer.0.attention.self.query.weight"])
    torch.testing.assert_close(model.txt_enc.proj.weight, state["img_txt_enc.cap_proj.weight"])
    torch.testing.assert_close(model.img_tf2.layers[1].linear2.bias,
                               state["img_txt_enc.transformer_encoder_2.layers.1.linear2.bias"])
    torch.testing.assert_close(model.txt_tf.layers[0].self_attn.in_proj_weight,
                               state["img_txt_enc.transformer_encoder_1.layers.0.self_attn.in_proj_weight"])
    feats, boxes = batch()
    ids, lens = tokens(tok)
    with torch.no_grad():
        x = torch.cat([feats.new_zeros(4, 1, D), feats], 1)
        b = torch.cat([boxes.new_zeros(4, 1, 4), boxes], 1)
        torch.testing.assert_close(model.pos(x, b), ref_boxes(state, feats, boxes).permute(1, 0, 2))  # the first layers
        got = model.score(model.embed_images({"feats": feats, "boxes": boxes}),
                          model.embed_captions({"text_ids": ids, "text_lens": lens}))
        img = F.normalize(ref_image_stage1(state, feats, boxes), dim=2).permute(1, 0, 2)
        cap = F.normalize(ref_text_stage1(state, tiny_bert, ids, lens), dim=2).permute(1, 0, 2)
        ref = ref_mrsw(img, cap, [6] * 4, lens.tolist())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_imported_run_evaluates_and_fine_tunes(imported, tmp_path):
    from itr.config import load_recipe
    from itr.data.synthetic import generate
    from itr.eval.job import run_eval
    from itr.train import train
    from safetensors.torch import load_file

    best, _ = imported
    data = generate(tmp_path / "data", splits=(("train", 40), ("dev", 10), ("test", 10)), dim=D, regions=4, seed=2)
    assert 0 <= run_eval(best, data, "test", chunk_size=16)["rsum"] <= 600
    over = tiny_overrides(data, **{"train.epochs": 1, "train.max_steps": 2, "train.batch_size": 20, "optim.lr": 0.0,
                                   "optim.warmup_steps": 0, "tracking.enabled": "false", "model.embed_dim": E,
                                   "eval.chunk_size": 16})
    over = [o for o in over if not o.startswith("model.text.word_dim")] + [f"train.init_from={tmp_path / 'run'}"]
    train(load_recipe(best / "recipe.yaml", over), tmp_path / "ft")
    a, b = load_file(str(best / "model.safetensors")), load_file(str(tmp_path / "ft" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the imported weights, kept


def test_shared_transformer_project_and_sum_and_a_frozen_bert_map_too(tmp_path, tiny_bert):
    from itr.checkpoint import load_for_eval

    state, _ = teran_checkpoint(tmp_path / "ck.pth", tiny_bert, **{"model.shared-transformer": True,
                                                                    "image-model.pos-encoding": "project-and-sum",
                                                                    "text-model.fine-tune": False})
    model, _, recipe, _ = load_for_eval(import_checkpoint(ImportRequest(tmp_path / "ck.pth", "teran", tmp_path / "run",
                                                                        bert=tiny_bert)))
    assert recipe.model.shared_transformer and model.img_tf2 is None and recipe.model.text.freeze
    assert recipe.model.pos_encoding == "project-and-sum"
    torch.testing.assert_close(model.pos.map.weight, state["img_txt_enc.img_enc.pos_encoding_image.map.weight"])
    torch.testing.assert_close(model.txt_tf.layers[1].linear1.weight,
                               state["img_txt_enc.transformer_encoder_1.layers.1.linear1.weight"])


@pytest.mark.parametrize("key,value", [("training.loss-type", "alignment+matching"),
                                       ("training.alignment-mode", "symm"), ("model.exclude-stopwords", True),
                                       ("text-model.layers", 1), ("image-model.name", "cnn")])
def test_options_itr_does_not_compute_are_refused_by_name(tmp_path, tiny_bert, key, value):
    teran_checkpoint(tmp_path / "ck.pth", tiny_bert, **{key: value})
    with pytest.raises(CheckpointError, match=re.escape(f"ck.pth: config {key}={value!r}")):
        import_checkpoint(ImportRequest(tmp_path / "ck.pth", "teran", tmp_path / "run", bert=tiny_bert))
    assert not (tmp_path / "run" / "best").exists()


def test_a_stray_tensor_a_wrong_shape_and_no_config_are_clear_errors(tmp_path, tiny_bert):
    state, cfg = teran_checkpoint(tmp_path / "ck.pth", tiny_bert)
    save_reference(tmp_path / "stray.pth", {**state, "img_txt_enc.gate_fn.0.weight": torch.zeros(2, 2)}, cfg)
    with pytest.raises(CheckpointError, match=r"stray\.pth: 1 tensors .*img_txt_enc\.gate_fn\.0\.weight"):
        import_checkpoint(ImportRequest(tmp_path / "stray.pth", "teran", tmp_path / "run", bert=tiny_bert))
    wrong = copy.deepcopy(cfg)
    wrong["model"]["embed-size"] = 2 * E  # the options say 32, the tensors are 16 wide
    save_reference(tmp_path / "wrong.pth", state, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pth does not map .*img_proj\.weight: itr expects \(32, 12\), "
                                              r"the checkpoint has \(16, 12\)"):
        import_checkpoint(ImportRequest(tmp_path / "wrong.pth", "teran", tmp_path / "run", bert=tiny_bert))
    torch.save({"model": state, "opt": argparse.Namespace()}, tmp_path / "noconf.pth")
    with pytest.raises(CheckpointError, match=r"noconf\.pth: no 'config'"):
        import_checkpoint(ImportRequest(tmp_path / "noconf.pth", "teran", tmp_path / "run", bert=tiny_bert))
    with pytest.raises(ConfigError, match="--bert BERT_DIR"):
        import_checkpoint(ImportRequest(tmp_path / "ck.pth", "teran", tmp_path / "run"))
    assert not (tmp_path / "run" / "best").exists()


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/itr-import-teran-ran", "w"))


def test_a_forbidden_pickle_global_is_refused_naming_the_file(tmp_path, tiny_bert):
    import os

    state, cfg = teran_checkpoint(tmp_path / "ck.pth", tiny_bert)
    save_reference(tmp_path / "evil.pth", state, {**cfg, "dataset": Evil()})
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*evil\.pth: it needs the global"):
        import_checkpoint(ImportRequest(tmp_path / "evil.pth", "teran", tmp_path / "run", bert=tiny_bert))
    assert not os.path.exists("/tmp/itr-import-teran-ran") and not (tmp_path / "run" / "best").exists()


def test_the_cli_imports_and_names_the_options_recorded(tmp_path, tiny_bert, capsys):
    from itr.cli import main

    teran_checkpoint(tmp_path / "ck.pth", tiny_bert, **{"dataset.name": "coco"})
    assert main(["import", str(tmp_path / "ck.pth"), "--from", "teran", "--out", str(tmp_path / "run"),
                 "--bert", str(tiny_bert)]) == 0
    meta = json.loads((tmp_path / "run" / "best" / "itr.json").read_text())
    assert meta["imported"]["options"]["dataset.name"] == "coco" and "itr eval" in capsys.readouterr().out
    import yaml

    recipe = yaml.safe_load((tmp_path / "run" / "best" / "recipe.yaml").read_text())
    assert recipe["data"]["test_split"] == "testall" and recipe["eval"]["protocol"] == "coco-5fold"
