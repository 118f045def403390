"""Matching losses: the config of ``recipe.loss``, one VSE++ hinge and one symmetric InfoNCE on score matrices,
and one loss base class.

Written for this rank's queries against (possibly gathered) candidates, so the same code serves one process and
many: ``ContrastiveLoss.candidates`` is the one gather of the global batch (OpenCLIP's gather-with-grad + local
loss), ``max_violation`` the one warm-up rule, ``hinge_from_scores`` the one hinge, ``infonce_from_scores`` the
one InfoNCE, used by every model.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from itr.distributed import gather_no_grad, gather_padded, gather_with_grad, is_distributed
from itr.schema import param


@dataclass
class LossConfig:
    name: str = param("hinge", "the loss: hinge (VSE++'s bidirectional triplet loss) or infonce (CLIP's symmetric "
                               "cross-entropy with a learnable temperature; global-embedding models only)",
                      choices=("hinge", "infonce"))
    margin: float = param(0.2, "hinge margin")
    max_violation: bool = param(True, "hardest negative only (VSE++); false sums all violations (VSE0)")
    warmup_epochs: int = param(0, "epochs of summed violations before switching to max violation (VSE-infinity uses 1)")
    mask_same_image: bool = param(True, "captions of the same image in a batch are not negatives (across ranks too)")
    global_negatives: bool = param(True, "mine negatives over the global batch (all ranks, gathered with gradients); "
                                         "false: each rank's own pairs only")
    multi_positive: bool = param(False, "infonce: captions of the same image are positives (uniform soft targets "
                                        "over them) rather than masked out (mask_same_image) or negatives")
    temperature: float = param(0.07, "infonce: initial temperature (CLIP: 0.07, a logit scale of log(1/0.07))",
                               min=1e-4)
    learn_temperature: bool = param(True, "infonce: the temperature is a trained parameter (CLIP), saved in "
                                          "checkpoints as criterion.logit_scale; false: fixed")
    max_logit_scale: float = param(100.0, "infonce: the logit scale 1/temperature is clamped to [1, this] "
                                          "(CLIP: 100)", min=1.0)


def max_violation(cfg, epoch):
    """Hardest negatives (VSE++) once the warm-up of summed violations (``loss.warmup_epochs``) is over."""
    return cfg.max_violation and epoch >= cfg.warmup_epochs


def hinge_loss(img, cap, img_ids, margin=0.2, max_violation=True, mask_same_image=True,
               img_all=None, cap_all=None, ids_all=None, offset=0):
    """Bidirectional hinge (triplet) loss of VSE++ on global embeddings, summed over the queries of this batch.

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


