import pytest
import torch

from itr.config import LossConfig
from itr.modules.losses import HingeLoss, hinge_loss

S = torch.tensor([[0.5, 0.6, 0.4],
                  [0.2, 0.9, 0.8],
                  [0.4, 0.3, 0.7]])


def _embeddings():
    # img = I makes scores = img @ cap.T = cap.T, so scores[i, j] = S[i, j] exactly.
    return torch.eye(3, requires_grad=True), S.t().clone().requires_grad_(True)


def test_hand_computed_sum_and_max_violation():
    # i2t violations (margin 0.2 + S[i,j] - S[i,i] > 0): (0,1) 0.3, (0,2) 0.1, (1,2) 0.1
    # t2i violations (0.2 + S[i,j] - S[j,j] > 0):       (2,0) 0.1, (1,2) 0.3
    img, cap = _embeddings()
    ids = torch.arange(3)
    assert hinge_loss(img, cap, ids, 0.2, max_violation=False).item() == pytest.approx(0.3 + 0.1 + 0.1 + 0.1 + 0.3)
    # hardest per query: i2t rows 0.3, 0.1, 0; t2i columns 0.1, 0, 0.3
    assert hinge_loss(img, cap, ids, 0.2, max_violation=True).item() == pytest.approx(0.8)


def test_same_image_pairs_are_not_negatives():
    img, cap = _embeddings()
    ids = torch.tensor([7, 7, 3])  # pairs 0 and 1 show the same image
    # removes i2t (0,1) 0.3 and t2i (1,0) [0]; left: i2t (0,2) 0.1, (1,2) 0.1; t2i (2,0) 0.1, (1,2) 0.3
    assert hinge_loss(img, cap, ids, 0.2, max_violation=False).item() == pytest.approx(0.6)
    assert hinge_loss(img, cap, ids, 0.2, max_violation=True).item() == pytest.approx(0.6)
    assert hinge_loss(img, cap, ids, 0.2, max_violation=True, mask_same_image=False).item() == pytest.approx(0.8)


def test_gradient_flows_through_the_hardest_negatives_only():
    # Terms with image 2: caption 0's hardest negative is image 2 (+cap0); caption 2's query has positive
    # image 2 (-cap2) and hardest negative image 1; image 2's own row has no violation.
    img, cap = _embeddings()
    hinge_loss(img, cap, torch.arange(3), 0.2, max_violation=True).backward()
    torch.testing.assert_close(img.grad[2], S[:, 0] - S[:, 2])


def test_gathered_candidates_match_the_full_batch():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    full = hinge_loss(img, cap, ids)
    halves = sum(hinge_loss(img[s], cap[s], ids[s], img_all=img, cap_all=cap, ids_all=ids, offset=s.start)
                 for s in (slice(0, 3), slice(3, 6)))
    assert halves.item() == pytest.approx(full.item(), rel=1e-6)


def test_warmup_epochs_sum_then_max():
    loss = HingeLoss(LossConfig(warmup_epochs=1))
    img, cap = _embeddings()
    batch = {"img_ids": torch.arange(3)}
    assert loss({"img": img, "cap": cap}, batch, epoch=0).item() == pytest.approx(0.9)
    assert loss({"img": img, "cap": cap}, batch, epoch=1).item() == pytest.approx(0.8)
