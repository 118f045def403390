"""The K best candidates of every query, both directions, merged tile by tile and rank by rank.

Each query keeps (score, candidate) pairs for its K best so far; a tile merges its scores in with one
vectorized partial sort per direction; ranks merge their lists on rank 0. The lists are the input of a
cascade (``itr.eval.cascade``: rerank a shortlist with another model) and of a retrieval report, saved as a
columnar ``.npz``: per direction ``query``, ``rank``, ``candidate``, ``score``, ``is_gt``. Order: score
descending, then candidate index ascending; a tie at the K-th place keeps either candidate.
"""
import numpy as np
import torch


def merge_topk(scores, ids, k):
    """The k best of each row of (scores, ids), sorted (score descending, then index ascending)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class TopK:
    """Lists of one block: ``n`` images x ``m`` captions, the best ``k`` candidates of each query (empty slots:
    score -inf, candidate -1, until a tile fills them)."""

    def __init__(self, n, m, k):
        self.k_i2t, self.k_t2i = min(k, m), min(k, n)
        self.s_i2t, self.c_i2t = np.full((n, self.k_i2t), -np.inf, np.float32), np.full((n, self.k_i2t), -1)
        self.s_t2i, self.c_t2i = np.full((m, self.k_t2i), -np.inf, np.float32), np.full((m, self.k_t2i), -1)

    def add(self, tile, i0, j0):
        """Merge a tile of scores (images i0.., captions j0.., block indices) into both directions' lists."""
        h, w = tile.shape
        rs, cs = slice(i0, i0 + h), slice(j0, j0 + w)
        cand = np.broadcast_to(np.arange(j0, j0 + w), (h, w))
        self.s_i2t[rs], self.c_i2t[rs] = merge_topk(np.concatenate([self.s_i2t[rs], tile], 1),
                                                np.concatenate([self.c_i2t[rs], cand], 1), self.k_i2t)
        cand = np.broadcast_to(np.arange(i0, i0 + h), (w, h))
        self.s_t2i[cs], self.c_t2i[cs] = merge_topk(np.concatenate([self.s_t2i[cs], tile.T], 1),
                                                np.concatenate([self.c_t2i[cs], cand], 1), self.k_t2i)

    def arrays(self):
        return {"s_i2t": self.s_i2t, "c_i2t": self.c_i2t, "s_t2i": self.s_t2i, "c_t2i": self.c_t2i}

    def load(self, arrays):
        for name, a in arrays.items():
            getattr(self, name)[:] = a

    def cut(self, k):
        """The lists cut to their first ``k`` candidates (a copy; sorted lists, so their top-k)."""
        import copy

        out = copy.copy(self)
        out.k_i2t, out.k_t2i = min(k, self.k_i2t), min(k, self.k_t2i)
        for side, kk in (("i2t", out.k_i2t), ("t2i", out.k_t2i)):
            setattr(out, f"s_{side}", getattr(self, f"s_{side}")[:, :kk])
            setattr(out, f"c_{side}", getattr(self, f"c_{side}")[:, :kk])
        return out

    def merged(self, rank, world):
        """Every rank's lists merged onto rank 0 (an all-gather of (queries x k) arrays); None elsewhere."""
        if world > 1:
            from itr.distributed import gather_no_grad

            for side, k in (("i2t", self.k_i2t), ("t2i", self.k_t2i)):
                s, c = getattr(self, f"s_{side}"), getattr(self, f"c_{side}")
                s_all = gather_no_grad(torch.from_numpy(s)).numpy().reshape(world, *s.shape)
                c_all = gather_no_grad(torch.from_numpy(c)).numpy().reshape(world, *c.shape)
                s, c = merge_topk(np.concatenate(list(s_all), 1), np.concatenate(list(c_all), 1), k)
                setattr(self, f"s_{side}", s)
                setattr(self, f"c_{side}", c)
        return self if rank == 0 else None


def save_topk(path, tops, blocks, caps_per_image=5):
    """The lists of every block as one columnar .npz (split-wide indices: image and caption row numbers)."""
    cols = {}
    for side in ("i2t", "t2i"):
        parts = {name: [] for name in ("query", "rank", "candidate", "score", "is_gt")}
        for (b0, _), top in zip(blocks, tops):
            c, s = getattr(top, f"c_{side}"), getattr(top, f"s_{side}")
            q = np.broadcast_to(np.arange(len(c))[:, None], c.shape)
            r = np.broadcast_to(np.arange(c.shape[1])[None, :], c.shape)
            gt = (c // caps_per_image == q) if side == "i2t" else (q // caps_per_image == c)
            off_q, off_c = (b0, caps_per_image * b0) if side == "i2t" else (caps_per_image * b0, b0)
            for name, a in (("query", q + off_q), ("rank", r), ("candidate", c + off_c), ("score", s), ("is_gt", gt)):
                parts[name].append(np.asarray(a).reshape(-1))
        cols.update({f"{side}_{name}": np.concatenate(v) for name, v in parts.items()})
    np.savez(path, **cols)
    return path
