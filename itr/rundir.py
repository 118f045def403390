"""The run directory's write protocol: no kill, at any instant, loses a finished step or leaves a state a
resume misreads. docs/training.md ("The run directory") is the written form; this is the code.

- A checkpoint ``NAME`` (``last``, ``best``) is complete when its ``itr.json`` exists: it is written last,
  after every other file is fsynced. A checkpoint is built in ``.NAME.tmp`` and committed by two
  renames (``NAME`` -> ``.NAME.old``, ``.NAME.tmp`` -> ``NAME``); the old one is then deleted.
- Nothing is deleted in place: a directory is first renamed to ``.trash.*`` (atomic), then removed, so a
  kill mid-delete never leaves a half-deleted directory under a name the protocol reads.
- ``recover`` runs before a resume reads anything: it turns whatever a kill left into one committed
  ``NAME`` (rolling a completed swap forward, an interrupted one back) and empties the trash.
- Small files (``results.json``) are written to a temporary name and renamed.
- One ``itr train`` per directory: ``RunLock`` holds an exclusive ``flock`` on ``DIR/.lock`` for the run's
  life; the kernel releases it when the holder dies, however it dies, so a lock is never stale.

``ITR_FAULT=kill@POINT[:N]`` (a test hook) SIGKILLs the process the N-th time it reaches ``POINT``
(``term@``: SIGTERM, a preemption); ``ITR_FAULT_TRACE=FILE`` appends every point reached to FILE (how the
tests find all of them). The trainer also marks ``step K`` after each optimizer step.
"""
import json
import os
import shutil
import signal
import socket
import time
import uuid
from pathlib import Path

from itr.errors import ItrError

META = "itr.json"
TRASH = ".trash."
_hits = {}


def reset_faults():
    """Count ``ITR_FAULT`` points from zero (each training run in a process does: in-process tests run several)."""
    _hits.clear()


def fault(point):
    """A protocol point: traced, and the process killed there when ``ITR_FAULT`` names it (tests only)."""
    trace = os.environ.get("ITR_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(point + "\n")
    how, _, spec = os.environ.get("ITR_FAULT", "").partition("@")
    if how not in ("kill", "term"):
        return
    name, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    if name == point:
        _hits[point] = _hits.get(point, 0) + 1
        if _hits[point] == int(n):
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGTERM)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def complete(path):
    return (Path(path) / META).is_file()


def trash(path, point=None):
    """Delete a directory so that a kill cannot half-do it: rename it out of the protocol's names, then remove."""
    path = Path(path)
    if not path.exists():
        return
    dead = path.parent / f"{TRASH}{path.name.lstrip('.')}.{uuid.uuid4().hex[:8]}"
    os.replace(path, dead)
    fsync_dir(path.parent)
    if point:
        fault(point)
    shutil.rmtree(dead, ignore_errors=True)


def paths(dst):
    dst = Path(dst)
    return dst, dst.parent / f".{dst.name}.tmp", dst.parent / f".{dst.name}.old"


def commit(tmp, dst):
    """Swap the complete checkpoint ``tmp`` in as ``dst`` (two renames), then delete the one it replaced."""
    dst, _, old = paths(dst)
    name = dst.name
    fault(f"{name}: tmp written")
    if dst.exists():
        trash(old)  # a leftover of an interrupted delete; recover() leaves none, this is belt and braces
        os.replace(dst, old)
        fsync_dir(dst.parent)
        fault(f"{name}: old moved aside")
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    fault(f"{name}: new in place")
    trash(old, f"{name}: old renamed to trash")
    fault(f"{name}: old deleted")


def recover(dst):
    """Leave one committed ``dst`` (or none) whatever point of ``commit`` a kill interrupted; main process only.

    ``dst`` complete: an unswapped ``.tmp`` and a leftover ``.old`` go (the swap had not begun, or had
    finished). ``dst`` missing: the kill fell between the two renames; the complete ``.tmp`` (newer) is
    renamed in, else a complete ``.old``. Returns what it did, for the log."""
    dst, tmp, old = paths(dst)
    for dead in dst.parent.glob(f"{TRASH}{dst.name}.*"):
        shutil.rmtree(dead, ignore_errors=True)
    did = None
    if not complete(dst):
        for cand in (tmp, old):
            if complete(cand):
                trash(dst)  # an incomplete dst exists only if something outside this protocol made it
                os.replace(cand, dst)
                fsync_dir(dst.parent)
                fault(f"{dst.name}: recovered")
                did = f"{dst} recovered from {cand.name} (a kill interrupted its last save)"
                break
    trash(tmp)
    trash(old)
    return did


def write_text_atomic(path, text):
    """Write a small file so that a reader sees the old or the new content, never a part."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    fault(f"{path.name}: written")


class RunLock:
    """An exclusive lock on a run directory for this process's life (``DIR/.lock``, holder's pid and host)."""

    def __init__(self, run_dir):
        import fcntl

        self.path = Path(run_dir) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(self.fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']}, since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise ItrError(f"{run_dir} is in use by another `itr train` ({who}): two runs cannot share a run "
                           f"directory. Wait for it to finish, stop it, or give this run another --out") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
