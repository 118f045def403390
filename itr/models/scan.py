"""SCAN: Stacked Cross Attention (Lee et al., ECCV 2018; reference kuanghuei/SCAN ``model.py@053693f``).

Image (``EncoderImagePrecomp``, ``precomp_enc_type basic``): regions -> FC (Xavier uniform,
r = sqrt(6 / (in + out)), bias 0) -> ``l2norm(x) = x / (||x|| + 1e-8)`` per region (``no_imgnorm`` false).
Text (``EncoderText`` with ``--bi_gru``): word embedding (300, uniform +-0.1) -> bidirectional GRU, the two
directions' outputs averaged -> ``l2norm`` per word (``no_txtnorm`` false); <start>/<end> are words too
(SCAN's vocabulary encodes captions as ``<start> ... <end>`` and ``cap_lens`` counts them).
Similarity (``func_attention``, ``xattn_score_t2i`` / ``xattn_score_i2t``):

- t2i: each word attends to the regions. Raw scores s_rl = <v_r, w_l> are normalized over the words
  (``raw_feature_norm``, default ``clipped_l2norm``: LeakyReLU(0.1) then L2), then softmax over the
  regions with temperature ``lambda_softmax`` (9); the attended vector a_l = sum_r alpha_lr v_r is
  compared with the word by cosine; the word scores are pooled by LogSumExp (``lambda_lse`` 6) or Mean.
- i2t: each region attends to the words (normalization over the regions, softmax over the words,
  ``lambda_softmax`` 4), cosine per region, pooled over the regions (LSE ``lambda_lse`` 5; 20 on COCO).

Loss (``ContrastiveLoss``): the VSE++ hinge, margin 0.2, max violation, on the cross-attention score matrix.

Batched all pairs (the reference loops over captions in Python): for a tile the raw scores of every
(image, caption, region, word) come from one matrix product, and the attended vectors are never
materialized: <w, sum_r alpha_r v_r> = sum_r alpha_r s_r and ||sum_r alpha_r v_r||^2 = alpha^T G alpha
with G = V V^T the (R x R) Gram matrix of the image (for i2t the caption's (L x L) Gram). Memory is
bounded by evaluating sub-chunks of at most ``score_budget`` (pairs x R x L) elements.

Variable region counts (bottom-up TSVs, ``feat_lens``): the image embedding is {"regions", "lens"} and the
padded regions are zeroed and masked (no attention weight in t2i; outside the normalisation over the regions
and the pooling of the region scores in i2t), so a padded batch scores as each image alone.

Deviations: ``raw_feature_norm`` l1norm / clipped_l1norm call an undefined ``l1norm_d`` in the
reference (NameError); here they are the evident ``l1norm`` over the same axis. Only the ``basic``
image encoder (the paper's) is provided (no ``weight_norm``).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.schema import component, param
from itr.errors import ConfigError
from itr.models.base import MatchingModel
from itr.modules.encoders import text_entry
from itr.modules.ops import length_mask
from itr.modules.xattn import tiled_pairs, xattn_batch_loss
from itr.registry import MODELS

RAW_NORMS = ("clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "clipped", "softmax", "no_norm")
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")


def l2norm(x, dim=-1, eps=1e-8):
    """SCAN ``l2norm``: x / (sqrt(sum x^2) + eps)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def l1norm(x, dim=-1, eps=1e-8):
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def raw_norm(s, how, dim, valid=None):
    """``func_attention``'s first normalization of the raw scores along ``dim``. Padding words have zero
    features, so their raw scores are 0 and take no part in the L1 / L2 norms (the reference slices them
    off); for ``softmax`` over the words ``valid`` (broadcastable bool) masks them."""
    if how == "softmax":
        return torch.softmax(s if valid is None else s.masked_fill(~valid, float("-inf")), dim=dim)
    if how.startswith("clipped"):
        s = F.leaky_relu(s, 0.1)
    if how.endswith("l2norm"):
        s = l2norm(s, dim)
    elif how.endswith("l1norm"):
        s = l1norm(s, dim)
    return s


