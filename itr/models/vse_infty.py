"""VSE-infinity (Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding", CVPR 2021).

Reference: woodfrog/vse_infty (master branch: BERT; ``bigru`` branch: BiGRU), ``lib/encoders.py``,
``lib/modules/aggr/gpo.py``, ``lib/modules/mlp.py``, ``lib/loss.py``, ``lib/vse.py``,
``lib/datasets/image_caption.py``, ``train_region.sh``.

Image (BUTD regions, ``precomp_enc_type basic`` as train_region.sh uses): FC to the joint space plus a
2-layer MLP residual (BatchNorm), then GPO over the regions, then L2. Text: BiGRU (``gru_words``) or a
local BERT (``hf_words``) token features, then GPO over the tokens, then L2. Training drops 20% of the
regions and masks / replaces / deletes 20% of the caption words. Loss: VSE++ hinge, margin 0.2, summed
violations for ``loss.warmup_epochs`` (1) then the hardest negative (the default ``batch_loss``).
Pooled features (one region per image) work too: GPO over one element returns it.
"""
from dataclasses import dataclass

import torch

from itr.schema import component, param
from itr.models.base import MatchingModel, region_lens
from itr.modules.encoders import l2norm, text_entry
from itr.modules.fragments import FCMLP, CaptionAugment, drop_regions
from itr.modules.gpo import GPO
from itr.registry import MODELS


@dataclass
class VSEInftyConfig:
    embed_dim: int = param(1024, "joint embedding size (train_region.sh: --embed_size 1024)", min=1)
    image_mlp: bool = param(True, "image: FC + 2-layer MLP residual (precomp_enc_type basic, train_region.sh); "
                                  "false: FC only")
    region_drop: float = param(0.2, "training: drop each region with this probability, keeping at least one "
                                    "(image_caption.py: rand > 0.20)")
    caption_aug: float = param(0.2, "training: probability that a caption word is masked / replaced / deleted "
                                    "(image_caption.py process_caption: 0.20)")
    gpo_dim: int = param(32, "GPO positional-encoding and GRU size (encoders.py: GPO(32, 32))")
    text: dict = component("gru_words", "text", "text encoder with word-level outputs: gru_words (bigru branch) "
                                                "or hf_words (local BERT, master branch)")


@MODELS.register("vse_infty", VSEInftyConfig)
class VSEInfty(MatchingModel):
    takes_region_lens = True  # GPO pools over each image's own regions (variable-region shards)

    def __init__(self, cfg: VSEInftyConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        self.cfg = cfg
        self.img_fc = FCMLP(img_dim, cfg.embed_dim, mlp=cfg.image_mlp, init="vse")
        self.img_pool = GPO(cfg.gpo_dim, cfg.gpo_dim)
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), cfg.embed_dim)
        self.txt_pool = GPO(cfg.gpo_dim, cfg.gpo_dim)
        self.augment = CaptionAugment(tokenizer, cfg.caption_aug)

    def encode_image(self, feats, lens):
        return l2norm(self.img_pool(self.img_fc(feats), lens))

    def encode_text(self, ids, lens):
        return l2norm(self.txt_pool(self.txt_enc(ids, lens), lens))

    def embed(self, batch):
        feats, ids, lens = batch["feats"], batch["text_ids"], batch["text_lens"]
        if self.training:
            feats, img_lens = drop_regions(feats, self.cfg.region_drop, batch.get("feat_lens"))
            ids, lens = self.augment(ids, lens)
        else:
            img_lens = region_lens(batch)
        return {"img": self.encode_image(feats, img_lens), "cap": self.encode_text(ids, lens)}

    def embed_images(self, batch):
        return self.encode_image(batch["feats"], region_lens(batch))

    def embed_captions(self, batch):
        return self.encode_text(batch["text_ids"], batch["text_lens"])
