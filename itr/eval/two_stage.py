"""Two-stage retrieval: a global shortlist of K, then the expensive score only on the shortlist.

For models that have a cheap global score (``model.global_score``, e.g. TGDT's global tokens)
and an expensive one (``model.score``: cross-attention, or TGDT's global + local sum):

1. the global score of every pair, in tiles dealt to the ranks (``similarity_matrix``);
2. per query, the K best candidates by the global score (ties: smaller index first);
3. the full ``model.score`` of each query against its K candidates only (batched over many queries
   with ``model.pair_score``, the score of aligned rows, where the model has one); the queries are
   dealt round robin to the ranks and the (queries x K) scores summed back onto rank 0;
4. ranks inside the shortlist by the reranked score. A ground truth outside the shortlist is
   never a hit: it gets the last rank (``n_candidates - 1``), so R@k counts it as a miss for
   every k, and medr / meanr become upper bounds. (TGDT's reference code counted such a miss as
   rank 0, i.e. a hit at R@1.)

With ``coco-5fold`` the shortlist is taken inside each fold's block (1,000 images and their
captions), as a full evaluation of that fold would.
"""
import time

import numpy as np
import torch
import torch.distributed as dist

from itr.distributed import host_collective
from itr.eval.metrics import KEYS, PROTOCOLS, recall_metrics
from itr.eval.scores import num_rows, rows, similarity_matrix


def take(emb, idx, device="cpu"):
    """Rows ``idx`` of an embedding (tensor or dict of tensors)."""
    if isinstance(emb, dict):
        return {k: v[idx].to(device) for k, v in emb.items()}
    return emb[idx].to(device)


def shortlist(block, k):
    """Indices (rows, k) of the k highest scores of each row; ties to the smaller index."""
    block = torch.as_tensor(np.ascontiguousarray(block))
    k = min(k, block.shape[1])
    return torch.sort(block, dim=1, descending=True, stable=True).indices[:, :k].contiguous()


def _broadcast(t, rank, world):
    if world > 1:
        host_collective(dist.broadcast, t, src=0)
    return t


