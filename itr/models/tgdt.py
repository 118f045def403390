"""TGDT: Token-Guided Dual Transformer with global and local similarity (Liu et al., 2023;
reference LCFractal/TGDT "Image-Text Retrieval with Global and Local Similarity" (GLS), built on TERAN).

Facts from the reference (LCFractal/TGDT@067ee00 unless said otherwise):
- Image (``models/visual.py`` ``TransformerPostProcessing``, TERAN ``models/utils.py@85c186b``
  ``PositionalEncodingImageBoxes('concat-and-process')``): regions ++ (x1, y1, x2, y2, area) ->
  Linear(D+5, D) -> ReLU -> Linear(D, D); a transformer encoder over the regions at the feature
  size (``image-model.transformer-layers: 4``, 4 heads, feed-forward 2048, dropout 0.1); an
  empty slot in front of the regions is the image's global token (TERAN's collate:
  ``feat_lengths = f.shape[0] + 1``); then ``img_proj`` Linear(D, embed).
- Text (TERAN ``models/text.py@85c186b`` ``EncoderTextBERT``): BERT cut to its first 6 layers
  (``extraction-hidden-layer: 6``, fine-tuned at the base lr), [CLS] is the global slot; then
  ``cap_proj`` Linear(768, embed).
- Per modality (``models/baseline.py``): a 2-layer transformer (``model.layers: 2``, 4 heads,
  feed-forward 2048, dropout 0.1) over [global; local tokens] gives the local tokens; a second
  2-layer transformer (``transformer_encoder_text`` / ``_img``) gives the global token (position
  0, ``aggregation: first``); all tokens L2-normalized.
- Loss ``alignment+matching`` (``models/loss.py``): the local matching loss is the VSE++ hinge
  (margin 0.2, max violation) on the MrSw alignment score: region-word dot products (padding 0),
  max over regions, sum over words, x10 ([CLS] / the image slot and the end tokens are left out);
  the global alignment loss is the same hinge on the global cosine plus a consistency term
  ``((s_txt - s_img).abs().max(0) - 0.3).clamp(min=0).sum()``, s_img / s_txt the intra-modal
  cosine matrices of the global tokens (the "consistent" part of the CMC objective).
- Test (``test.py`` / ``test_gl.py``, ``evaluate_utils/evaluation.py``): global cosine, local
  MrSw score, or two stages: the global top-K (i2t 50, t2i 100) reranked by local + global.

Here: ``model.test_mode`` picks what ``score`` returns for every pair of an eval tile (global,
local, or sum = global + local over all pairs: the two-stage rerank with K = all), and
``global_score`` / ``local_score`` are batched all-pairs functions for a two-stage evaluation.

Deviations (documented choices):
- The reference feeds the detached first-stage tokens into the global transformers
  (``full_cap_emb.detach()``), trains its local loss on the second-stage tokens and scores the
  local test on the first-stage tokens; as released, train.py then trains nothing below the
  second stage. Here both stages train end to end: local tokens come from the first stage in
  training and at test alike, the global token from the second stage on top of it
  (``model.global_layers``; 0 reads it off the first stage).
- The image's global token is a learned vector (TERAN's slot is a zero feature with a zero box);
  with a word-level GRU (``text.name=gru_words``) a learned global token is prepended to the words.
  Padding is masked in every attention (the reference's second stage attends to padding); with variable
  region counts (``feat_lens``, bottom-up TSVs) the padded regions too, and they never win the local max,
  so a padded batch scores as each image alone.
- The local score leaves out [CLS] and [SEP]; the reference's ``s_seq[:, 1:-2]`` also drops the
  token before [SEP] (a period in TERAN's captions): ``model.drop_last_word`` (imported checkpoints).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from itr.schema import component, param
from itr.errors import ConfigError, DataError
from itr.models.base import MatchingModel
from itr.modules.encoders import text_entry
from itr.modules.ops import l2norm, length_mask
from itr.modules.xattn import tiled_pairs
from itr.registry import MODELS

# TGDT's local scores: length-grouped sub-chunks of ~4 MB intermediates stay in cache (docs/performance.md)
LOCAL_BUDGET = 1 << 20


# ----------------------------------------------------------------------------- TGDT pieces


def mrsw(regions, rmask, words, wmask):
    """MrSw alignment (TERAN / TGDT ``AlignmentContrastiveLoss``): for every image x caption pair, region-word
    dot products, max over the valid regions, sum over the valid words. (I, R, d) x (C, L, d) -> (I, C).
    (The reference sets padded entries to 0 before the max; the same whenever regions are not padded.)"""
    a = torch.einsum("ird,cld->icrl", regions, words)
    a = a.masked_fill(~rmask[:, None, :, None], float("-inf")).amax(2)  # padded regions never win the max
    return a.masked_fill(~wmask[None], 0.0).sum(-1)


def box_info(boxes):
    """(x1, y1, x2, y2, area) of normalized boxes (TERAN ``PositionalEncodingImageBoxes``)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area.unsqueeze(-1)], dim=-1)


