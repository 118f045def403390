"""The all-pairs sub-chunking shared by the cross-attention models (itr.modules.xattn)."""
import math

import torch

from itr.modules.xattn import length_groups, tiled_pairs


def test_length_groups_partition_the_captions_shortest_first_within_the_row_budget():
    lens = torch.tensor([12, 3, 30, 7, 7, 0, 11, 25, 9, 4])
    groups = length_groups(lens, rows=24)
    order = torch.cat(groups)
    assert sorted(order.tolist()) == list(range(10))  # every caption once
    assert lens[order].tolist() == sorted(lens.tolist())  # shortest first
    for g in groups:
        longest = max(int(lens[g].max()), 1)
        assert len(g) * longest <= 24 or len(g) == 1, (g, lens[g])
    assert [len(g) for g in groups] == [3, 2, 2, 1, 1, 1]  # 0,3,4 | 7,7 | 9,11 | 12 | 25 | 30


def _identify(img, words, lens):
    # a score that names its pair: image id in the integer part, the caption's (length, first feature) after it
    return img[:, 0, 0][:, None] * 1000 + lens[None, :].to(img.dtype) + words[None, :, 0, 0] / 10


def test_tiled_pairs_puts_every_pair_back_in_place_whatever_the_budget():
    g = torch.Generator().manual_seed(0)
    ni, nc, R = 7, 11, 3
    img = torch.arange(ni, dtype=torch.float32)[:, None, None].expand(ni, R, 2).contiguous()
    lens = torch.randint(1, 9, (nc,), generator=g)
    words = torch.rand(nc, 8, 2, generator=g)
    whole = _identify(img, words, lens)
    calls = []

    def fn(i, w, ln):
        calls.append((i.shape[0], w.shape[0], w.shape[1]))
        assert w.shape[1] == int(ln.max())  # cut to the group's longest caption
        # within the budget once it holds a few rows of regions (below that: one image x one group)
        assert i.shape[0] * w.shape[0] * R * w.shape[1] <= max(budget, R * max(math.isqrt(budget), 8))
        return _identify(i, w, ln)

    for budget in (1, 50, 200, 10 ** 6):
        calls.clear()
        torch.testing.assert_close(tiled_pairs(fn, img, words, lens, budget), whole, rtol=0, atol=0)
        assert (len(calls) == 1) == (budget == 10 ** 6)
    # a tuple of image tensors is sliced together
    tup = tiled_pairs(lambda im, w, ln: _identify(im[0], w, ln) + im[1][:, None], (img, torch.ones(ni)), words, lens, 50)
    torch.testing.assert_close(tup, whole + 1, rtol=0, atol=0)