def pool(x, how, lam, valid=None):
    """Pool (..., K) scores over the last axis where ``valid`` (LogSumExp with temperature ``lam``, Mean, Max, Sum)."""
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    if how == "LogSumExp":
        return torch.logsumexp(lam * x.masked_fill(~valid, float("-inf")), dim=-1) / lam
    if how == "Max":
        return x.masked_fill(~valid, float("-inf")).max(-1).values
    x = x.masked_fill(~valid, 0.0)
    if how == "Sum":
        return x.sum(-1)
    return x.sum(-1) / valid.sum(-1).clamp(min=1).to(x.dtype)


def _pair_dots(img, words):
    """(ni, R, nc, L) raw scores <v_r, w_l> of every pair: one matrix product, no copy."""
    ni, R, d = img.shape
    nc, L, _ = words.shape
    return (img.reshape(ni * R, d) @ words.reshape(nc * L, d).t()).view(ni, R, nc, L)


def _cos(num, sq, qnorm, eps=1e-8):
    """``cosine_similarity(query, attended)``: sum_k a_k <q, c_k> / (||q|| ||sum_k a_k c_k||), clamped as the reference."""
    return num / (qnorm * sq.clamp(min=0).sqrt()).clamp(min=eps)


def _real_regions(img, rmask):
    """Regions past each image's count (``rmask`` (ni, R) False) zeroed, whatever they held."""
    return img if rmask is None else img.masked_fill(~rmask[..., None], 0)


def scan_t2i(img, words, lens, lambda_softmax=9.0, lambda_lse=6.0, agg="LogSumExp", norm="clipped_l2norm",
             rmask=None):
    """(ni, nc) SCAN text-to-image scores (``xattn_score_t2i``), every pair at once.

    Layout (ni, R, nc, L). The attended region vector of word l, a_l = sum_r alpha_rl v_r, is never built:
    <w_l, a_l> = sum_r alpha_rl s_rl and ||a_l||^2 = sum_r alpha_rl (G alpha)_rl, G = V V^T (R x R).
    ``rmask`` (ni, R): the real regions of variable-region data; the others get no attention weight."""
    ni, R = img.shape[:2]
    nc, L = words.shape[:2]
    valid = length_mask(lens, L)  # (nc, L)
    words = words * valid[..., None].to(words.dtype)
    img = _real_regions(img, rmask)
    pad = None if rmask is None else ~rmask[:, :, None, None]
    s = _pair_dots(img, words)
    if norm in ("clipped_l2norm", "l2norm") and lambda_softmax <= 40:
        # |a| <= 1, so exp(lambda (a - 1)) lies in [e^-80, 1]: no overflow, no underflow, no max pass. The
        # softmax's normalizer scales the attended vector only, and the cosine does not see a scale.
        a = F.leaky_relu(s, 0.1) if norm == "clipped_l2norm" else s
        inv = lambda_softmax / (torch.linalg.vector_norm(a, dim=-1, keepdim=True) + 1e-8)
        attn = torch.exp(a * inv - lambda_softmax)
        if pad is not None:
            attn = attn.masked_fill(pad, 0)
    else:
        a = raw_norm(s, norm, -1, valid)  # over the words (func_attention's queryL)
        z = lambda_softmax * a if pad is None else (lambda_softmax * a).masked_fill(pad, float("-inf"))
        attn = torch.softmax(z, dim=1)  # over the regions
    gram = img @ img.transpose(1, 2)  # (ni, R, R)
    g_attn = (gram @ attn.reshape(ni, R, nc * L)).view(ni, R, nc, L)
    cos = _cos((attn * s).sum(1), (attn * g_attn).sum(1), torch.linalg.vector_norm(words, dim=-1))  # (ni, nc, L)
    return pool(cos, agg, lambda_lse, valid.expand(ni, nc, L))


