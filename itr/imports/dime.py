"""DIME (LgQu/DIME) released checkpoints: ``pretrain_model/{flickr,coco}/{Flickr30K,MSCOCO}_DIME_{it,ti}.pth.tar``
(evaluate_models.py@85062e2; README@85062e2 links them on Google Drive, file 1vurSb_Ssr2wlKaJCA5Vu5w6I3ee17RFM).

Layout (train.py@85062e2 ``save_checkpoint``, model.py@85062e2 ``DIME.state_dict``): a dict with ``epoch``,
``model``, ``best_rsum``, ``best_r1``, ``opt`` (the argparse options) and ``Eiters``; ``model`` is
[image encoder, text encoder, interaction module]:

- models/VisNet.py ``EncoderImagePrecomp``: ``fc`` (embed, img_dim), ``bn`` (built always, read by t2i only);
- models/TextNet.py ``EncoderText``: ``bert.*`` (models/BERT.py: LayerNorm ``gamma``/``beta`` at 85062e2,
  ``weight``/``bias`` since 5a711c4; pooler never read), ``fc`` (embed, 768), ``convs1.{0,1,2}``
  (Conv2d(1, embed, (K, 768)): itr's Conv1d weight is its (embed, 768, K) transpose), ``mapping``;
- models/InteractionModule.py: ``dynamic_itr_l{0,1,2}.{ric,glgc,imrc,cmrc}.router.mlp.{0,2}``,
  ``imrc.sa.att_layer.linears.0-2``, ``imrc.sa.feed_forward_layer.fc{1,2}``, ``glgc.fc_1`` (its ``fc_2`` is
  never read), ``cmrc.refine.fc_{scale,shift,1,2}``, ``path_mapping`` (128, 36), ``bn`` (the score BatchNorm).

Options read: direction, num_head_IMRC, lambda_softmax_CMRC, trade_off, max_words (captions padded to that
many tokens: ``model.pad_tokens``, ``data.max_words`` = max_words - 2), margin, max_violation, data_name, the
schedule (learning_rate, lr_update, num_epochs, batch_size, grad_clip); sizes from the tensors. Refused:
raw_feature_norm_CMRC other than clipped_l2norm, measure=order, use_abs, no_imgnorm, a full-image encoder
(``cnn.*``). Not read: extra_stc / extra_img (extra sampled negatives in training; itr samples none).
"""
from itr.errors import CheckpointError
from itr.imports.common import (bert_rules, check_bert_dir, eval_section, layernorm_names, option, paper_hinge,
                                rename, schedule, state_parts)
from itr.imports.vsepp import data_section

REPO = "LgQu/DIME"
CELLS = ("ric", "glgc", "imrc", "cmrc")  # the order of emb_lst / path_prob in DynamicInteraction.py


def interaction_rules():
    rules = []
    for n in range(3):
        src, dst = f"dynamic_itr_l{n}.", f"layers.{n}."
        rules += [(f"{src}{cell}.router.", f"{dst}routers.{j}.") for j, cell in enumerate(CELLS)]
        rules += [(f"{src}imrc.sa.att_layer.linears.{i}.", f"{dst}sa.{qkv}.") for i, qkv in enumerate("qkv")]
        rules += [(f"{src}imrc.sa.feed_forward_layer.{fc}.", f"{dst}sa.{fc}.") for fc in ("fc1", "fc2")]
        rules += [(f"{src}glgc.fc_1.", f"{dst}glgc_fc."), (f"{src}glgc.fc_2.", None), (f"{src}cmrc.refine.", dst)]
    return rules + [("path_mapping.", "path_mapping."), ("bn.", "score_bn.")]


def text_weights(txt, source):
    """TextNet's BERT, fc and mapping renamed; its Conv2d(1, E, (K, H)) kernels as Conv1d(H, E, K) kernels."""
    rules = [*bert_rules("txt_enc.backbone."), ("fc.", "txt_enc.proj."), ("convs1.", "convs."), ("mapping.", "mapping.")]
    out = layernorm_names(rename(txt, rules, "text encoder", source))
    for i in range(3):
        w = out.get(f"convs.{i}.weight")
        if w is None or w.dim() != 4 or w.shape[1] != 1:
            raise CheckpointError(f"{source}: text encoder convs1.{i}.weight is "
                                  f"{None if w is None else tuple(w.shape)}, expected TextNet's (embed, 1, K, hidden)")
        out[f"convs.{i}.weight"] = w[:, 0].transpose(1, 2).contiguous()
    return out


def check_options(opt, img, source):
    option(opt, "raw_feature_norm_CMRC", "clipped_l2norm", source, ("clipped_l2norm",))
    option(opt, "measure", "cosine", source, ("cosine",))
    for flag in ("use_abs", "no_imgnorm"):
        if opt.get(flag):
            raise CheckpointError(f"{source}: option {flag}=True; itr's dime L2-normalizes the image vector "
                                  f"(DIME's default)")
    if any(k.startswith("cnn.") for k in img):
        raise CheckpointError(f"{source}: a full-image model (EncoderImageFull); itr imports the precomputed-feature "
                              f"models (data_name *_precomp)")


def dime_recipe(opt, req, direction, img, itr):
    max_words = int(opt.get("max_words", 32))
    optim, train = schedule(opt, 2e-4, 15, 30, 32)
    data = {**data_section(opt, req), "max_words": max_words - 2}
    return {
        "model": {"name": "dime", "direction": direction, "embed_dim": img["fc.weight"].shape[0],
                  "heads": opt.get("num_head_IMRC", 16),
                  "hid_imrc": itr["dynamic_itr_l0.imrc.sa.feed_forward_layer.fc1.weight"].shape[0],
                  "hid_router": itr["dynamic_itr_l0.ric.router.mlp.0.weight"].shape[0],
                  "lambda_softmax": float(opt.get("lambda_softmax_CMRC", 4.0)),
                  "path_hid": itr["path_mapping.weight"].shape[0], "trade_off": opt.get("trade_off", 0.5),
                  "pad_tokens": max_words, "text": {"name": "hf_words", "freeze": True}},
        "data": data,
        "loss": paper_hinge(opt, max_violation=True),
        "optim": optim,
        "train": train,
        "eval": eval_section(data),
    }


def convert(ckpt, opt, req):
    img, txt, itr = state_parts(ckpt, ("image encoder", "text encoder", "interaction module"), req.ckpt, REPO)
    check_options(opt, img, req.ckpt)
    direction = option(opt, "direction", "i2t", req.ckpt, ("i2t", "t2i"))
    for part, state, key in (("image encoder", img, "fc.weight"), ("interaction module", itr, "path_mapping.weight"),
                             ("interaction module", itr, "dynamic_itr_l0.ric.router.mlp.0.weight"),
                             ("interaction module", itr, "dynamic_itr_l0.imrc.sa.feed_forward_layer.fc1.weight")):
        if key not in state:
            raise CheckpointError(f"{req.ckpt}: the {part} has no {key}: not DIME's model")
    check_bert_dir(txt, req)
    img_rules = [("fc.", "img_fc."), ("bn.", "img_bn." if direction == "t2i" else None)]  # i2t never reads bn
    weights = rename(img, img_rules, "image encoder", req.ckpt)
    weights.update(text_weights(txt, req.ckpt))
    weights.update(rename(itr, interaction_rules(), "interaction module", req.ckpt))
    return {"recipe": dime_recipe(opt, req, direction, img, itr), "weights": weights,
            "img_dim": img["fc.weight"].shape[1]}
