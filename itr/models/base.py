"""What every model provides, and the one forward the trainer calls.

A model is two things:

- encoders: ``embed(batch)`` -> training-time embeddings of a micro-batch (``img``, ``cap``, and
  optionally ``aux_loss``, a per-micro-batch term such as VSRN's caption generation loss);
  ``embed_images(batch)`` (keys ``feats`` or ``pixels``, and ``boxes`` where the data has them) /
  ``embed_captions(batch)`` (keys ``text_ids``, ``text_lens``) / ``score`` for evaluation;
- a batch loss: ``batch_loss(emb, img_ids, epoch)``, the loss of this rank's queries against
  the global batch (gathered by the criterion), including any learnable batch-level module
  (HREM's instance interaction, SelfAlign's prototypes). Default: ``self.criterion``.

``forward`` joins them so that DDP / DeepSpeed see every parameter used in one forward:
``mode="loss"`` embeds and returns the loss; ``mode="embed"`` only embeds (the replays of
exact gradient accumulation, ``itr.train.train_step``). With ``context`` (the embeddings of the
whole accumulated batch, detached), the loss is that of the whole batch, this micro-batch's rows
live: its gradient is exact for this micro-batch and for the batch-level modules.

Token-level embeddings (cross-attention models: (B, L, d) words with integer ``cap_lens``) are
zero-padded to the longest when micro-batches or ranks are joined (``itr.distributed.pad_cat``);
integer outputs ride along as side keys (no gradient).

Retrieval (``itr index`` / ``itr search`` / the report): ``global_vectors(emb)`` names the vectors whose inner
products are the model's global score (what an exact or FAISS index searches); cross-attention models may
offer ``alignment(img_emb, cap_emb)``, the word x region weights of one pair that their score is built from.
"""
import torch
import torch.nn as nn

from itr.distributed import pad_cat
from itr.errors import ConfigError
from itr.modules.losses import LossConfig, build_loss


def embedding_keys(emb):
    """The differentiable per-pair outputs of ``embed`` (everything float but ``aux_loss``)."""
    return [k for k, v in emb.items() if k != "aux_loss" and torch.is_tensor(v) and v.is_floating_point()]


def side_keys(emb):
    """Per-pair integer outputs of ``embed`` that the batch loss needs too (e.g. caption lengths of
    token-level embeddings); carried along without gradients."""
    return [k for k, v in emb.items() if torch.is_tensor(v) and not v.is_floating_point()]


def loss_inputs(emb):
    """What ``batch_loss`` sees of an ``embed`` output: float embeddings in fp32, plus side keys."""
    return {**{k: emb[k].float() for k in embedding_keys(emb)}, **{k: emb[k] for k in side_keys(emb)}}


def region_lens(batch):
    """Each image's region count: ``feat_lens`` from variable-region data (features zero padded past it), else all."""
    feats = batch["feats"]
    lens = batch.get("feat_lens")
    return lens if lens is not None else torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long,
                                                    device=feats.device)


def check_region_lens(model, batch):
    """Variable-region data (``feat_lens``) reaches only models that mask the padding."""
    if "feat_lens" in batch and not getattr(getattr(model, "module", model), "takes_region_lens", False):
        from itr.errors import ConfigError

        raise ConfigError(f"model {type(model).__name__} treats every region as real, but this data has a variable "
                          f"number of regions per image (zero padded: manifest variable_regions); use a model that "
                          f"takes region counts (vsepp, vse_infty, hrem, scan, vsrn, camera, selfalign_vsrn, "
                          f"selfalign_camera, teran, tgdt, dime), or shard features with a fixed region count")


class MatchingModel(nn.Module):
    # "sum": batch_loss sums over the queries (VSE++ and most of the field); "mean": averages over the
    # global batch. Only the logged loss per pair depends on it.
    loss_reduction = "sum"
    # True: the model reads ``feat_lens`` (variable region counts, features zero padded past them)
    takes_region_lens = False
    # False for token-level cross-attention models: their losses are the hinge on score tiles only.
    global_embeddings = True

    def __init__(self, loss_cfg=None):
        super().__init__()
        loss_cfg = loss_cfg if loss_cfg is not None else LossConfig()
        if loss_cfg.name != "hinge" and not self.global_embeddings:
            raise ConfigError(f"loss.name={loss_cfg.name}: {type(self).__name__} scores pairs by token-level cross "
                              f"attention; its losses are defined for loss.name=hinge only")
        self.criterion = build_loss(loss_cfg)
        if self.criterion.reduction == "mean":
            self.loss_reduction = "mean"  # the trainer logs a mean loss as it is

    def after_optimizer_step(self):
        """The trainer calls this after every optimizer step (the InfoNCE temperature's clamp)."""
        self.criterion.after_step()

    # -- to implement
    def embed(self, batch):
        return {"img": self.embed_images(batch), "cap": self.embed_captions(batch)}

    def embed_images(self, batch):
        raise NotImplementedError

    def embed_captions(self, batch):
        raise NotImplementedError

    @staticmethod
    def score(img_emb, cap_emb):
        """All-pairs similarity of embedded images and captions (global embeddings: cosine)."""
        return img_emb @ cap_emb.t()

    def batch_loss(self, emb, img_ids, epoch):
        return self.criterion(emb, {"img_ids": img_ids}, epoch)

    def global_vectors(self, emb):
        """The (rows, d) vectors whose inner products give this model's global score, or None. Default: the
        embedding itself where ``score`` is the inner product of 2-D embeddings; token-level models with a
        global token return it (its product is their ``global_score``, and ``score`` then reranks)."""
        if type(self).score is MatchingModel.score and torch.is_tensor(emb) and emb.dim() == 2:
            return emb
        return None

    def pretrained_parameters(self):
        """Parameters of pretrained backbones (trained at ``optim.text_lr_mult`` x lr)."""
        backbone = getattr(getattr(self, "txt_enc", None), "backbone", None)
        return list(backbone.parameters()) if backbone is not None else []

    # -- the trainer's entry point
    def forward(self, batch, epoch=0, mode="loss", context=None):
        check_region_lens(self, batch)
        emb = self.embed(batch)
        if mode == "embed":
            return emb
        aux = emb.get("aux_loss")
        full, ids = loss_inputs(emb), batch["img_ids"]
        if context is not None:  # splice this micro-batch's live rows into the whole (detached) batch
            lo, hi = context["rows"]
            full = {k: pad_cat([context["emb"][k][:lo], v, context["emb"][k][hi:]]) for k, v in full.items()}
            ids = context["img_ids"]
        loss = self.batch_loss(full, ids, epoch)
        return {**emb, "loss": loss + aux if aux is not None else loss}
