"""VSE++ (Faghri et al., BMVC 2018; reference: fartashf/vsepp ``model.py``).

Image: precomputed features -> FC -> L2 (regions, if any, pooled after the FC).
Text: word embeddings -> GRU -> last hidden state -> L2, or a local BERT-family encoder.
Similarity: cosine, ``img @ cap.T``. Loss: bidirectional hinge, margin 0.2, hardest
negative (``itr.modules.losses.hinge_loss``).
"""
from dataclasses import dataclass

import torch.nn as nn

from itr.config import component, param
from itr.modules.encoders import build_image_encoder, text_entry
from itr.registry import MODELS


@dataclass
class VSEPPConfig:
    embed_dim: int = param(1024, "joint embedding size (VSE++: 1024)")
    image: dict = component("precomp", "image", "image encoder: precomp (FC over precomputed features)")
    text: dict = component("gru", "text", "text encoder: gru (vocabulary from the training captions) or hf (local transformers model)")


@MODELS.register("vsepp", VSEPPConfig)
class VSEPP(nn.Module):
    def __init__(self, cfg: VSEPPConfig, img_dim: int, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.img_enc = build_image_encoder(cfg.image, img_dim, cfg.embed_dim)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), cfg.embed_dim)

    def embed_images(self, feats):
        return self.img_enc(feats)

    def embed_captions(self, ids, lens):
        return self.txt_enc(ids, lens)

    def forward(self, batch):
        return {"img": self.embed_images(batch["feats"]), "cap": self.embed_captions(batch["text_ids"], batch["text_lens"])}

    @staticmethod
    def score(img_emb, cap_emb):
        """All-pairs similarity of embedded images and captions."""
        return img_emb @ cap_emb.t()

    def pretrained_parameters(self):
        """Parameters of a pretrained text backbone (trained at ``optim.text_lr_mult`` x lr)."""
        backbone = getattr(self.txt_enc, "backbone", None)
        return list(backbone.parameters()) if backbone is not None else []
