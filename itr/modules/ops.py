"""Small tensor operations several models share (one implementation each): masks, masked means and BatchNorms,
L2 normalisations over an axis, VSE++'s Xavier init, CAMERA's diversity regularizer, the BERT references'
fixed-length caption padding."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from itr.errors import ConfigError


def l2norm(x, dim=-1, eps=1e-8):
    return x / (x.norm(dim=dim, keepdim=True) + eps)


def length_mask(lens, max_len):
    """(B, max_len) True on the first ``lens[b]`` positions of each row."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def reference_padding(ids, lens, n):
    """Captions as the BERT references feed them (``data.py`` ``convert_to_feature``): each padded with id 0
    to exactly ``n`` tokens. Returns those ids and the mask of the real tokens (BERT's attention mask)."""
    if ids.shape[1] > n:
        raise ConfigError(f"a caption of {ids.shape[1]} tokens is longer than model.pad_tokens={n}: set "
                          f"data.max_words={n - 2} ([CLS] and [SEP] are the other two)")
    mask = length_mask(lens, n)
    out = ids.new_zeros(ids.shape[0], n)
    out[:, :ids.shape[1]] = ids
    return out.masked_fill(~mask, 0), mask


def masked_mean(x, mask=None, dim=-2):
    """Mean over ``dim`` (the positions) of (..., N, C) where ``mask`` (..., N) is True; all positions without one."""
    if mask is None:
        return x.mean(dim)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_bn(bn, x, mask=None):
    """BatchNorm1d over the (B, N, C) positions where ``mask`` (B, N) is True; the others are 0."""
    if mask is None:
        return bn(x.reshape(-1, x.shape[-1])).view_as(x)
    y = bn(x[mask])
    out = y.new_zeros((*x.shape[:-1], y.shape[-1]))
    out[mask] = y
    return out


L2_AXES = ("regions", "features")
L2_AXIS_HELP = ("L2 normalization of the (B, regions, D) features: regions = as the reference code, whose "
                "l2norm(X) sums dim=1, i.e. normalizes each channel over the regions; features = each region "
                "vector (use it for pooled one-region data, where 'regions' leaves only the signs)")


def l2norm_over(x, axis="regions", mask=None, eps=1e-8):
    """L2 of (B, N, D) over the N positions per channel (``axis="regions"``, VSRN's and CAMERA's
    ``l2norm(X)`` with its default dim=1) or over D per position (``"features"``). With ``mask``
    (B, N), padding positions are zeroed and left out."""
    if mask is not None:
        x = x * mask.unsqueeze(-1).to(x.dtype)
    if axis == "features":
        return l2norm(x, dim=-1, eps=eps)
    return x / (x.norm(dim=1, keepdim=True) + eps)


def check_l2_axis(value):
    if value not in L2_AXES:
        raise ConfigError(f"model.l2_axis={value!r}; choose one of {', '.join(L2_AXES)}")
    return value


def xavier_linear(lin: nn.Linear):
    """VSE++/VSRN ``init_weights``: U(-r, r) with r = sqrt(6 / (in + out)), bias 0."""
    r = (6.0 / (lin.in_features + lin.out_features)) ** 0.5
    nn.init.uniform_(lin.weight, -r, r)
    nn.init.zeros_(lin.bias)
    return lin


def diversity_regularizer(smry):
    """sum_b ||A_b^T A_b - I||_F^2, A_b = smry_b L2-normalized over regions (CAMERA ``DiversityRegularization``)."""
    a = F.normalize(smry.float(), dim=1)
    gram = a.transpose(1, 2) @ a
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return ((gram - eye) ** 2).sum()
