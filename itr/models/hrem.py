"""HREM (Fu et al., "Learning Semantic Relationship among Instances for Image-Text Matching", CVPR 2023).

Reference: CrossmodalGroup/HREM ``lib/encoders.py``, ``lib/mlp.py``, ``lib/mca.py``, ``lib/loss.py``,
``lib/vse.py``, ``graph_lib.py``, ``arguments.py``, ``lib/image_caption.py``, README.

Fragment level (the encoders, also at test time): region features -> FC + MLP residual (``FC_MLP``) and
token features (BiGRU or BERT -> linear) go through a 1-layer transformer encoder (16 heads, feed-forward
= embed size, dropout 0.1); the embedding is ``0.8 * maxk_pool(x) + 0.2 * avg_pool(transformer(x))``
(``residual_weight`` 0.8, max-k pooling with k = 2), L2-normalized. Retrieval uses these embeddings only.

Instance level (training only, inside ``batch_loss``, over the GLOBAL batch when distributed): the batch's
2N image and caption embeddings form one sequence for a transformer encoder (1 layer, 16 heads) whose
additive attention mask is built from "connection" and "relevance" relations (``lib/mca.py``):
intra-modal relevance ``exp(-||a - b||)``, cross-modal relevance from region-word similarities (top-K
scores through a small MLP, plus their mean), connections = the top half of each row. Losses
(``graph_lib.py GraphLoss``): base loss on the embeddings + (after the warm-up) the loss on
(img, enhanced cap), (enhanced img, cap), (enhanced img, enhanced cap) + 10 x the KL regularization of the
learned cross-modal relevance towards ``exp(-cdist(img, cap))``. Loss kinds: ``trip`` (triplet loss with
distance-weighted negative sampling, the reference default) or ``vse`` (VSE++ hinge).

Exactness under accumulation / ranks: the random parts of the instance level (the triplet loss's negative
sampling and the interaction transformer's dropout) draw from generators seeded by the batch's image ids
and the epoch, so every replay of a step and every rank sees the same draws (the reference draws from the
global RNG; the distribution is the same).
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.distributed import gather_no_grad, is_distributed
from itr.errors import ConfigError
from itr.models.base import MatchingModel, region_lens
from itr.modules.encoders import text_entry
from itr.modules.fragments import FCMLP, CaptionAugment, avg_pool, drop_regions, maxk_pool
from itr.modules.gpo import GPO
from itr.modules.ops import l2norm, length_mask
from itr.registry import MODELS
from itr.schema import component, param

FRAGMENT_KEYS = ("img_frag", "img_frag_len", "cap_frag", "cap_frag_len")


@dataclass
class HREMConfig:
    embed_dim: int = param(1024, "joint embedding size (arguments.py: 1024)", min=1)
    image_mlp: bool = param(True, "image: FC + 2-layer MLP residual with BatchNorm (lib/mlp.py FC_MLP, bn=True); false: FC only")
    residual_pool: str = param("maxk", "pooling of the residual branch: maxk (lib/encoders.py Maxk_Pooling_Variable) "
                                       "or gpo (VSE-infinity's GPO)")
    pool_k: int = param(2, "k of max-k pooling (Maxk_Pooling_Variable: k=2)")
    residual_weight: float = param(0.8, "weight of the pooled features vs the transformer branch (graph_lib.py: 0.8)")
    nhead: int = param(16, "attention heads of the fragment- and instance-level transformers (graph_lib.py: 16)")
    dropout: float = param(0.1, "dropout of both transformers (graph_lib.py: 0.1)")
    num_layers_enc: int = param(1, "layers of the instance-level transformer (graph_lib.py: 1)")
    region_drop: float = param(0.2, "training: drop each region with this probability, keeping at least one "
                                    "(image_caption.py size_augment: rand > 0.20)")
    caption_aug: float = param(0.2, "training: probability that a caption word is masked / replaced / deleted "
                                    "(image_caption.py process_caption_bert: 0.20)")
    base_loss: str = param("trip", "loss on the embeddings: trip (triplet, distance-weighted sampling) or vse "
                                   "(hinge; margin / warm-up / max violation from recipe.loss) (graph_lib.py: trip)")
    gnn_loss: str = param("trip", "loss on the relation-enhanced embeddings: trip or vse (graph_lib.py: trip)")
    trip_margin: float = param(0.2, "triplet margin (lib/loss.py TripletLoss: 0.2)")
    trip_cutoff: float = param(1.7, "distance-weighted sampling: only negatives closer than this "
                                    "(lib/loss.py: 1.7 for f30k, 1.9 for coco)")
    trip_min_dist: float = param(0.5, "distance-weighted sampling: distances clamped below at this (cut_off 0.5)")
    trip_dim: float = param(512.0, "distance-weighted sampling: the dimension d of its density (lib/loss.py: 512)")
    interaction_warmup_epochs: int = param(7, "epochs with the base loss only before the instance-level "
                                              "interaction starts (reference: --warmup 8000 iterations = 7.06 "
                                              "epochs of F30K at batch 128; 3.6 of COCO at 256)")
    mask_weight: float = param(1.0, "scale of the relation attention mask (README: 1.0 f30k, 1.5 coco)")
    threshold: float = param(0.5, "connection relation: the top fraction of each row that is connected (0.5)")
    topk: int = param(10, "region-word relevance: top-K scores fed to the relation MLP (graph_lib.py: 10)")
    reg_loss_weight: float = param(10.0, "weight of the relation regularization loss (graph_lib.py: 10)")
    cross_loss: bool = param(True, "also the losses of (img, enhanced cap) and (enhanced img, cap) (graph_lib.py: 1)")
    sigma: float = param(1.0, "relevance exp(-distance / sigma) (lib/mca.py: 1)")
    temperature: float = param(1.0, "temperature T of the regularization's softmaxes (lib/mca.py: 1)")
    relation_words: int = param(64, "tokens per caption kept for the region-word relations (the per-pair "
                                    "fragment tensors have a fixed size; longer captions are cut there only)")
    text: dict = component("gru_words", "text", "text encoder with word-level outputs: gru_words (BiGRU) or "
                                                "hf_words (local BERT, the reference)")


class _ZeroGrad(torch.autograd.Function):
    """Identity whose gradient is zero: fragment features enter the relations detached (lib/mca.py
    ``detach=True``), yet stay in the graph so exact accumulation can differentiate every embedding key."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


