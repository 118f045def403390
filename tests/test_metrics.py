import json

import numpy as np
import pytest

from itr.cli import main
from itr.eval.metrics import KEYS, evaluate_sims, recall_metrics
from itr.eval.ranks import i2t_ranks, t2i_ranks

# 2 images x 10 captions (captions 0-4 belong to image 0, 5-9 to image 1)
SIMS = np.array([
    [0.1, 0.9, 0.3, 0.2, 0.0, 0.95, 0.5, 0.2, 0.1, 0.1],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2],
], dtype=np.float32)


def test_hand_computed_ranks_with_ties():
    # image 0: best gt is caption 1 (0.9); one caption (0.95) is higher -> 1
    # image 1: caption 5 ties at 0.5 with captions 0-4, which have smaller indices -> 5
    assert i2t_ranks(SIMS).tolist() == [1, 5]
    # caption j vs its image j // 5; column 7 ties (0.2, 0.2) and image 0 comes first -> 1
    assert t2i_ranks(SIMS).tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 0, 0]


def test_hand_computed_metrics():
    m = evaluate_sims(SIMS, "1k")
    assert list(m) == KEYS
    assert (m["i2t_R1"], m["i2t_R5"], m["i2t_R10"]) == (0.0, 50.0, 100.0)
    assert (m["i2t_medr"], m["i2t_meanr"]) == (4.0, 4.0)  # floor(median(1, 5)) + 1; mean + 1
    assert (m["t2i_R1"], m["t2i_R5"], m["t2i_R10"]) == (30.0, 100.0, 100.0)
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(1.7)
    assert m["rsum"] == pytest.approx(380.0)


def test_collapsed_scores_give_chance_not_perfect_recall():
    m = evaluate_sims(np.zeros((4, 20), np.float32))
    assert m["i2t_R1"] == pytest.approx(25.0) and m["t2i_R1"] == pytest.approx(25.0)


def _reference_ranks(sims):
    """vsepp-style ranks by a full stable sort (descending score, then ascending index)."""
    n = sims.shape[0]
    i2t = []
    for i in range(n):
        order = sorted(range(5 * n), key=lambda j: (-sims[i, j], j))
        i2t.append(min(order.index(j) for j in range(5 * i, 5 * i + 5)))
    t2i = []
    for j in range(5 * n):
        order = sorted(range(n), key=lambda i: (-sims[i, j], i))
        t2i.append(order.index(j // 5))
    return i2t, t2i


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_counting_equals_a_full_sort_on_random_matrices_with_ties(chunk):
    rng = np.random.default_rng(0)
    sims = rng.integers(0, 4, size=(7, 35)).astype(np.float32)  # many ties
    ref_i2t, ref_t2i = _reference_ranks(sims)
    assert i2t_ranks(sims, chunk=chunk).tolist() == ref_i2t
    assert t2i_ranks(sims, chunk=chunk).tolist() == ref_t2i


def test_coco_5fold_uses_diagonal_blocks_and_averages_folds():
    rng = np.random.default_rng(1)
    n = 10  # 5 folds of 2 images
    sims = rng.standard_normal((n, 5 * n)).astype(np.float32)
    sims[:2, 10:] = 50.0  # off-diagonal blocks: ruin 5k, invisible to the 5 folds
    folds = [recall_metrics(i2t_ranks(sims[2 * f:2 * f + 2, 10 * f:10 * f + 10]),
                            t2i_ranks(sims[2 * f:2 * f + 2, 10 * f:10 * f + 10])) for f in range(5)]
    m = evaluate_sims(sims, "coco-5fold")
    for k in KEYS:
        assert m[k] == pytest.approx(np.mean([f[k] for f in folds]))
    assert m["rsum"] == pytest.approx(sum(m[k] for k in KEYS if "_R" in k))
    assert len(m["folds"]) == 5
    assert evaluate_sims(sims, "5k")["rsum"] != pytest.approx(m["rsum"])
    with pytest.raises(ValueError, match="divisible by 5"):
        evaluate_sims(sims[:7, :35], "coco-5fold")


def test_bad_matrices():
    with pytest.raises(ValueError, match="5 x 2"):
        evaluate_sims(np.zeros((2, 9), np.float32))
    bad = SIMS.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_sims(bad)


def test_score_command_writes_the_json_keys(tmp_path, capsys):
    np.save(tmp_path / "sims.npy", SIMS)
    assert main(["score", str(tmp_path / "sims.npy"), "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert list(m) == KEYS and m["rsum"] == pytest.approx(380.0)
    assert "rsum 380.0" in capsys.readouterr().out


def test_score_command_errors_name_the_file(tmp_path, capsys):
    np.save(tmp_path / "wide.npy", np.zeros((2, 7)))
    assert main(["score", str(tmp_path / "wide.npy")]) == 2
    assert "wide.npy" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err
