"""Reading what the reference repositories release, without running anything they might contain.

A released checkpoint is a pickle (``torch.save`` of a dict holding state dicts and the training options, an
``argparse.Namespace``). It is read with ``torch.load(weights_only=True)``, only the globals a family's files
need allowed (``argparse.Namespace`` always); anything else is refused, naming the file and the global.
Word vocabularies come from the repositories' JSON files, or from their pickles (``vocab.py``'s
``Vocabulary``) through an unpickler that builds plain containers and nothing else.
"""
import argparse
import io
import json
import pickle
import re
from pathlib import Path

from itr.errors import CheckpointError


def load_reference(path, allow=()):
    """The unpickled checkpoint at ``path`` (tensors, containers, options), loaded weights-only."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *allow]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the global {found.group(1)}" if found else str(e).splitlines()[0][:200]
        raise CheckpointError(f"refusing to unpickle {path}: it needs {what}, which no released checkpoint of this "
                              f"family holds (only tensors, containers and argparse options are read)") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def options(ckpt, key="opt"):
    """The training options a checkpoint stores (``argparse.Namespace`` or dict) as a dict; {} when absent."""
    opt = ckpt.get(key) if isinstance(ckpt, dict) else None
    if opt is None:
        return {}
    return dict(vars(opt)) if isinstance(opt, argparse.Namespace) else dict(opt)


# ----------------------------------------------------------------------------- vocabularies


class _Plain:
    """What a pickled ``Vocabulary`` becomes: its attributes, and no methods of its own."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"a vocabulary's state must be a dict, got {type(state).__name__}")
        self.__dict__.update(state)


def _reconstruct(cls, base, state):
    """``copy_reg._reconstructor`` (protocol 0/1 pickles of plain objects), for the one class allowed."""
    if cls is not _Plain or base is not object or state is not None:
        raise pickle.UnpicklingError("only a plain vocabulary object may be reconstructed")
    return _Plain()


class _VocabUnpickler(pickle.Unpickler):
    """Accepts a ``Vocabulary`` (any module: ``vocab``, ``__main__``) made of dicts, lists, strings and ints."""

    def find_class(self, module, name):
        if name == "Vocabulary":
            return _Plain
        if (module, name) in (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")):
            return _reconstruct
        if (module, name) in (("__builtin__", "object"), ("builtins", "object")):
            return object
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _check_plain(x, depth=0):
    if depth > 3 or not isinstance(x, (dict, list, str, int)):
        raise CheckpointError(f"unexpected {type(x).__name__} in a vocabulary")
    if isinstance(x, dict):
        for k, v in x.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _check_plain(v, depth + 1)


def _idx2word(word2idx, idx2word, path):
    n = len(word2idx)
    if isinstance(idx2word, dict):
        words = [idx2word.get(i, idx2word.get(str(i))) for i in range(n)]
    else:
        words = list(idx2word)[:n]
    if len(words) != n or any(w is None for w in words) or any(word2idx.get(w) != i for i, w in enumerate(words)):
        raise CheckpointError(f"{path}: word2idx and idx2word disagree (or ids are not 0..{n - 1})")
    return words


def read_vocab(path, max_words=0):
    """A released word vocabulary (JSON ``{word2idx, idx2word, idx}`` or a ``vocab.py`` pickle) as a ``WordVocab``."""
    from itr.data.text import SPECIALS, WordVocab

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"vocabulary {path} does not exist (pass the repository's vocab file with --vocab)")
    raw = path.read_bytes()
    if path.suffix == ".json":
        d = json.loads(raw.decode("utf-8"))
    else:
        try:
            obj = _VocabUnpickler(io.BytesIO(raw), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise CheckpointError(f"refusing to unpickle {path}: {e} (only a vocab.py Vocabulary of plain "
                                  f"dicts, lists, strings and ints is read)") from None
        d = obj.__dict__ if isinstance(obj, _Plain) else obj
    if not isinstance(d, dict) or "word2idx" not in d or "idx2word" not in d:
        raise CheckpointError(f"{path}: not a word vocabulary (expected word2idx and idx2word)")
    _check_plain(d["word2idx"])
    _check_plain(d["idx2word"])
    words = _idx2word(d["word2idx"], d["idx2word"], path)
    if words[:len(SPECIALS)] != SPECIALS:
        raise CheckpointError(f"{path}: the vocabulary starts with {words[:4]}, expected {SPECIALS}")
    return WordVocab(words, max_words=max_words)