def _fit(x, n):
    """Cut or zero-pad dim 1 of x to n."""
    if x.shape[1] >= n:
        return x[:, :n]
    return F.pad(x, (0, 0, 0, n - x.shape[1]))


def _batch_seed(ids, epoch):
    """A seed that depends only on the global batch (image ids in order) and the epoch."""
    ids = ids.long()
    pos = torch.arange(1, ids.numel() + 1, device=ids.device)
    h = int(((ids + 1) * pos).sum()) * 1_000_003 + int(ids.sum()) * 7919 + epoch
    return h % (2 ** 62)


@contextmanager
def _seeded_rng(seed, device):
    """Global RNG (CPU, and this CUDA device) seeded for a block, restored afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()].manual_seed(seed)
        yield


def _top_rows(x, frac):
    """Connection relation: True where an entry is among the top ``int(cols * frac)`` of its row (lib/mca.py)."""
    k = max(1, int(x.shape[1] * frac))
    return x >= x.topk(k, dim=1).values[:, -1:]


def _topk_filled(x, lens, k):
    """Top-k over the last dim of x (..., P): positions >= max(k, len) do not count, positions missing up to k
    count as 0 (the reference takes the top-k over max(k, len) positions; the callers hold 0 in [len, k))."""
    if x.shape[-1] < k:
        x = F.pad(x, (0, k - x.shape[-1]))
    pos = torch.arange(x.shape[-1], device=x.device)
    x = x.masked_fill(pos >= lens.clamp(min=k)[..., None], float("-inf"))
    return x.topk(k, dim=-1).values


class FragmentRelation(nn.Module):
    """``w * pool(x) + (1 - w) * avg_pool(transformer(x))``, L2-normalized (lib/encoders.py)."""

    def __init__(self, dim, cfg: HREMConfig):
        super().__init__()
        self.cfg = cfg
        self.aggr = nn.TransformerEncoderLayer(dim, cfg.nhead, dim_feedforward=dim, dropout=cfg.dropout,
                                               batch_first=True)
        self.gpo = GPO(32, 32) if cfg.residual_pool == "gpo" else None

    def forward(self, x, lens):
        res = self.gpo(x, lens) if self.gpo is not None else maxk_pool(x, lens, self.cfg.pool_k)
        pad = ~length_mask(lens, x.shape[1])
        rel = avg_pool(self.aggr(x, src_key_padding_mask=pad), lens)
        w = self.cfg.residual_weight
        return l2norm(w * res + (1 - w) * rel)


class InstanceInteraction(nn.Module):
    """The instance-level relation module of graph_lib.py / lib/mca.py (its learnable parts)."""

    def __init__(self, dim, cfg: HREMConfig):
        super().__init__()
        self.cfg = cfg
        layer = nn.TransformerEncoderLayer(dim, cfg.nhead, dim_feedforward=dim, dropout=cfg.dropout, batch_first=True)
        self.gnn = nn.TransformerEncoder(layer, cfg.num_layers_enc, enable_nested_tensor=False)
        k = cfg.topk
        self.mlp_t2i = nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Dropout(0.0), nn.Linear(k, 1))
        self.mlp_i2t = copy.deepcopy(self.mlp_t2i)  # lib/mca.py: the same initial weights

    @torch.no_grad()
    def fragment_scores(self, regions, r_lens, words, w_lens, budget=2 ** 20):
        """Region-word matching of every caption with every image (lib/mca.py AdjacencyLearning, SCAN-style).

        Returns t2i_topk (M, N, K), t2i_mean (M, N) [caption rows] and i2t_topk (N, M, K), i2t_mean (N, M)
        [image rows]. Padding regions are ignored (the reference's img_len_use=True; its default uses the
        zero-padded rows' features too); words beyond a caption count as 0 where the top-K needs filling.
        Computed in chunks of captions of about ``budget`` similarities (cache-sized, and bounded memory)."""
        K = self.cfg.topk
        W = max(int(w_lens.max()), 1)
        words = F.normalize(words[:, :W].float(), dim=-1)
        regions = F.normalize(regions.float(), dim=-1)
        N, R = regions.shape[:2]
        rmask = length_mask(r_lens, R)  # (N, R)
        r_bias = torch.zeros(N, R, device=regions.device).masked_fill_(~rmask, float("-inf"))[None, :, None, :]
        r_pad = not bool(rmask.all())
        chunk = max(1, budget // max(1, N * W * R))
        t_top, t_mean, i_top, i_mean = [], [], [], []
        for c0 in range(0, words.shape[0], chunk):
            w, wl = words[c0:c0 + chunk], w_lens[c0:c0 + chunk]
            wmask = length_mask(wl, W)  # (C, W)
            s = F.leaky_relu_(torch.einsum("cwd,nrd->cnwr", w, regions), negative_slope=0.1)  # (C, N, W, R)
            if r_pad:
                s.mul_(rmask[None, :, None, :])
            if not bool(wmask.all()):
                s.mul_(wmask[:, None, :, None])
            # t2i: per word, the best region (similarities L2-normalized over the words)
            t = s / s.pow(2).sum(2, keepdim=True).sqrt_().clamp_(min=1e-12)
            row = t.add_(r_bias).amax(3)  # (C, N, W); 0 at words past the caption
            t_mean.append((row * wmask[:, None]).sum(2) / wl[:, None].to(row.dtype))
            t_top.append(_topk_filled(row, wl[:, None].expand(-1, N), K))
            # i2t: per region, the best word (similarities L2-normalized over the regions)
            t = s / s.pow(2).sum(3, keepdim=True).sqrt_().clamp_(min=1e-12)
            w_bias = torch.zeros_like(wmask, dtype=t.dtype).masked_fill_(~wmask, float("-inf"))
            col = t.add_(w_bias[:, None, :, None]).amax(2)  # (C, N, R); 0 at padding regions
            i_mean.append((col * rmask[None]).sum(2) / r_lens[None].to(col.dtype))
            i_top.append(_topk_filled(col, r_lens[None].expand(col.shape[0], -1), K))
        return (torch.cat(t_top), torch.cat(t_mean), torch.cat(i_top).transpose(0, 1),
                torch.cat(i_mean).t())

    def relations(self, img, cap, regions, r_lens, words, w_lens):
        """The (2N, 2N) additive attention mask over [images; captions] and the learned cross-modal
        relevance (t2i: caption rows, i2t: image rows) for the regularization loss (lib/mca.py AdjacencyModel)."""
        cfg = self.cfg
        t_top, t_mean, i_top, i_mean = self.fragment_scores(regions, r_lens, words, w_lens)
        t2i = self.mlp_t2i(t_top).squeeze(-1) + t_mean  # res=True
        i2t = self.mlp_i2t(i_top).squeeze(-1) + i_mean
        with torch.no_grad():
            # As lib/mca.py, the "intra-modal" connections are ranked by the cross-modal similarities
            # (batch_sim_i2i = img @ cap.T, batch_sim_t2t = cap @ img.T).
            i2i_c, t2t_c = _top_rows(img @ cap.t(), cfg.threshold), _top_rows(cap @ img.t(), cfg.threshold)
            t2i_c, i2t_c = _top_rows(t_mean, cfg.threshold), _top_rows(i_mean, cfg.threshold)
        i2i = torch.exp(-torch.cdist(img, img) / cfg.sigma)
        t2t = torch.exp(-torch.cdist(cap, cap) / cfg.sigma)
        relevance = torch.cat([torch.cat([i2i, i2t], 1), torch.cat([t2i, t2t], 1)], 0)
        connect = torch.cat([torch.cat([i2i_c, i2t_c], 1), torch.cat([t2i_c, t2t_c], 1)], 0)
        mask = cfg.mask_weight * relevance.masked_fill(~connect, float("-inf"))
        return mask, t2i, i2t

    def regularization_rows(self, t2i, i2t, img, cap):
        """Per-row KL(softmax(relevance / T) || softmax(exp(-cdist(img, cap)) / T)) (lib/mca.py relation_reg_loss,
        whose F.kl_div(batchmean) averages these rows): (image rows of i2t, caption rows of t2i)."""
        T = self.cfg.temperature
        guide = torch.exp(-torch.cdist(img, cap) / self.cfg.sigma).detach()

        def kl(a, b):
            log_p_a, log_p_b = F.log_softmax(a / T, dim=-1), F.log_softmax(b / T, dim=-1)
            return (log_p_b.exp() * (log_p_b - log_p_a)).sum(-1) * T ** 2

        return kl(guide, i2t), kl(guide.t(), t2i)

    def forward(self, img, cap, mask):
        out = self.gnn(torch.cat([img, cap])[None], mask=mask.to(img.dtype))[0]
        return F.normalize(out[: img.shape[0]], dim=-1), F.normalize(out[img.shape[0]:], dim=-1)


@MODELS.register("hrem", HREMConfig)
class HREM(MatchingModel):
    takes_region_lens = True  # the relation encoder and the pools mask each image's padding (variable regions)
    def __init__(self, cfg: HREMConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        for key in ("base_loss", "gnn_loss"):
            if getattr(cfg, key) not in ("trip", "vse"):
                raise ConfigError(f"model.{key} must be trip or vse, got {getattr(cfg, key)!r}")
        if cfg.residual_pool not in ("maxk", "gpo"):
            raise ConfigError(f"model.residual_pool must be maxk or gpo, got {cfg.residual_pool!r}")
        if cfg.embed_dim % cfg.nhead:
            raise ConfigError(f"model.embed_dim={cfg.embed_dim} is not divisible by model.nhead={cfg.nhead}")
        self.cfg = cfg
        self.loss_cfg = self.criterion.cfg
        d = cfg.embed_dim
        self.img_fc = FCMLP(img_dim, d, mlp=cfg.image_mlp, init="xavier")
        self.img_rel = FragmentRelation(d, cfg)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), d)
        self.txt_rel = FragmentRelation(d, cfg)
        self.augment = CaptionAugment(tokenizer, cfg.caption_aug)
        self.interaction = InstanceInteraction(d, cfg)

    # ------------------------------------------------------------------ encoders

    def embed(self, batch):
        feats, ids, lens = batch["feats"], batch["text_ids"], batch["text_lens"]
        if not self.training:
            return {"img": self.embed_images(batch), "cap": self.embed_captions(batch)}
        kept, r_lens = drop_regions(feats, self.cfg.region_drop, batch.get("feat_lens"))
        ids, lens = self.augment(ids, lens)
        regions, words = self.img_fc(kept), self.txt_enc(ids, lens)
        W = self.cfg.relation_words
        return {"img": self.img_rel(regions, r_lens), "cap": self.txt_rel(words, lens),
                # per-pair fragment features for the instance-level relations (fixed sizes: R regions, W tokens)
                "img_frag": _fit(regions.detach(), feats.shape[1]), "img_frag_len": r_lens.float(),
                "cap_frag": _fit(words.detach(), W), "cap_frag_len": lens.clamp(max=W).float()}

    def embed_images(self, batch):
        return self.img_rel(self.img_fc(batch["feats"]), region_lens(batch))

    def embed_captions(self, batch):
        ids, lens = batch["text_ids"], batch["text_lens"]
        return self.txt_rel(self.txt_enc(ids, lens), lens)

    # ------------------------------------------------------------------ losses

    def pair_loss(self, kind, im, s, ids, lo, hi, epoch, gen):
        """Loss of the queries im[lo:hi] (against all s) and s[lo:hi] (against all im); a sum."""
        lc = self.loss_cfg
        if kind == "vse":  # lib/loss.py ContrastiveLoss with mask_repeat (or loss.name=infonce)
            return self.criterion.on_embeddings(im[lo:hi], s[lo:hi], ids[lo:hi], im, s, ids, lo, epoch)
        sim = im @ s.t()
        if lc.mask_same_image:  # lib/loss.py pos_neg_mask: pairs of the same image are positives
            pos = ids[:, None] == ids[None, :]
        else:
            pos = torch.eye(len(ids), dtype=torch.bool, device=sim.device)
        return self.triplet(sim, pos, lo, hi, gen) + self.triplet(sim.t(), pos.t(), lo, hi, gen)

    def triplet(self, sim, pos, lo, hi, gen):
        """Triplet loss with distance-weighted negative sampling (lib/loss.py TripletLoss.loss_forward; Wu et
        al., ICCV 2017) for every (anchor row, positive) pair; only anchors in [lo, hi) count.

        Negatives are sampled for all anchors of the global batch (so every rank draws the same ones). An
        anchor without any negative of nonzero weight adds nothing (the reference's multinomial then raises
        and it returns 0 for the whole direction)."""
        c = self.cfg
        neg = ~pos
        with torch.no_grad():
            dist = (2 - 2 * sim).sqrt().clamp(min=c.trip_min_dist)
            log_w = (2.0 - c.trip_dim) * dist.log() - ((c.trip_dim - 3.0) / 2.0) * (1.0 - 0.25 * dist * dist).log()
            bad = ~torch.isfinite(log_w)
            log_w = (log_w * neg).masked_fill(bad, 0.0)
            w = (log_w - log_w.max(dim=1, keepdim=True).values).exp() * (neg & (dist < c.trip_cutoff))
            w = w / (w.sum(dim=1, keepdim=True) + 1e-20)
            anchor, positive = pos.nonzero(as_tuple=True)
            wa = w[anchor]
            ok = wa.sum(1) > 0
            negative = torch.multinomial(torch.where(ok[:, None], wa, torch.ones_like(wa)), 1, generator=gen).squeeze(1)
            keep = ok & (anchor >= lo) & (anchor < hi)
        anchor, positive, negative = anchor[keep], positive[keep], negative[keep]
        return F.relu(c.trip_margin + sim[anchor, negative] - sim[anchor, positive]).sum()

    def batch_loss(self, emb, img_ids, epoch):
        cfg = self.cfg
        img, cap = emb["img"].float(), emb["cap"].float()
        n = img.shape[0]
        c, ids_all, lo = self.criterion.candidates({"img": img, "cap": cap}, img_ids)
        img_all, cap_all, glob = c["img"], c["cap"], c["img"] is not img
        hi = lo + n
        seed = _batch_seed(ids_all, epoch)
        gen = torch.Generator(device=img.device).manual_seed(seed)
        loss = self.pair_loss(cfg.base_loss, img_all, cap_all, ids_all, lo, hi, epoch, gen)
        # The fragment keys stay in the graph with zero gradient (see _ZeroGrad).
        loss = loss + sum(_ZeroGrad.apply(emb[k]).float().sum() * 0.0 for k in FRAGMENT_KEYS if k in emb)
        if epoch < cfg.interaction_warmup_epochs:
            if is_distributed():  # DDP needs every parameter in the graph; zero gradient (see the report)
                loss = loss + sum(p.sum() for p in self.interaction.parameters()) * 0.0
            return loss
        missing = [k for k in FRAGMENT_KEYS if k not in emb]
        if missing:
            raise KeyError(f"HREM.batch_loss needs the training outputs of embed(): missing {missing}")
        frags = [emb[k].detach().float() for k in FRAGMENT_KEYS]
        if glob:
            frags = [gather_no_grad(f) for f in frags]
        regions, r_lens, words, w_lens = frags[0], frags[1].round().long(), frags[2], frags[3].round().long()
        inter = self.interaction
        mask, t2i, i2t = inter.relations(img_all, cap_all, regions, r_lens, words, w_lens)
        with _seeded_rng(seed + 1, img.device):  # the same dropout masks in every replay and on every rank
            img_g, cap_g = inter(img_all, cap_all, mask)
        gnn = 0.0
        if cfg.cross_loss:  # graph_lib.py: gnn_loss1 (img, enhanced cap) and gnn_loss2 (enhanced img, cap)
            gnn = self.pair_loss(cfg.gnn_loss, img_all, cap_g, ids_all, lo, hi, epoch, gen) \
                + self.pair_loss(cfg.gnn_loss, img_g, cap_all, ids_all, lo, hi, epoch, gen)
        gnn = gnn + self.pair_loss(cfg.gnn_loss, img_g, cap_g, ids_all, lo, hi, epoch, gen)  # gnn_loss3
        reg_i2t, reg_t2i = inter.regularization_rows(t2i, i2t, img_all, cap_all)
        # The regularization is a mean over the global batch's rows in the reference (batchmean KL): this
        # rank's rows / global batch size, so that the ranks' losses add up to it.
        reg = (reg_i2t[lo:hi].sum() + reg_t2i[lo:hi].sum()) / img_all.shape[0]
        return loss + gnn + cfg.reg_loss_weight * reg
