"""VSRN (KunpengLi1994/VSRN) released checkpoints: ``pretrain_model/flickr/model_fliker_{1,2}.pth.tar`` and
``pretrain_model/coco/model_coco_{1,2}.pth.tar`` (README.md@777ae74; each file is one model of the paper's
two-model ensemble), or any ``runs/*/model_best.pth.tar`` that train.py writes.

Layout (train.py@0e75e2e ``save_checkpoint``; model.py@eae3067 ``VSRN.state_dict``): a dict with ``epoch``,
``best_rsum``, ``Eiters``, ``opt`` and ``model`` = [img_enc, txt_enc]:

- ``model[0]``: ``EncoderImagePrecompAttn``: ``fc.*`` (embed_size, img_dim); ``Rs_GCN_{1..4}`` (GCN_lib/Rs_GCN.py)
  with 1x1 ``Conv1d`` ``g`` / ``theta`` / ``phi`` (weights (D, D, 1)) and ``W.0`` (Conv1d) + ``W.1`` (BatchNorm1d);
  ``img_rnn.*`` (GRU over the regions); ``bn.*`` (BatchNorm1d on the GRU state) only in the Flickr30K variant;
- ``model[1]``: ``EncoderText``: ``embed.weight`` and ``rnn.*`` (the VSE++ GRU, its last valid state, L2).

The S2VT caption generator (``encoder``, ``decoder``, ``caption_model``) is trained but NOT saved: the derived
recipe has ``model.caption_weight: 0`` so that nothing is missing (evaluation never uses it); fine-tuning with
the caption loss means setting ``model.caption_weight=1``, which starts a fresh captioner.

Flickr30K variant: model.py@eae3067 (since model.py@bf2ac4f) builds ``bn`` and drops the L2 after the region
FC together, exactly when ``data_name == 'f30k_precomp'``; model.py@c9e721e and before had the L2 and no ``bn``
for every dataset. The weights decide, so both generations import: ``bn.*`` present -> ``model.fc_norm: false``,
``model.out_bn: true``; absent -> ``fc_norm: true``, ``out_bn: false``.

Options read: embed_size, word_dim, num_layers, data_name, margin, max_violation, the captioner's sizes (dim_hidden,
dim_word, max_len, input_dropout_p) for a later fine-tuning, and the schedule (learning_rate, lr_update, num_epochs,
batch_size, grad_clip). Refused: ``measure: order`` / ``use_abs`` (order embeddings), ``no_imgnorm`` (itr's VSRN
always normalizes the image embedding), a full-image model (``cnn.*``: EncoderImageFull).
Vocabulary: the repository's ``vocab/{data_name}_vocab.pkl`` (vocab.py ``Vocabulary`` pickles).
"""
from itr.errors import CheckpointError
from itr.imports.common import eval_section, paper_hinge, schedule
from itr.imports.vsepp import data_section, two_parts

# GCN_lib/Rs_GCN.py names -> itr.models.vsrn.RsGCN names
GCN_PARTS = {"g.": "g.", "theta.": "theta.", "phi.": "phi.", "W.0.": "W.", "W.1.": "bn."}


def check_layout(opt, img, txt, source):
    """A VSRN-shaped checkpoint, and none of the reference's options that itr's VSRN does not have."""
    if opt.get("measure", "cosine") != "cosine" or opt.get("use_abs"):
        raise CheckpointError(f"{source}: an order-embedding model (measure={opt.get('measure')}, "
                              f"use_abs={opt.get('use_abs')}); itr's VSRN scores by cosine")
    if opt.get("no_imgnorm"):
        raise CheckpointError(f"{source}: option no_imgnorm=True; itr's VSRN always L2-normalizes the image embedding")
    if any(k.startswith("cnn.") for k in img):
        raise CheckpointError(f"{source}: a full-image model (EncoderImageFull with a {opt.get('cnn_type')} CNN); "
                              f"itr imports the precomputed-feature models (data_name *_precomp)")
    if not any(k.startswith("Rs_GCN_") for k in img) or "fc.weight" not in img or "embed.weight" not in txt:
        raise CheckpointError(f"{source}: expected fc.*, Rs_GCN_* in model[0] and embed.weight in model[1] "
                              f"(VSRN's EncoderImagePrecompAttn / EncoderText), "
                              f"got {sorted(img)[:4]} / {sorted(txt)[:4]}")


