"""Sentence-level image-text matcher: the Vokenization cross-modal matching model (Tan and Bansal,
EMNLP 2020; reference: airsplay/vokenization ``xmatching/``) moved from token to sentence level.

Image: raw pixels -> a ResNet (transformers ``ResNetModel``; local pretrained weights from
``model.image.backbone_path`` or a random init from the recipe's config) -> global average pool ->
MLP (Linear, ReLU, Dropout, Linear) -> L2. As the reference (``xmatching/model.py`` VisnModel):
BatchNorm layers are frozen (``frozen_bn``), the stem conv and the first stage ("conv1 + layer1")
are frozen (``freeze_stem``), and the whole backbone is frozen unless ``finetune``.
Text: a local BERT-family model -> the [CLS] token (``model.text.pool: cls``) -> MLP -> L2. The
reference maps every token (``LangModel``); the sentence-level variant keeps the [CLS] token only.
Similarity: dot product of the unit vectors (cosine).
Loss: ``paired_hinge_loss``, the reference's ``paired_hinge_rank_loss`` (``xmatching/loss.py``)
with sentences in place of tokens: the first half of the (global) batch are the positives, the
second half the negatives; each sentence must score its own image ``margin`` (0.5) above the
image of its partner in the other half.
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.schema import component_name, param
from itr.distributed import is_distributed
from itr.errors import ConfigError
from itr.models.base import MatchingModel
from itr.modules.losses import LossConfig
from itr.modules.encoders import HFTextEncoder, l2norm, text_entry
from itr.registry import IMAGE_ENCODERS, MODELS


def mlp_head(in_dim, hidden, out_dim, dropout):
    """The reference's MLP: Linear -> ReLU -> Dropout -> Linear (``xmatching/model.py``; hidden 256,
    dropout 0.3 there; the sentence-level variant uses a 1024 hidden layer)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


# ----------------------------------------------------------------------------- image


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (as detectron2's,
    which the reference copies in ``xmatching/frozen_batch_norm.py``). Same state-dict keys as
    BatchNorm2d except ``num_batches_tracked``."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module):
        """Replace every BatchNorm2d in ``module`` (in place) by a frozen copy; returns ``module``."""
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = cls(child.num_features, child.eps)
                with torch.no_grad():
                    if child.affine:
                        frozen.weight.copy_(child.weight)
                        frozen.bias.copy_(child.bias)
                    if child.track_running_stats:
                        frozen.running_mean.copy_(child.running_mean)
                        frozen.running_var.copy_(child.running_var)
                setattr(module, name, frozen)
            else:
                cls.convert(child)
        return module


@dataclass
class ResNetImageConfig:
    backbone_path: str = param("", "local transformers ResNet directory (config.json + weights, e.g. microsoft/resnet-50, "
                                   "a ResNetModel or ResNetForImageClassification); empty: random init from the keys "
                                   "below; nothing is downloaded. Evaluating a checkpoint needs this directory again")
    depths: List[int] = param([3, 4, 6, 3], "random init only: blocks per stage (ResNet-50: 3 4 6 3)")
    hidden_sizes: List[int] = param([256, 512, 1024, 2048], "random init only: output channels per stage")
    embedding_size: int = param(64, "random init only: stem channels")
    layer_type: str = param("bottleneck", "random init only: bottleneck or basic blocks")
    frozen_bn: bool = param(True, "freeze every BatchNorm (statistics and affine), as xmatching/model.py")
    freeze_stem: bool = param(True, "keep the stem conv and the first stage fixed (torchvision conv1 + layer1), as xmatching")
    finetune: bool = param(False, "train the backbone (xmatching --visn-finetune; off there by default: only the MLP trains)")


