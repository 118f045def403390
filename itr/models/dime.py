"""DIME: Dynamic Modality Interaction Modeling (Qu et al., SIGIR 2021; reference LgQu/DIME@85062e2).

Facts from the reference:
- Image (``models/VisNet.py`` ``EncoderImagePrecomp``): regions -> FC (Xavier) = region tokens
  (L2); image = mean of the region tokens (-> BatchNorm1d in the t2i variant) -> L2.
- Text (``models/TextNet.py``): frozen BERT (``freeze_layers``) -> last layer H; ``fc(H)``; 1-d
  convolutions of widths 1, 2, 3 over the tokens (width 2 padded after, width 3 on both sides),
  ReLU, concatenated -> ``mapping`` + fc(H) = word tokens (L2); max-pool of each convolution over
  the tokens -> ``mapping`` + mean fc(H) = sentence (L2). In training, L2(mean of H) is the
  label of the path regularizer.
- Cells (``models/Cells.py``), each with a router (``models/Router.py``: mean over tokens ->
  Linear -> ReLU -> Linear (last bias 1.5) -> relu(tanh)):
  Rectified Identity (ReLU); Intra-Modal Reasoning (one self-attention block: 3 linear maps,
  16 heads, no output map, residual, feed-forward 512 with residual, ``models/SelfAttention.py``);
  Global-Local Guidance (``(1 + normalize_tokens(fc_1(l) * g)) * l``, g the other modality's
  global vector); Cross-Modal Refinement (``models/Refinement.py``: SCAN-style attention of the
  tokens over the other modality's tokens, clipped_l2norm, softmax temperature 4, then
  ``fc_2(relu(fc_1(l * tanh(fc_scale(c)) + fc_shift(c)))) + l``).
- Dense routing (``models/DynamicInteraction.py``, ``models/InteractionModule.py``): layer 0 and
  layer 1 with 4 cells x 4 output paths (path probabilities normalized over the cells, a skip of
  the identity cell where all are ~0), layer 2 with one output path (the weighted mean of the
  cells, skipping a cell's input where its probability is ~0). Score: BatchNorm1d over the
  tokens, mean + max over the tokens, L2, dot with the other modality's global vector.
  i2t: the regions are the interacting tokens (the caption guides); t2i: the words are.
- Path regularization (``model.py`` ``train_emb``): the 4x4 + 4x4 + 4 path probabilities of each
  pair, averaged over the images (t2i: one vector per caption) or the captions (i2t: per
  image) -> Linear(36, 128) -> L2 -> Gram matrix; loss ``((sim_paths - bert bert^T) ** 2).sum() /
  batch_size * trade_off`` (0.5), added to the VSE++ hinge (margin 0.2, max violation) on the
  interaction scores (``loss.py``).
- Hyperparameters (``train.py``): embed 256, batch 32, Adam 2e-4, x0.1 after 15 epochs, 30
  epochs, grad clip 2, max_words 32, 16 heads, hidden 512 (IMRC and routers), lambda 4.

Deviations (documented choices):
- Padding is masked everywhere (the reference pads captions to 32 tokens and lets the padding
  into the router means, the self-attention, the guidance normalization, the refinement's
  query normalization, the convolutions' pooling and the BatchNorm): scores do not depend on
  the batch's padding. Positions past a caption's length are zero before the convolutions (the
  reference's own zero padding of its longest caption). ``model.pad_tokens=32`` restores the
  reference's forward (``itr import --from dime`` sets it for a released checkpoint). With variable
  region counts (``feat_lens``, bottom-up TSVs; the reference has 36 regions in every image) padded
  regions are masked the same way (out of the image mean, the routers, cells, pooling and the
  score BatchNorm's training statistics), so a padded batch scores as each image alone.
- Scores are computed for all pairs at once (broadcasting image-only and caption-only cells
  over the pairs) instead of a Python loop per caption; captions go in sub-chunks to bound
  memory. In training the score BatchNorm sees the pairs of this rank's score matrix (one rank:
  the whole B x B batch, as the reference).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.schema import component, param
from itr.distributed import gather_with_grad
from itr.errors import ConfigError
from itr.models.base import MatchingModel
from itr.modules.encoders import text_entry
from itr.modules.ops import l2norm, length_mask, masked_mean, reference_padding
from itr.modules.xattn import caption_chunks
from itr.registry import MODELS

THRESHOLD, EPS = 1e-4, 1e-8  # DynamicInteraction.py: self.threshold, self.eps
CELLS = 4


class Router(nn.Module):
    def __init__(self, dim, hid, paths):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hid), nn.ReLU(), nn.Linear(hid, paths))
        nn.init.constant_(self.mlp[2].bias, 1.5)

    def forward(self, x, mask):
        return F.relu(torch.tanh(self.mlp(masked_mean(x, mask))))


class SelfAttention(nn.Module):
    """Multi-head self-attention (no output map) + residual, feed-forward + residual (SelfAttention.py)."""

    def __init__(self, dim, hid, heads):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.heads={heads} must divide model.embed_dim={dim}")
        self.h, self.dk = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hid), nn.Linear(hid, dim)

    def forward(self, x, mask):
        lead, (t, d) = x.shape[:-2], x.shape[-2:]
        flat = x.reshape(-1, t, d)
        n = flat.shape[0]
        q, k, v = (lin(flat).view(n, t, self.h, self.dk).transpose(1, 2) for lin in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dk)
        key = mask.expand(*lead, t).reshape(n, 1, 1, t)
        s = s.masked_fill(~key, -1e9)
        a = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
        y = flat + a
        y = y + self.fc2(F.relu(self.fc1(y)))
        return y.view(*lead, t, d)


def xattn(query, qmask, context, cmask, smooth):
    """Refinement.py func_attention, clipped_l2norm: context x query products -> LeakyReLU(0.1) -> L2 over the
    (valid) query tokens -> softmax(smooth x) over the (valid) context tokens -> weighted context per query token.
    Shapes broadcast over the leading (pair) dims: query (..., T, d), context (..., S, d)."""
    attn = context @ query.transpose(-1, -2)  # (..., S, T)
    attn = F.leaky_relu(attn, 0.1) * qmask.unsqueeze(-2).to(attn.dtype)
    attn = F.normalize(attn, dim=-1)
    attn = attn.transpose(-1, -2) * smooth  # (..., T, S)
    attn = attn.masked_fill(~cmask.unsqueeze(-2), float("-inf"))
    return torch.softmax(attn, dim=-1) @ context  # (..., T, d)


class Cells(nn.Module):
    """The four cells of one layer, each with its router over ``paths`` output paths."""

    def __init__(self, dim, hid_router, hid_imrc, heads, smooth, paths):
        super().__init__()
        self.routers = nn.ModuleList(Router(dim, hid_router, paths) for _ in range(CELLS))
        self.sa = SelfAttention(dim, hid_imrc, heads)  # intra-modal reasoning
        self.glgc_fc = nn.Linear(dim, dim)  # global-local guidance (fc_1; the reference's fc_2 is unused)
        self.fc_scale, self.fc_shift = nn.Linear(dim, dim), nn.Linear(dim, dim)  # cross-modal refinement
        self.fc_1, self.fc_2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.smooth = smooth

    def forward(self, inputs, ctx):
        """inputs: 4 tensors (..., T, d), one per cell; returns the cells' outputs and path probabilities."""
        tmask = ctx["tmask"]
        x0, x1, x2, x3 = inputs
        ric = F.relu(x0)
        m = self.glgc_fc(x1) * ctx["g"]
        m = F.normalize(m * tmask.unsqueeze(-1).to(m.dtype), dim=-2)  # over the (valid) tokens
        glgc = (1 + m) * x1
        imrc = self.sa(x2, tmask)
        c = xattn(x3, tmask, ctx["other"], ctx["omask"], self.smooth)
        cmrc = self.fc_2(F.relu(self.fc_1(x3 * torch.tanh(self.fc_scale(c)) + self.fc_shift(c)))) + x3
        probs = [r(x, tmask) for r, x in zip(self.routers, inputs)]
        return [ric, glgc, imrc, cmrc], probs


