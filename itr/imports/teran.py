"""TERAN (mesnico/TERAN) released checkpoints: ``pretrained_models/*.pth`` of ``TERAN_pretrained_models.tgz``.

Layout (train.py@85c186b ``save_checkpoint``; test.py@85c186b rebuilds the model from ``checkpoint['config']``):
a dict with ``epoch``, ``model`` (``TERAN.state_dict()``), ``optimizer``, ``scheduler``, ``opt`` (train.py's
argparse options: ``num_epochs``), ``config`` (the training YAML as a nested dict, configs/teran_*.yaml) and
``Eiters``. The ``model`` keys (models/teran.py, text.py, visual.py, utils.py @85c186b), under ``img_txt_enc.``:

- ``txt_enc.bert_model.*``: a transformers-2.3 ``BertModel`` of ``extraction-hidden-layer`` layers, pooler
  included; ``txt_enc.word_embeddings.weight`` (the same tensor registered twice); ``txt_enc.map.*`` (unused);
- ``img_enc.pos_encoding_image.map.*`` (concat-and-process: Linear(D+5, D), ReLU, Linear(D, D)),
  ``img_enc.transformer_encoder.layers.N.*`` (``nn.TransformerEncoderLayer``, 4 heads, ff 2048), ``img_enc.fc.*``;
- ``cap_proj.*``, ``img_proj.*``, ``transformer_encoder_1.*`` (text; images too with ``shared-transformer``),
  ``transformer_encoder_2.*`` (images).

Options read (``config``): model.embed-size, layers, dropout, shared-transformer; image-model.transformer-layers,
pos-encoding; text-model.fine-tune; training.margin, max-violation, lr, bs, grad-clip, scheduler, step-size,
gamma, warmup, warmup-period; dataset.name; and ``opt.num_epochs``. Refused, naming the option: anything whose
evaluation itr's ``teran`` does not compute (loss-type other than ``alignment``: evaluation.py then scores
the global tokens; alignment-mode other than MrSw; exclude-stopwords; a GRU, pre-extracted or post-transformer
text model; a non-bottom-up image model). Not carried, as they feed neither the alignment score nor its loss:
BERT's pooler, ``txt_enc.map``, ``img_enc.fc`` and the aggregators' weights. The TGDT importer reuses these
helpers: TGDT is TERAN's code with a second stage.
"""
from itr.errors import CheckpointError

HEADS, FF = 4, 2048  # nn.TransformerEncoderLayer(nhead=4, dim_feedforward=2048) everywhere in the reference
BERT = "img_txt_enc.txt_enc.bert_model."
WORDS = "img_txt_enc.txt_enc.word_embeddings.weight"  # the BERT's input embeddings, registered a second time
UNUSED = (BERT + "pooler.", BERT + "embeddings.position_ids", "img_txt_enc.txt_enc.map.", "img_txt_enc.img_enc.fc.",
          "img_txt_enc.text_aggregation.", "img_txt_enc.image_aggregation.", WORDS)
_MISSING = object()


# ----------------------------------------------------------------------------- helpers shared with tgdt.py


def parts(ckpt, source):
    """(model state dict, training config) of a TERAN-style checkpoint."""
    model, config = ckpt.get("model"), ckpt.get("config")
    if not isinstance(model, dict) or not all(hasattr(v, "shape") for v in model.values()):
        raise CheckpointError(f"{source}: expected 'model' to be the model's state dict, as TERAN's train.py "
                              f"save_checkpoint writes it; got {type(model).__name__}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: no 'config' (the training YAML, a dict, that test.py rebuilds the model "
                              f"from); got {type(config).__name__}")
    return model, config


def option(config, key, source, default=_MISSING):
    """``config['a']['b']`` for ``key='a.b'``; a missing key without a default is an error naming it."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise CheckpointError(f"{source}: the checkpoint's config has no {key!r}")
            return default
        node = node[part]
    return node


def require(config, source, key, allowed, default, why):
    """Refuse a config value itr's model does not compute, naming the option, its value and why."""
    value = option(config, key, source, default)
    if value not in allowed:
        raise CheckpointError(f"{source}: config {key}={value!r} ({why}); "
                              f"itr imports {' or '.join(map(repr, allowed))}")
    return value


