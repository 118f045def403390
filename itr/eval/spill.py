"""Embeddings kept in a node-local file and read tile by tile, so that a rank's memory does not grow with the
gallery.

Held in RAM, a split's embeddings are the one part of the evaluation job that grows with the gallery: every
rank scores tiles from every row block, so each holds all of them (0.57 GiB at 100K images x 500K captions,
d = 256). Above ``eval.spill_gib`` the embedding stage writes them instead, round by round as the ranks
all-gather their batches, into an unlinked file of each rank (``eval.spill_dir``, default the system's
temporary folder: on a cluster, the node's local disk); a tile then reads its rows with ``preadv`` into a
fresh buffer. Reads go through the page cache, never a memory map, so the pages are not charged to the
process's RSS. The rows read back are the float32 values written, so scores, ranks and metrics are bitwise
those of the in-memory path. The file has no name from the moment it is made: a killed job leaves nothing.

Only plain (n, d) embeddings spill; token-level models' dicts of padded word/region features stay in memory.
"""
import os
import tempfile

import numpy as np
import torch


class DiskRows:
    """An (n, d) float32 matrix in an unlinked file: ``x[lo:hi]`` reads rows as a tensor, ``x.shape`` as a tensor's."""

    dtype = torch.float32

    def __init__(self, n, dim, folder=None):
        folder = folder or tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="itr-emb-", suffix=".f32", dir=folder)
        os.unlink(path)
        self.fd, self.shape, self.row, self.folder = fd, torch.Size((n, dim)), dim * 4, folder
        os.ftruncate(fd, n * self.row)

    def write(self, index, values):
        """Rows ``index`` (ascending or not) <- ``values`` (len(index), d); contiguous runs go in one write."""
        values = np.ascontiguousarray(values.detach().cpu().float().numpy() if torch.is_tensor(values) else values,
                                      dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError("NaN or inf in the embeddings: the model diverged or the input is bad")
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        index, values = index[order], values[order]
        cuts = np.flatnonzero(np.diff(index) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(index)]):
            _write_all(self.fd, values[a:b], int(index[a]) * self.row)

    def __getitem__(self, s):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("DiskRows reads row ranges: x[lo:hi]")
        lo, hi, _ = s.indices(self.shape[0])
        out = np.empty((max(hi - lo, 0), self.shape[1]), np.float32)
        if out.size:
            _read_all(self.fd, out, lo * self.row)
        return torch.from_numpy(out)

    def __len__(self):
        return self.shape[0]

    def is_floating_point(self):
        return True

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def _write_all(fd, arr, offset):
    view = memoryview(arr).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _read_all(fd, out, offset):
    view = memoryview(out).cast("B")
    while len(view):
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError(f"short read of the spilled embeddings at byte {offset}")
        view, offset = view[done:], offset + done


def should_spill(n, dim, gib):
    """Whether (n, dim) float32 embeddings go to disk: above ``gib`` GiB; ``gib`` 0 always, < 0 never."""
    return gib is not None and gib >= 0 and n * dim * 4 > gib * 2 ** 30
