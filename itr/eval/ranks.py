"""Ranks of the ground truths by counting, tile by tile: no sort, and no full matrix needed.

The rank of a target is the number of candidates that score strictly higher, plus the tied candidates with a
smaller index (OpenCLIP's deterministic tie-break, ``open_clip_train/metrics.py``). Counting strictly-higher
alone would let a collapsed model (all scores equal) score R@1 = 100; with the index tie-break it scores
chance, as it should. Without ties (real float scores) both rules agree. Ranks are 0-based: R@K counts < K.

Image -> text: a query's rank is that of the best of its 5 captions (vsepp ``i2t``): the first maximum among
them decides (any other caption of the image ranks below it). Text -> image: caption ``j``'s target is image
``j // 5`` (vsepp ``t2i``).

Counting needs no order: a candidate before the target (smaller index) counts when it scores at least as high,
one after it when it scores strictly higher. So a tile of scores adds, to each of its image rows and caption
columns, one compare-and-count pass; the band of columns (rows) around the targets is the only part that
looks at indices. ``RankCounts`` folds tiles into O(n + m) counters, in any order, from any rank (the sum of
counters from disjoint tiles is exact); ``ranks_of`` is the same over a whole matrix.
"""
import numpy as np


def check_shape(shape, caps_per_image=5):
    if len(shape) != 2:
        raise ValueError(f"similarity matrix must be 2-D, got shape {tuple(shape)}")
    n, m = shape
    if m != caps_per_image * n:
        raise ValueError(f"similarity matrix {n} x {m}: expected {caps_per_image} x {n} = {caps_per_image * n} "
                         f"caption columns (caption j belongs to image j // {caps_per_image})")


def _per_row(mask):
    """Row sums of a bool matrix (count_nonzero per row is SIMD popcount; with axis= it is ~3x slower)."""
    return np.fromiter((np.count_nonzero(r) for r in mask), np.int64, len(mask))


def _per_col(mask):
    """Column sums of a bool matrix, as uint8 sums of at most 255 rows at a time (~2x count_nonzero(axis=0))."""
    v, out = mask.view(np.uint8), np.zeros(mask.shape[1], np.int64)
    for k in range(0, len(v), 255):
        out += v[k:k + 255].sum(0, dtype=np.uint8)
    return out


def _above(tile, g, j, start, axis):
    """The mask of candidates ranked above each query's target; candidates along ``axis`` (indices start..),
    queries along the other; target j[q] with score g[q]."""
    length = tile.shape[axis]
    lo, hi = int(np.clip(j.min() - start, 0, length)), int(np.clip(j.max() - start + 1, 0, length))
    gq = g[:, None] if axis == 1 else g[None, :]
    cut = (lambda a, b: tile[:, a:b]) if axis == 1 else (lambda a, b: tile[a:b])
    mask = np.empty(tile.shape, bool)
    into = (lambda a, b: mask[:, a:b]) if axis == 1 else (lambda a, b: mask[a:b])
    np.greater_equal(cut(0, lo), gq, out=into(0, lo))  # before every target: at least as high counts
    np.greater(cut(hi, length), gq, out=into(hi, length))  # after every target: strictly higher
    if hi > lo:  # the band holding the targets: before each one >=, after it >
        band, idx = cut(lo, hi), np.arange(start + lo, start + hi)
        before = idx[None, :] < j[:, None] if axis == 1 else idx[:, None] < j[None, :]
        np.logical_or(band > gq, (band == gq) & before, out=into(lo, hi))
    return mask


def count_above_rows(tile, g, j, c0=0):
    """(q,) candidates of ``tile`` (q queries x w candidates c0..c0+w) ranked above each query's target, the
    target being candidate ``j[r]`` (global index) with score ``g[r]``."""
    return _per_row(_above(tile, g, j, c0, axis=1))


def count_above_cols(tile, g, j, r0=0):
    """``count_above_rows`` with the queries along the columns (candidates r0..r0+h along the rows)."""
    return _per_col(_above(tile, g, j, r0, axis=0))


class RankCounts:
    """The counters of one block (n images x caps_per_image * n captions), from its ground-truth scores ``gt``
    (n, caps_per_image): ``gt[i, k]`` is the score of image i with caption ``caps_per_image * i + k``."""

    def __init__(self, gt):
        gt = np.asarray(gt, dtype=np.float32)
        if np.isnan(gt).any():
            raise ValueError(f"NaN ground-truth scores for images {np.flatnonzero(np.isnan(gt).any(1))[:5].tolist()}: "
                             f"the model diverged or the input is bad")
        n, k = gt.shape
        best = gt.argmax(1)  # the first maximum among the image's captions decides its i2t rank
        self.g_i2t, self.j_i2t = gt[np.arange(n), best], k * np.arange(n) + best
        self.g_t2i, self.j_t2i = gt.reshape(-1), np.arange(n * k) // k
        self.i2t, self.t2i = np.zeros(n, np.int64), np.zeros(n * k, np.int64)

    def add(self, tile, i0, j0):
        """Fold in a tile of scores: images i0.., captions j0.. (indices within the block)."""
        i1, j1 = i0 + tile.shape[0], j0 + tile.shape[1]
        self.i2t[i0:i1] += count_above_rows(tile, self.g_i2t[i0:i1], self.j_i2t[i0:i1], j0)
        self.t2i[j0:j1] += count_above_cols(tile, self.g_t2i[j0:j1], self.j_t2i[j0:j1], i0)

    def ranks(self):
        return self.i2t, self.t2i


def ground_truth(sims, caps_per_image=5):
    """(n, caps_per_image) ground-truth scores read off a full matrix."""
    n = sims.shape[0]
    rows = np.arange(n)[:, None]
    return np.asarray(sims[rows, caps_per_image * rows + np.arange(caps_per_image)[None, :]], dtype=np.float32)


def ranks_of(sims, caps_per_image=5, rows=256, cols=4096):
    """(i2t ranks, t2i ranks) of a whole (n, caps_per_image n) matrix (an array or a memmap), in tiles."""
    check_shape(sims.shape, caps_per_image)
    n, m = sims.shape
    counts = RankCounts(ground_truth(sims, caps_per_image))
    for i0 in range(0, n, rows):
        for j0 in range(0, m, cols):
            tile = np.asarray(sims[i0:i0 + rows, j0:j0 + cols], dtype=np.float32)
            if np.isnan(tile.sum()) and np.isnan(tile).any():  # (the sum reads the tile from cache: nearly free)
                raise ValueError(f"similarity matrix has NaN in rows {i0}..{min(n, i0 + rows) - 1}: the model "
                                 f"diverged or the input is bad")
            counts.add(tile, i0, j0)
    return counts.ranks()


def i2t_ranks(sims, caps_per_image=5, chunk=None):
    return ranks_of(sims, caps_per_image)[0]


def t2i_ranks(sims, caps_per_image=5, chunk=None):
    return ranks_of(sims, caps_per_image)[1]