def route_many(embs, probs, skip):
    """4 output paths (DynamicInteraction_Layer0 / _Layer, num_out_path > 1)."""
    gate = (sum(probs) < THRESHOLD).to(embs[0].dtype)  # (..., paths)
    allp = torch.stack(probs, dim=-1)  # (..., paths, cells)
    allp = allp / (allp.sum(-1, keepdim=True) + EPS)
    outs = []
    for i in range(allp.shape[-2]):
        res = gate[..., i, None, None] * skip
        for j, e in enumerate(embs):
            res = res + allp[..., i, j, None, None] * e
        outs.append(res)
    return outs, allp


def route_one(embs, probs, inputs):
    """One output path (DynamicInteraction_Layer, num_out_path == 1)."""
    res, den = 0, 0
    for e, p, x in zip(embs, probs, inputs):
        gate = (p < THRESHOLD / CELLS).to(e.dtype)
        res = res + p[..., None] * e + gate[..., None] * x
        den = den + gate + p
    return [res / den[..., None]], torch.stack(probs, dim=-1)


@dataclass
class DIMEConfig:
    embed_dim: int = param(256, "joint embedding size (train.py --embed_size 256)", min=1)
    direction: str = param("i2t", "i2t (regions interact, the caption guides) or t2i (words interact) "
                                  "(train.py --direction)")
    heads: int = param(16, "heads of the intra-modal reasoning cell (train.py --num_head_IMRC 16)")
    hid_imrc: int = param(512, "feed-forward size of the intra-modal reasoning cell (train.py --hid_IMRC 512)")
    hid_router: int = param(512, "hidden size of the routers (train.py --hid_router 512)")
    lambda_softmax: float = param(4.0, "attention softmax temperature of the refinement cell (--lambda_softmax_CMRC 4)")
    path_hid: int = param(128, "path embedding size of the regularizer (InteractionModule path_hid=128)")
    trade_off: float = param(0.5, "weight of the path regularization (train.py --trade_off 0.5)")
    pad_tokens: int = param(0, "0: caption padding is masked after BERT; N: as the reference, captions are padded "
                               "to N tokens (id 0) and every position is a word after BERT, in the convolutions, "
                               "pools, routers, cells and score (LgQu/DIME data.py@85062e2 pads to --max_words 32; "
                               "i2t's refinement still attends to the real words only, Refinement.py@85062e2); "
                               "set by itr import")
    text: dict = component("hf_words", "text", "text encoder: hf_words (local BERT; DIME freezes it: "
                                               "text.freeze=true) + DIME's 1-d convolutions")


