"""CAMERA: Context-Aware Multi-View Summarization (Qu et al., ACM MM 2020; reference LgQu/CAMERA).

Image (``model.py`` ``EncoderImagePrecompSelfAttn``): regions -> FC (Xavier) -> L2 (over the
regions, as the reference's ``l2norm(X, dim=1)``: ``model.l2_axis``); box
positions -> 6 absolute features -> Linear -> sigmoid (``PositionEncoder``); adaptive gating
self-attention over ``regions * positions`` with a BatchNorm residual on the regions (``AGSA``,
1 layer, 64 heads); L2 (the same axis); multi-view summarization: 7 dilated 1-d convolutions over the regions ->
Linear -> k=12 region-weight columns, softmax over regions, k weighted sums -> L2 (``Summarization``).
The image embedding is (B, k, d).
Text (``models/TextEncoder.py``): BERT (frozen in the reference: ``freeze_layers(self.bert)``) ->
Linear -> AGSA -> residual MLP with BatchNorm -> mean over tokens -> L2.
Similarity (``MultiViewMatching``): the best view, max_k <view_k, caption>.
Loss (``train_emb``): VSE++ hinge with max violation on that similarity + 0.01 x the diversity
regularizer sum_b ||A_b^T A_b - I||^2, A_b the region-L2-normalized summarization logits
(``loss.py`` ``DiversityRegularization``; a sum over the batch, so a per-micro-batch aux_loss).

AGSA, Summarization, PositionEncoder, MultiViewMatching and loss.py are missing from LgQu/CAMERA;
they were read from copies vendored by forks (the same code in several, incl. the commented-out
copies in a CAMERA fork's model.py).

Deviations (documented choices):
- Boxes arrive normalized to [0, 1] (itr's ``{split}_boxes.npy``). The reference divides pixel
  boxes by the image width/height, which gives the same x, y, w, h and area ratio; its aspect
  feature w/h is in pixels, here in normalized units (the image aspect ratio is not in the data).
- The reference pads every caption to 32 tokens and neither masks its text AGSA nor its mean
  over tokens (padding tokens take part). Here padding is masked in the attention, the
  BatchNorms and the mean, so a caption's embedding does not depend on the batch's padding.
  ``model.pad_tokens=32`` restores the reference's text forward (``itr import --from camera``
  sets it: a released checkpoint was trained with its padding).

Variable region counts (bottom-up TSVs, ``feat_lens``): the padded regions are zeroed (L2 over the real regions),
get no attention in the AGSA and no part in its BatchNorm, reach the summarization's convolutions as zeros (as
the convolutions' own padding past an image's end) and get no view weight, so a padded batch embeds as each image
alone; the diversity regularizer sees the real regions only.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.schema import component, param
from itr.errors import ConfigError, DataError
from itr.models.base import MatchingModel
from itr.modules.encoders import HFTextEncoder, text_entry
from itr.modules.ops import (L2_AXIS_HELP, check_l2_axis, diversity_regularizer, l2norm, l2norm_over, length_mask,
                            masked_bn, masked_mean, reference_padding, xavier_linear)
from itr.registry import MODELS


def box_features(boxes, eps=1e-4):
    """(x1, y1, w, h, w / h, w * h) of normalized (x1, y1, x2, y2) boxes (``absoluteEncode``)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)
    return torch.stack([x1, y1, w, h, w / h.clamp(min=eps), w * h], dim=-1)


class PositionEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(6, dim)

    def forward(self, boxes):
        return torch.sigmoid(self.proj(box_features(boxes.to(self.proj.weight.dtype))))


class GatedQueryAttention(nn.Module):
    """Multi-head self-attention whose queries and keys are gated per position (``GatedQueryAttLayer``).

    G = fc_q(q) * fc_k(k) per head and position, M = sigmoid(fc_g(G)) gates q and k (first and
    second half), softmax(q k^T / sqrt(d_k)) v; no output projection.
    """

    def __init__(self, dim, heads, drop=0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.heads={heads} must divide model.embed_dim={dim}")
        self.h, self.dk = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc_q = nn.Linear(self.dk, self.dk)
        self.fc_k = nn.Linear(self.dk, self.dk)
        self.fc_g = nn.Linear(self.dk, 2 * self.dk)
        self.drop = nn.Dropout(drop) if drop > 0 else None

    def forward(self, x, mask=None):
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, self.h, self.dk).transpose(1, 2) for lin in (self.q, self.k, self.v))
        gate = torch.sigmoid(self.fc_g(self.fc_q(q) * self.fc_k(k)))
        q, k = q * gate[..., :self.dk], k * gate[..., self.dk:]
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dk)
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1)
        if self.drop is not None:
            p = self.drop(p)
        return (p @ v).transpose(1, 2).reshape(b, n, d)