def scan_i2t(img, words, lens, lambda_softmax=4.0, lambda_lse=5.0, agg="LogSumExp", norm="clipped_l2norm",
             rmask=None):
    """(ni, nc) SCAN image-to-text scores (``xattn_score_i2t``), every pair at once.

    Layout (ni, R, nc, L): the raw scores are normalized over the regions (func_attention's queryL), the
    softmax runs over the valid words; ||sum_l alpha_rl w_l||^2 from the caption's (L x L) Gram matrix.
    ``rmask`` (ni, R): the real regions of variable-region data; the others (zeroed: raw scores 0, outside the
    L1 / L2 norms, masked in a softmax) are left out of the pooling over the regions."""
    ni, R = img.shape[:2]
    nc, L = words.shape[:2]
    valid = length_mask(lens, L)
    words = words * valid[..., None].to(words.dtype)
    img = _real_regions(img, rmask)
    s = _pair_dots(img, words)
    a = raw_norm(s, norm, 1, None if rmask is None else rmask[:, :, None, None])
    attn = torch.softmax((lambda_softmax * a).masked_fill(~valid, float("-inf")), dim=-1)
    gram = words @ words.transpose(1, 2)  # (nc, L, L)
    g_attn = torch.einsum("ircl,clm->ircm", attn, gram)
    cos = _cos((attn * s).sum(-1), (attn * g_attn).sum(-1), torch.linalg.vector_norm(img, dim=-1)[..., None])
    if rmask is None:
        return pool(cos.transpose(1, 2), agg, lambda_lse)  # over the regions
    return pool(cos.transpose(1, 2), agg, lambda_lse, rmask[:, None, :].expand(ni, nc, R))


@dataclass
class SCANConfig:
    embed_dim: int = param(1024, "joint embedding size (train.py --embed_size 1024)", min=1)
    direction: str = param("t2i", "t2i (words attend to regions) or i2t (regions attend to words) (--cross_attn)")
    lambda_softmax: float = param(9.0, "attention softmax temperature (--lambda_softmax; README: 9 for t-i, 4 for i-t)")
    lambda_lse: float = param(6.0, "LogSumExp pooling temperature (--lambda_lse; README: 6 t-i, 5 i-t F30K, 20 i-t COCO)")
    agg_func: str = param("LogSumExp", "pooling of the word (t2i) / region (i2t) scores: LogSumExp, Mean, Max, Sum (--agg_func)")
    raw_feature_norm: str = param("clipped_l2norm", "first normalization of the raw attention scores: "
                                  + ", ".join(RAW_NORMS) + " (--raw_feature_norm)")
    img_norm: bool = param(True, "L2-normalize each region embedding (not --no_imgnorm)")
    txt_norm: bool = param(True, "L2-normalize each word embedding (not --no_txtnorm)")
    score_budget: int = param(1 << 20, "most (pairs x regions x words) elements per batched scoring call; bounds memory")
    text: dict = component("gru_words", "text", "word-level text encoder: gru_words (--bi_gru: bidirectional, "
                                                "directions averaged) or hf_words")