@IMAGE_ENCODERS.register("xmatching_resnet", ResNetImageConfig)
class ResNetImageEncoder(nn.Module):
    """Raw uint8 pixels -> ImageNet normalization -> ResNet -> average pool -> MLP -> L2 (xmatching VisnModel)."""

    def __init__(self, cfg: ResNetImageConfig, img_dim: int, embed_dim: int, mlp_dim: int = 1024, dropout: float = 0.3):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_resnet(cfg)
        if cfg.frozen_bn:
            FrozenBatchNorm2d.convert(self.backbone)
        if cfg.freeze_stem:
            self.backbone.embedder.requires_grad_(False)
            self.backbone.encoder.stages[0].requires_grad_(False)
        if not cfg.finetune:
            self.backbone.requires_grad_(False)
        self.mlp = mlp_head(self.backbone.config.hidden_sizes[-1], mlp_dim, embed_dim, dropout)

    def train(self, mode=True):
        super().train(mode)
        if not self.cfg.finetune:  # a fixed backbone also keeps its BatchNorm statistics
            self.backbone.eval()
        return self

    def features(self, pixels):
        from itr.data.images import normalize

        x = normalize(pixels).to(next(self.backbone.parameters()).dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.finetune):
            return self.backbone(pixel_values=x).pooler_output.flatten(1)

    def forward(self, pixels):
        return l2norm(self.mlp(self.features(pixels)))