class AGSA(nn.Module):
    """One AGSA layer: x + dropout(BN(attention(x * pos))) (``AGSA`` with num_layers=1)."""

    def __init__(self, dim, heads, drop=0.0):
        super().__init__()
        self.att = GatedQueryAttention(dim, heads, drop)
        self.bn = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, pos=None, mask=None):
        a = self.att(x * pos if pos is not None else x, mask)
        return x + self.drop(masked_bn(self.bn, a, mask))


class Summarization(nn.Module):
    """k region-weight columns from 7 dilated convolutions over the regions (``Summarization``)."""

    OUT = (256, 128, 128, 128, 128, 128, 128)
    KERNEL = (1, 3, 3, 3, 5, 5, 5)
    DILATION = (1, 1, 2, 3, 1, 2, 3)

    def __init__(self, dim, k):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, c, ks, dilation=dl, padding=dl * (ks - 1) // 2)
            for c, ks, dl in zip(self.OUT, self.KERNEL, self.DILATION))
        self.fc = nn.Linear(sum(self.OUT), k)

    def forward(self, x):
        """``x`` zero past each image's regions: the convolutions then see what they see past an image's end."""
        y = x.transpose(1, 2)
        y = torch.cat([F.relu(conv(y)) for conv in self.convs], dim=1)
        return self.fc(y.transpose(1, 2))  # (B, R, k) logits


class CameraImageEncoder(nn.Module):
    def __init__(self, img_dim, dim, heads, k, drop=0.0, l2_axis="regions"):
        super().__init__()
        self.l2_axis = check_l2_axis(l2_axis)
        self.fc = xavier_linear(nn.Linear(img_dim, dim))
        self.pos = PositionEncoder(dim)
        self.agsa = AGSA(dim, heads, drop)
        self.mvs = Summarization(dim, k)

    def forward(self, feats, boxes, lens=None):
        """``lens``: each image's region count (variable-region data, padding past it), or None: all count."""
        mask = None if lens is None else length_mask(lens, feats.shape[1])
        fc = l2norm_over(self.fc(feats.to(self.fc.weight.dtype)), self.l2_axis, mask)
        a = self.agsa(fc, self.pos(boxes), mask)
        an = l2norm_over(a, self.l2_axis, mask)
        smry = self.mvs(an)
        if mask is None:
            views = l2norm(torch.softmax(smry, dim=1).transpose(1, 2) @ an)  # (B, k, d)
        else:  # no view weight on padding; the summary (diversity regularizer) zero there
            pad = ~mask.unsqueeze(-1)
            weights = torch.softmax(smry.masked_fill(pad, torch.finfo(smry.dtype).min), dim=1)
            views = l2norm(weights.transpose(1, 2) @ an)
            smry = smry.masked_fill(pad, 0)
        return {"fc": fc, "agsa": a, "views": views, "smry": smry, "mask": mask}


class CameraTextEncoder(nn.Module):
    """Local BERT (itr's hf encoder: its backbone and its Linear projection) -> AGSA -> MLP -> mean.

    ``norm_words`` is SelfAlign-CAMERA's variant (camera_SelfAlign/model_SelfAlign.py
    ``TextEncoder``): the projected words are L2-normalized (``l2_axis``; over the caption's tokens
    as the reference's dim=1, padding left out) before the AGSA and the projection starts from the
    Xavier init.
    """

    def __init__(self, tcfg, dim, heads, drop=0.0, norm_words=False, l2_axis="regions", pad_tokens=0):
        super().__init__()
        self.l2_axis = check_l2_axis(l2_axis)
        self.pad_tokens = pad_tokens
        hf = HFTextEncoder(tcfg, 0, dim)
        self.backbone, self.mapping = hf.backbone, hf.proj
        pooler = getattr(self.backbone, "pooler", None)
        if pooler is not None:  # BERT's pooler is unused here: no gradient, so DDP must not wait for one
            pooler.requires_grad_(False)
        if norm_words:
            xavier_linear(self.mapping)
        self.norm_words = norm_words
        self.agsa = AGSA(dim, heads, drop)
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, ids, lens):
        """``mask``: the positions that count as tokens after BERT: the caption's, or all ``pad_tokens``."""
        if self.pad_tokens:  # the reference: every position past BERT is a token, padding included
            ids, real = reference_padding(ids, lens, self.pad_tokens)
            mask = torch.ones_like(real)
        else:
            real = mask = length_mask(lens, ids.shape[1])
        h = self.backbone(input_ids=ids, attention_mask=real.long()).last_hidden_state
        words = self.mapping(h.to(self.mapping.weight.dtype))
        if self.norm_words:
            words = l2norm_over(words, self.l2_axis, mask)
        a = self.agsa(words, mask=mask)
        y = masked_bn(self.bn, self.fc2(self.drop(F.relu(self.fc1(a)))), mask)
        x = a + self.drop(y)
        return {"emb": l2norm(masked_mean(x, mask)), "words": words, "agsa": a, "mask": mask}


