"""Reading files that several processes write into: SLURM logs (every rank of every node), the MLflow journal.

One process's write can land inside another's multi-byte character, and the log then is not valid UTF-8;
a strict reader fails on a file that is fine to read. These are decoded with replacement instead."""
from pathlib import Path


def read_log(path, tail=None, missing_ok=False):
    """The text of a log (its last ``tail`` characters), undecodable bytes as U+FFFD; "" when ``missing_ok``
    and there is no such file."""
    p = Path(path)
    if missing_ok and not p.is_file():
        return ""
    text = p.read_text(encoding="utf-8", errors="replace")
    return text[-tail:] if tail else text