def encoder(dim, heads, ff, dropout, layers):
    if dim % heads:
        raise ConfigError(f"model.heads={heads} must divide the transformer width {dim}")
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff, dropout=dropout, activation="relu",
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def run_encoder(enc, x, mask):
    return enc(x, src_key_padding_mask=~mask) if enc is not None else x


@dataclass
class TGDTConfig:
    embed_dim: int = param(1024, "joint embedding size (configs/f30k_all.yaml model.embed-size 1024)", min=1)
    image_layers: int = param(4, "transformer layers over the regions at the feature size, before the projection "
                                 "(image-model.transformer-layers 4, TERAN TransformerPostProcessing)")
    layers: int = param(2, "first-stage transformer layers per modality in the joint space: the local tokens "
                           "(model.layers 2, baseline.py transformer_encoder_1 / _2)")
    global_layers: int = param(2, "second-stage layers per modality whose position 0 is the global token "
                                  "(baseline.py transformer_encoder_text / _img, model.layers 2); 0: global token "
                                  "read off the first stage")
    heads: int = param(4, "attention heads of every transformer (baseline.py / visual.py nhead=4)")
    ff_dim: int = param(2048, "feed-forward size of every transformer (dim_feedforward=2048)")
    dropout: float = param(0.1, "transformer dropout (model.dropout / image-model.dropout 0.1)")
    box_encoding: bool = param(True, "TERAN concat-and-process box encoding of the regions (pos-encoding); "
                                     "needs region boxes")
    bert_layers: int = param(6, "hf_words text: keep the first N transformer layers (text-model.extraction-hidden-layer "
                                "6); 0: all")
    local_scale: float = param(10.0, "the MrSw local score is multiplied by this (models/loss.py: "
                                     "alignments.max(2)[0].sum(2)*10)")
    global_weight: float = param(1.0, "weight of the global alignment (matching) loss (training.matching-weight 1)")
    local_weight: float = param(1.0, "weight of the local matching (alignment) loss (training.alignment-weight 1)")
    consistency_weight: float = param(1.0, "weight of the intra-modal consistency term of the global loss "
                                           "(models/loss.py ContrastiveLoss intra_loss, added with weight 1)")
    consistency_margin: float = param(0.3, "margin of the consistency term (models/loss.py: margin = 0.3)")
    drop_last_word: bool = param(False, "hf_words: also leave the token before [SEP] (a caption's final '.') out of "
                                        "the local score, as LCFractal/TGDT models/loss.py@067ee00 s_seq[:, 1:-2] / "
                                        "s_len - 3 (itr import --from tgdt sets it)")
    test_mode: str = param("sum", "what score() returns for eval tiles: global (cosine of the global tokens), local "
                                  "(scaled MrSw of the local tokens) or sum (global + local for every pair)")
    text: dict = component("hf_words", "text", "token-level text encoder: hf_words (local BERT; its [CLS] is the "
                                               "global slot) or gru_words (a learned global token is prepended)")