def multiview_score(img, cap):
    """(n, k, d) image views x (m, d) captions -> (n, m): the best view (``MultiViewMatching``)."""
    return torch.einsum("nkd,md->nmk", img, cap).amax(-1)


@dataclass
class CAMERAConfig:
    embed_dim: int = param(2048, "joint embedding size (CAMERA train.py --embed_size 2048)", min=1)
    heads: int = param(64, "AGSA heads, image and text (train.py --head 64)")
    views: int = param(12, "summarization views k (train.py --smry_k 12)")
    div_weight: float = param(0.01, "weight of the diversity regularizer (train.py --smry_lamda 0.01)")
    dropout: float = param(0.0, "dropout in AGSA and the text MLP (train.py --drop 0.0)")
    l2_axis: str = param("regions", L2_AXIS_HELP)
    pad_tokens: int = param(0, "0: caption padding is masked after BERT; N: as the reference, every caption is "
                               "padded to N tokens (id 0) and the padding positions take part in the text AGSA, "
                               "BatchNorm and mean (LgQu/CAMERA data.py@3611b1c pads to --max_words 32, "
                               "models/TextEncoder.py@3611b1c masks none of them); set by itr import")
    text: dict = component("hf", "text", "text encoder: hf (a local BERT directory; CAMERA freezes BERT: text.freeze=true)")


@MODELS.register("camera", CAMERAConfig)
class CAMERA(MatchingModel):
    model_name = "camera"
    takes_region_lens = True  # variable-region data: padding masked in the AGSA, the summarization and its views
    selfalign_text = False

    def __init__(self, cfg: CAMERAConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        self.cfg = cfg
        if cfg.text.name != "hf":
            raise ConfigError(f"model.text.name={cfg.text.name!r}: {type(self).__name__} needs a BERT-family "
                              f"text encoder (model.text.name=hf)")
        _, tcfg = text_entry(cfg.text)
        self.img_enc = CameraImageEncoder(img_dim, cfg.embed_dim, cfg.heads, cfg.views, cfg.dropout, cfg.l2_axis)
        self.txt_enc = CameraTextEncoder(tcfg, cfg.embed_dim, cfg.heads, cfg.dropout, norm_words=self.selfalign_text,
                                         l2_axis=cfg.l2_axis, pad_tokens=cfg.pad_tokens)

    def image_features(self, batch):
        if "boxes" not in batch:
            raise DataError(f"model.name={self.model_name} needs region boxes (batch key 'boxes', from {{split}}_boxes.npy) but the data has none "
                            f"(pooled features?); use data with region features and boxes")
        return self.img_enc(batch["feats"], batch["boxes"], batch.get("feat_lens"))

    def embed(self, batch):
        im = self.image_features(batch)
        out = {"img": im["views"], "cap": self.embed_captions(batch)}
        if self.cfg.div_weight:
            out["aux_loss"] = self.cfg.div_weight * diversity_regularizer(im["smry"])
        return out

    def embed_images(self, batch):
        return self.image_features(batch)["views"]

    def embed_captions(self, batch):
        return self.txt_enc(batch["text_ids"], batch["text_lens"])["emb"]

    @staticmethod
    def score(img_emb, cap_emb):
        return multiview_score(img_emb, cap_emb)

    def batch_loss(self, emb, img_ids, epoch):
        return self.criterion.with_score(self.score, emb["img"].float(), emb["cap"].float(), img_ids, epoch)
