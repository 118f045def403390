"""A damaged checkpoint file (a truncated copy, a disk error) found before anything of it is loaded.

A resume reads safetensors (weights, RNG states, the EMA), torch's zip pickles (accelerate's optimizer state,
DeepSpeed's partitions) and JSON (``itr.json``, the tokenizer). Each format shows a cut-off file cheaply:
safetensors' header must cover the whole file, a zip ends with its central directory, JSON must parse. Without
this check the loaders fail with their own messages (``SafetensorError``, ``PytorchStreamReader failed``)
that name no file, or the refusal of a planted pickle misreports a truncated one.
"""
import json
import zipfile
from pathlib import Path

from itr.errors import DamagedCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6; older (legacy) pickles are left to the loader


def why_damaged(path: Path):
    """What is wrong with the file at ``path``, or None when its format looks whole."""
    try:
        if path.suffix in PICKLE_SUFFIXES or path.suffix == ".safetensors":
            with open(path, "rb") as f:
                if not f.read(1):
                    return "the file is empty"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in PICKLE_SUFFIXES:
            with open(path, "rb") as f:
                if f.read(4) == ZIP_MAGIC:
                    zipfile.ZipFile(f).close()  # reads the central directory at the end of the file
    except zipfile.BadZipFile as e:
        return f"its zip archive is cut short or corrupt: {e}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON: {e}"
    except Exception as e:  # safetensors' header errors, unreadable files
        return f"{type(e).__name__}: {e}"
    return None


def damaged(path, why, checkpoint):
    """The error for a damaged file of ``checkpoint``, with what to do instead."""
    checkpoint = Path(checkpoint)
    best = checkpoint.parent / "best"
    instead = "restore the file from a copy"
    if best != checkpoint and (best / "itr.json").is_file():
        instead += (f", start a new run from the best weights (--out NEW_DIR train.init_from={best}: the optimizer "
                    f"state and the data position start afresh)")
    return DamagedCheckpointError(
        f"{path} is damaged ({why}): the checkpoint {checkpoint} cannot be resumed (a truncated copy or a disk "
        f"error?) and nothing was trained. Either {instead}, or start afresh without train.resume")


def check(root, checkpoint=None):
    """Raise ``DamagedCheckpointError`` naming the first damaged file under ``root`` (a checkpoint directory, or its
    ``state/``; ``checkpoint``: the checkpoint it belongs to, default ``root``)."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (*PICKLE_SUFFIXES, ".safetensors", ".json"):
            why = why_damaged(p)
            if why:
                raise damaged(p, why, checkpoint or root)