@MODELS.register("tgdt", TGDTConfig)
class TGDT(MatchingModel):
    global_embeddings = False
    takes_region_lens = True  # variable-region data: the padding masked in every transformer and the local max

    def __init__(self, cfg: TGDTConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        if cfg.test_mode not in ("global", "local", "sum"):
            raise ConfigError(f"model.test_mode={cfg.test_mode!r}; choose global, local or sum")
        if cfg.text.name not in ("hf_words", "gru_words"):
            raise ConfigError(f"model.text.name={cfg.text.name!r}: tgdt needs per-token text features "
                              f"(hf_words or gru_words)")
        if img_dim <= 0:
            raise DataError("model.name=tgdt needs precomputed region features (not raw images)")
        self.cfg = cfg
        d = cfg.embed_dim
        # image: [global slot; regions (+ boxes)] -> transformer at the feature size -> projection
        self.img_cls = nn.Parameter(torch.zeros(img_dim))
        nn.init.normal_(self.img_cls, std=0.02)
        self.box_map = nn.Sequential(nn.Linear(img_dim + 5, img_dim), nn.ReLU(), nn.Linear(img_dim, img_dim)) \
            if cfg.box_encoding else None
        self.img_tf = encoder(img_dim, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.image_layers) if cfg.image_layers else None
        self.img_proj = nn.Linear(img_dim, d)
        # text: token features projected to the joint space (the encoder's own projection = cap_proj)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), d)
        self.bert_cls = cfg.text.name == "hf_words"
        if cfg.drop_last_word and not self.bert_cls:
            raise ConfigError("model.drop_last_word leaves out the token before BERT's [SEP]; it needs text.name=hf_words")
        if self.bert_cls and cfg.bert_layers:
            layers = self.txt_enc.backbone.encoder.layer
            if cfg.bert_layers > len(layers):
                raise ConfigError(f"model.bert_layers={cfg.bert_layers} but the text model has {len(layers)} layers")
            self.txt_enc.backbone.encoder.layer = layers[: cfg.bert_layers]
            self.txt_enc.backbone.config.num_hidden_layers = cfg.bert_layers  # text_model/ config of checkpoints
        self.txt_cls = None if self.bert_cls else nn.Parameter(torch.randn(d) * 0.02)
        # per modality: local stage, then the global stage
        self.img_local = encoder(d, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.layers) if cfg.layers else None
        self.txt_local = encoder(d, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.layers) if cfg.layers else None
        self.img_global = encoder(d, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.global_layers) if cfg.global_layers else None
        self.txt_global = encoder(d, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.global_layers) if cfg.global_layers else None

    # -- encoders
    def embed_images(self, batch):
        """{"glob", "regions", "lens"}; with variable-region data (``feat_lens``) the padded regions are zeroed,
        masked out of every image transformer (so out of the global token too) and zero in "regions"."""
        x = batch["feats"].to(self.img_proj.weight.dtype)
        b, r, _ = x.shape
        lens = batch.get("feat_lens")
        real = None if lens is None else length_mask(lens, r)[..., None]
        if real is not None:  # whatever the padding holds reaches no output and no gradient
            x = x.masked_fill(~real, 0)
        if self.box_map is not None:
            if "boxes" not in batch:
                raise DataError("model.name=tgdt with model.box_encoding=true needs region boxes (batch key 'boxes', "
                                "from {split}_boxes.npy); use data with boxes or model.box_encoding=false")
            boxes = batch["boxes"].to(x.dtype)
            if real is not None:
                boxes = boxes.masked_fill(~real, 0)
            x = self.box_map(torch.cat([x, box_info(boxes)], dim=-1))
        x = torch.cat([self.img_cls.to(x.dtype).expand(b, 1, -1), x], dim=1)
        if real is None:
            mask = torch.ones(b, r + 1, dtype=torch.bool, device=x.device)
            lens = torch.full((b,), r, dtype=torch.long, device=x.device)
        else:
            mask = length_mask(lens + 1, r + 1)  # the global slot is always real
        x = self.img_proj(run_encoder(self.img_tf, x, mask))
        loc = run_encoder(self.img_local, x, mask)
        glob = run_encoder(self.img_global, loc, mask)[:, 0]
        regions = l2norm(loc[:, 1:])
        if real is not None:
            regions = regions.masked_fill(~real, 0)
        return {"glob": l2norm(glob), "regions": regions, "lens": lens}

    def embed_captions(self, batch):
        ids, lens = batch["text_ids"], batch["text_lens"]
        x = self.txt_enc(ids, lens)
        if self.bert_cls:  # [CLS] w1 .. wn [SEP]: [CLS] is the global slot, the words are local
            seq, seq_lens = x, lens
            first, n_local = 1, (lens - (3 if self.cfg.drop_last_word else 2)).clamp(min=1)
        else:  # a learned global token in front of the words
            seq = torch.cat([self.txt_cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
            seq_lens = lens + 1
            first, n_local = 1, lens
        mask = length_mask(seq_lens, seq.shape[1])
        loc = run_encoder(self.txt_local, seq, mask)
        glob = run_encoder(self.txt_global, loc, mask)[:, 0]
        words = loc[:, first:]
        words = words * length_mask(n_local, words.shape[1]).unsqueeze(-1).to(words.dtype)  # padding is exactly 0
        n = int(n_local.max()) if n_local.numel() else 0
        return {"glob": l2norm(glob), "words": l2norm(words[:, :n]), "lens": n_local}

    def embed(self, batch):
        im, cap = self.embed_images(batch), self.embed_captions(batch)
        return {"img": im["glob"], "cap": cap["glob"], "img_regions": im["regions"], "img_lens": im["lens"],
                "cap_words": cap["words"], "cap_lens": cap["lens"]}

    # -- similarities (batched over all pairs)
    @staticmethod
    def global_score(img_emb, cap_emb):
        """Cosine of the global tokens, (n_img, n_cap)."""
        return img_emb["glob"] @ cap_emb["glob"].t()

    def local_score(self, img_emb, cap_emb):
        """Scaled MrSw of the local tokens, (n_img, n_cap), in sub-chunks of captions grouped by length
        (``tiled_pairs``) to bound memory."""
        reg, rl = img_emb["regions"], img_emb["lens"]
        words, wl = cap_emb["words"], cap_emb["lens"]

        def one(im, w, ln):
            return mrsw(im[0], im[1], w, length_mask(ln, w.shape[1]))

        s = tiled_pairs(one, (reg, length_mask(rl, reg.shape[1])), words, wl, LOCAL_BUDGET)
        return self.cfg.local_scale * s

    def global_vectors(self, emb):
        """The global tokens: ``global_score`` is their inner product."""
        return emb["glob"]

    @torch.no_grad()
    def alignment(self, img_emb, cap_emb):
        """Region-word dot products of the local tokens of one pair (row 0 of each), (words, regions), x
        ``local_scale``: the local score is the sum over the words of each row's maximum (word 0: the token after
        [CLS] with BERT, the first token with a GRU)."""
        n, r = int(cap_emb["lens"][0]), int(img_emb["lens"][0])
        w = cap_emb["words"][0, :n] @ img_emb["regions"][0, :r].t()
        return {"weights": self.cfg.local_scale * w, "first_token": 1 if self.bert_cls else 0, "kind": "TGDT local alignment"}

    def pair_score(self, img_emb, cap_emb):
        """``score`` of image row p with caption row p, (P,): the two-stage rerank batches the shortlists of
        many queries into one call instead of one ``score`` call per query."""
        mode = self.cfg.test_mode
        glob = (img_emb["glob"] * cap_emb["glob"]).sum(-1)
        if mode == "global":
            return glob
        reg, words = img_emb["regions"], cap_emb["words"]
        rmask, wmask = length_mask(img_emb["lens"], reg.shape[1]), length_mask(cap_emb["lens"], words.shape[1])
        a = torch.einsum("prd,pld->prl", reg, words).masked_fill(~rmask[:, :, None], float("-inf")).amax(1)
        loc = self.cfg.local_scale * a.masked_fill(~wmask, 0.0).sum(-1)
        return loc if mode == "local" else glob + loc

    def score(self, img_emb, cap_emb):
        mode = self.cfg.test_mode
        if mode == "global":
            return self.global_score(img_emb, cap_emb)
        if mode == "local":
            return self.local_score(img_emb, cap_emb)
        return self.global_score(img_emb, cap_emb) + self.local_score(img_emb, cap_emb)

    # -- the consistent multimodal contrastive objective
    def consistency(self, img, cap):
        """sum_j max(0, max_i |s_txt[i, j] - s_img[i, j]| - margin) over the (global) batch (models/loss.py intra_loss:
        s_img = img img^T, s_txt = cap cap^T, a max over dim 0 per column j)."""
        diff = (cap @ cap.t() - img @ img.t()).abs()
        return (diff.amax(0) - self.cfg.consistency_margin).clamp(min=0).sum()

    def batch_loss(self, emb, img_ids, epoch):
        cfg, crit = self.cfg, self.criterion
        keys = ("img", "cap", "img_regions", "img_lens", "cap_words", "cap_lens")
        local = {k: emb[k] for k in keys}
        allc, ids_all, offset = crit.candidates(local, img_ids)

        def hinge(s_i2t, s_t2i):
            return crit.on_scores(s_i2t, s_t2i, img_ids, ids_all, offset, epoch)

        img_l = {"glob": local["img"], "regions": local["img_regions"], "lens": local["img_lens"]}
        cap_l = {"glob": local["cap"], "words": local["cap_words"], "lens": local["cap_lens"]}
        img_a = {"glob": allc["img"], "regions": allc["img_regions"], "lens": allc["img_lens"]}
        cap_a = {"glob": allc["cap"], "words": allc["cap_words"], "lens": allc["cap_lens"]}
        loss = 0.0
        if cfg.global_weight:
            g = hinge(self.global_score(img_l, cap_a), self.global_score(img_a, cap_l).t())
            if cfg.consistency_weight:
                # a term of the whole (gathered) batch: every rank computes it and takes 1/world of it, so the sum
                # over ranks, and the gradient routed back by the gather, are those of the whole batch
                share = 1 if allc["img"] is local["img"] else torch.distributed.get_world_size()
                g = g + cfg.consistency_weight * self.consistency(allc["img"], allc["cap"]) / share
            loss = loss + cfg.global_weight * g
        if cfg.local_weight:
            if offset == 0 and allc["img"].shape[0] == local["img"].shape[0]:  # one rank: one matrix serves both ways
                s = self.local_score(img_l, cap_l)
                s_i2t, s_t2i = s, s.t()
            else:
                s_i2t, s_t2i = self.local_score(img_l, cap_a), self.local_score(img_a, cap_l).t()
            loss = loss + cfg.local_weight * hinge(s_i2t, s_t2i)
        return loss
