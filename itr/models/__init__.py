"""Models, one file each, registered by name (``model.name`` in a recipe).

Every model is an ``itr.models.base.MatchingModel``: ``embed`` + ``batch_loss`` for training
(joined by ``forward``), ``embed_images`` / ``embed_captions`` / ``score`` for evaluation.
"""
import importlib
import pkgutil

from itr.modules import encoders as _encoders  # noqa: F401  (registers encoders)
from itr.modules import fragments as _fragments  # noqa: F401  (registers the token-level encoders)
from itr.registry import MODELS

# One file per model: importing each module of this package registers its model.
for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def model_config(recipe):
    """(registry entry, typed config) of the recipe's model (``recipe.model`` is built once, when the recipe loads)."""
    return MODELS.get(recipe.model.name), recipe.model.config


def make_tokenizer(recipe, captions=None, vocab_file=None):
    """The caption tokenizer of the recipe's text encoder (a GRU vocabulary is built from ``captions``)."""
    from itr.modules.encoders import text_entry

    _, mcfg = model_config(recipe)
    entry, tcfg = text_entry(mcfg.text)
    return entry.build.make_tokenizer(tcfg, max_words=recipe.data.max_words, captions=captions, vocab_file=vocab_file)


def build_model(recipe, img_dim, tokenizer):
    """The recipe's model, with its loss (``recipe.loss``) built in."""
    entry, mcfg = model_config(recipe)
    return entry.build(mcfg, img_dim, tokenizer, recipe.loss)
