"""SelfAlign on top of VSRN and CAMERA (reference Zjamie813/SelfAlign: vsrn_SelfAlign/ and
camera_SelfAlign/, ``model_SelfAlign.py``, ``loss_SelfAlign.py``, ``train_SelfAlign.py``).

Two alignment objectives are added to the base model, each switchable (``model.concept``,
``model.context``), so that the same recipe measures the gain over the base:

- Concept-level alignment (``LCA_loss``): SwAV-style online clustering. Learnable prototypes
  (1024, re-normalized to unit length before every use), Sinkhorn-Knopp codes (epsilon 0.05) of
  the image's region features give the targets; every word of a caption is matched to its most
  similar region of the paired image and must predict that region's code from its own prototype
  scores (softmax at student temperature 0.1). Words: the projected word embeddings (VSRN: the
  ``local_fc`` of the word vectors; CAMERA: the BERT projection); regions: the FC features.
  The prototypes are a batch-level module: the Sinkhorn codes are computed on the GLOBAL batch
  (all ranks, all micro-batches), and they get no update during the first epoch (the reference
  drops their gradients while ``epoch < 1``).
- Context-level alignment (``CRA_loss``): InfoNCE between a modality's "attended global" vector
  (BN(Linear(mean of locals)) + ReLU) and the other modality's context-enhanced locals
  (BN + ReLU of the GCN/AGSA region features or of the GRU/AGSA word features), temperature 0.7
  in both directions, the 512 hardest negatives among the other pairs' locals, averaged 0.5/0.5.
  The context features also join the retrieval embedding as in the reference: the image gets
  0.5 x [gated fusion of mean and attended global; mean of locals] appended, the caption
  [mean of locals; fusion] (pairwise crossed), so the model stays a dual encoder.

Total loss as the reference: base (hinge [+ caption loss, VSRN] [+ 0.01 diversity, CAMERA]) +
LCA + CRA, weights 1. The LCA and CRA of the reference are batch means; here each rank returns the
sum over its own pairs divided by the global batch size, so the sum over ranks and accumulation
steps equals the reference's mean over one batch.

The SelfAlign encoders follow the SelfAlign code, which differs slightly from the base models':
VSRN's text GRU reads ``local_fc(word vectors)`` (embed_dim wide) instead of the word vectors,
and on Flickr30K the image FC output is not L2-normalized and the final image state gets a
BatchNorm (``model.fc_norm=false``, ``model.out_bn=true``); CAMERA's projected words are
L2-normalized before the text AGSA.

Documented choices where the reference is silent or does not fit a distributed trainer:
- Padding: the reference's text-side means, BatchNorms and CRA keys include padding positions
  (padded to the batch's longest caption, or to 32 tokens for BERT); here they are masked.
  SelfAlign-CAMERA's ``model.pad_tokens=32`` (CAMERA's key) gives the reference's evaluation
  embedding; in training its concept loss then also sees the padding words (the reference's does not).
- Word features are padded to a fixed ``word_slots`` (from ``data.max_words``) so that they can be
  concatenated across micro-batches and gathered across ranks.
- CRA negatives exclude the query's own pair (as the reference) and, with
  ``loss.mask_same_image``, the other captions of the same image (the reference cannot tell them
  apart; they are rare at Flickr30K/COCO scale).
- Sinkhorn iterations: the models of the reference call ``LCA_loss(..., sinkhorn_iterations=2)``
  (the class default is 3); 2 is the default here.
- Variable region counts (``feat_lens``): the Sinkhorn codes (equal use of the prototypes) are over the real
  regions, words match real regions only, and the image's context locals (CRA keys, their mean) leave the
  padding out; the counts ride along as ``img_lens``.
- Frozen prototypes in the first epoch get a zero gradient rather than none (a parameter without a
  gradient would stall DDP); with Adam and no weight decay the update is zero as well, the only
  difference being Adam's step count (bias correction) when they start to move.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itr.schema import param
from itr.distributed import is_distributed
from itr.errors import ConfigError
from itr.models.camera import CAMERA, CAMERAConfig
from itr.models.vsrn import VSRN, VSRNConfig
from itr.modules.alignment import ConceptAlignment, ContextHead, cra_loss, pad_slots, tokenizer_slots
from itr.modules.encoders import text_entry
from itr.modules.ops import diversity_regularizer, l2norm, length_mask, masked_mean, xavier_linear
from itr.registry import MODELS


# ----------------------------------------------------------------------------- the shared part


@dataclass
class SelfAlignFields:
    concept: bool = param(True, "concept-level alignment (LCA: Sinkhorn prototypes, loss_SelfAlign.py LCA_loss)")
    context: bool = param(True, "context-level alignment (CRA: local-global InfoNCE, loss_SelfAlign.py CRA_loss; "
                                "also appends the context features to the retrieval embedding)")
    prototypes: int = param(1024, "number of prototypes (train_SelfAlign.py --local_clu_num 1024)")
    student_temp: float = param(0.1, "softmax temperature of the word prototype scores (LCA_loss student_temp=0.1)")
    epsilon: float = param(0.05, "Sinkhorn entropy epsilon (LCA_loss epsilon=0.05)")
    sinkhorn_iters: int = param(2, "Sinkhorn iterations (model_SelfAlign.py passes sinkhorn_iterations=2; class default 3)")
    freeze_prototypes_epochs: int = param(1, "no prototype update in the first N epochs (train_emb: grads dropped "
                                             "while epoch < 1)")
    concept_weight: float = param(1.0, "weight of the LCA loss (train_emb: + L_loss)")
    context_weight: float = param(1.0, "weight of the CRA loss (train_emb: + ctx_loss, itself 0.5 x each direction)")
    tau_image_locals: float = param(0.7, "CRA temperature, caption global vs image locals (--v5_tao 0.7)")
    tau_text_locals: float = param(0.7, "CRA temperature, image global vs word locals (--v6_tao 0.7)")
    negatives: int = param(512, "CRA hardest negatives per query (CRA_loss neg_num=512)")
    ctx_relu: bool = param(True, "ReLU after the context BatchNorms (--ctx_relu / --ctx_fc_relu 1)")
    word_slots: int = param(0, "word features are padded to this many tokens to be gathered across micro-batches "
                               "and ranks (0: from data.max_words, which must then be set)")


class SelfAlignMixin:
    """Builds the alignment modules and adds their losses in ``batch_loss`` (on the global batch)."""

    def build_alignment(self, cfg, tokenizer):
        self.word_slots = cfg.word_slots or tokenizer_slots(tokenizer)
        if (cfg.concept or cfg.context) and not self.word_slots:
            raise ConfigError(f"model.name={self.model_name}: set data.max_words (or model.word_slots): SelfAlign "
                              f"gathers word features across micro-batches and ranks, which needs a fixed length")
        d = cfg.embed_dim
        self.lca = ConceptAlignment(d, cfg.prototypes, cfg.student_temp, cfg.epsilon, cfg.sinkhorn_iters) \
            if cfg.concept else None
        if cfg.context:
            self.img_ctx = ContextHead(d, cfg.ctx_relu)
            self.txt_ctx = ContextHead(d, cfg.ctx_relu)

    def alignment_inputs(self, regions, words, mask, img_locals_src, txt_locals_src, img_lens=None):
        """Per-pair tensors for batch_loss, plus the context features for the retrieval embedding.
        ``img_lens``: variable regions (``regions`` and ``img_locals_src`` zero past each image's count)."""
        out, ctx = {}, {}
        img_mask = None if img_lens is None else length_mask(img_lens, regions.shape[1])
        if self.cfg.concept or self.cfg.context:
            out["cap_mask"] = pad_slots(mask.to(regions.dtype), self.word_slots)
            if img_lens is not None:
                out["img_lens"] = img_lens
        if self.cfg.concept:
            out["img_regions"] = l2norm(regions)
            out["cap_words"] = pad_slots(l2norm(words), self.word_slots)
        if self.cfg.context:
            ic = self.img_ctx(img_locals_src, img_mask)
            tc = self.txt_ctx(txt_locals_src, mask)
            out.update(img_locals=ic["locals"], img_glo=ic["glo"], cap_locals=pad_slots(tc["locals"], self.word_slots),
                       cap_glo=tc["glo"])
            ctx = {"img": (ic["fused"], self.mean_locals(ic, img_mask)),
                   "cap": (masked_mean(tc["locals"], mask), tc["fused"])}
        return out, ctx

    @staticmethod
    def mean_locals(ic, img_mask):
        return ic["locals"].mean(1) if img_mask is None else masked_mean(ic["locals"], img_mask)

    def image_context(self, locals_src, img_lens):
        """The image's context features for its retrieval embedding (evaluation)."""
        img_mask = None if img_lens is None else length_mask(img_lens, locals_src.shape[1])
        ic = self.img_ctx(locals_src, img_mask)
        return {"img": (ic["fused"], self.mean_locals(ic, img_mask))}

    def alignment_loss(self, emb, img_ids, epoch):
        cfg = self.cfg
        keys = [k for k in ("img_regions", "cap_words", "cap_mask", "img_locals", "img_glo", "cap_locals", "cap_glo",
                            "img_lens") if k in emb]
        n = emb[keys[0]].shape[0]
        with torch.autocast(emb[keys[0]].device.type, enabled=False):
            emb = {k: emb[k].float() if emb[k].is_floating_point() else emb[k] for k in keys}
            full, ids_all, offset = self.criterion.candidates(emb, img_ids)
            if full is not emb:
                n_global = full[keys[0]].shape[0]
            else:  # one process, or per-rank negatives (whose loss is still over the global batch)
                n_global = n * (torch.distributed.get_world_size() if is_distributed() else 1)
            regions = full["img_regions" if cfg.concept else "img_locals"]
            img_mask = length_mask(full["img_lens"], regions.shape[1]) if "img_lens" in full else None
            total = 0.0
            if cfg.concept:
                frozen = epoch < cfg.freeze_prototypes_epochs
                total = total + cfg.concept_weight * self.lca(
                    full["img_regions"], emb["cap_words"], emb["cap_mask"], offset, n_global, frozen, img_mask)
            if cfg.context:
                same = img_ids[:, None] == ids_all[None, :] if self.criterion.cfg.mask_same_image else None
                v2t = cra_loss(full["img_locals"], full["cap_glo"], offset, n, n_global, cfg.tau_image_locals,
                               cfg.negatives, key_mask_all=None if img_mask is None else img_mask.float(), same=same)
                t2v = cra_loss(full["cap_locals"], full["img_glo"], offset, n, n_global, cfg.tau_text_locals,
                               cfg.negatives, key_mask_all=full["cap_mask"], same=same)
                total = total + cfg.context_weight * 0.5 * (v2t + t2v)
        return total


# ----------------------------------------------------------------------------- SelfAlign-VSRN


class SelfAlignGRUText(nn.Module):
    """SelfAlign-VSRN's ``EncoderText``: word vectors (U(-0.1, 0.1)) -> local_fc (Xavier) ->
    GRU(embed_dim) -> last valid state -> L2; also returns the projected words and the GRU states."""

    def __init__(self, tcfg, vocab_size, dim):
        super().__init__()
        if tcfg.bidirectional:
            raise ConfigError("model.text.bidirectional: SelfAlign-VSRN's text GRU is unidirectional")
        self.embed = nn.Embedding(vocab_size, tcfg.word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.local_fc = xavier_linear(nn.Linear(tcfg.word_dim, dim))
        self.rnn = nn.GRU(dim, dim, tcfg.num_layers, batch_first=True)

    def forward(self, ids, lens):
        words = self.local_fc(self.embed(ids))
        packed = pack_padded_sequence(words, lens.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return {"emb": l2norm(h[-1]), "words": words, "states": states, "mask": length_mask(lens, ids.shape[1])}


@dataclass
class SelfAlignVSRNConfig(VSRNConfig, SelfAlignFields):
    """VSRN's keys (``fc_norm`` / ``out_bn``: the Flickr30K variant, in SelfAlign's model_SelfAlign.py as in VSRN's)
    and SelfAlign's."""


@MODELS.register("selfalign_vsrn", SelfAlignVSRNConfig)
class SelfAlignVSRN(SelfAlignMixin, VSRN):
    model_name = "selfalign_vsrn"

    def __init__(self, cfg: SelfAlignVSRNConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(cfg, img_dim, tokenizer, loss_cfg)
        self.build_alignment(cfg, tokenizer)

    def build_text(self, cfg, tokenizer):
        if cfg.text.name != "gru":
            raise ConfigError(f"model.text.name={cfg.text.name!r}: selfalign_vsrn uses the GRU text encoder "
                              f"(model.text.name=gru)")
        _, tcfg = text_entry(cfg.text)
        return SelfAlignGRUText(tcfg, len(tokenizer), cfg.embed_dim)

    def _sides(self, batch, images=True, captions=True):
        im = self.img_enc(batch["feats"], batch.get("feat_lens")) if images else None
        tx = self.txt_enc(batch["text_ids"], batch["text_lens"]) if captions else None
        return im, tx

    def _img_embedding(self, im, ctx):
        if not ctx:
            return im["emb"]
        fused, mean_locals = ctx["img"]
        return torch.cat([im["emb"], 0.5 * fused, 0.5 * mean_locals], dim=-1)

    def _cap_embedding(self, tx, ctx):
        if not ctx:
            return tx["emb"]
        mean_locals, fused = ctx["cap"]
        return torch.cat([tx["emb"], mean_locals, fused], dim=-1)

    def embed(self, batch):
        im, tx = self._sides(batch)
        out, ctx = self.alignment_inputs(im["fc"], tx["words"], tx["mask"], im["gcn"], tx["states"],
                                         batch.get("feat_lens"))
        out.update(img=self._img_embedding(im, ctx), cap=self._cap_embedding(tx, ctx))
        aux = self.caption_loss(im["gcn_n"], batch)
        if aux is not None:
            out["aux_loss"] = aux
        return out

    def embed_images(self, batch):
        im = self.img_enc(batch["feats"], batch.get("feat_lens"))
        if not self.cfg.context:
            return im["emb"]
        return self._img_embedding(im, self.image_context(im["gcn"], batch.get("feat_lens")))

    def embed_captions(self, batch):
        tx = self.txt_enc(batch["text_ids"], batch["text_lens"])
        if not self.cfg.context:
            return tx["emb"]
        tc = self.txt_ctx(tx["states"], tx["mask"])
        return self._cap_embedding(tx, {"cap": (masked_mean(tc["locals"], tx["mask"]), tc["fused"])})

    def batch_loss(self, emb, img_ids, epoch):
        loss = self.criterion(emb, {"img_ids": img_ids}, epoch)
        if self.cfg.concept or self.cfg.context:
            loss = loss + self.alignment_loss(emb, img_ids, epoch)
        return loss


# ----------------------------------------------------------------------------- SelfAlign-CAMERA


@dataclass
class SelfAlignCAMERAConfig(CAMERAConfig, SelfAlignFields):
    pass


@MODELS.register("selfalign_camera", SelfAlignCAMERAConfig)
class SelfAlignCAMERA(SelfAlignMixin, CAMERA):
    model_name = "selfalign_camera"
    selfalign_text = True

    def __init__(self, cfg: SelfAlignCAMERAConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(cfg, img_dim, tokenizer, loss_cfg)
        self.build_alignment(cfg, tokenizer)
        if cfg.pad_tokens and (cfg.concept or cfg.context) and cfg.pad_tokens != self.word_slots:
            raise ConfigError(f"model.pad_tokens={cfg.pad_tokens} but the word features are gathered in "
                              f"{self.word_slots} slots: set data.max_words={cfg.pad_tokens - 2}")

    def _img_embedding(self, im, ctx):
        views = im["views"]
        if not ctx:
            return views
        fused, mean_locals = ctx["img"]
        extra = 0.5 * torch.cat([mean_locals, fused], dim=-1)  # camera_SelfAlign: [mean locals; fusion] x 0.5
        return torch.cat([views, extra.unsqueeze(1).expand(-1, views.shape[1], -1)], dim=-1)

    def _cap_embedding(self, tx, ctx):
        if not ctx:
            return tx["emb"]
        mean_locals, fused = ctx["cap"]
        return torch.cat([tx["emb"], fused, mean_locals], dim=-1)  # [fusion; mean locals]

    def embed(self, batch):
        im = self.image_features(batch)
        tx = self.txt_enc(batch["text_ids"], batch["text_lens"])
        out, ctx = self.alignment_inputs(im["fc"], tx["words"], tx["mask"], im["agsa"], tx["agsa"],
                                         batch.get("feat_lens"))
        out.update(img=self._img_embedding(im, ctx), cap=self._cap_embedding(tx, ctx))
        if self.cfg.div_weight:
            out["aux_loss"] = self.cfg.div_weight * diversity_regularizer(im["smry"])
        return out

    def embed_images(self, batch):
        im = self.image_features(batch)
        if not self.cfg.context:
            return im["views"]
        return self._img_embedding(im, self.image_context(im["agsa"], batch.get("feat_lens")))

    def embed_captions(self, batch):
        tx = self.txt_enc(batch["text_ids"], batch["text_lens"])
        if not self.cfg.context:
            return tx["emb"]
        tc = self.txt_ctx(tx["agsa"], tx["mask"])
        return self._cap_embedding(tx, {"cap": (masked_mean(tc["locals"], tx["mask"]), tc["fused"])})

    def batch_loss(self, emb, img_ids, epoch):
        loss = self.criterion.with_score(self.score, emb["img"].float(), emb["cap"].float(), img_ids, epoch)
        if self.cfg.concept or self.cfg.context:
            loss = loss + self.alignment_loss(emb, img_ids, epoch)
        return loss
