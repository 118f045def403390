"""VSE++ (Faghri et al., BMVC 2018; reference: fartashf/vsepp ``model.py``).

Image: precomputed features -> FC -> L2 (regions, if any, pooled after the FC; with variable-region data
over each image's own regions, ``feat_lens``).
Text: word embeddings -> GRU -> last hidden state -> L2, or a local BERT-family encoder.
Similarity: cosine, ``img @ cap.T``. Loss: bidirectional hinge, margin 0.2, hardest
negative (``itr.modules.losses.hinge_loss``).
"""
from dataclasses import dataclass

from itr.schema import component, param
from itr.models.base import MatchingModel
from itr.modules.encoders import build_image_encoder, text_entry
from itr.registry import MODELS


@dataclass
class VSEPPConfig:
    embed_dim: int = param(1024, "joint embedding size (VSE++: 1024)", min=1)
    image: dict = component("precomp", "image", "image encoder: precomp (FC over precomputed features)")
    text: dict = component("gru", "text", "text encoder: gru (vocabulary from the training captions) or hf (local transformers model)")


@MODELS.register("vsepp", VSEPPConfig)
class VSEPP(MatchingModel):
    takes_region_lens = True  # the precomp encoder pools over each image's own regions (variable-region shards)

    def __init__(self, cfg: VSEPPConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        self.cfg = cfg
        self.img_enc = build_image_encoder(cfg.image, img_dim, cfg.embed_dim)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), cfg.embed_dim)

    def embed_images(self, batch):
        lens = batch.get("feat_lens")
        return self.img_enc(batch["feats"]) if lens is None else self.img_enc(batch["feats"], lens)

    def embed_captions(self, batch):
        return self.txt_enc(batch["text_ids"], batch["text_lens"])
