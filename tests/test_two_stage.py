"""Two-stage retrieval (global shortlist, then the full score on it): exact when the shortlist holds
every candidate, a ground truth outside the shortlist is a miss at every R@k, and 2 ranks give what
1 rank gives."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from itr.eval.metrics import evaluate_sims
from itr.eval.cascade import rerank, shortlist, shortlist_ranks, two_stage_metrics
from conftest import free_port


class Toy:
    """A global score (first 4 dims) and a full score (all 8 dims, with a bias) on token-level dicts."""

    @staticmethod
    def global_score(img, cap):
        return img["v"][:, :4] @ cap["v"][:, :4].t()

    @staticmethod
    def score(img, cap):
        return img["v"] @ cap["v"].t() + 0.1 * img["b"][:, None]


class PairToy(Toy):
    """Toy with ``pair_score``: the rerank batches many queries per call."""

    @staticmethod
    def pair_score(img, cap):
        return (img["v"] * cap["v"]).sum(-1) + 0.1 * img["b"]


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 8, generator=g)
    cap = img.repeat_interleave(5, 0) + 0.8 * torch.randn(5 * n, 8, generator=g)
    return {"v": img, "b": torch.randn(n, generator=g)}, {"v": cap}


@pytest.mark.parametrize("protocol", ["1k", "coco-5fold"])
def test_a_shortlist_of_every_candidate_equals_full_scoring(protocol):
    img, cap = _data()
    two = two_stage_metrics(Toy, img, cap, k=100, protocol=protocol, chunk=7)
    full = evaluate_sims(Toy.score(img, cap).numpy(), protocol)
    for key in ("i2t_R1", "i2t_R5", "i2t_R10", "i2t_meanr", "t2i_R1", "t2i_R5", "t2i_meanr", "rsum"):
        assert two[key] == pytest.approx(full[key]), key


@pytest.mark.parametrize("per_call", [1, 7, 10 ** 6])
def test_batched_pair_rerank_equals_one_call_per_query(per_call):
    img, cap = _data(n=9, seed=2)
    glob = Toy.global_score(img, cap).numpy()
    i2t_idx, t2i_idx = shortlist(glob, 6), shortlist(glob.T, 4)
    one = rerank(Toy.score, img, cap, i2t_idx, t2i_idx)
    # per_call 7: groups of one query (K = 6) ... 10 ** 6: every image and caption query in one group
    batched = rerank(Toy.score, img, cap, i2t_idx, t2i_idx, pair_fn=PairToy.pair_score, pairs_per_call=per_call)
    for a, b in zip(one, batched):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert float(one[0].abs().min()) > 0 and float(one[1].abs().min()) > 0  # every entry was filled
    m1 = two_stage_metrics(Toy, img, cap, k=4, protocol="1k", chunk=4)
    m2 = two_stage_metrics(PairToy, img, cap, k=4, protocol="1k", chunk=4)
    for key in ("i2t_R1", "i2t_R5", "i2t_meanr", "t2i_R1", "t2i_R5", "t2i_meanr", "rsum"):
        assert m1[key] == pytest.approx(m2[key]), key


def test_a_ground_truth_outside_the_shortlist_is_a_miss_at_every_k():
    # 12 images; image 0's captions score worst globally but best under the full score
    n = 12
    scores_full = torch.zeros(n, 5 * n)
    glob = torch.rand(n, 5 * n, generator=torch.Generator().manual_seed(1))
    glob[0, :5] = -1.0
    scores_full[0, :5] = 10.0
    idx = shortlist(glob.numpy(), 3)
    assert not bool(torch.isin(idx[0], torch.arange(5)).any())
    s = scores_full.gather(1, idx)
    gt = 5 * torch.arange(n)[:, None] + torch.arange(5)[None]
    ranks = shortlist_ranks(s, idx, gt, 5 * n)
    assert ranks[0] == 5 * n - 1  # never a hit, not even at R@10 with K = 3


def test_shortlist_ranks_by_hand_with_ties():
    idx = torch.tensor([[7, 2, 4, 9]])
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1]])
    # target 4 ties with candidate 7 (larger index: not before it) and is beaten by 2: rank 1
    assert shortlist_ranks(scores, idx, torch.tensor([[4]]), 10)[0] == 1
    # target 7 ties with 4 (smaller index: counts before it), beaten by 2: rank 2
    assert shortlist_ranks(scores, idx, torch.tensor([[7]]), 10)[0] == 2
    # the best of several targets
    assert shortlist_ranks(scores, idx, torch.tensor([[9, 2]]), 10)[0] == 0
    # shortlist ties: the smaller index is kept
    assert shortlist(np.array([[1.0, 2.0, 2.0, 0.0]]), 2).tolist() == [[1, 2]]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, cap = _data(n=15, seed=3)
    m = two_stage_metrics(Toy, img, cap, k=4, protocol="1k", chunk=8, rank=rank, world=world)
    if rank == 0:
        torch.save({k: v for k, v in m.items() if k != "timing"}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    img, cap = _data(n=15, seed=3)
    one = two_stage_metrics(Toy, img, cap, k=4, protocol="1k", chunk=8)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    assert {k: v for k, v in one.items() if k != "timing"} == two
    assert one["rsum"] < evaluate_sims(Toy.score(img, cap).numpy(), "1k")["rsum"] + 1e-9
