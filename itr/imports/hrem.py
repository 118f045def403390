"""HREM (CrossmodalGroup/HREM) released checkpoints: ``runs/{f30k,coco}_test/model_best.pth`` (README: "Fusion").

Layout (train.py@30388ea ``save_checkpoint``; lib/vse.py@3ae350e ``VSEModel.state_dict``): a dict with ``model``,
``opt`` (the argparse options of arguments.py@30388ea and graph_lib.py@30388ea ``extra_parameters``), ``epoch``,
``best_rsum``, ``Eiters``; ``model`` is [image encoder state, text encoder state] (``module.`` prefixed when
trained with --multi_gpu 1; both read). The instance-level interaction (``GraphLoss``: its transformer ``gnn``
and the relation MLPs of lib/mca.py) lives in the criterion, which ``state_dict`` does not save: itr's
``interaction`` keeps its own initialization (training-only; retrieval uses the encoders alone).

- ``model[0]``: ``EncoderImageAggr`` (lib/encoders.py@3ae350e): ``fc.fc`` and the MLP residual
  ``fc.mlp.layers.{0,1}``, ``fc.mlp.bns.{0,1}`` with running statistics (lib/mlp.py@3ae350e ``FC_MLP``; ``bns.1``
  is never used by the forward: dropped), the fragment-relation transformer ``aggr.layers.0.*`` (1 layer).
- ``model[1]``: ``EncoderText_BERT``: ``bert.*`` (pooler and ``embeddings.position_ids`` dropped, as for
  VSE-infinity), ``linear`` (embed, 768), ``aggr.layers.0.*``. The pooling modules hold no weights.

Options read: embed_size, nhead (not visible in the shapes), dropout, residual_weight, no_imgnorm / no_txtnorm
(set: refused), dataset, and for fine-tuning margin, vse_mean_warmup_epochs, mask_repeat, size_augment,
base_loss, gnn_loss, warmup (iterations -> epochs), num_layers_enc, mask_weight, threshold, topk,
reg_loss_weight, cross_loss, learning_rate, lr_schedules (its first epoch; itr decays every lr_update epochs),
decay_rate, num_epochs, batch_size, grad_clip. Not carried (itr has no key; kept in itr.json's options):
norm_input, graph_lr_factor. The BiGRU text encoder of the paper is not in the released code: refused.
"""
from itr.errors import CheckpointError
from itr.imports.vse_infty import bert_rules, data_section, encoder_states, refuse_unnormalized, rename

TRAIN_CAPTIONS = {"f30k": 145000, "coco": 566435}  # Karpathy train splits (coco with restval)


def warmup_epochs(opt, data):
    """graph_lib.py ``--warmup`` iterations as whole epochs (train loader: drop_last, image_caption.py@3ae350e)."""
    n = TRAIN_CAPTIONS.get(data)
    iters = opt.get("warmup", 8000)
    if n is None:
        return {}
    return {"interaction_warmup_epochs": round(iters / max(1, n // opt.get("batch_size", 128)))}


def model_section(opt, data):
    return {"name": "hrem", "embed_dim": opt["embed_size"], "image_mlp": True, "residual_pool": "maxk",
            "pool_k": 2, "residual_weight": opt.get("residual_weight", 0.8), "nhead": opt.get("nhead", 16),
            "dropout": opt.get("dropout", 0.1), "num_layers_enc": opt.get("num_layers_enc", 1),
            "region_drop": 0.2 if opt.get("size_augment", 1) else 0.0, "caption_aug": 0.2,
            "base_loss": opt.get("base_loss", "trip"), "gnn_loss": opt.get("gnn_loss", "trip"),
            "trip_margin": 0.2, "trip_cutoff": 1.9 if data == "coco" else 1.7, **warmup_epochs(opt, data),
            "mask_weight": opt.get("mask_weight", 1.0), "threshold": opt.get("threshold", 0.5),
            "topk": opt.get("topk", 10), "reg_loss_weight": float(opt.get("reg_loss_weight", 10.0)),
            "cross_loss": bool(opt.get("cross_loss", 1)), "text": {"name": "hf_words"}}


def convert(ckpt, opt, req):
    img, txt = encoder_states(ckpt, req.ckpt)
    if "fc.fc.weight" not in img:
        raise CheckpointError(f"{req.ckpt}: the image encoder state has no fc.fc.weight (HREM's EncoderImageAggr "
                              f"with FC_MLP); keys start {sorted(img)[:4]}")
    if "bert.embeddings.word_embeddings.weight" not in txt:
        raise CheckpointError(f"{req.ckpt}: the text encoder state has no bert.* (EncoderText_BERT); the released "
                              f"HREM code has only the BERT text encoder; keys start {sorted(txt)[:4]}")
    refuse_unnormalized(opt, req.ckpt)
    opt = {"embed_size": img["fc.fc.weight"].shape[0], **opt}
    img_rules = [("fc.fc.", "img_fc.fc."), ("fc.mlp.bns.1.", None), ("fc.mlp.", "img_fc.mlp."),
                 ("aggr.layers.0.", "img_rel.aggr.")]
    txt_rules = bert_rules(req.ckpt, txt) + [("aggr.layers.0.", "txt_rel.aggr.")]
    weights = {**rename(img, img_rules, "model[0]"), **rename(txt, txt_rules, "model[1]")}
    data, protocol = data_section(opt.get("dataset"), req)
    schedule = opt.get("lr_schedules") or [15]
    recipe = {
        "model": model_section(opt, data["name"]),
        "data": data,
        "loss": {"margin": opt.get("margin", 0.2), "max_violation": True,
                 "warmup_epochs": opt.get("vse_mean_warmup_epochs", 1),
                 "mask_same_image": bool(opt.get("mask_repeat", 1))},
        "optim": {"name": "adamw", "lr": opt.get("learning_rate", 5e-4), "weight_decay": 1e-4, "text_lr_mult": 0.1,
                  "lr_update": int(schedule[0]), "lr_decay": opt.get("decay_rate", 0.1)},
        "train": {"epochs": opt.get("num_epochs", 30), "batch_size": opt.get("batch_size", 128),
                  "grad_clip": opt.get("grad_clip", 2.0)},
        "eval": {"protocol": protocol},
    }
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.fc.weight"].shape[1],
            "fresh": ("interaction.",)}
