"""Shared pieces of the token-level (cross-attention) models (SCAN, TERAN, TGDT, DIME).

- ``tiled_pairs``: evaluates a batched all-pairs scorer ``fn(img (ni, R, d), words (nc, L, d), lens (nc,))``
  on sub-chunks of a tile so that the (ni, nc, R, L) intermediates stay under ``budget`` elements.
- ``caption_chunks``: caption sub-chunks under a budget of elements per pair.
- ``xattn_batch_loss``: the loss of this rank's queries against the global batch for such models, with the
  criterion's own gather of candidates and hinge (``itr.modules.losses``).
"""
import math

import torch

# Sub-chunk budget of batched all-pairs scores: (images x captions x per-pair) elements.
PAIR_BUDGET = 1 << 24


def caption_chunks(n_img, n_cap, per_pair, budget=PAIR_BUDGET):
    """Caption sub-chunks so that n_img x chunk x per_pair stays under ``budget`` elements."""
    step = max(1, budget // max(1, n_img * per_pair))
    return [(j, min(n_cap, j + step)) for j in range(0, n_cap, step)]


def length_groups(lens, rows):
    """Caption indices in order of length, cut into groups of at most ``rows`` word rows each (count x the
    group's longest caption; a longer caption gets a group of its own). Padding a group only to its own
    longest caption is what keeps real captions (mean ~12 words, a tile's longest ~30) from costing ~2.5x."""
    order = torch.argsort(lens, stable=True)
    sorted_lens = lens[order].clamp(min=1).tolist()
    groups, start = [], 0
    for k, n in enumerate(sorted_lens):
        if k > start and (k - start + 1) * n > rows:
            groups.append(order[start:k])
            start = k
    groups.append(order[start:])
    return groups


def _rows(img, i0, i1):
    return tuple(t[i0:i1] for t in img) if isinstance(img, tuple) else img[i0:i1]


def tiled_pairs(fn, img, words, lens, budget):
    """(ni, nc) scores of every image x caption pair, ``fn`` called on sub-chunks of at most ~``budget``
    (ni_sub x nc_sub x R x L) elements. ``img`` is a tensor (ni, R, ...) or a tuple of such tensors sliced
    together (regions and their mask).

    When it does not fit in one call, captions are taken in groups of similar length (``length_groups``),
    each cut to its longest caption, and images in sub-chunks that fill the budget. Pairs are computed
    by the same batched ops either way; only the padding they carry differs."""
    first = img[0] if isinstance(img, tuple) else img
    ni, R = first.shape[:2]
    nc = words.shape[0]
    if ni == 0 or nc == 0:
        return first.new_zeros(ni, nc)
    L = max(int(lens.max()), 1)
    if ni * nc * R * L <= budget:
        return fn(img, words[:, :L], lens)
    out = first.new_empty(ni, nc)
    # caption groups of ~sqrt(budget) word rows (or all images at once): GEMMs of (bi R) x rows, both large
    for idx in length_groups(lens, max(budget // (R * ni), math.isqrt(budget), L)):
        ln = lens[idx]
        lc = max(int(ln.max()), 1)
        w = words[idx, :lc]
        bi = min(ni, max(budget // (len(idx) * R * lc), 1))
        for i0 in range(0, ni, bi):
            i1 = min(ni, i0 + bi)
            out[i0:i1, idx] = fn(_rows(img, i0, i1), w, ln)
    return out


def xattn_batch_loss(scores, img, cap, cap_lens, img_ids, criterion, epoch, img_lens=None):
    """Hinge loss of this rank's pairs against the global batch, with ``scores(img, cap, lens)`` -> (ni, nc).

    One process: the (n x n) matrix once. Distributed with global negatives: this rank's images against
    every caption and every image against this rank's captions (2 n N pairs per rank, not N^2).
    ``img_lens`` (variable regions): gathered with the images, which ``scores`` then gets as {"regions", "lens"}.
    """
    local = {"img": img, "cap": cap, "lens": cap_lens}
    if img_lens is not None:
        local["img_lens"] = img_lens
    c, ids_all, offset = criterion.candidates(local, img_ids)

    def images(d):
        return d["img"] if img_lens is None else {"regions": d["img"], "lens": d["img_lens"]}

    if c["img"] is img:
        s = scores(images(local), cap, cap_lens)
        s_i2t, s_t2i = s, s.t()
    else:
        s_i2t = scores(images(local), c["cap"], c["lens"])
        s_t2i = scores(images(c), cap, cap_lens).t()
    return criterion.on_scores(s_i2t, s_t2i, img_ids, ids_all, offset, epoch)
