"""VSE-infinity (woodfrog/vse_infty) released checkpoints: ``{f30k,coco}_butd_region_{bert,bigru}/model_best.pth``.

Layout (train.py@c9943b2 master / train.py@35035a0 bigru ``save_checkpoint``; lib/vse.py@42892f0
``VSEModel.state_dict``): a dict with ``epoch``, ``best_rsum``, ``Eiters``, ``opt`` (the argparse options) and
``model``, the list [image encoder state, text encoder state]. Master wraps both encoders in ``nn.DataParallel``
before training, so its keys start with ``module.``; the bigru branch does that for grid models only. Both read.

- ``model[0]``: ``EncoderImageAggr`` (lib/encoders.py@c9943b2): ``fc`` (embed, img_dim), the MLP residual
  ``mlp.layers.{0,1}`` and ``mlp.bns.{0,1}`` with running statistics (lib/modules/mlp.py@4ccad17: ``bns.1`` is
  built, never used by the forward, and dropped here), GPO ``gpool.gru.*`` (bidirectional 32 -> 32) and
  ``gpool.linear.weight`` (lib/modules/aggr/gpo.py@c18160a). Grid models (``precomp_enc_type backbone``:
  ``backbone.*``, ``image_encoder.*``) are refused: itr's vse_infty takes precomputed region features.
- ``model[1]``, master: ``bert.*`` (``BertModel.from_pretrained``: its pooler, which the forward never uses, and
  the ``embeddings.position_ids`` buffer some transformers versions save, are dropped), ``linear`` (embed, 768),
  ``gpool.*``. bigru (lib/encoders.py@35035a0): ``embed.weight`` (SCAN's vocabulary + ``<mask>``, which
  train.py@35035a0 appends; so is it here), ``rnn.*`` (bidirectional GRU, ``num_layers``), ``gpool.*``.

Options read: precomp_enc_type, embed_size, word_dim, num_layers, no_imgnorm / no_txtnorm (set: refused, itr's
model always L2-normalizes), data_name (or data_path's last folder), margin, vse_mean_warmup_epochs, optim,
learning_rate, lr_update (the reference decays once there, itr every lr_update epochs: the same within its 25),
num_epochs, batch_size, grad_clip. Optimizer: master AdamW with weight decay 1e-4 and BERT at 0.1 x lr
(lib/vse.py@42892f0); bigru AdamW with PyTorch's default weight decay 0.01 (lib/vse.py@bc34b23).
"""
from pathlib import Path

import torch

from itr.errors import CheckpointError

DATA = {"f30k": "f30k", "f30k_precomp": "f30k", "coco": "coco", "coco_precomp": "coco", "f8k_precomp": "f8k"}


def data_section(name, req, data_path=""):
    """(recipe data section, eval protocol) from --data-name, else the checkpoint's dataset name, else the last
    folder of its data path (arguments.py's default data_name is the uninformative ``precomp``)."""
    name = req.data_name or name or ""
    if name not in DATA and Path(str(data_path or "")).name in DATA:
        name = Path(str(data_path)).name
    short = DATA.get(name, name.replace("_precomp", "") or "DATA")
    data = {"name": short, "root": f"data/{short}_precomp"}
    if short == "coco":
        data["test_split"] = "testall"
    return data, ("coco-5fold" if short == "coco" else "1k")


def encoder_states(ckpt, source):
    """``model`` = [image encoder state, text encoder state], with a DataParallel ``module.`` prefix removed."""
    model = ckpt.get("model")
    if not (isinstance(model, (list, tuple)) and len(model) == 2 and all(isinstance(m, dict) for m in model)):
        raise CheckpointError(f"{source}: expected 'model' to be [image encoder state, text encoder state] as "
                              f"lib/vse.py VSEModel.state_dict saves it, got {type(model).__name__}")
    out = []
    for state in model:
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        out.append(state)
    return out


def rename(state, rules, where):
    """Rename ``state`` by the first matching (old prefix, new prefix) rule; new prefix None drops the key.

    A key no rule matches is kept as ``where:key`` so that the mapping check names it as unexpected."""
    out = {}
    for k, v in state.items():
        rule = next(((a, b) for a, b in rules if k.startswith(a)), None)
        if rule is None:
            out[f"{where}:{k}"] = v
        elif rule[1] is not None:
            out[rule[1] + k[len(rule[0]):]] = v
    return out


