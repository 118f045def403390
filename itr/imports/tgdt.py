"""TGDT (LCFractal/TGDT) released checkpoints: ``runs/{f30k,coco}_m0.3/model_best_rsum.pth.tar``.

Layout (train.py@067ee00 ``save_checkpoint``, the same as TERAN's; test.py / test_gl.py rebuild the model from
``checkpoint['config']``): ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``opt`` (``num_epochs``),
``config`` (configs/{f30k,coco}_all.yaml as a dict), ``Eiters``. ``model`` (models/baseline.py@067ee00 on TERAN's
models/text.py, visual.py @85c186b) holds TERAN's keys (see ``itr.imports.teran``) under ``img_txt_enc.``, plus
the second stage ``transformer_encoder_text.*`` / ``transformer_encoder_img.*`` (position 0 is the global token),
and ``text_agg_emb.*``, ``img_agg_emb.*``, ``img_first_emb.*``, ``cap_first_emb.*``, which no forward uses.

Mapping: the first-stage transformers ``transformer_encoder_1`` / ``_2`` are itr's ``txt_local`` / ``img_local``,
the second stage ``txt_global`` / ``img_global``. The reference's image global slot is a zero feature with a zero
box going through the box encoding; itr prepends a learned ``img_cls`` after it, so ``img_cls`` is that encoding
of zeros (``map.2(relu(map.0.bias))``): the same token.

Options read (``config``): as TERAN (``itr.imports.teran.schedule``), and training.loss-type for
``model.test_mode``: alignment+matching (the released runs) -> sum (test_gl.py's local + global; evaluate it with
``itr eval --two-stage K`` for the rerank), matching -> global, alignment -> local (test.py with
configs/*_global.yaml / *_local.yaml); ``--set model.test_mode=...`` picks another. Refused, naming the option:
TERAN's refusals, shared-transformer, aggregations other than ``first``, project-and-sum box encoding.
"""
import torch

from itr.errors import CheckpointError
from itr.imports.teran import (BERT, HEADS, FF, UNUSED, bert_depth, common_checks, option, parts, recorded, rename,
                               require, schedule, text_section)

MODES = {"alignment+matching": "sum", "matching": "global", "alignment": "local"}
TABLE = [(BERT, "txt_enc.backbone."), ("img_txt_enc.cap_proj.", "txt_enc.proj."),
         ("img_txt_enc.img_enc.pos_encoding_image.map.", "box_map."),
         ("img_txt_enc.img_enc.transformer_encoder.", "img_tf."), ("img_txt_enc.img_proj.", "img_proj."),
         ("img_txt_enc.transformer_encoder_1.", "txt_local."), ("img_txt_enc.transformer_encoder_2.", "img_local."),
         ("img_txt_enc.transformer_encoder_text.", "txt_global."),
         ("img_txt_enc.transformer_encoder_img.", "img_global.")]
NEVER_RUN = ("img_txt_enc.text_agg_emb.", "img_txt_enc.img_agg_emb.", "img_first_emb.", "cap_first_emb.")


def global_slot(weights, img_dim):
    """The image's global token after the box encoding: a zero feature and a zero box (TERAN's collate) through
    Linear(D+5, D), ReLU, Linear(D, D) is ``W2 relu(b1) + b2``; zeros without a box encoding."""
    if "box_map.0.bias" not in weights:
        return torch.zeros(img_dim)
    w2, b1, b2 = (weights[k].float() for k in ("box_map.2.weight", "box_map.0.bias", "box_map.2.bias"))
    return w2 @ torch.relu(b1) + b2


def convert(ckpt, opt, req):
    state, config = parts(ckpt, req.ckpt)
    src = req.ckpt
    common_checks(config, src)
    loss_type = require(config, src, "training.loss-type", tuple(MODES), None, "what test.py scores")
    pos = require(config, src, "image-model.pos-encoding", ("concat-and-process", None), None,
                  "itr's tgdt encodes boxes by concat-and-process")
    require(config, src, "model.shared-transformer", (False,), False, "itr's tgdt has a first stage per modality")
    for side in ("text", "image"):
        require(config, src, f"model.{side}-aggregation", ("first",), None, "itr's global token is position 0")
    weights = rename(state, TABLE, UNUSED + NEVER_RUN, src)
    if "img_proj.weight" not in weights:
        raise CheckpointError(f"{src}: no img_txt_enc.img_proj.weight in the model state")
    img_dim = weights["img_proj.weight"].shape[1]
    weights["img_cls"] = global_slot(weights, img_dim)
    layers = option(config, "model.layers", src)
    recipe = {
        "model": {"name": "tgdt", "embed_dim": option(config, "model.embed-size", src),
                  "image_layers": option(config, "image-model.transformer-layers", src),
                  "layers": layers, "global_layers": layers, "heads": HEADS, "ff_dim": FF,
                  "dropout": option(config, "model.dropout", src, 0.1), "box_encoding": pos is not None,
                  "bert_layers": bert_depth(state, config, src),
                  "local_scale": 10.0,  # models/loss.py@067ee00: alignments.max(2)[0].sum(2)*10
                  "global_weight": 1.0, "local_weight": 1.0,  # train.py sums the losses (matching-weight is never read)
                  "consistency_weight": 1.0, "consistency_margin": 0.3,  # models/loss.py: con_loss + intra_loss, 0.3
                  "drop_last_word": True, "test_mode": MODES[loss_type], "text": text_section(config, src)},
        **schedule(config, opt, req),
    }
    return {"recipe": recipe, "weights": weights, "img_dim": img_dim, "options": recorded(opt, config)}