@torch.no_grad()
def rerank(score_fn, img, cap, i2t_idx, t2i_idx, device="cpu", rank=0, world=1, progress=False, pair_fn=None,
           pairs_per_call=4096):
    """``score_fn`` of every query against its shortlist: (n, K) for image queries, (m, K) for caption
    queries, complete on rank 0. ``i2t_idx`` / ``t2i_idx`` index ``cap`` / ``img``.

    With ``pair_fn`` (a model's ``pair_score``: the score of image row p with caption row p) the
    (query, candidate) pairs of many queries go in one batched call of ~``pairs_per_call`` pairs;
    otherwise one ``score_fn`` call per query (1 x K or K x 1)."""
    from tqdm import tqdm

    n, m = i2t_idx.shape[0], t2i_idx.shape[0]
    out_i2t = torch.zeros(i2t_idx.shape, dtype=torch.float32)
    out_t2i = torch.zeros(t2i_idx.shape, dtype=torch.float32)
    mine = list(range(rank, n + m, world))
    if pair_fn is not None:
        k_max = max(i2t_idx.shape[1], t2i_idx.shape[1], 1)
        step = max(1, pairs_per_call // k_max)
        groups = [mine[a:a + step] for a in range(0, len(mine), step)]
        for group in tqdm(groups, desc="rerank shortlists", disable=not progress, leave=False, unit="batch"):
            qi = torch.tensor([q for q in group if q < n], dtype=torch.long)
            qc = torch.tensor([q - n for q in group if q >= n], dtype=torch.long)
            if len(qi):  # image queries: the image repeated against each of its K candidates
                K = i2t_idx.shape[1]
                s = pair_fn(take(img, qi.repeat_interleave(K), device), take(cap, i2t_idx[qi].reshape(-1), device))
                out_i2t[qi] = s.float().cpu().view(len(qi), K)
            if len(qc):
                K = t2i_idx.shape[1]
                s = pair_fn(take(img, t2i_idx[qc].reshape(-1), device), take(cap, qc.repeat_interleave(K), device))
                out_t2i[qc] = s.float().cpu().view(len(qc), K)
    else:
        for q in tqdm(mine, desc="rerank shortlists", disable=not progress, leave=False, unit="query"):
            if q < n:
                out_i2t[q] = score_fn(rows(img, q, q + 1, device), take(cap, i2t_idx[q], device)).float().cpu()[0]
            else:
                j = q - n
                out_t2i[j] = score_fn(take(img, t2i_idx[j], device), rows(cap, j, j + 1, device)).float().cpu()[:, 0]
    if world > 1:  # every entry has exactly one owner: the sum is exact
        host_collective(dist.all_reduce, out_i2t)
        host_collective(dist.all_reduce, out_t2i)
    return out_i2t, out_t2i


def shortlist_ranks(scores, idx, targets, n_candidates):
    """Rank of the best target of each query among its reranked shortlist; ``targets`` (q, t) candidate
    indices of the ground truths. Outside the shortlist: ``n_candidates - 1`` (never a hit)."""
    q = scores.shape[0]
    best = torch.full((q,), n_candidates - 1, dtype=torch.long)
    for t in range(targets.shape[1]):
        hit = idx == targets[:, t:t + 1]  # (q, K)
        found = hit.any(1)
        where = hit.float().argmax(1)
        s = scores.gather(1, where[:, None])
        ties_before = (scores == s) & (idx < targets[:, t:t + 1])
        r = (scores > s).sum(1) + ties_before.sum(1)
        best = torch.where(found, torch.minimum(best, r), best)
    return best.numpy()


def two_stage_metrics(model, img, cap, k, protocol="1k", chunk=1024, device="cpu", rank=0, world=1,
                      progress=False, caps_per_image=5):
    """Metrics of two-stage retrieval on rank 0 (None elsewhere), with ``timing`` (seconds per stage)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not hasattr(model, "global_score"):
        from itr.errors import ConfigError

        raise ConfigError(f"two-stage evaluation needs a model with a global score (global_score); "
                          f"{type(model).__name__} has none")
    t0 = time.perf_counter()
    glob = similarity_matrix(model.global_score, img, cap, chunk, device, progress, rank, world)
    t1 = time.perf_counter()
    n, m = num_rows(img), num_rows(cap)
    folds = 5 if protocol == "coco-5fold" else 1
    if n % folds:
        raise ValueError(f"coco-5fold needs a number of images divisible by 5, got {n}")
    f = n // folds
    results = []
    for i in range(folds):
        i0, i1, j0, j1 = i * f, (i + 1) * f, caps_per_image * i * f, caps_per_image * (i + 1) * f
        if rank == 0:
            block = glob[i0:i1, j0:j1]
            i2t_idx, t2i_idx = shortlist(block, k), shortlist(block.T, k)
        else:
            i2t_idx = torch.empty((f, min(k, j1 - j0)), dtype=torch.long)
            t2i_idx = torch.empty((j1 - j0, min(k, f)), dtype=torch.long)
        i2t_idx, t2i_idx = _broadcast(i2t_idx, rank, world), _broadcast(t2i_idx, rank, world)
        fold_img = rows(img, i0, i1)
        fold_cap = rows(cap, j0, j1)
        s_i2t, s_t2i = rerank(model.score, fold_img, fold_cap, i2t_idx, t2i_idx, device, rank, world, progress,
                              pair_fn=getattr(model, "pair_score", None))
        if rank == 0:
            gt_caps = caps_per_image * torch.arange(f)[:, None] + torch.arange(caps_per_image)[None]
            gt_imgs = (torch.arange(j1 - j0) // caps_per_image)[:, None]
            results.append(recall_metrics(shortlist_ranks(s_i2t, i2t_idx, gt_caps, j1 - j0),
                                          shortlist_ranks(s_t2i, t2i_idx, gt_imgs, f)))
    t2 = time.perf_counter()
    if rank != 0:
        return None
    out = results[0] if folds == 1 else {key: float(np.mean([r[key] for r in results])) for key in KEYS}
    if folds > 1:
        out["folds"] = results
    out["timing"] = {"global_s": t1 - t0, "rerank_s": t2 - t1}
    return out