def bert_rules(source, txt, proj="txt_enc.proj."):
    """Rules for a ``BertModel`` under ``bert.`` and its ``linear`` projection (VSE-infinity / HREM EncoderText)."""
    pos = txt.get("bert.embeddings.position_ids")
    if pos is not None and not torch.equal(pos.flatten().long(), torch.arange(pos.numel())):
        raise CheckpointError(f"{source}: bert.embeddings.position_ids is not 0..{pos.numel() - 1}; itr's BERT "
                              f"numbers the positions itself")
    return [("bert.pooler.", None), ("bert.embeddings.position_ids", None), ("bert.", "txt_enc.backbone."),
            ("linear.", proj)]


def refuse_unnormalized(opt, source):
    for flag in ("no_imgnorm", "no_txtnorm"):
        if opt.get(flag):
            raise CheckpointError(f"{source}: trained with --{flag}; itr's model L2-normalizes both embeddings, "
                                  f"which changes the text-to-image ranking of unnormalized ones")


def text_section(txt, opt, source):
    """(recipe text section, rename rules, optimizer keys) for the master (BERT) or bigru (BiGRU) text encoder."""
    if "bert.embeddings.word_embeddings.weight" in txt:
        rules = bert_rules(source, txt) + [("gpool.", "txt_pool.")]
        return {"name": "hf_words"}, rules, {"weight_decay": 1e-4, "text_lr_mult": 0.1}
    if "embed.weight" in txt:
        text = {"name": "gru_words", "word_dim": opt.get("word_dim", txt["embed.weight"].shape[1]),
                "num_layers": opt.get("num_layers", 1), "bidirectional": True, "mask_word": True}
        rules = [("embed.", "txt_enc.embed."), ("rnn.", "txt_enc.rnn."), ("gpool.", "txt_pool.")]
        return text, rules, {"weight_decay": 0.01}
    raise CheckpointError(f"{source}: the text encoder state has neither bert.* (master branch) nor embed.weight "
                          f"(bigru branch); keys start {sorted(txt)[:4]}")


def convert(ckpt, opt, req):
    img, txt = encoder_states(ckpt, req.ckpt)
    if opt.get("precomp_enc_type", "basic") != "basic" or any(k.startswith(("backbone.", "image_encoder."))
                                                               for k in img):
        raise CheckpointError(f"{req.ckpt}: a grid-feature model (precomp_enc_type={opt.get('precomp_enc_type')}, "
                              f"a {opt.get('backbone_source')} ResNet backbone); itr's vse_infty imports the BUTD "
                              f"region models (precomp_enc_type basic)")
    if "fc.weight" not in img:
        raise CheckpointError(f"{req.ckpt}: the image encoder state has no fc.weight (EncoderImageAggr); keys "
                              f"start {sorted(img)[:4]}")
    refuse_unnormalized(opt, req.ckpt)
    if opt.get("optim", "adam") != "adam":
        raise CheckpointError(f"{req.ckpt}: trained with --optim {opt.get('optim')}; itr's recipes use AdamW")
    text, txt_rules, optim = text_section(txt, opt, req.ckpt)
    img_rules = [("fc.", "img_fc.fc."), ("mlp.bns.1.", None), ("mlp.", "img_fc.mlp."), ("gpool.", "img_pool.")]
    weights = {**rename(img, img_rules, "model[0]"), **rename(txt, txt_rules, "model[1]")}
    data, protocol = data_section(opt.get("data_name"), req, opt.get("data_path"))
    recipe = {
        "model": {"name": "vse_infty", "embed_dim": opt.get("embed_size", img["fc.weight"].shape[0]),
                  "image_mlp": True, "region_drop": 0.2, "caption_aug": 0.2, "gpo_dim": 32, "text": text},
        "data": data,
        "loss": {"margin": opt.get("margin", 0.2), "max_violation": True,
                 "warmup_epochs": opt.get("vse_mean_warmup_epochs", 0), "mask_same_image": False},
        "optim": {"name": "adamw", "lr": opt.get("learning_rate", 2e-4), "lr_update": opt.get("lr_update", 15),
                  "lr_decay": 0.1, **optim},
        "train": {"epochs": opt.get("num_epochs", 30), "batch_size": opt.get("batch_size", 128),
                  "grad_clip": opt.get("grad_clip", 2.0)},
        "eval": {"protocol": protocol},
    }
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}
