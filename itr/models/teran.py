"""TERAN: Transformer Encoder Reasoning and Alignment Network (Messina et al., ACM TOMM 2021;
reference mesnico/TERAN ``models/teran.py@372f588``, ``models/visual.py``, ``models/utils.py``,
``models/text.py``, ``models/loss.py`` @85c186b, ``configs/teran_{coco,f30k}_MrSw*.yaml``).

Image (``TransformerPostProcessing`` + ``JointTextImageTransformerEncoder.forward_img``): an empty slot
is prepended to the 36 regions (zero feature, zero box: the collate's reserved CLS position); box
positional encoding ``concat-and-process`` (``PositionalEncodingImageBoxes``: [x, (x1, y1, x2, y2, area)]
-> Linear(D + 5, D) -> ReLU -> Linear(D, D)); a 4-layer transformer encoder over the features at their own
size D (``image-model.transformer-layers`` 4, 4 heads, feed-forward 2048, dropout 0.1, ReLU, post-norm);
Linear(D, embed) (``img_proj``); a 2-layer transformer at the embedding size (``model.layers`` 2,
``transformer_encoder_2``); L2 per region (``F.normalize``).
Text (``EncoderTextBERT`` + ``forward_txt``): BERT cut to its first 6 layers (``extraction-hidden-layer`` 6,
fine-tuned at the same lr) -> Linear(768, embed) (``cap_proj``) -> 2-layer transformer
(``transformer_encoder_1``) -> L2 per token.
Similarity (``AlignmentContrastiveLoss``, ``alignment-mode MrSw``, ``measure dot``): the CLS slot of the
image and the [CLS] token, [SEP] and the token before it (the final '.') are left out
(``im_set[:, 1:]``, ``s_seq[:, 1:-2]``, ``s_len - 3``); region-word dot products; max over the regions,
summed over the words. Loss: VSE++ hinge, margin 0.2, max violation, on that score matrix.

Variable region counts (bottom-up TSVs, ``feat_lens``): the padded regions are zeroed, masked out of both
image transformers (``src_key_padding_mask``, as ``TransformerPostProcessing`` / ``forward_img`` build it from
``feat_len``) and out of the max over regions; the image embedding is then {"regions", "lens"}.

Deviations: the reference fills masked alignments with 0 before the max over regions (a word whose
region scores are all negative would score 0 against a padded region); here a padded region never wins
the max (a padded batch scores as each image alone) and padded words are simply left out of the sum. The
global (``first``) aggregations and TransformerPostProcessing's own ``fc`` are not built: with
``loss-type: alignment`` their outputs feed neither the loss nor the score (an unused parameter would
also stall DDP).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.schema import component, param
from itr.errors import ConfigError, DataError
from itr.models.base import MatchingModel
from itr.modules.encoders import _transformer_layers, text_entry
from itr.modules.ops import length_mask
from itr.modules.xattn import tiled_pairs, xattn_batch_loss
from itr.registry import MODELS

POS_ENCODINGS = ("concat-and-process", "project-and-sum", "none")


def mrsw(img, words, lens, rmask=None):
    """(ni, nc) TERAN MrSw scores: for every word its best region's dot product, summed over the words.
    ``rmask`` (ni, R): the real regions of variable-region data; the others never win the max."""
    ni, R, d = img.shape
    nc, L, _ = words.shape
    s = (img.reshape(ni * R, d) @ words.reshape(nc * L, d).t()).view(ni, R, nc, L)
    if rmask is not None:
        s = s.masked_fill(~rmask[:, :, None, None], float("-inf"))
    best = s.max(dim=1).values  # (ni, nc, L)
    return best.masked_fill(~length_mask(lens, L)[None], 0.0).sum(-1)


class BoxPositions(nn.Module):
    """``PositionalEncodingImageBoxes``: boxes (x1, y1, x2, y2) plus their area, concatenated to the feature
    and processed (``concat-and-process``) or projected and added (``project-and-sum``)."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode == "project-and-sum":
            self.map = nn.Linear(5, dim)
        else:
            self.map = nn.Sequential(nn.Linear(dim + 5, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x, boxes):
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        info = torch.cat([boxes, area[..., None]], dim=-1)
        if self.mode == "project-and-sum":
            return x + self.map(info)
        return self.map(torch.cat([x, info], dim=-1))


def encoder(dim, layers, heads, ff, dropout):
    layer = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=ff, dropout=dropout,
                                       activation="relu", batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


@dataclass
class TERANConfig:
    embed_dim: int = param(1024, "joint embedding size (model.embed-size 1024)", min=1)
    image_layers: int = param(4, "transformer layers over the region features at their own size (image-model.transformer-layers 4)")
    layers: int = param(2, "transformer layers after the projections, text and image each (model.layers 2)")
    heads: int = param(4, "attention heads of every transformer (nhead=4 in the reference)")
    ff_dim: int = param(2048, "feed-forward size of every transformer layer (dim_feedforward=2048)")
    dropout: float = param(0.1, "dropout in the transformers (model.dropout / image-model.dropout 0.1)")
    shared_transformer: bool = param(False, "one post-projection transformer for both modalities (model.shared-transformer)")
    pos_encoding: str = param("concat-and-process", "box positional encoding: concat-and-process, project-and-sum, "
                                                    "or none (data without boxes) (image-model.pos-encoding)")
    text_layers: int = param(6, "keep the first N layers of the BERT backbone (text-model.extraction-hidden-layer 6; "
                                "0: all)")
    drop_last_word: bool = param(True, "leave the token before [SEP] (the caption's final '.') out of the alignment, "
                                       "as models/loss.py s_seq[:, 1:-2] / s_len - 3")
    score_budget: int = param(1 << 20, "most (pairs x regions x words) elements per batched scoring call; bounds memory")
    text: dict = component("hf_words", "text", "word-level text encoder: hf_words (a local BERT; the projection "
                                               "is TERAN's cap_proj)")


@MODELS.register("teran", TERANConfig)
class TERAN(MatchingModel):
    global_embeddings = False
    takes_region_lens = True  # variable-region data: the padding masked in the transformers and the MrSw max

    def __init__(self, cfg: TERANConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        if cfg.pos_encoding not in POS_ENCODINGS:
            raise ConfigError(f"model.pos_encoding must be one of {', '.join(POS_ENCODINGS)}, got {cfg.pos_encoding!r}")
        if img_dim <= 0:
            raise ConfigError("model.name=teran needs precomputed region features (got raw images)")
        for key, dim in (("img_dim", img_dim), ("model.embed_dim", cfg.embed_dim)):
            if dim % cfg.heads:
                raise ConfigError(f"model.heads={cfg.heads} must divide {key}={dim}")
        self.cfg = cfg
        self.pos = BoxPositions(img_dim, cfg.pos_encoding) if cfg.pos_encoding != "none" else None
        self.img_tf = encoder(img_dim, cfg.image_layers, cfg.heads, cfg.ff_dim, cfg.dropout)
        self.img_proj = nn.Linear(img_dim, cfg.embed_dim)
        self.txt_tf = encoder(cfg.embed_dim, cfg.layers, cfg.heads, cfg.ff_dim, cfg.dropout)
        self.img_tf2 = None if cfg.shared_transformer else encoder(cfg.embed_dim, cfg.layers, cfg.heads, cfg.ff_dim,
                                                                   cfg.dropout)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), cfg.embed_dim)
        backbone = getattr(self.txt_enc, "backbone", None)
        if cfg.text_layers and backbone is not None:
            layers = _transformer_layers(backbone)
            if cfg.text_layers > len(layers):
                raise ConfigError(f"model.text_layers={cfg.text_layers} but the text model has {len(layers)} layers")
            backbone.encoder.layer = nn.ModuleList(list(layers)[: cfg.text_layers])
            backbone.config.num_hidden_layers = cfg.text_layers

    # -- encoders
    def _regions(self, batch):
        """(B, R, embed) regions; with variable-region data (``feat_lens``) also the counts, the padding zeroed
        and masked out of both transformers (as the reference's ``src_key_padding_mask`` from ``feat_len``)."""
        x = batch["feats"].to(self.img_proj.weight.dtype)
        B, R, D = x.shape
        lens = batch.get("feat_lens")
        real = None if lens is None else length_mask(lens, R)[..., None]
        if real is not None:  # whatever the padding holds reaches no output and no gradient
            x = x.masked_fill(~real, 0)
        x = torch.cat([x.new_zeros(B, 1, D), x], dim=1)  # the reserved CLS slot
        if self.pos is not None:
            if "boxes" not in batch:
                raise DataError("model.pos_encoding needs region boxes ({split}_boxes.npy) and this data has none; "
                                "set model.pos_encoding=none")
            boxes = batch["boxes"].to(x.dtype)
            if real is not None:
                boxes = boxes.masked_fill(~real, 0)
            boxes = torch.cat([boxes.new_zeros(B, 1, 4), boxes], dim=1)
            x = self.pos(x, boxes)
        tf2 = self.img_tf2 if self.img_tf2 is not None else self.txt_tf
        if real is None:
            x = self.img_proj(self.img_tf(x))
            return F.normalize(tf2(x), p=2, dim=-1)[:, 1:]
        pad = ~length_mask(lens + 1, R + 1)  # the CLS slot is always real
        x = self.img_proj(self.img_tf(x, src_key_padding_mask=pad))
        x = F.normalize(tf2(x, src_key_padding_mask=pad), p=2, dim=-1)[:, 1:]
        return x.masked_fill(~real, 0), lens

    def _words(self, batch):
        ids, lens = batch["text_ids"], batch["text_lens"]
        x = self.txt_enc(ids, lens)  # (B, L, embed): BERT tokens -> cap_proj
        pad = ~length_mask(lens, x.shape[1])
        x = F.normalize(self.txt_tf(x, src_key_padding_mask=pad), p=2, dim=-1)
        n = (lens - (3 if self.cfg.drop_last_word else 2)).clamp(min=0)  # without [CLS], [SEP] (and the '.')
        x = x[:, 1:]
        return x * length_mask(n, x.shape[1])[..., None].to(x.dtype), n

    def embed_images(self, batch):
        """(B, R, embed) regions; with variable-region data {"regions" (zero past each count), "lens"}."""
        x = self._regions(batch)
        return {"regions": x[0], "lens": x[1]} if isinstance(x, tuple) else x

    def embed_captions(self, batch):
        words, lens = self._words(batch)
        return {"words": words, "lens": lens}

    def embed(self, batch):
        words, lens = self._words(batch)
        img = self._regions(batch)
        if isinstance(img, tuple):  # variable regions: the counts ride along as a side key
            return {"img": img[0], "cap": words, "cap_lens": lens, "img_lens": img[1]}
        return {"img": img, "cap": words, "cap_lens": lens}

    # -- similarity
    def pair_scores(self, img, words, lens):
        """``img``: (ni, R, embed) regions, or {"regions", "lens"} (variable regions: the padding masked)."""
        if isinstance(img, dict):
            def masked(i, w, ln):
                return mrsw(i[0], w, ln, rmask=i[1])

            reg = img["regions"]
            return tiled_pairs(masked, (reg, length_mask(img["lens"], reg.shape[1])), words, lens,
                               self.cfg.score_budget)
        return tiled_pairs(mrsw, img, words, lens, self.cfg.score_budget)

    def score(self, img_emb, cap_emb):
        return self.pair_scores(img_emb, cap_emb["words"], cap_emb["lens"])

    @torch.no_grad()
    def alignment(self, img_emb, cap_emb):
        """Region-word dot products of one pair (row 0 of each), (words, regions): the score is the sum over
        the words of each row's maximum. ``first_token``: word 0 is the token after [CLS]."""
        n = int(cap_emb["lens"][0])
        if isinstance(img_emb, dict):  # variable regions: the real ones only
            img_emb = img_emb["regions"][:, :int(img_emb["lens"][0])]
        return {"weights": cap_emb["words"][0, :n] @ img_emb[0].t(), "first_token": 1, "kind": "TERAN region-word alignment"}

    def batch_loss(self, emb, img_ids, epoch):
        return xattn_batch_loss(self.pair_scores, emb["img"], emb["cap"], emb["cap_lens"], img_ids,
                                self.criterion, epoch, img_lens=emb.get("img_lens"))