def flat(config, prefix=""):
    """The config's plain values as dotted keys (``training.lr``), recorded in itr.json."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def common_checks(config, source):
    """What TERAN and TGDT share: a BERT read token by token, bottom-up regions, MrSw alignment."""
    require(config, source, "text-model.name", ("bert",), None, "itr maps TERAN's BERT text encoder only")
    require(config, source, "text-model.pre-extracted", (False,), False, "pre-extracted BERT features: the checkpoint "
            "holds no BERT")
    require(config, source, "text-model.layers", (0,), 0, "a transformer after BERT inside EncoderTextBERT")
    require(config, source, "image-model.name", ("bottomup",), None, "region features with boxes")
    require(config, source, "model.exclude-stopwords", (False,), False, "stopwords removed from the alignment")
    require(config, source, "training.alignment-mode", ("MrSw",), "MrSw", "itr scores max over regions, sum over words")


def rename(state, table, unused, source):
    """The checkpoint's tensors under itr's names: each key's first matching (reference prefix, itr prefix) of
    ``table``; keys starting with an ``unused`` prefix are dropped; any other key is an error naming it."""
    out, unknown = {}, []
    for k, v in state.items():
        hit = next(((a, b) for a, b in table if k.startswith(a)), None)
        if hit is not None and not k.startswith(unused):
            out[hit[1] + k[len(hit[0]):]] = v
        elif not k.startswith(unused):
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors that are not part of the reference model this family "
                              f"reads: {sorted(unknown)[:8]}")
    if WORDS in state and BERT + "embeddings.word_embeddings.weight" in state and \
            not state[WORDS].equal(state[BERT + "embeddings.word_embeddings.weight"]):
        raise CheckpointError(f"{source}: {WORDS} differs from the BERT's word embeddings it should alias")
    return out


def bert_depth(state, config, source):
    """Layers of the checkpoint's BERT; it must agree with text-model.extraction-hidden-layer."""
    ids = {int(k[len(BERT) + len("encoder.layer."):].split(".")[0]) for k in state
           if k.startswith(BERT + "encoder.layer.")}
    if not ids:
        raise CheckpointError(f"{source}: no BERT layers ({BERT}encoder.layer.N.*) in the model state")
    n = max(ids) + 1
    stored = option(config, "text-model.extraction-hidden-layer", source, n)
    if stored != n:
        raise CheckpointError(f"{source}: config text-model.extraction-hidden-layer={stored} but the BERT in the "
                              f"model state has {n} layers")
    return n


def text_section(config, source):
    """hf_words (the path comes from --bert); text-model.fine-tune false trained with the BERT frozen."""
    return {"name": "hf_words", "freeze": not option(config, "text-model.fine-tune", source, True)}


def data_section(config, req):
    name = (req.data_name or option(config, "dataset.name", req.ckpt, "")).replace("_precomp", "")
    out = {"name": name, "root": f"data/{name or 'DATA'}_precomp"}
    if name == "coco":
        out["test_split"] = "testall"
    return out


def schedule(config, opt, req):
    """data, loss, optim, train and eval sections from config.training (train.py: Adam, StepLR by epoch,
    pytorch_warmup.LinearWarmup) and opt.num_epochs."""
    src = req.ckpt
    data = data_section(config, req)
    epochs = int(opt.get("num_epochs", 30))
    step = option(config, "training.scheduler", src, None) == "steplr"
    linear = option(config, "training.warmup", src, None) == "linear"
    return {
        "data": data,
        "loss": {"margin": option(config, "training.margin", src, 0.2), "warmup_epochs": 0, "mask_same_image": False,
                 "max_violation": bool(option(config, "training.max-violation", src, False))},
        "optim": {"name": "adam", "lr": option(config, "training.lr", src), "text_lr_mult": 1.0,
                  "lr_update": option(config, "training.step-size", src, epochs) if step else max(epochs, 1),
                  "lr_decay": option(config, "training.gamma", src, 0.1) if step else 1.0,
                  "warmup_steps": option(config, "training.warmup-period", src, 0) if linear else 0},
        "train": {"epochs": epochs, "batch_size": option(config, "training.bs", src),
                  "grad_clip": max(0.0, float(option(config, "training.grad-clip", src, 2.0)))},
        "eval": {"protocol": "coco-5fold" if data["name"] == "coco" else "1k"},
    }


def recorded(opt, config):
    return {**opt, **flat(config)}


# ----------------------------------------------------------------------------- TERAN


def convert(ckpt, opt, req):
    state, config = parts(ckpt, req.ckpt)
    src = req.ckpt
    common_checks(config, src)
    require(config, src, "training.loss-type", ("alignment",), None, "evaluation.py@85c186b scores by the "
            "alignment only then; otherwise by the global tokens, which itr's teran does not build")
    pos = require(config, src, "image-model.pos-encoding", ("concat-and-process", "project-and-sum", None), None,
                  "box positional encoding")
    shared = bool(option(config, "model.shared-transformer", src, False))
    table = [(BERT, "txt_enc.backbone."), ("img_txt_enc.cap_proj.", "txt_enc.proj."),
             ("img_txt_enc.img_enc.pos_encoding_image.", "pos."),
             ("img_txt_enc.img_enc.transformer_encoder.", "img_tf."),
             ("img_txt_enc.img_proj.", "img_proj."), ("img_txt_enc.transformer_encoder_1.", "txt_tf.")]
    if not shared:
        table.append(("img_txt_enc.transformer_encoder_2.", "img_tf2."))
    weights = rename(state, table, UNUSED, src)
    if "img_proj.weight" not in weights:
        raise CheckpointError(f"{src}: no img_txt_enc.img_proj.weight in the model state")
    recipe = {
        "model": {"name": "teran", "embed_dim": option(config, "model.embed-size", src),
                  "image_layers": option(config, "image-model.transformer-layers", src),
                  "layers": option(config, "model.layers", src), "heads": HEADS, "ff_dim": FF,
                  "dropout": option(config, "model.dropout", src, 0.1), "shared_transformer": shared,
                  "pos_encoding": pos or "none", "text_layers": bert_depth(state, config, src), "drop_last_word": True,
                  "text": text_section(config, src)},
        **schedule(config, opt, req),
    }
    return {"recipe": recipe, "weights": weights, "img_dim": weights["img_proj.weight"].shape[1],
            "options": recorded(opt, config)}
