"""SelfAlign's two alignment objectives and their heads (``itr.models.selfalign`` describes them and the
reference): concept-level (``ConceptAlignment``: Sinkhorn codes of the regions, prototypes, word predictions)
and context-level (``ContextHead``, ``cra_loss``: InfoNCE between attended globals and locals). Shared by
SelfAlign on VSRN and on CAMERA."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.modules.ops import l2norm, masked_bn, masked_mean


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV's Sinkhorn-Knopp codes for (B, K) prototype scores: each row an assignment (sums to 1),
    prototypes equally used (``LCA_loss.distributed_sinkhorn``, here on the already gathered batch)."""
    q = torch.exp((scores.float() - scores.max().float()) / epsilon).t()  # (K, B); a global shift cancels below
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


class ConceptAlignment(nn.Module):
    """``LCA_loss``: prototypes (a bias-free Linear, default init) and the word -> region-code loss."""

    def __init__(self, dim, prototypes=1024, student_temp=0.1, epsilon=0.05, iterations=2):
        super().__init__()
        self.prototypes = nn.Linear(dim, prototypes, bias=False)
        self.student_temp, self.epsilon, self.iterations = student_temp, epsilon, iterations

    def forward(self, regions_all, words, word_mask, offset, n_global, frozen=False, region_mask_all=None):
        """``regions_all`` (N, R, d): every pair's region features of the global batch; ``words`` (n, L, d)
        and ``word_mask`` (n, L, float): this rank's captions, rows ``offset:offset + n`` of it.
        ``region_mask_all`` (N, R, bool; variable regions): the real regions, the only ones coded and matched.
        Returns the sum over this rank's pairs of the per-pair mean word loss, / ``n_global``."""
        with torch.no_grad():  # unit-length prototypes (reference: in place, before each use)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        w = self.prototypes.weight
        if frozen:
            w = w.detach() + 0.0 * w  # no update, but a (zero) gradient so that DDP sees the parameter used
        n, big_n, r, d = words.shape[0], regions_all.shape[0], regions_all.shape[1], regions_all.shape[2]
        regions = regions_all[offset:offset + n]
        with torch.no_grad():
            scores = regions_all.detach().reshape(-1, d) @ w.detach().t()
            if region_mask_all is None:
                codes = sinkhorn(scores, self.epsilon, self.iterations)
            else:  # the equal use of the prototypes is over the real regions
                keep = region_mask_all.reshape(-1)
                codes = scores.new_zeros(scores.shape)
                codes[keep] = sinkhorn(scores[keep], self.epsilon, self.iterations).to(codes.dtype)
            codes = codes.view(big_n, r, -1)[offset:offset + n]  # (n, R, K)
            sim = words.detach() @ regions.detach().transpose(1, 2)
            if region_mask_all is not None:
                sim = sim.masked_fill(~region_mask_all[offset:offset + n, None, :], float("-inf"))
            nearest = sim.argmax(-1)  # (n, L): best region per word
            target = codes.gather(1, nearest.unsqueeze(-1).expand(-1, -1, codes.shape[-1]))  # (n, L, K)
        logp = F.log_softmax(words @ w.t() / self.student_temp, dim=-1)
        ce = -(target * logp).sum(-1)  # (n, L)
        per_pair = (ce * word_mask).sum(1) / word_mask.sum(1).clamp(min=1)
        # regions get no gradient from this loss (codes and matches are targets); the zero term keeps
        # them in the graph, as the trainer differentiates its cached batch w.r.t. every embedding key.
        return per_pair.sum() / n_global + 0.0 * regions_all.sum()


def cra_loss(keys_all, queries_all, offset, n, n_global, tau, negatives, key_mask_all=None, same=None):
    """``CRA_loss``: for each of this rank's pairs b and each valid local i of b, the InfoNCE of the
    positive <key_{b,i}, query_b> / tau against the ``negatives`` highest <key_{b',j}, query_b> / tau
    over the other pairs b' (all locals j). Per pair the mean over its locals; summed over this rank's
    pairs / ``n_global``. ``same`` (n, N) marks further pairs that are not negatives (same image)."""
    big_n, nl, d = keys_all.shape
    q = queries_all[offset:offset + n]  # (n, d)
    keys = keys_all[offset:offset + n]
    pos = (keys * q.unsqueeze(1)).sum(-1) / tau  # (n, nl)
    neg = (q @ keys_all.reshape(-1, d).t() / tau).view(n, big_n, nl)
    invalid = torch.zeros(n, big_n, nl, dtype=torch.bool, device=q.device)
    rows = torch.arange(n, device=q.device)
    invalid[rows, offset + rows] = True
    if same is not None:
        invalid |= same.unsqueeze(-1)
    if key_mask_all is not None:
        invalid |= (key_mask_all < 0.5).unsqueeze(0)
    neg = neg.masked_fill(invalid, float("-inf")).reshape(n, -1)
    top = neg.topk(min(negatives, neg.shape[1]), dim=1).values
    loss = torch.logaddexp(pos, torch.logsumexp(top, dim=1, keepdim=True)) - pos  # -log softmax(positive)
    if key_mask_all is None:
        per_pair = loss.mean(1)
    else:
        m = key_mask_all[offset:offset + n]
        per_pair = (loss * m).sum(1) / m.sum(1).clamp(min=1)
    return per_pair.sum() / n_global


class ContextHead(nn.Module):
    """The CRA sub-module of one modality (``EncoderImagePrecompAttn`` / ``EncoderText`` / ``TextEncoder``):
    attended global BN(ctx_fc(mean)), context locals BN(locals) (+ ReLU, ``ctx_relu``), and a gated
    fusion g * mean + (1 - g) * attended global, g = sigmoid(MLP([mean; attended global])); all L2."""

    def __init__(self, dim, relu=True):
        super().__init__()
        self.ctx_fc = nn.Linear(dim, dim)
        self.bn_glo = nn.BatchNorm1d(dim)
        self.bn_loc = nn.BatchNorm1d(dim)
        self.fusion = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        self.relu = relu

    def forward(self, feats, mask=None):
        avg = masked_mean(feats, mask)
        glo = self.bn_glo(self.ctx_fc(avg))
        loc = masked_bn(self.bn_loc, feats, mask)
        if self.relu:
            glo, loc = F.relu(glo), F.relu(loc)
        g = torch.sigmoid(self.fusion(torch.cat([avg, glo], dim=-1)))
        fused = g * avg + (1 - g) * glo
        return {"glo": l2norm(glo), "locals": l2norm(loc), "fused": l2norm(fused)}


def pad_slots(x, slots):
    """(B, L, ...) -> (B, slots, ...): zero padding or truncation along dim 1."""
    n = x.shape[1]
    if n >= slots:
        return x[:, :slots]
    return F.pad(x, (0, 0) * (x.dim() - 2) + (0, slots - n))


def tokenizer_slots(tokenizer):
    """Tokens per caption at most, from the tokenizer's truncation (0: unlimited)."""
    if getattr(tokenizer, "max_length", None):  # HFTokenizer: [CLS] + max_words + [SEP]
        return int(tokenizer.max_length)
    max_words = getattr(tokenizer, "max_words", 0)
    return max_words + 2 if max_words else 0  # WordVocab: <start> + words + <end>
