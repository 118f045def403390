"""Generalized Pooling Operator (GPO) of VSE-infinity (Chen et al., CVPR 2021).

Reference: woodfrog/vse_infty ``lib/modules/aggr/gpo.py``. For a set of ``n`` features,
GPO sorts every feature dimension independently in descending order and takes a weighted
sum over the sorted values; the weights come from a small bidirectional GRU run over the
sine/cosine positional encodings of the positions ``0..n-1`` (so they depend on ``n`` only),
followed by a linear score and a softmax with temperature 0.1. Padded positions get a
score of -10000 and sorted value 0, so a padded set pools exactly like the unpadded one.
"""
import math

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itr.modules.ops import length_mask


def positional_encoding_1d(d_model, length, device=None):
    """(length, d_model) sine/cosine encodings of positions 0..length-1 (reference ``positional_encoding_1d``)."""
    if d_model % 2:
        raise ValueError(f"sin/cos positional encoding needs an even size, got {d_model}")
    position = torch.arange(length, dtype=torch.float, device=device)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float, device=device) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class GPO(nn.Module):
    """``forward(features (B, N, D), lengths (B,)) -> (B, D)``; reference defaults d_pe = d_hidden = 32."""

    def __init__(self, d_pe=32, d_hidden=32, temperature=0.1):
        super().__init__()
        self.d_pe = d_pe
        self.temperature = temperature  # reference: softmax(scores / 0.1)
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def pool_weights(self, lengths, max_len):
        """(B, max_len, 1) pooling weights (zero on padding) and the (B, max_len) validity mask."""
        mask = length_mask(lengths, max_len)
        pe = positional_encoding_1d(self.d_pe, max_len, lengths.device)
        pes = pe[None].expand(lengths.shape[0], -1, -1) * mask[..., None]
        pes = pes.to(self.linear.weight.dtype)
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        half = out.shape[-1] // 2
        out = (out[..., :half] + out[..., half:]) / 2  # the two directions averaged
        scores = self.linear(out).float().masked_fill(~mask[..., None], -10000)
        return torch.softmax(scores / self.temperature, dim=1), mask

    def forward(self, features, lengths):
        max_len = int(lengths.max())
        features = features[:, :max_len]
        weights, mask = self.pool_weights(lengths, max_len)
        pad = ~mask[..., None]
        ranked = features.masked_fill(pad, -10000).sort(dim=1, descending=True).values.masked_fill(pad, 0)
        return (ranked * weights.to(ranked.dtype)).sum(1)
