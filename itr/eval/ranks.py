"""Ranks from an (n_images, 5 x n_images) similarity matrix, by counting, in row chunks.

The rank of a ground truth is the number of candidates that score strictly higher,
plus the tied candidates with a smaller index (OpenCLIP's deterministic tie-break,
``open_clip_train/metrics.py``). No sort, memory O(chunk x candidates). Counting
strictly-higher alone would let a collapsed model (all scores equal) score R@1 = 100;
with the index tie-break it scores chance, as it should. Without ties (real float
scores) both rules agree.

Image -> text: a query's rank is that of the best of its 5 captions (vsepp ``i2t``).
Text -> image: caption ``j``'s ground truth is image ``j // 5`` (vsepp ``t2i``).
Ranks are 0-based: R@K counts ranks < K.
"""
import numpy as np
import torch


def _check(sims, caps_per_image):
    if sims.ndim != 2:
        raise ValueError(f"similarity matrix must be 2-D, got shape {tuple(sims.shape)}")
    n, m = sims.shape
    if m != caps_per_image * n:
        raise ValueError(f"similarity matrix {n} x {m}: expected {caps_per_image} x {n} = {caps_per_image * n} "
                         f"caption columns (caption j belongs to image j // {caps_per_image})")


def _rank_of(scores, target_idx, cand_idx):
    """Rank of column ``target_idx[r]`` in row ``r`` of ``scores`` (rows x candidates)."""
    t = scores.gather(1, target_idx[:, None])
    higher = (scores > t).sum(1)
    ties_before = ((scores == t) & (cand_idx[None, :] < target_idx[:, None])).sum(1)
    return higher + ties_before


def _rows(sims, r0, r1):
    block = torch.from_numpy(np.array(sims[r0:r1])) if isinstance(sims, np.ndarray) else sims[r0:r1]  # copy: mmap is read-only
    if torch.isnan(block).any():
        raise ValueError(f"similarity matrix has NaN in rows {r0}..{r1 - 1}: the model diverged or the input is bad")
    return block


def i2t_ranks(sims, caps_per_image=5, chunk=1024):
    _check(sims, caps_per_image)
    n, m = sims.shape
    cand = torch.arange(m)
    out = np.empty(n, dtype=np.int64)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        block = _rows(sims, r0, r1)
        img = torch.arange(r0, r1)
        best = None
        for k in range(caps_per_image):
            r = _rank_of(block, caps_per_image * img + k, cand)
            best = r if best is None else torch.minimum(best, r)
        out[r0:r1] = best.numpy()
    return out


def t2i_ranks(sims, caps_per_image=5, chunk=1024):
    _check(sims, caps_per_image)
    n, m = sims.shape
    cand = torch.arange(n)
    out = np.empty(m, dtype=np.int64)
    for c0 in range(0, m, chunk):
        c1 = min(m, c0 + chunk)
        block = _rows(sims.T if isinstance(sims, np.ndarray) else sims.t(), c0, c1)
        out[c0:c1] = _rank_of(block, torch.arange(c0, c1) // caps_per_image, cand).numpy()
    return out