def build_resnet(cfg: ResNetImageConfig):
    """A transformers ResNetModel: pretrained from ``backbone_path``, else random from the config keys."""
    from transformers import ResNetConfig, ResNetModel

    if cfg.backbone_path:
        from itr.schema import resolve_path

        p = resolve_path(cfg.backbone_path)
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.image.backbone_path={cfg.backbone_path}: no config.json in {p}; it must be a "
                              f"local transformers ResNet directory (runs never download)")
        if not any((p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            raise ConfigError(f"model.image.backbone_path={cfg.backbone_path}: no model.safetensors or "
                              f"pytorch_model.bin in {p}")
        try:
            return ResNetModel.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
        except (ValueError, OSError) as e:
            raise ConfigError(f"model.image.backbone_path={cfg.backbone_path}: not a loadable ResNet ({e})") from None
    if cfg.layer_type not in ("bottleneck", "basic"):
        raise ConfigError(f"model.image.layer_type must be bottleneck or basic, got {cfg.layer_type!r}")
    if not cfg.depths or len(cfg.depths) != len(cfg.hidden_sizes):
        raise ConfigError(f"model.image.depths {cfg.depths} and hidden_sizes {cfg.hidden_sizes} must be "
                          f"non-empty lists of the same length (one entry per stage)")
    return ResNetModel(ResNetConfig(depths=list(cfg.depths), hidden_sizes=list(cfg.hidden_sizes),
                                    embedding_size=cfg.embedding_size, layer_type=cfg.layer_type))


# ----------------------------------------------------------------------------- text


class MLPTextEncoder(HFTextEncoder):
    """A local BERT-family model -> [CLS] (or masked mean) -> MLP -> L2 (xmatching LangModel, one
    vector per sentence). Loading, freezing and checkpointing as ``HFTextEncoder`` (same keys)."""

    def __init__(self, cfg, vocab_size, embed_dim, mlp_dim=1024, dropout=0.3):
        super().__init__(cfg, vocab_size, embed_dim)
        del self.proj  # pooled first, then the MLP (an MLP over every token would only be pooled away)
        self.mlp = mlp_head(self.backbone.config.hidden_size, mlp_dim, embed_dim, dropout)

    def forward(self, ids, lens):
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lens[:, None]
        h = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.cfg.pool == "cls":
            x = h[:, 0]
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            x = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return l2norm(self.mlp(x))


# ----------------------------------------------------------------------------- loss


def paired_hinge_loss(cap, img_all, ids_all, offset=0, margin=0.5, mask_same_image=True, reduction="mean",
                      global_size=None):
    """xmatching's ``paired_hinge_rank_loss`` at sentence level, for this rank's queries.

    ``img_all`` (N, d) and ``ids_all`` (N,) are the images of the whole (global) batch; ``cap``
    (n, d) are this rank's captions, rows ``offset .. offset + n`` of it. Caption ``i`` is paired
    with image ``i`` and compared with the image of its partner ``(i + N // 2) % N``: for even N the
    first half of the batch are the positives and the second half their negatives, and the other
    way round, exactly as the reference splits its batch. Its cost is
    ``max(0, margin - <cap_i, img_i> + <cap_i, img_partner>)``; a partner showing the same image
    (``ids_all``, with ``mask_same_image``) or the pair itself (N = 1) costs nothing.
    ``reduction="mean"`` divides the sum by ``global_size`` (default N), the size of the global batch,
    so that the ranks' losses add up to the reference's average over the batch (it divides by the
    number of tokens).
    """
    n, N = cap.shape[0], img_all.shape[0]
    q = torch.arange(offset, offset + n, device=cap.device)
    partner = (q + N // 2) % N
    pos = (cap * img_all[q]).sum(-1)
    neg = (cap * img_all[partner]).sum(-1)
    cost = (margin - pos + neg).clamp(min=0)
    void = partner == q
    if mask_same_image:
        void = void | (ids_all[q] == ids_all[partner])
    total = torch.where(void, torch.zeros_like(cost), cost).sum()
    return total / (global_size or N) if reduction == "mean" else total


# ----------------------------------------------------------------------------- model


@dataclass
class SentenceMatcherConfig:
    embed_dim: int = param(512, "joint embedding size (the sentence-level variant: 512; xmatching --dim 64 per token)", min=1)
    mlp_dim: int = param(1024, "hidden size of the image and text MLPs (sentence-level variant 1024; xmatching 256)")
    dropout: float = param(0.3, "dropout inside both MLPs (xmatching/model.py: 0.3)")
    loss_reduction: str = param("mean", "mean: the hinge costs over the global batch size, as xmatching/loss.py "
                                        "(train.grad_clip 5.0 was set for it); sum: itr's VSE++ convention")
    image: dict = param({"name": "xmatching_resnet"}, "image encoder: xmatching_resnet (raw images)", registry="image")
    text: dict = param({"name": "hf", "pool": "cls"}, "text encoder: hf (a local transformers model; pool: cls for "
                                                      "the [CLS] token as here, mean also works)", registry="text")

    def __post_init__(self):
        if self.loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"model.loss_reduction must be mean or sum, got {self.loss_reduction!r}")
        if component_name(self.text) != "hf":
            raise ConfigError(f"model.text.name must be hf for sentence_matcher, got {component_name(self.text)!r}")
        if component_name(self.image) != "xmatching_resnet":
            raise ConfigError(f"model.image.name must be xmatching_resnet for sentence_matcher, "
                              f"got {component_name(self.image)!r}")


@MODELS.register("sentence_matcher", SentenceMatcherConfig)
class SentenceMatcher(MatchingModel):
    """Raw images and sentences into one space; the paired hinge rank loss (xmatching)."""

    def __init__(self, cfg: SentenceMatcherConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg if loss_cfg is not None else LossConfig(margin=0.5))
        if img_dim:
            raise ConfigError(f"sentence_matcher embeds raw images, but data.root holds {img_dim}-d precomputed "
                              f"features: point it at image shards (`itr shard images`)")
        self.cfg = cfg
        if self.criterion.cfg.name == "hinge":
            self.loss_reduction = cfg.loss_reduction  # the trainer logs a mean loss as it is
        self.loss_cfg = self.criterion.cfg
        self.img_enc = ResNetImageEncoder(cfg.image.config, img_dim, cfg.embed_dim, cfg.mlp_dim, cfg.dropout)
        _, tcfg = text_entry(cfg.text)
        self.txt_enc = MLPTextEncoder(tcfg, len(tokenizer), cfg.embed_dim, cfg.mlp_dim, cfg.dropout)

    def embed_images(self, batch):
        if "pixels" not in batch:
            raise ConfigError("sentence_matcher embeds raw images: data.root must be image shards "
                              "(`itr shard images`), not precomputed features")
        return self.img_enc(batch["pixels"])

    def embed_captions(self, batch):
        return self.txt_enc(batch["text_ids"], batch["text_lens"])

    def batch_loss(self, emb, img_ids, epoch):
        """This rank's sentences against the images of the global batch (gathered with gradients:
        a partner image on another rank gets its gradient back there)."""
        if self.criterion.cfg.name != "hinge":  # loss.name=infonce: every pair of the global batch
            return self.criterion(emb, {"img_ids": img_ids}, epoch)
        cap, world = emb["cap"], torch.distributed.get_world_size() if is_distributed() else 1
        c, img_ids, offset = self.criterion.candidates({"img": emb["img"]}, img_ids)
        img = c["img"]
        # loss.global_negatives=false: partners within this rank's batch; the mean is still over the global batch
        return paired_hinge_loss(cap, img, img_ids, offset, margin=self.loss_cfg.margin,
                                 mask_same_image=self.loss_cfg.mask_same_image, reduction=self.cfg.loss_reduction,
                                 global_size=cap.shape[0] * world)
