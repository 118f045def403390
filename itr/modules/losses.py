"""Matching losses on embeddings. Written for local queries against (possibly gathered) candidates,
so the same code serves one process and many.
"""
from dataclasses import dataclass

import torch

from itr.distributed import gather_no_grad, gather_with_grad, is_distributed
from itr.registry import LOSSES


def hinge_loss(img, cap, img_ids, margin=0.2, max_violation=True, mask_same_image=True,
               img_all=None, cap_all=None, ids_all=None, offset=0):
    """Bidirectional hinge (triplet) loss of VSE++, summed over the queries of this batch.

    ``img[i]`` and ``cap[i]`` are a positive pair. Each image is a query against the
    candidate captions ``cap_all`` and each caption against the candidate images
    ``img_all`` (default: this batch; pass gathered tensors for global-batch negatives,
    with ``offset`` the position of this batch inside them). ``max_violation`` keeps
    only the hardest negative per query (VSE++), else all violations are summed (VSE0).
    With ``mask_same_image``, candidates from the query's own image are not negatives
    (HREM's ``mask_repeat``); otherwise only the pair itself is excluded.
    """
    if img_all is None:
        img_all, cap_all, ids_all, offset = img, cap, img_ids, 0
    pos = (img * cap).sum(-1)  # (n,) the pairs' own scores, one value for both directions
    return hinge_from_scores(img @ cap_all.t(), cap @ img_all.t(), img_ids, ids_all, offset, margin, max_violation,
                             mask_same_image, pos=pos)


def hinge_from_scores(s_i2t, s_t2i, img_ids, ids_all, offset=0, margin=0.2, max_violation=True, mask_same_image=True,
                      pos=None):
    """VSE++ hinge summed over this rank's queries, on precomputed score matrices (cross-attention models).

    ``s_i2t`` (n, N): this rank's images against the candidate captions; ``s_t2i`` (n, N): this rank's
    captions against the candidate images; the positive pair of query k is candidate ``offset + k``.
    ``pos`` (n,): the positives' scores where the caller has them (``hinge_loss``), else read off the
    matrices. Same-image masking, hardest negative or sum, as ``hinge_loss``.
    """
    n, m = s_i2t.shape
    ar = torch.arange(n, device=s_i2t.device)
    pos_i = s_i2t[ar, offset + ar] if pos is None else pos
    pos_t = s_t2i[ar, offset + ar] if pos is None else pos
    if mask_same_image:
        not_neg = img_ids[:, None] == ids_all[None, :]
    else:
        not_neg = torch.zeros(n, m, dtype=torch.bool, device=s_i2t.device)
    not_neg[ar, offset + ar] = True
    zero = torch.zeros((), dtype=s_i2t.dtype, device=s_i2t.device)
    cost_c = torch.where(not_neg, zero, (margin + s_i2t - pos_i[:, None]).clamp(min=0))
    cost_i = torch.where(not_neg, zero, (margin + s_t2i - pos_t[:, None]).clamp(min=0))
    if max_violation:
        return cost_c.max(1).values.sum() + cost_i.max(1).values.sum()
    return cost_c.sum() + cost_i.sum()


class ContrastiveLoss(torch.nn.Module):
    """Base for losses over (image, caption) embeddings with in-batch negatives.

    ``candidates`` gathers every rank's embeddings with gradients (OpenCLIP's
    gather-with-grad + local loss): each rank scores its own queries against the global
    batch, the sum over ranks is the loss of the global batch, and the gather's backward
    routes every rank's gradient to the embeddings' owner. Embeddings are scored in fp32.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def candidates(self, img, cap, img_ids):
        if not self.cfg.global_negatives or not is_distributed():
            return {}
        return {"img_all": gather_with_grad(img), "cap_all": gather_with_grad(cap), "ids_all": gather_no_grad(img_ids),
                "offset": torch.distributed.get_rank() * img.shape[0]}


@dataclass
class _HingeCfg:
    pass


@LOSSES.register("hinge", _HingeCfg)
class HingeLoss(ContrastiveLoss):
    """VSE++ loss with an optional warm-up of summed violations (``loss.warmup_epochs``)."""

    def max_violation(self, epoch):
        return self.cfg.max_violation and epoch >= self.cfg.warmup_epochs

    def forward(self, out, batch, epoch):
        img, cap, ids = out["img"].float(), out["cap"].float(), batch["img_ids"]
        return hinge_loss(img, cap, ids, margin=self.cfg.margin, max_violation=self.max_violation(epoch),
                          mask_same_image=self.cfg.mask_same_image, **self.candidates(img, cap, ids))


def build_loss(loss_cfg):
    return LOSSES.get(loss_cfg.name).build(loss_cfg)
