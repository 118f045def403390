"""CAMERA (LgQu/CAMERA) released checkpoints: ``pretrain_model/{flickr,coco}/model_{flickr,coco}_{1,2}.pth.tar``
(evaluate_models.py@a0c8939; README@3611b1c links the Google Drive folder 16O9cqYDnQdLKHyiOUTUexih_yCfzTelW).

Layout (train.py@3611b1c ``save_checkpoint``, model.py@3611b1c ``CAMERA.state_dict``): a dict with ``epoch``,
``model``, ``best_rsum``, ``best_r1``, ``opt`` (the argparse options) and ``Eiters``; ``model`` is
[image encoder, text encoder]:

- ``EncoderImagePrecompSelfAttn``: ``fc`` (embed, img_dim), ``position_enc.proj`` (embed, 6),
  ``agsa.att_layers.0.{linears.0-2, fc_q, fc_k, fc_g}`` and ``agsa.bns.0`` (models/AGSA.py, one layer),
  ``mvs.convs_dilate.0-6`` and ``mvs.convs_fc`` (k, 1024) (models/Summarization.py);
- ``TextEncoder`` (models/TextEncoder.py): ``bert.*`` (bert.py: LayerNorm ``gamma``/``beta`` at 3611b1c,
  ``weight``/``bias`` since 2565622; the pooler is never read), ``mapping`` (embed, 768), ``agsa.*`` as
  above, ``fc1``, ``fc2``, ``bn``.

Options read: head (and embed size, views from the tensors), smry_lamda, drop, max_words (captions padded to
that many tokens: ``model.pad_tokens``, ``data.max_words`` = max_words - 2), margin, max_violation,
data_name, and the schedule (learning_rate, lr_update, lr_decay_gamma, num_epochs, batch_size, grad_clip)
for fine-tuning. Refused: an AGSA of more layers or with shared projections (``is_share``), which
CAMERA's model.py never builds, and a ``--bert`` directory whose config is not the checkpoint's BERT.
"""
from itr.errors import CheckpointError
from itr.imports.common import (bert_rules, check_bert_dir, eval_section, layernorm_names, paper_hinge, rename,
                                schedule, state_parts)
from itr.imports.vsepp import data_section

REPO = "LgQu/CAMERA"


def agsa_rules(src, dst):
    """One AGSA layer (models/AGSA.py: ``att_layers.0``, ``bns.0``) -> itr's ``AGSA`` (att.q/k/v, att.fc_*, bn)."""
    att = f"{src}att_layers.0."
    return [(f"{att}linears.0.", f"{dst}att.q."), (f"{att}linears.1.", f"{dst}att.k."),
            (f"{att}linears.2.", f"{dst}att.v."), (f"{att}fc_q.", f"{dst}att.fc_q."),
            (f"{att}fc_k.", f"{dst}att.fc_k."), (f"{att}fc_g.", f"{dst}att.fc_g."), (f"{src}bns.0.", f"{dst}bn.")]


IMAGE_RULES = [("fc.", "img_enc.fc."), ("position_enc.proj.", "img_enc.pos.proj."),
               ("mvs.convs_dilate.", "img_enc.mvs.convs."), ("mvs.convs_fc.", "img_enc.mvs.fc."),
               *agsa_rules("agsa.", "img_enc.agsa.")]
TEXT_RULES = [*bert_rules("txt_enc.backbone."), ("mapping.", "txt_enc.mapping."), ("fc1.", "txt_enc.fc1."),
              ("fc2.", "txt_enc.fc2."), ("bn.", "txt_enc.bn."), *agsa_rules("agsa.", "txt_enc.agsa.")]


def check_agsa(state, part, source):
    """itr's AGSA is model.py's: one layer, three projections of its own."""
    extra = sorted(k for k in state if k.startswith(("agsa.att_layers.1.", "agsa.bns.1.", "agsa.att_layers.0.linear.")))
    if extra:
        raise CheckpointError(f"{source}: the {part}'s AGSA has {extra[0]} (more than one layer, or shared projections: "
                              f"is_share); CAMERA's model.py builds AGSA(1, ..., is_share=False), as itr does")


def camera_weights(img, txt, source):
    """itr ``camera`` keys of the image and text encoder states (SelfAlign adds its heads to the rules)."""
    check_agsa(img, "image encoder", source)
    check_agsa(txt, "text encoder", source)
    weights = rename(img, IMAGE_RULES, "image encoder", source)
    weights.update(layernorm_names(rename(txt, TEXT_RULES, "text encoder", source)))
    return weights


def camera_recipe(opt, req, img, name="camera"):
    """The recipe of a CAMERA-family checkpoint: sizes from its tensors, the rest from its options."""
    embed, d_k = img["fc.weight"].shape[0], img["agsa.att_layers.0.fc_q.weight"].shape[0]
    heads = opt.get("head", embed // d_k)
    if heads * d_k != embed:
        raise CheckpointError(f"{req.ckpt}: option head={heads} does not give the AGSA's head size {d_k} at "
                              f"embed size {embed}")
    max_words = int(opt.get("max_words", 32))
    optim, train = schedule(opt, 1e-4, 10, 30, 128)
    data = {**data_section(opt, req), "max_words": max_words - 2}
    return {
        "model": {"name": name, "embed_dim": embed, "heads": heads, "views": img["mvs.convs_fc.weight"].shape[0],
                  "div_weight": opt.get("smry_lamda", 0.01), "dropout": opt.get("drop", 0.0), "l2_axis": "regions",
                  "pad_tokens": max_words, "text": {"name": "hf", "freeze": True}},
        "data": data,
        "loss": paper_hinge(opt),
        "optim": optim,
        "train": train,
        "eval": eval_section(data),
    }


def convert(ckpt, opt, req):
    img, txt = state_parts(ckpt, ("image encoder", "text encoder"), req.ckpt, REPO)
    for key in ("fc.weight", "agsa.att_layers.0.fc_q.weight", "mvs.convs_fc.weight"):
        if key not in img:
            raise CheckpointError(f"{req.ckpt}: the image encoder has no {key}: not CAMERA's EncoderImagePrecompSelfAttn")
    check_bert_dir(txt, req)
    return {"recipe": camera_recipe(opt, req, img), "weights": camera_weights(img, txt, req.ckpt),
            "img_dim": img["fc.weight"].shape[1]}