def conv1x1(w):
    """A 1x1 Conv1d weight (out, in, 1) as the Linear weight (out, in) that applies it per region."""
    return w[..., 0] if w.dim() == 3 and w.shape[-1] == 1 else w


def image_weights(img, source):
    """``EncoderImagePrecompAttn``'s tensors under itr's ``img_enc`` names; also the number of GCN layers.
    Keys it does not know are returned apart (SelfAlign's context head lives in the same state dict)."""
    out, rest, layers = {}, {}, set()
    for k, v in img.items():
        head, _, tail = k.partition(".")
        if head in ("fc", "bn"):
            out[f"img_enc.{'out_bn' if head == 'bn' else 'fc'}.{tail}"] = v
        elif head == "img_rnn":
            out[f"img_enc.rnn.{tail}"] = v
        elif head.startswith("Rs_GCN_") and head[7:].isdigit():
            i = int(head[7:]) - 1
            layers.add(i)
            part = next((p for p in GCN_PARTS if tail.startswith(p)), None)
            if part is None:
                raise CheckpointError(f"{source}: {k} is not a part of GCN_lib/Rs_GCN.py's Rs_GCN")
            out[f"img_enc.gcn.{i}.{GCN_PARTS[part]}{tail[len(part):]}"] = conv1x1(v) if part != "W.1." else v
        else:
            rest[k] = v
    if layers != set(range(len(layers))):
        raise CheckpointError(f"{source}: GCN layers Rs_GCN_{sorted(i + 1 for i in layers)} are not 1..N")
    return out, rest, len(layers)


def text_weights(txt, source, extra=()):
    """``EncoderText``'s ``embed`` / ``rnn`` (and ``extra`` prefixes) under ``txt_enc``; other keys are errors."""
    known = ("embed.", "rnn.") + tuple(extra)
    foreign = sorted(k for k in txt if not k.startswith(known))
    if foreign:
        raise CheckpointError(f"{source}: text encoder keys {foreign[:8]} are not this family's EncoderText")
    return {f"txt_enc.{k}": v for k, v in txt.items()}


def vsrn_recipe(name, opt, req, img, txt, layers):
    """The recipe of a VSRN-based model from the checkpoint's options (captioner off: it is not saved)."""
    embed = img["fc.weight"].shape[0]
    data = data_section(opt, req)
    optim, train = schedule(opt, lr=2e-4, lr_update=15, epochs=30, batch=128)
    return {
        "model": {"name": name, "embed_dim": opt.get("embed_size", embed), "gcn_layers": layers,
                  "fc_norm": "bn.weight" not in img, "out_bn": "bn.weight" in img, "l2_axis": "regions",
                  "text": {"name": "gru", "word_dim": opt.get("word_dim", txt["embed.weight"].shape[1]),
                           "num_layers": opt.get("num_layers", 1), "min_count": 4},
                  "caption_weight": 0.0,  # the captioner is not in the checkpoint
                  "caption_hidden": opt.get("dim_hidden", 512), "caption_word_dim": opt.get("dim_word", 300),
                  "caption_max_len": opt.get("max_len", 60), "caption_dropout": opt.get("input_dropout_p", 0.2)},
        "data": data,
        "loss": paper_hinge(opt),  # ContrastiveLoss clears the diagonal only
        "optim": optim,
        "train": train,
        "eval": eval_section(data),
    }


def convert(ckpt, opt, req):
    img, txt = two_parts(ckpt, req.ckpt)
    check_layout(opt, img, txt, req.ckpt)
    weights, rest, layers = image_weights(img, req.ckpt)
    if rest:
        raise CheckpointError(f"{req.ckpt}: image encoder keys {sorted(rest)[:8]} are not VSRN's "
                              f"EncoderImagePrecompAttn (a SelfAlign checkpoint? use --from selfalign_vsrn)")
    weights.update(text_weights(txt, req.ckpt))
    recipe = vsrn_recipe("vsrn", opt, req, img, txt, layers)
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}
