"""Released checkpoints of the reference repositories, into itr run directories.

    itr import CKPT --from FAMILY --out DIR [--vocab VOCAB] [--bert BERT_DIR] [--data-name f30k_precomp] [--set KEY=VALUE]

``DIR/best`` is then an ordinary itr checkpoint: ``itr eval DIR/best --data ...`` scores it with itr's exact
protocol, and ``itr train RECIPE train.init_from=DIR`` fine-tunes from it. Each family is one module here
(``vsepp.py``, ...) with a ``convert(ckpt, opt, req)`` that reads the checkpoint's options into a recipe and
renames its tensors into itr's modules (``fresh``: prefixes of training-only modules that the reference never
saves; they keep itr's initialization, as in a fresh run); this module does the rest the same way for all:
safe loading (``itr.imports.safe``), the tokenizer (the repository's word vocabulary, or a local BERT
directory), a complete mapping or an error listing the missing and unexpected keys and every shape that
differs, and the run directory written through the run-directory protocol. ``--set KEY=VALUE`` recipe
overrides pick among what one checkpoint can do (``model.test_mode=global`` for TGDT's test modes).
"""
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from itr.errors import CheckpointError, ConfigError

# --from name -> the module that converts it
FAMILIES = {name: name for name in ("vsepp", "scan", "vsrn", "selfalign_vsrn", "vse_infty", "hrem", "camera", "dime",
                                    "selfalign_camera", "teran", "tgdt")}


@dataclass
class ImportRequest:
    ckpt: Path
    family: str
    out: Path
    vocab: Optional[Path] = None  # the repository's word vocabulary (GRU text encoders)
    bert: Optional[Path] = None  # a local BERT directory (config + tokenizer) for BERT-based families
    data_name: Optional[str] = None  # overrides the data_name stored in the checkpoint's options
    overrides: tuple = ()  # dotted recipe overrides applied to the converted recipe (model.test_mode=global)


def family_module(name):
    if name not in FAMILIES:
        raise ConfigError(f"--from {name!r}: unknown family; choose one of {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"itr.imports.{FAMILIES[name]}")


def import_checkpoint(req: ImportRequest):
    """Convert ``req.ckpt`` into ``req.out/best``; returns that directory."""
    from itr.config import load_recipe
    from itr.imports.safe import load_reference, options
    from itr.models import build_model

    fam = family_module(req.family)
    ckpt = load_reference(req.ckpt, getattr(fam, "ALLOW", ()))
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{req.ckpt}: expected a dict (model state, options), got {type(ckpt).__name__}")
    opt = options(ckpt)
    conv = fam.convert(ckpt, opt, req)
    raw, text = conv["recipe"], conv["recipe"]["model"]["text"]
    if text["name"] in ("hf", "hf_words"):
        if not req.bert:
            raise ConfigError(f"--from {req.family}: this checkpoint has a BERT text encoder: pass --bert BERT_DIR, "
                              f"a local directory with its config and tokenizer (e.g. bert-base-uncased)")
        text["path"] = str(Path(req.bert).resolve())
    recipe = load_recipe(raw=raw, overrides=req.overrides)
    tokenizer = _tokenizer(recipe, req)
    model = build_model(recipe, conv["img_dim"], tokenizer)
    weights, fresh = dict(conv["weights"]), tuple(conv.get("fresh", ()))
    if fresh:  # training-only modules the reference never saves: itr's own initialization, as a fresh run's
        own = model.state_dict()
        weights.update({k: v for k, v in own.items() if k.startswith(fresh) and k not in weights})
    load_mapped(model, weights, req.ckpt)
    info = {"from": str(Path(req.ckpt).resolve()), "family": req.family,
            "options": {k: v for k, v in conv.get("options", opt).items()
                        if isinstance(v, (str, int, float, bool)) or v is None}}
    if fresh:
        info["initialized_fresh"] = list(fresh)
    return write_run(req.out, recipe, model.eval(), tokenizer, conv["img_dim"], info)


def _tokenizer(recipe, req):
    from itr.data.text import WordVocab
    from itr.imports.safe import read_vocab
    from itr.models import make_tokenizer

    if recipe.model.text.name in ("gru", "gru_words"):
        if not req.vocab:
            raise ConfigError(f"--from {req.family}: this checkpoint has a word-level GRU: pass --vocab VOCAB, the "
                              f"repository's vocabulary it was trained with (vocab/DATA_vocab.json or .pkl)")
        vocab = read_vocab(req.vocab, recipe.data.max_words)
        text = recipe.model.text
        if text.name == "gru_words" and text.config.mask_word and "<mask>" not in vocab.word2idx:
            vocab = WordVocab(vocab.idx2word + ["<mask>"], max_words=recipe.data.max_words)  # as its training did
        return vocab
    return make_tokenizer(recipe)


def load_mapped(model, weights, source):
    """Load converted ``weights`` into ``model``, all or nothing; a mismatch names every key that differs."""
    own = model.state_dict()
    weights = dict(weights)
    for k in own:  # BatchNorm counters that older PyTorch lacks; BERT's position-id buffer, saved by some versions
        if k.endswith(("num_batches_tracked", "embeddings.position_ids")) and k not in weights:
            weights[k] = own[k]
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: itr expects {tuple(own[k].shape)}, the checkpoint has {tuple(weights[k].shape)}"
              for k in sorted(own) if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing: {missing[:8]}" if missing else "",
                 f"{len(unexpected)} unexpected: {unexpected[:8]}" if unexpected else "",
                 "shapes differ: " + "; ".join(shapes[:6]) if shapes else ""]
        raise CheckpointError(f"{source} does not map onto the model its options describe ("
                              + ", ".join(p for p in parts if p) + "). A vocabulary size that differs means another "
                              "--vocab; other sizes, options this family's importer reads (see docs/models.md)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()}, strict=True)


def write_run(out, recipe, model, tokenizer, img_dim, info):
    """``out/best``: weights, recipe, tokenizer and ``itr.json`` (with where they came from), committed atomically."""
    from itr import checkpoint as ckpt
    from itr import rundir
    from itr.config import to_dict
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best, tmp, _ = rundir.paths(out / "best")
    rundir.trash(tmp)
    tmp.mkdir(parents=True)
    ckpt.write_weights(model.state_dict(), tmp / ckpt.WEIGHTS)
    (tmp / ckpt.RECIPE).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    ckpt.save_tokenizer(tokenizer, model, tmp)
    meta = {"img_dim": img_dim, "world_size": 1, "imported": info}
    (tmp / ckpt.META).write_text(json.dumps(meta, indent=1))
    rundir.fsync_tree(tmp)
    rundir.commit(tmp, best)
    return best
