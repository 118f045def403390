"""VSRN: Visual Semantic Reasoning (Li et al., ICCV 2019; reference KunpengLi1994/VSRN).

Image (``model.py`` ``EncoderImagePrecompAttn``): region features -> FC (Xavier) -> L2 ->
4 region-relation GCN layers (``GCN_lib/Rs_GCN.py``) -> L2 -> GRU over the regions (global
semantic reasoning) -> final hidden state -> L2, a ``embed_dim`` (2048) vector. The reference's
``l2norm(X)`` sums over dim=1, which for (B, regions, D) features normalizes every channel over
the 36 regions rather than every region vector; that is the default here (``model.l2_axis``).
Text: the VSE++ GRU (``EncoderText``), here itr's ``gru`` text encoder.
Similarity: cosine. Loss (``train_emb``): VSE++ hinge with max violation (``recipe.loss``) plus
the image-to-caption generation loss of an S2VT attention captioner (video-caption.pytorch's
``EncoderRNN`` + ``DecoderRNN``/``Attention``, as VSRN vendors them) run on the GCN region
features, with weight 1.

Loss scale: the hinge is a sum over the batch; the reference divides the caption loss (summed
token NLL) by its batch of 128 (``LanguageModelCriterion``: ``sum(loss * mask) / batch_size``;
VSRN imports it from ``misc/utils.py`` of xiadingZ/video-caption.pytorch, not in its repository).
Here the caption loss is a per-micro-batch ``aux_loss`` that the trainer sums over micro-batches
and ranks, so it is the summed NLL divided by a fixed ``caption_norm`` (128): that keeps the
reference's weighting at batch 128 and stays exact under gradient accumulation and any number of
ranks (a per-micro-batch mean would not).

Variable region counts (bottom-up TSVs, ``feat_lens``): the padded regions are zeroed after the FC, get no
edges in the GCN (whose affinity divides by each image's own count) and no part in its BatchNorm or the L2
over the regions; the reasoning GRU and the captioner's encoder stop at each image's last region, and the
captioner's attention leaves the padding out, so a padded batch embeds as each image alone.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itr.schema import component, param
from itr.models.base import MatchingModel
from itr.modules.encoders import text_entry
from itr.modules.ops import L2_AXIS_HELP, check_l2_axis, l2norm, l2norm_over, length_mask, masked_bn, xavier_linear
from itr.registry import MODELS


class RsGCN(nn.Module):
    """One region-relation reasoning layer (``GCN_lib/Rs_GCN.py``), on (B, N, C) regions.

    Affinity R = theta(v) phi(v)^T / N between all region pairs, y = R g(v), and a residual
    v + BN(W y) whose BatchNorm starts at zero weight and bias (so the layer starts as the identity).
    The reference's 1x1 Conv1d layers are the Linear layers here (same map, same default init).
    """

    def __init__(self, dim, inter=None):
        super().__init__()
        inter = inter or dim
        self.g = nn.Linear(dim, inter)
        self.theta = nn.Linear(dim, inter)
        self.phi = nn.Linear(dim, inter)
        self.W = nn.Linear(inter, dim)
        self.bn = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, v, mask=None):
        b, n, c = v.shape
        if mask is None:
            r = self.theta(v) @ self.phi(v).transpose(1, 2) / n
            y = self.W(r @ self.g(v))
            return v + self.bn(y.reshape(b * n, c)).view(b, n, c)
        # variable regions (``v`` zero past each image's count): no edges to padding, each image's own
        # region count, BatchNorm over the real regions; the padding stays zero
        m = mask.unsqueeze(-1).to(v.dtype)
        r = self.theta(v) @ self.phi(v).transpose(1, 2) / m.sum(1, keepdim=True)
        y = self.W(r @ (self.g(v) * m))
        return v + masked_bn(self.bn, y, mask)


class VSRNImageEncoder(nn.Module):
    """Regions -> FC -> (L2) -> GCN x ``layers`` -> L2 -> GRU -> last state -> (BN) -> L2.

    The two L2 of region features follow ``l2_axis`` (the reference normalizes over the regions).
    Returns the intermediate features too: ``fc`` (after the optional L2), ``gcn`` (GCN output
    before its L2), ``gcn_n`` (after, the captioner's input) and ``emb``. ``fc_norm=False`` and
    ``out_bn=True`` are SelfAlign-VSRN's Flickr30K variant (vsrn_SelfAlign/model_SelfAlign.py).
    """

    def __init__(self, img_dim, dim, layers=4, fc_norm=True, out_bn=False, l2_axis="regions"):
        super().__init__()
        self.fc = xavier_linear(nn.Linear(img_dim, dim))
        self.fc_norm, self.l2_axis = fc_norm, check_l2_axis(l2_axis)
        self.gcn = nn.ModuleList(RsGCN(dim) for _ in range(layers))
        self.rnn = nn.GRU(dim, dim, 1, batch_first=True)
        self.out_bn = nn.BatchNorm1d(dim) if out_bn else None

    def forward(self, feats, lens=None):
        """``lens``: each image's region count (variable-region data, padding past it), or None: all count."""
        mask = None if lens is None else length_mask(lens, feats.shape[1])
        fc = self.fc(feats.to(self.fc.weight.dtype))
        if mask is not None:
            fc = fc * mask.unsqueeze(-1).to(fc.dtype)  # padding zeroed: garbage there reaches nothing
        if self.fc_norm:
            fc = l2norm_over(fc, self.l2_axis, mask)
        g = fc
        for layer in self.gcn:
            g = layer(g, mask)
        gn = l2norm_over(g, self.l2_axis, mask)
        if mask is None:
            _, h = self.rnn(gn)
        else:  # each image's state after its own last region
            _, h = self.rnn(pack_padded_sequence(gn, lens.cpu(), batch_first=True, enforce_sorted=False))
        out = h[-1]
        if self.out_bn is not None:
            out = self.out_bn(out)
        return {"fc": fc, "gcn": g, "gcn_n": gn, "emb": l2norm(out), "mask": mask}


class CaptionModel(nn.Module):
    """S2VT attention captioner on region features, teacher forced (VSRN's caption branch).

    Encoder (``EncoderRNN``): Linear(dim_vid -> hidden) (Xavier normal) -> dropout -> GRU.
    Decoder (``DecoderRNN``): at step t, additive attention over the encoder outputs with the
    current state (``Attention``: linear2(tanh(linear1([enc; h])))), input dropout on
    [word_t; context], a GRU step, log-softmax over the vocabulary (output layer Xavier normal);
    the initial state is the encoder's final state.
    """

    def __init__(self, vocab_size, dim_vid, hidden=512, dim_word=300, max_len=60, dropout=0.2):
        super().__init__()
        self.max_len = max_len
        self.vid2hid = nn.Linear(dim_vid, hidden)
        nn.init.xavier_normal_(self.vid2hid.weight)
        self.enc_drop = nn.Dropout(dropout)
        self.enc_rnn = nn.GRU(hidden, hidden, 1, batch_first=True)
        self.embedding = nn.Embedding(vocab_size, dim_word)
        self.att_enc = nn.Linear(hidden, hidden)  # linear1 split in two: W [enc; h] = W_e enc + W_h h
        self.att_hid = nn.Linear(hidden, hidden, bias=False)
        self.att_v = nn.Linear(hidden, 1, bias=False)
        bound = (2 * hidden) ** -0.5  # nn.Linear's default init of the reference's linear1 (fan_in 2 x hidden)
        for p in (self.att_enc.weight, self.att_enc.bias, self.att_hid.weight):
            nn.init.uniform_(p, -bound, bound)
        self.dec_drop = nn.Dropout(dropout)
        self.dec_rnn = nn.GRUCell(dim_word + hidden, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)

    def nll(self, regions, ids, lens, pad_id=0, region_lens=None):
        """Summed masked token NLL of captions ``ids`` (``<start> ... <end>``, padded) given ``regions``.

        As the reference's labels/masks (``data.py``): step t reads token t and predicts token
        t+1 for t+1 <= length, so the one padding token after ``<end>`` is scored too; at most
        ``max_len - 1`` steps. ``region_lens``: variable regions; the encoder stops at each image's last
        region and the attention leaves the padding out.
        """
        x = self.enc_drop(self.vid2hid(regions))
        if region_lens is None:
            enc, h = self.enc_rnn(x)
            skip = None
        else:
            packed, h = self.enc_rnn(pack_padded_sequence(x, region_lens.cpu(), batch_first=True, enforce_sorted=False))
            enc = pad_packed_sequence(packed, batch_first=True, total_length=x.shape[1])[0]
            skip = ~length_mask(region_lens, x.shape[1])
        h = h[-1]
        keys = self.att_enc(enc)  # (B, R, H), once per batch
        targets = F.pad(ids, (0, 1), value=pad_id)
        words = self.embedding(targets)
        steps = min(targets.shape[1] - 1, self.max_len - 1)
        total = enc.new_zeros(())
        for t in range(steps):
            e = self.att_v(torch.tanh(keys + self.att_hid(h)[:, None])).squeeze(-1)
            alpha = torch.softmax(e if skip is None else e.masked_fill(skip, torch.finfo(e.dtype).min), dim=1)
            context = (alpha.unsqueeze(-1) * enc).sum(1)
            h = self.dec_rnn(self.dec_drop(torch.cat([words[:, t], context], dim=1)), h)
            logp = F.log_softmax(self.out(h), dim=-1)
            nll = -logp.gather(1, targets[:, t + 1:t + 2]).squeeze(1)
            total = total + (nll * (t + 1 <= lens).to(nll.dtype)).sum()
        return total


@dataclass
class VSRNConfig:
    embed_dim: int = param(2048, "joint embedding size (VSRN train.py@0e75e2e --embed_size 2048)", min=1)
    text: dict = component("gru", "text", "text encoder: gru (VSRN EncoderText: word_dim 300, 1-layer GRU) or hf")
    gcn_layers: int = param(4, "region-relation GCN layers (VSRN model.py: Rs_GCN_1..4)")
    fc_norm: bool = param(True, "L2-normalize the region FC features (model.py@eae3067 EncoderImagePrecompAttn: "
                                "every data_name but f30k_precomp)")
    out_bn: bool = param(False, "BatchNorm on the image GRU's final state before its L2 (model.py@eae3067: "
                                "f30k_precomp only)")
    l2_axis: str = param("regions", L2_AXIS_HELP)
    caption_weight: float = param(1.0, "weight of the image-to-caption generation loss (VSRN train_emb: "
                                       "retrieval_loss + caption_loss); 0 switches the captioner off")
    caption_norm: float = param(128.0, "the summed caption NLL is divided by this constant (the reference divides by "
                                       "its batch, 128); a constant keeps accumulation and ranks exact")
    caption_hidden: int = param(512, "captioner GRU size (VSRN train.py --dim_hidden 512)")
    caption_word_dim: int = param(300, "captioner word embedding size (--dim_word 300)")
    caption_max_len: int = param(60, "captioner length limit incl. <start>/<end> (--max_len 60; README uses 60 for F30K too)")
    caption_dropout: float = param(0.2, "captioner input dropout (--input_dropout_p 0.2; rnn_dropout_p has no "
                                        "effect on a 1-layer GRU)")


@MODELS.register("vsrn", VSRNConfig)
class VSRN(MatchingModel):
    takes_region_lens = True  # variable-region data: padding masked in the GCN, the GRUs and the captioner
    def __init__(self, cfg: VSRNConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        self.cfg = cfg
        self.img_enc = VSRNImageEncoder(img_dim, cfg.embed_dim, cfg.gcn_layers, fc_norm=cfg.fc_norm,
                                        out_bn=cfg.out_bn, l2_axis=cfg.l2_axis)
        self.txt_enc = self.build_text(cfg, tokenizer)
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self.caption = (CaptionModel(len(tokenizer), cfg.embed_dim, cfg.caption_hidden, cfg.caption_word_dim,
                                     cfg.caption_max_len, cfg.caption_dropout) if cfg.caption_weight > 0 else None)

    def build_text(self, cfg, tokenizer):
        entry, tcfg = text_entry(cfg.text)
        return entry.build(tcfg, len(tokenizer), cfg.embed_dim)

    def caption_loss(self, regions, batch):
        if self.caption is None:
            return None
        nll = self.caption.nll(regions, batch["text_ids"], batch["text_lens"], self.pad_id, batch.get("feat_lens"))
        return self.cfg.caption_weight * nll / self.cfg.caption_norm

    def embed(self, batch):
        im = self.img_enc(batch["feats"], batch.get("feat_lens"))
        out = {"img": im["emb"], "cap": self.embed_captions(batch)}
        aux = self.caption_loss(im["gcn_n"], batch)
        if aux is not None:
            out["aux_loss"] = aux
        return out

    def embed_images(self, batch):
        return self.img_enc(batch["feats"], batch.get("feat_lens"))["emb"]

    def embed_captions(self, batch):
        return self.txt_enc(batch["text_ids"], batch["text_lens"])