@MODELS.register("scan", SCANConfig)
class SCAN(MatchingModel):
    global_embeddings = False
    takes_region_lens = True  # variable-region data: the padding gets no attention and no part in the pooling

    def __init__(self, cfg: SCANConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        if cfg.direction not in ("t2i", "i2t"):
            raise ConfigError(f"model.direction must be t2i or i2t, got {cfg.direction!r}")
        if cfg.raw_feature_norm not in RAW_NORMS:
            raise ConfigError(f"model.raw_feature_norm must be one of {', '.join(RAW_NORMS)}, got {cfg.raw_feature_norm!r}")
        if cfg.agg_func not in AGG_FUNCS:
            raise ConfigError(f"model.agg_func must be one of {', '.join(AGG_FUNCS)}, got {cfg.agg_func!r}")
        if img_dim <= 0:
            raise ConfigError("model.name=scan needs precomputed region features (got raw images)")
        self.cfg = cfg
        self.fc = nn.Linear(img_dim, cfg.embed_dim)
        r = (6.0 ** 0.5) / ((img_dim + cfg.embed_dim) ** 0.5)  # EncoderImagePrecomp.init_weights
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), cfg.embed_dim)

    # -- encoders
    def embed_images(self, batch):
        """(B, R, d) regions; with variable-region data (``feat_lens``) {"regions" (zero past each count), "lens"}."""
        feats, lens = batch["feats"], batch.get("feat_lens")
        valid = None if lens is None else length_mask(lens, feats.shape[1])[..., None]
        if valid is not None:  # the padding reaches no output and no gradient, whatever it holds
            feats = feats.masked_fill(~valid, 0)
        x = self.fc(feats.to(self.fc.weight.dtype))
        x = l2norm(x) if self.cfg.img_norm else x
        return x if valid is None else {"regions": x.masked_fill(~valid, 0), "lens": lens}

    def _words(self, batch):
        w = self.txt_enc(batch["text_ids"], batch["text_lens"])
        if self.cfg.txt_norm:
            w = l2norm(w)
        return w * length_mask(batch["text_lens"], w.shape[1])[..., None].to(w.dtype)

    def embed_captions(self, batch):
        return {"words": self._words(batch), "lens": batch["text_lens"]}

    def embed(self, batch):
        img = self.embed_images(batch)
        if isinstance(img, dict):  # variable regions: the counts ride along as a side key
            return {"img": img["regions"], "cap": self._words(batch), "cap_lens": batch["text_lens"],
                    "img_lens": img["lens"]}
        return {"img": img, "cap": self._words(batch), "cap_lens": batch["text_lens"]}

    # -- similarity
    def pair_scores(self, img, words, lens):
        """``img``: (ni, R, d) regions, or {"regions", "lens"} (variable regions: the padding masked)."""
        c = self.cfg
        fn = scan_t2i if c.direction == "t2i" else scan_i2t
        if isinstance(img, dict):
            def masked(i, w, ln):
                return fn(i[0], w, ln, c.lambda_softmax, c.lambda_lse, c.agg_func, c.raw_feature_norm, rmask=i[1])

            reg = img["regions"]
            return tiled_pairs(masked, (reg, length_mask(img["lens"], reg.shape[1])), words, lens, c.score_budget)

        def one(i, w, ln):
            return fn(i, w, ln, c.lambda_softmax, c.lambda_lse, c.agg_func, c.raw_feature_norm)

        return tiled_pairs(one, img, words, lens, c.score_budget)

    def score(self, img_emb, cap_emb):
        return self.pair_scores(img_emb, cap_emb["words"], cap_emb["lens"])

    @torch.no_grad()
    def alignment(self, img_emb, cap_emb):
        """The attention of one pair (row 0 of each), (words, regions): t2i, each word's softmax over the
        regions (rows sum to 1); i2t, each region's softmax over the words (columns sum to 1). ``first_token``:
        the caption token of word 0 (the tokenizer's ids; SCAN's words include <start> and <end>)."""
        c = self.cfg
        n = int(cap_emb["lens"][0])
        if isinstance(img_emb, dict):  # variable regions: the real ones only
            img_emb = img_emb["regions"][:, :int(img_emb["lens"][0])]
        s = img_emb[0] @ cap_emb["words"][0, :n].t()  # (R, L) raw scores
        if c.direction == "t2i":
            attn = torch.softmax(c.lambda_softmax * raw_norm(s, c.raw_feature_norm, -1), dim=0).t()
        else:
            attn = torch.softmax(c.lambda_softmax * raw_norm(s, c.raw_feature_norm, 0), dim=1).t()
        return {"weights": attn, "first_token": 0, "kind": f"SCAN {c.direction} attention"}

    def batch_loss(self, emb, img_ids, epoch):
        return xattn_batch_loss(self.pair_scores, emb["img"], emb["cap"], emb["cap_lens"], img_ids,
                                self.criterion, epoch, img_lens=emb.get("img_lens"))