@MODELS.register("dime", DIMEConfig)
class DIME(MatchingModel):
    global_embeddings = False
    takes_region_lens = True  # variable-region data: padded regions masked as padded words are

    def __init__(self, cfg: DIMEConfig, img_dim: int, tokenizer, loss_cfg=None):
        super().__init__(loss_cfg)
        if cfg.direction not in ("i2t", "t2i"):
            raise ConfigError(f"model.direction={cfg.direction!r}; choose i2t or t2i")
        if cfg.text.name != "hf_words":
            raise ConfigError(f"model.text.name={cfg.text.name!r}: dime needs a BERT-family token encoder "
                              f"(model.text.name=hf_words), whose frozen states also label the path regularizer")
        if img_dim <= 0:
            raise ConfigError("model.name=dime needs precomputed region features (not raw images)")
        self.cfg = cfg
        d = cfg.embed_dim
        self.img_fc = nn.Linear(img_dim, d)
        r = math.sqrt(6.0) / math.sqrt(img_dim + d)
        nn.init.uniform_(self.img_fc.weight, -r, r)
        nn.init.zeros_(self.img_fc.bias)
        self.img_bn = nn.BatchNorm1d(d) if cfg.direction == "t2i" else None
        entry, tcfg = text_entry(cfg.text)
        self.txt_enc = entry.build(tcfg, len(tokenizer), d)  # backbone + proj (TextNet's fc)
        h = self.txt_enc.backbone.config.hidden_size
        self.convs = nn.ModuleList(nn.Conv1d(h, d, k) for k in (1, 2, 3))
        self.mapping = nn.Linear(3 * d, d)
        args = (d, cfg.hid_router, cfg.hid_imrc, cfg.heads, cfg.lambda_softmax)
        self.layers = nn.ModuleList([Cells(*args, CELLS), Cells(*args, CELLS), Cells(*args, 1)])
        self.path_mapping = nn.Linear(CELLS * CELLS * 2 + CELLS, cfg.path_hid)
        self.score_bn = nn.BatchNorm1d(d)

    # -- encoders
    def embed_images(self, batch):
        """{"img", "rgn"}; with variable-region data (``feat_lens``) also "lens", the padded regions zero in "rgn"
        and out of the image's mean."""
        feats, lens = batch["feats"], batch.get("feat_lens")
        if lens is None:
            rgn = self.img_fc(feats.to(self.img_fc.weight.dtype))
            img = rgn.mean(1)
        else:  # whatever the padding holds reaches no output and no gradient
            real = length_mask(lens, feats.shape[1])
            rgn = self.img_fc(feats.masked_fill(~real[..., None], 0).to(self.img_fc.weight.dtype))
            img = masked_mean(rgn, real)
        if self.img_bn is not None:
            img = self.img_bn(img)
        if lens is None:
            return {"img": l2norm(img), "rgn": l2norm(rgn)}
        return {"img": l2norm(img), "rgn": l2norm(rgn).masked_fill(~real[..., None], 0), "lens": lens}

    def text_states(self, batch):
        """BERT states (zero past the tokens), the token mask, and the lengths the interaction masks words by."""
        ids, lens = batch["text_ids"], batch["text_lens"]
        if self.cfg.pad_tokens:  # the reference: all pad_tokens positions are words after BERT
            ids, real = reference_padding(ids, lens, self.cfg.pad_tokens)
            mask = torch.ones_like(real)
            if self.cfg.direction == "t2i":
                lens = torch.full_like(lens, self.cfg.pad_tokens)
        else:
            real = mask = length_mask(lens, ids.shape[1])
        h = self.txt_enc.backbone(input_ids=ids, attention_mask=real.long()).last_hidden_state
        return h.to(self.mapping.weight.dtype) * mask.unsqueeze(-1).to(self.mapping.weight.dtype), mask, lens

    def encode_text(self, h, mask):
        x_emb = self.txt_enc.proj(h)
        t = h.transpose(1, 2)  # (B, H, L)
        feats = [F.relu(self.convs[0](t)), F.relu(self.convs[1](F.pad(t, (0, 1)))),
                 F.relu(self.convs[2](F.pad(t, (1, 1))))]  # each (B, d, L)
        wrd = self.mapping(torch.cat(feats, dim=1).transpose(1, 2)) + x_emb
        neg = torch.finfo(h.dtype).min
        pooled = torch.cat([f.masked_fill(~mask[:, None, :], neg).amax(-1) for f in feats], dim=1)
        stc = self.mapping(pooled) + masked_mean(x_emb, mask)
        return l2norm(stc), l2norm(wrd) * mask.unsqueeze(-1).to(wrd.dtype)

    def embed_captions(self, batch):
        h, mask, lens = self.text_states(batch)
        stc, wrd = self.encode_text(h, mask)
        return {"stc": stc, "wrd": wrd, "lens": lens}

    def embed(self, batch):
        im = self.embed_images(batch)
        h, mask, lens = self.text_states(batch)
        stc, wrd = self.encode_text(h, mask)
        bert = l2norm(masked_mean(h.detach().float(), mask))  # the path regularizer's label (TextNet bert_emb)
        out = {"rgn": im["rgn"], "cap": stc, "wrd": wrd, "cap_lens": lens, "bert": bert}
        if "lens" in im:  # variable regions: the counts ride along as a side key
            out["img_lens"] = im["lens"]
        if self.cfg.direction == "t2i":  # the i2t variant never uses the global image vector
            out["img"] = im["img"]
        return out

    # -- interaction
    def interact(self, img, rgn, stc, wrd, lens, rlens=None):
        """Scores (I, C) and path probabilities (I, C, 36) of every image x caption pair; ``rlens``: each image's
        region count (variable-region data: the others masked as padded words are)."""
        wmask = length_mask(lens, wrd.shape[1])
        if rlens is None:
            rmask = torch.ones(rgn.shape[:2], dtype=torch.bool, device=rgn.device)
        else:
            rmask = length_mask(rlens, rgn.shape[1])
        if self.cfg.direction == "i2t":  # regions interact; the caption guides and is attended to
            x = rgn[:, None]  # (I, 1, R, d)
            ctx = {"tmask": rmask[:, None], "g": stc[None, :, None], "other": wrd[None], "omask": wmask[None]}
            g = stc[None]  # (1, C, d)
        else:  # words interact; the image guides and is attended to
            x = wrd[None]  # (1, C, L, d)
            ctx = {"tmask": wmask[None], "g": img[:, None, None], "other": rgn[:, None], "omask": rmask[:, None]}
            g = img[:, None]  # (I, 1, d)
        n_img, n_cap = rgn.shape[0], stc.shape[0]
        pair = (n_img, n_cap)
        embs, probs = self.layers[0]([x] * CELLS, ctx)
        outs, p0 = route_many(embs, probs, embs[0])
        embs, probs = self.layers[1](outs, ctx)
        outs, p1 = route_many(embs, probs, embs[0])
        embs, probs = self.layers[2](outs, ctx)
        (out,), p2 = route_one(embs, probs, outs)
        out = out.expand(*pair, *out.shape[-2:])
        tmask = ctx["tmask"].expand(*pair, out.shape[-2])
        if self.training:  # BatchNorm over the valid tokens of every pair
            y = out.new_zeros(out.shape)
            y[tmask] = self.score_bn(out[tmask])
        else:
            y = self.score_bn(out.reshape(-1, out.shape[-1])).view_as(out)
        pooled = masked_mean(y, tmask) + y.masked_fill(~tmask.unsqueeze(-1), float("-inf")).amax(-2)
        scores = (l2norm(pooled) * g).sum(-1)
        paths = torch.cat([p.expand(*pair, *p.shape[-2:]).flatten(-2) for p in (p0, p1, p2)], dim=-1)
        return scores, paths

    def score(self, img_emb, cap_emb):
        img, rgn = img_emb["img"], img_emb["rgn"]
        stc, wrd, lens = cap_emb["stc"], cap_emb["wrd"], cap_emb["lens"]
        n_wrd = int(lens.max()) if lens.numel() else 1
        wrd = wrd[:, :n_wrd]
        tokens = rgn.shape[1] if self.cfg.direction == "i2t" else n_wrd
        per_pair = tokens * max(rgn.shape[1], n_wrd) + 8 * tokens * rgn.shape[-1]
        out = [self.interact(img, rgn, stc[a:b], wrd[a:b], lens[a:b], img_emb.get("lens"))[0]
               for a, b in caption_chunks(img.shape[0], stc.shape[0], per_pair)]
        return torch.cat(out, dim=1)

    # -- loss
    def path_vectors(self, paths, over):
        """Mean path probabilities over the images (over=0: one vector per caption) or the captions (over=1)
        -> Linear -> L2 (InteractionModule.forward)."""
        return l2norm(self.path_mapping(paths.mean(over)))

    def batch_loss(self, emb, img_ids, epoch):
        crit, cfg = self.criterion, self.cfg
        keys = ("rgn", "cap", "wrd", "cap_lens", "bert") + (("img",) if cfg.direction == "t2i" else ()) \
            + (("img_lens",) if "img_lens" in emb else ())  # variable regions: gathered with the regions
        local = {k: emb[k] for k in keys}
        allc, ids_all, offset = crit.candidates(local, img_ids)
        for d in (local, allc):
            d.setdefault("img", None)
            d.setdefault("img_lens", None)
        m = allc["rgn"].shape[0]
        one = allc["rgn"] is local["rgn"]
        if one:  # one matrix serves both directions
            s, paths = self.interact(local["img"], local["rgn"], local["cap"], local["wrd"], local["cap_lens"],
                                     local["img_lens"])
            s_i2t, s_t2i, p_rows, p_cols = s, s.t(), paths, paths
        else:
            s_i2t, p_rows = self.interact(local["img"], local["rgn"], allc["cap"], allc["wrd"], allc["cap_lens"],
                                          local["img_lens"])
            s_t2i, p_cols = self.interact(allc["img"], allc["rgn"], local["cap"], local["wrd"], local["cap_lens"],
                                          allc["img_lens"])
            s_t2i = s_t2i.t()
        loss = crit.on_scores(s_i2t, s_t2i, img_ids, ids_all, offset, epoch)
        if cfg.trade_off:
            # t2i: a path vector per caption (mean over all images); i2t: per image (mean over all captions)
            vec = self.path_vectors(p_cols, 0) if cfg.direction == "t2i" else self.path_vectors(p_rows, 1)
            vec_all = vec if one else gather_with_grad(vec)
            label = local["bert"] @ allc["bert"].t()
            reg = ((vec @ vec_all.t() - label) ** 2).sum() / m  # model.py: .sum() / batch_size
            loss = loss + cfg.trade_off * reg
        return loss
