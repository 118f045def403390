"""What the importers of the BERT-based families share.

Their checkpoints are ``{epoch, model, best_rsum, best_r1, opt, Eiters}`` with ``model`` a list of state
dicts (one per module of the reference's model object). Each family renames those keys by prefix rules
into itr's modules; every key must be covered by a rule (a rule may drop a tensor the reference's
forward never reads), so a checkpoint of modified code is an error naming its extra keys, never a
silent partial load. The text encoders hold a BERT under ``bert.``: the references' own ``bert.py``
(LayerNorm ``gamma``/``beta`` before LgQu's 2022-05-26 "update bert" commits, ``weight``/``bias`` after)
or transformers' ``BertModel`` (SelfAlign); its config is checked against the ``--bert`` directory.
"""
import json
from pathlib import Path

from itr.errors import CheckpointError


def state_parts(ckpt, names, source, repo):
    """``ckpt["model"]``: one state dict per name in ``names`` (e.g. image encoder, text encoder)."""
    model = ckpt.get("model")
    if not (isinstance(model, (list, tuple)) and len(model) == len(names) and all(isinstance(m, dict) for m in model)):
        got = f"a list of {len(model)}" if isinstance(model, (list, tuple)) else type(model).__name__
        raise CheckpointError(f"{source}: expected 'model' to be the {len(names)} state dicts "
                              f"[{', '.join(names)}] as {repo} saves them, got {got}")
    return model


def rename(state, rules, part, source):
    """``{itr key: tensor}`` from the first ``(old prefix, new prefix)`` rule each key starts with; a rule whose new
    prefix is None drops the tensor. Keys no rule covers are an error naming them."""
    import torch

    out, unknown = {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {part} key {key!r} holds a {type(value).__name__}, not a tensor")
        rule = next(((old, new) for old, new in rules if key.startswith(old)), None)
        if rule is None:
            unknown.append(key)
        elif rule[1] is not None:
            out[rule[1] + key[len(rule[0]):]] = value
    if unknown:
        raise CheckpointError(f"{source}: {part} keys {sorted(unknown)[:8]} ({len(unknown)} in all) are not in the "
                              f"reference's model; is this a checkpoint of modified code?")
    return out


def bert_rules(new_prefix):
    """``bert.*`` -> ``new_prefix``; the pooler (never read: the references take the token states) dropped."""
    return [("bert.pooler.", None), ("bert.embeddings.position_ids", None), ("bert.", new_prefix)]


def layernorm_names(weights):
    """The old ``bert.py`` names its LayerNorm parameters ``gamma`` and ``beta``; transformers' are weight, bias."""
    def fix(k):
        if ".LayerNorm." in k:
            return k.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
        return k
    return {fix(k): v for k, v in weights.items()}


def check_bert_dir(state, req):
    """The ``--bert`` directory's config.json must describe the BERT in the checkpoint's text state."""
    if not req.bert or not (Path(req.bert) / "config.json").is_file():
        return  # the framework names a missing --bert; load_backbone a directory without config.json
    cfg = json.loads((Path(req.bert) / "config.json").read_text())
    try:
        word = state["bert.embeddings.word_embeddings.weight"]
        want = {"vocab_size": word.shape[0], "hidden_size": word.shape[1],
                "max_position_embeddings": state["bert.embeddings.position_embeddings.weight"].shape[0],
                "type_vocab_size": state["bert.embeddings.token_type_embeddings.weight"].shape[0],
                "num_hidden_layers": len({k.split(".")[3] for k in state if k.startswith("bert.encoder.layer.")})}
    except KeyError as e:
        raise CheckpointError(f"{req.ckpt}: the text encoder has no BERT tensor {e.args[0]}") from None
    diff = [f"{k} {cfg.get(k)} there, {v} in the checkpoint" for k, v in want.items() if cfg.get(k) != v]
    if diff:
        raise CheckpointError(f"--bert {req.bert}: its config.json does not describe the checkpoint's BERT "
                              f"({'; '.join(diff)}); pass the BERT the model was trained with (the reference's "
                              f"bert_config.json: Google's uncased_L-12_H-768_A-12, i.e. bert-base-uncased)")


def option(opt, key, default, source, choices=None):
    """``opt[key]`` (the reference's argparse default when absent); with ``choices``, one of them or an error."""
    value = opt.get(key, default)
    if isinstance(value, bytes):  # a Python 2 str unpickled without an encoding
        value = value.decode("utf-8", "replace")
    if choices is not None and value not in choices:
        raise CheckpointError(f"{source}: option {key}={value!r}; itr's model implements "
                              f"{' or '.join(map(repr, choices))}")
    return value


def schedule(opt, lr, lr_update, epochs, batch):
    """The recipe's optim and train sections from the reference's train.py options (for fine-tuning)."""
    return ({"name": "adam", "lr": opt.get("learning_rate", lr), "lr_update": opt.get("lr_update", lr_update),
             "lr_decay": opt.get("lr_decay_gamma", 0.1)},
            {"epochs": opt.get("num_epochs", epochs), "batch_size": opt.get("batch_size", batch),
             "grad_clip": opt.get("grad_clip", 2.0)})


def paper_hinge(opt, warmup_epochs=0, max_violation=False):
    """The VSE++ ContrastiveLoss section of the references: it clears the diagonal only (no same-image mask)."""
    return {"margin": opt.get("margin", 0.2), "max_violation": bool(opt.get("max_violation", max_violation)),
            "warmup_epochs": warmup_epochs, "mask_same_image": False}


def eval_section(data):
    """COCO is scored 1K 5-fold (and 5K), Flickr30K 1K, as the papers report."""
    return {"protocol": "coco-5fold" if data["name"] == "coco" else "1k"}