def infonce_from_scores(s_i2t, s_t2i, img_ids, ids_all, offset, scale, same_image="mask", n_global=None):
    """Symmetric InfoNCE of this rank's queries on (n, N) score matrices, as a share of the global batch's mean.

    Cross-entropy of ``scale * s`` with the pair itself (candidate ``offset + k``) as target, both directions,
    summed over this rank's n queries and divided by ``2 * n_global`` (default n): the ranks' shares add up to
    CLIP's ``(CE_i2t + CE_t2i) / 2`` averaged over the global batch (OpenCLIP's ClipLoss with local loss).
    ``same_image``: other candidates of the query's image are ``"mask"``ed out of the softmax, are
    ``"positive"`` (the target is uniform over every candidate of the image, the pair included), or are plain
    ``"negative"``s.
    """
    n, m = s_i2t.shape
    ar = torch.arange(n, device=s_i2t.device)
    same = img_ids[:, None] == ids_all[None, :]
    own = torch.zeros(n, m, dtype=torch.bool, device=s_i2t.device)
    own[ar, offset + ar] = True
    total = 0.0
    for s in (s_i2t, s_t2i):
        logits = scale * s
        if same_image == "positive":
            target = (same | own).float()
            total = total - (target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum()
        else:
            if same_image == "mask":
                logits = logits.masked_fill(same & ~own, float("-inf"))
            total = total - F.log_softmax(logits, 1)[ar, offset + ar].sum()
    return total / (2 * (n_global or n))


class ContrastiveLoss(torch.nn.Module):
    """Base for losses over (image, caption) embeddings with global-batch negatives.

    ``candidates`` gathers every rank's embeddings with gradients (OpenCLIP's gather-with-grad + local loss):
    each rank scores its own queries against the global batch, the sum over ranks is the loss of the global
    batch, and the gather's backward routes every rank's gradient to the embeddings' owner.
    """

    reduction = "sum"  # "sum" over the queries (VSE++) or "mean" over the global batch (CLIP); for the logs

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def after_step(self):
        """Called after every optimizer step (the trainer, through the model): parameter constraints."""

    def with_score(self, score, img, cap, img_ids, epoch):
        """The loss for a model whose similarity is ``score(img, cap) -> (n, m)`` rather than a dot product of
        global vectors (CAMERA's best view): this rank's queries against the gathered candidates; the positives'
        scores taken from the image-query side for both directions."""
        c, ids_all, offset = self.candidates({"img": img, "cap": cap}, img_ids)
        s_i2t = score(img, c["cap"])
        rows = torch.arange(img.shape[0], device=img.device)
        return self.on_scores(s_i2t, score(c["img"], cap).t(), img_ids, ids_all, offset, epoch,
                              pos=s_i2t[rows, offset + rows])

    def forward(self, out, batch, epoch):
        img, cap, ids = out["img"].float(), out["cap"].float(), batch["img_ids"]
        c, ids_all, offset = self.candidates({"img": img, "cap": cap}, ids)
        return self.on_embeddings(img, cap, ids, c["img"], c["cap"], ids_all, offset, epoch)

    def max_violation(self, epoch):
        return max_violation(self.cfg, epoch)

    def candidates(self, local, ids):
        """(candidates, their image ids, this rank's row offset in them) of the global batch.

        ``local``: this rank's tensors, batch first; token-level ones (n, L, ...) are zero-padded along their
        later dimensions to the longest across ranks; float ones are gathered with gradients. One process, or
        ``loss.global_negatives: false``: ``local`` itself."""
        if not self.cfg.global_negatives or not is_distributed():
            return local, ids, 0
        n = ids.shape[0]
        out = {}
        for k, v in local.items():
            if v.dim() > 2:
                out[k] = gather_padded(v, grad=v.is_floating_point())
            else:
                out[k] = gather_with_grad(v) if v.is_floating_point() else gather_no_grad(v)
        return out, gather_no_grad(ids), torch.distributed.get_rank() * n


class HingeLoss(ContrastiveLoss):
    """VSE++'s hinge with an optional warm-up of summed violations (``loss.warmup_epochs``); embeddings in fp32."""

    def on_embeddings(self, img, cap, img_ids, img_all, cap_all, ids_all, offset, epoch):
        """Queries ``img`` / ``cap`` (rows ``offset ..`` of the candidates) against ``cap_all`` / ``img_all``."""
        return hinge_loss(img, cap, img_ids, self.cfg.margin, self.max_violation(epoch), self.cfg.mask_same_image,
                          img_all, cap_all, ids_all, offset)

    def on_scores(self, s_i2t, s_t2i, img_ids, ids_all, offset, epoch, pos=None):
        """The hinge on precomputed (this rank's queries x candidates) score matrices (``hinge_from_scores``)."""
        return hinge_from_scores(s_i2t, s_t2i, img_ids, ids_all, offset, self.cfg.margin, self.max_violation(epoch),
                                 self.cfg.mask_same_image, pos=pos)


class InfoNCELoss(ContrastiveLoss):
    """CLIP's symmetric InfoNCE with a learnable temperature (``criterion.logit_scale``, initialised to
    log(1/loss.temperature) and kept in [0, log(loss.max_logit_scale)] as OpenCLIP's training loop clamps it
    after each step; the forward clamps too, for engines whose master weights live in the optimizer)."""

    reduction = "mean"

    def __init__(self, cfg):
        super().__init__(cfg)
        init = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = torch.nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.same_image = "positive" if cfg.multi_positive else "mask" if cfg.mask_same_image else "negative"

    def scale(self):
        return self.logit_scale.float().clamp(0.0, math.log(self.cfg.max_logit_scale)).exp()

    def after_step(self):
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def on_embeddings(self, img, cap, img_ids, img_all, cap_all, ids_all, offset, epoch):
        return self.on_scores(img @ cap_all.t(), cap @ img_all.t(), img_ids, ids_all, offset, epoch)

    def on_scores(self, s_i2t, s_t2i, img_ids, ids_all, offset, epoch, pos=None):
        """InfoNCE on (this rank's queries x candidates) scores; ``pos`` is unused (the targets are positions).
        The mean is over the global batch: this rank's queries x the number of ranks."""
        world = torch.distributed.get_world_size() if is_distributed() else 1
        return infonce_from_scores(s_i2t.float(), s_t2i.float(), img_ids, ids_all, offset, self.scale(),
                                   self.same_image, n_global=s_i2t.shape[0] * world)


LOSSES = {"hinge": HingeLoss, "infonce": InfoNCELoss}


def build_loss(loss_cfg):
    return LOSSES[loss_cfg.name](loss_cfg)
