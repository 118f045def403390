"""SCAN (kuanghuei/SCAN) checkpoints: ``model_best.pth.tar`` of runs such as ``runs/f30k_scan/log`` and
``runs/coco_scan/log`` (README.md@8063557: ``--logger_name runs/coco_scan/log --model_name runs/coco_scan/log``),
t2i and i2t alike.

Layout (train.py@0474a17 ``save_checkpoint``; model.py@053693f ``SCAN.state_dict``): a dict with ``epoch``,
``best_rsum``, ``Eiters``, ``opt`` (the argparse options) and ``model``, a list of two state dicts:

- ``model[0]``: ``EncoderImagePrecomp`` (``--precomp_enc_type basic``): ``fc.weight`` (embed_size, img_dim),
  ``fc.bias``; the ``weight_norm`` encoder stores ``fc.weight_g`` / ``fc.weight_v`` instead (refused below);
- ``model[1]``: ``EncoderText``: ``embed.weight`` (vocab_size, word_dim) and the GRU's ``rnn.weight_ih_l0``,
  ``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``, ``rnn.bias_hh_l0`` per layer, each with a ``_reverse`` twin
  under ``--bi_gru`` (the two directions' outputs are averaged per word).

Options read: cross_attn, lambda_softmax, lambda_lse, agg_func, raw_feature_norm, no_imgnorm, no_txtnorm,
bi_gru, precomp_enc_type, embed_size, word_dim, num_layers, margin, max_violation, data_name, and the schedule
(learning_rate, lr_update, num_epochs, batch_size, grad_clip) for fine-tuning. An option missing from an older
checkpoint takes train.py@0474a17's default (``bi_gru``: whether the GRU has ``_reverse`` weights).
Refused, naming the option: ``precomp_enc_type`` other than basic (itr's scan has the paper's plain FC), and a
``cross_attn`` / ``agg_func`` / ``raw_feature_norm`` value itr's scan does not implement.
Vocabulary: the repository's ``vocab/{data_name}_vocab.json`` (vocab.py@19e8d2f ``serialize_vocab``).
"""
from itr.errors import CheckpointError
from itr.imports.common import eval_section, paper_hinge, schedule
from itr.imports.vsepp import data_section, two_parts
from itr.models.scan import AGG_FUNCS, RAW_NORMS

# train.py@0474a17 defaults of the options that shape the model
DEFAULTS = {"cross_attn": "t2i", "lambda_softmax": 9.0, "lambda_lse": 6.0, "agg_func": "LogSumExp",
            "raw_feature_norm": "clipped_l2norm", "precomp_enc_type": "basic", "no_imgnorm": False,
            "no_txtnorm": False, "num_layers": 1}
CHOICES = {"cross_attn": ("t2i", "i2t"), "agg_func": AGG_FUNCS, "raw_feature_norm": RAW_NORMS,
           "precomp_enc_type": ("basic",)}


def checked_options(opt, source):
    """The model options with train.py's defaults filled in; a value itr's scan lacks is an error naming it."""
    o = {k: opt.get(k, v) for k, v in DEFAULTS.items()}
    for key, allowed in CHOICES.items():
        if o[key] not in allowed:
            why = (" (the reference's EncoderImageWeightNormPrecomp; itr's scan has the paper's plain FC)"
                   if key == "precomp_enc_type" else "")
            raise CheckpointError(f"{source}: option {key}={o[key]!r} is not implemented by itr's scan{why}; "
                                  f"it implements {', '.join(allowed)}")
    return o


def scan_weights(img, txt, source):
    """The checkpoint's tensors under itr's scan names (top-level ``fc``, ``txt_enc.embed``, ``txt_enc.rnn``)."""
    if "fc.weight_g" in img or "fc.weight_v" in img:
        raise CheckpointError(f"{source}: the image FC is weight-normalized (precomp_enc_type=weight_norm); itr's "
                              f"scan implements precomp_enc_type basic only")
    if "fc.weight" not in img or "embed.weight" not in txt:
        raise CheckpointError(f"{source}: expected fc.weight in model[0] and embed.weight in model[1] "
                              f"(SCAN's EncoderImagePrecomp / EncoderText), got {sorted(img)[:4]} / {sorted(txt)[:4]}")
    foreign = sorted(k for k in img if not k.startswith("fc."))
    foreign += sorted(k for k in txt if not k.startswith(("embed.", "rnn.")))
    if foreign:
        raise CheckpointError(f"{source}: keys {foreign} are not SCAN's EncoderImagePrecomp / EncoderText")
    weights = dict(img)  # fc.weight, fc.bias: the same names in itr's scan
    weights.update({f"txt_enc.{k}": v for k, v in txt.items()})
    return weights


def convert(ckpt, opt, req):
    img, txt = two_parts(ckpt, req.ckpt)
    o = checked_options(opt, req.ckpt)
    weights = scan_weights(img, txt, req.ckpt)
    bi_gru = bool(opt.get("bi_gru", any(k.endswith("_reverse") for k in txt)))
    data = data_section(opt, req)
    optim, train = schedule(opt, lr=2e-4, lr_update=15, epochs=30, batch=128)
    recipe = {
        "model": {"name": "scan", "embed_dim": opt.get("embed_size", img["fc.weight"].shape[0]),
                  "direction": o["cross_attn"], "lambda_softmax": float(o["lambda_softmax"]),
                  "lambda_lse": float(o["lambda_lse"]), "agg_func": o["agg_func"],
                  "raw_feature_norm": o["raw_feature_norm"], "img_norm": not o["no_imgnorm"],
                  "txt_norm": not o["no_txtnorm"],
                  "text": {"name": "gru_words", "word_dim": opt.get("word_dim", txt["embed.weight"].shape[1]),
                           "num_layers": o["num_layers"], "bidirectional": bi_gru, "min_count": 4,
                           "mask_word": False}},
        "data": data,
        "loss": paper_hinge(opt),  # ContrastiveLoss clears the diagonal only
        "optim": optim,
        "train": train,
        "eval": eval_section(data),
    }
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}
