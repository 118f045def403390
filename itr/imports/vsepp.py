"""VSE++ (fartashf/vsepp) released checkpoints: ``runs/{coco,f30k}_vse++/model_best.pth.tar``.

Layout (train.py@175b897 ``save_checkpoint``; model.py@321793b ``VSE.state_dict``): a dict with ``epoch``,
``best_rsum``, ``Eiters``, ``opt`` (the argparse options) and ``model``, a list of two state dicts:

- ``model[0]``: the image encoder; ``EncoderImagePrecomp`` holds ``fc.weight`` (embed_size, img_dim) and
  ``fc.bias``; the full-image ``EncoderImageFull`` also ``cnn.*`` (a torchvision CNN itr does not carry:
  refused, with a message);
- ``model[1]``: ``EncoderText``: ``embed.weight`` (vocab_size, word_dim) and the GRU's ``rnn.weight_ih_l0``,
  ``rnn.weight_hh_l0``, ``rnn.bias_ih_l0``, ``rnn.bias_hh_l0`` (per layer).

Options read: embed_size, word_dim, num_layers, margin, max_violation, no_imgnorm, data_name, and the
training schedule (learning_rate, lr_update, num_epochs, batch_size, grad_clip) for fine-tuning. The order
embedding variant (``measure: order``, ``use_abs``) is not an itr model and is refused.
"""
from itr.errors import CheckpointError
from itr.imports.common import eval_section, paper_hinge, schedule

DATA = {"f30k_precomp": "f30k", "coco_precomp": "coco", "f8k_precomp": "f8k", "10crop_precomp": "f30k"}


def data_section(opt, req):
    """The recipe's data section from the checkpoint's ``data_name`` (or --data-name)."""
    name = req.data_name or opt.get("data_name", "")
    short = DATA.get(name, name.replace("_precomp", ""))
    out = {"name": short, "root": f"data/{name or 'DATA'}"}
    if short == "coco":
        out["test_split"] = "testall"
    return out


def two_parts(ckpt, source):
    model = ckpt.get("model")
    if not (isinstance(model, (list, tuple)) and len(model) == 2 and all(isinstance(m, dict) for m in model)):
        raise CheckpointError(f"{source}: expected 'model' to be [image encoder state, text encoder state] as "
                              f"vsepp/SCAN/VSRN save it, got {type(model).__name__}")
    return model


def convert(ckpt, opt, req):
    img, txt = two_parts(ckpt, req.ckpt)
    if opt.get("measure", "cosine") != "cosine" or opt.get("use_abs"):
        raise CheckpointError(f"{req.ckpt}: an order-embedding model (measure={opt.get('measure')}, "
                              f"use_abs={opt.get('use_abs')}); itr's vsepp scores by cosine")
    if any(k.startswith("cnn.") for k in img):
        raise CheckpointError(f"{req.ckpt}: a full-image model (EncoderImageFull with a {opt.get('cnn_type')} CNN); "
                              f"itr imports the precomputed-feature models (data_name *_precomp)")
    layers = opt.get("num_layers", 1)
    weights = {"img_enc.fc.weight": img["fc.weight"], "img_enc.fc.bias": img["fc.bias"],
               "txt_enc.embed.weight": txt["embed.weight"]}
    weights.update({f"txt_enc.rnn.{k}_l{i}": txt[f"rnn.{k}_l{i}"] for i in range(layers)
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if f"rnn.{k}_l{i}" in txt})
    extra = sorted(k for k in txt if not k.startswith(("embed.", "rnn.")))
    if extra:
        raise CheckpointError(f"{req.ckpt}: text encoder keys {extra} are not VSE++'s EncoderText")
    embed = opt.get("embed_size", img["fc.weight"].shape[0])
    optim, train = schedule(opt, lr=2e-4, lr_update=15, epochs=30, batch=128)
    recipe = {
        "model": {"name": "vsepp", "embed_dim": embed,
                  "image": {"name": "precomp", "pool": "mean", "norm": not opt.get("no_imgnorm", False)},
                  "text": {"name": "gru", "word_dim": opt.get("word_dim", txt["embed.weight"].shape[1]),
                           "num_layers": layers, "bidirectional": False}},
        "data": data_section(opt, req),
        "loss": paper_hinge(opt),  # ContrastiveLoss clears the diagonal only
        "optim": optim,
        "train": train,
        "eval": eval_section(data_section(opt, req)),
    }
    return {"recipe": recipe, "weights": weights, "img_dim": img["fc.weight"].shape[1]}
