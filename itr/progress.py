"""Progress bars that survive many ranks and log files: every bar in itr comes from ``bar``.

Only rank 0 draws one. On a terminal it is tqdm's usual bar. Into a file or a pipe (a SLURM log, a test) it is
plain ASCII, one whole line at most every ``ITR_PROGRESS_SECONDS`` (default 30) and one at the end: no carriage
returns redrawing a line thousands of times, and no multi-byte block characters that another process's write
into the same log can split (a reader then fails to decode the file; ``itr.logs.read_log`` copes with that too).
"""
import os
import sys

from tqdm import tqdm

INTERVAL_ENV = "ITR_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def rank():
    """This process's global rank from the launcher's environment (RANK, else SLURM_PROCID), 0 when alone."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _is_tty(f):
    try:
        return f.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interval():
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class _Lines:
    """A file for tqdm that turns its redraws (``'\\r' + bar + padding``, cursor moves) into whole lines, each once."""

    def __init__(self, f):
        self.f, self.last = f, None

    def write(self, s):
        for part in s.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            line = part.rstrip()
            if line and line != self.last:
                self.f.write(line + "\n")
                self.last = line

    def flush(self):
        self.f.flush()


class _LogBar(tqdm):
    """In a log, a new postfix or description waits for the next timed line instead of writing one now."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


def bar(iterable=None, *, enabled=True, file=None, **kw):
    """A tqdm bar (``total``, ``desc``, ``unit``, ... as tqdm's), a silent one unless ``enabled`` on rank 0."""
    f = file if file is not None else sys.stderr
    if not enabled or rank() != 0:
        return tqdm(iterable, disable=True, **kw)
    if _is_tty(f):
        return tqdm(iterable, file=f, **kw)
    every = interval()
    kw.update(ascii=True, ncols=100, dynamic_ncols=False, leave=True, position=0, mininterval=every,
              maxinterval=max(every, 10.0), miniters=1)
    return _LogBar(iterable, file=_Lines(f), **kw)
