"""A cascade: a shortlist of K candidates per query from one score, then another score on the shortlist only.

The shortlist comes from any global score: a checkpoint's (``model.global_score`` where the model has one,
such as TGDT's global tokens, else its ``score``: VSE++, VSE-infinity, HREM, ...), streamed into top-K lists
(``itr.eval.stream``, ``itr.eval.topk``) with no full matrix, or from a top-K file saved by ``itr eval
--save-topk``. The rerank applies any model's ``score`` (cross-attention: SCAN, TERAN, DIME; TGDT's global +
local sum; another global model) to the (query, candidate) pairs of the shortlist only, batched over many
queries with ``model.pair_score`` where the model has one, the queries dealt round robin to the ranks and the
(queries x K) scores summed back onto rank 0. TGDT's two-stage evaluation is the case where both come from one
checkpoint (``itr eval --two-stage K``).

Ranks inside the shortlist by the reranked score. A ground truth outside the shortlist is never a hit: it
gets the last rank (``n_candidates - 1``), so R@k counts it as a miss for every k, and medr / meanr become
upper bounds. (TGDT's reference code counted such a miss as rank 0, i.e. a hit at R@1.) With ``coco-5fold``
the shortlist is taken inside each fold's block (1,000 images and their captions), as a full evaluation of
that fold would.
"""
import time

import numpy as np
import torch
import torch.distributed as dist

from itr.distributed import host_collective
from itr.eval.metrics import PROTOCOLS, recall_metrics
from itr.eval.scores import num_rows, rows


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
    from itr.progress import bar

    n, m = i2t_idx.shape[0], t2i_idx.shape[0]
    out_i2t = torch.zeros(i2t_idx.shape, dtype=torch.float32)
    out_t2i = torch.zeros(t2i_idx.shape, dtype=torch.float32)
    mine = list(range(rank, n + m, world))
    if pair_fn is not None:
        k_max = max(i2t_idx.shape[1], t2i_idx.shape[1], 1)
        step = max(1, pairs_per_call // k_max)
        groups = [mine[a:a + step] for a in range(0, len(mine), step)]
        for group in bar(groups, desc="rerank shortlists", enabled=progress, leave=False, unit="batch"):
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
        for q in bar(mine, desc="rerank shortlists", enabled=progress, leave=False, unit="query"):
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


def streamed_shortlists(score_fn, img, cap, k, protocol, chunk=1024, device="cpu", rank=0, world=1,
                        progress=False, caps_per_image=5):
    """Per protocol block, (i2t candidate indices (images x K), t2i (captions x K)) by ``score_fn``, on every
    rank: the K best of each query, streamed tile by tile (no matrix)."""
    from itr.eval.stream import Streamer, protocol_blocks, stream_ranks

    streamer = Streamer(score_fn, img, cap, chunk, device, rank, world, caps_per_image, progress)
    out = stream_ranks(streamer, protocol, topk=k)
    blocks = protocol_blocks(num_rows(img), protocol, caps_per_image)
    lists = []
    for b, (b0, b1) in enumerate(blocks):
        f = b1 - b0
        if rank == 0:
            top = out[1][b]
            i2t, t2i = torch.from_numpy(top.c_i2t.copy()), torch.from_numpy(top.c_t2i.copy())
        else:
            i2t = torch.empty((f, min(k, caps_per_image * f)), dtype=torch.long)
            t2i = torch.empty((caps_per_image * f, min(k, f)), dtype=torch.long)
        lists.append((_broadcast(i2t, rank, world), _broadcast(t2i, rank, world)))
    return lists


def file_shortlists(path, n, k, protocol, caps_per_image=5):
    """Per protocol block, the lists of a top-K file (``itr eval --save-topk``), cut to K; they must cover the
    split's queries in the same protocol's blocks."""
    from itr.errors import DataError
    from itr.eval.stream import protocol_blocks

    with np.load(path) as z:
        cols = {name: z[name] for name in z.files}
    lists = []
    for b0, b1 in protocol_blocks(n, protocol, caps_per_image):
        pair = []
        for side, q0, q1, c0 in (("i2t", b0, b1, caps_per_image * b0), ("t2i", caps_per_image * b0, caps_per_image * b1, b0)):
            q, r, c = cols[f"{side}_query"], cols[f"{side}_rank"], cols[f"{side}_candidate"]
            keep = (q >= q0) & (q < q1) & (r < k)
            width = int(r[keep].max()) + 1 if keep.any() else 0
            if width == 0 or keep.sum() != (q1 - q0) * width:
                raise DataError(f"{path}: no complete {side} lists for queries {q0}..{q1 - 1} (saved by a run on "
                                f"another split or protocol?)")
            idx = np.full((q1 - q0, width), -1, np.int64)
            idx[q[keep] - q0, r[keep]] = c[keep] - c0
            pair.append(torch.from_numpy(idx))
        lists.append(tuple(pair))
    return lists


def cascade_metrics(model, img, cap, lists, protocol="1k", device="cpu", rank=0, world=1, progress=False,
                    caps_per_image=5):
    """Metrics of ``model.score`` reranking each block's shortlists, on rank 0 (None elsewhere)."""
    from itr.eval.metrics import fold_mean
    from itr.eval.stream import protocol_blocks

    results = []
    for (b0, b1), (i2t_idx, t2i_idx) in zip(protocol_blocks(num_rows(img), protocol, caps_per_image), lists):
        f, j0, j1 = b1 - b0, caps_per_image * b0, caps_per_image * b1
        s_i2t, s_t2i = rerank(model.score, rows(img, b0, b1), rows(cap, j0, j1), i2t_idx, t2i_idx, device, rank,
                              world, progress, pair_fn=getattr(model, "pair_score", None))
        if rank == 0:
            gt_caps = caps_per_image * torch.arange(f)[:, None] + torch.arange(caps_per_image)[None]
            gt_imgs = (torch.arange(j1 - j0) // caps_per_image)[:, None]
            results.append(recall_metrics(shortlist_ranks(s_i2t, i2t_idx, gt_caps, j1 - j0),
                                          shortlist_ranks(s_t2i, t2i_idx, gt_imgs, f)))
    if rank != 0:
        return None
    return results[0] if len(results) == 1 else fold_mean(results)


def two_stage_metrics(model, img, cap, k, protocol="1k", chunk=1024, device="cpu", rank=0, world=1,
                      progress=False, caps_per_image=5):
    """One checkpoint's cascade: its global score shortlists, its full score reranks. Metrics on rank 0 (None
    elsewhere), with ``timing`` (seconds per stage)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not hasattr(model, "global_score"):
        from itr.errors import ConfigError

        raise ConfigError(f"two-stage evaluation needs a model with a global score (global_score); "
                          f"{type(model).__name__} has none")
    t0 = time.perf_counter()
    lists = streamed_shortlists(model.global_score, img, cap, k, protocol, chunk, device, rank, world, progress,
                                caps_per_image)
    t1 = time.perf_counter()
    out = cascade_metrics(model, img, cap, lists, protocol, device, rank, world, progress, caps_per_image)
    if out is not None:
        out["timing"] = {"global_s": t1 - t0, "rerank_s": time.perf_counter() - t1}
    return out
