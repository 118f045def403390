"""Global-batch negatives and exact gradient accumulation: splitting a batch over ranks or
accumulation steps gives the loss and gradients of the whole batch in one process."""
import pytest
import torch

from conftest import assert_same_step, launch_steps


@pytest.fixture(scope="module")
def reference():
    return launch_steps(1, "vsepp")[0]


@pytest.fixture(scope="module")
def two_ranks():
    """Every 2-rank run of this file, in one launch."""
    runs = {"w2a1": ("vsepp", 1), "w2a2": ("vsepp", 2), "local": ("vsepp", 1, {"global_negatives": False}),
            "head": ("vsepp_head", 2)}
    return dict(zip(runs, launch_steps(2, *runs.values())))


def test_accumulation_equals_the_whole_batch(reference):
    a2, a4 = launch_steps(1, ("vsepp", 2), ("vsepp", 4))
    assert_same_step(a2, reference, "1 rank x 2")
    assert_same_step(a4, reference, "1 rank x 4")


@pytest.mark.slow
def test_two_ranks_with_gathered_negatives_equal_one_rank(reference, two_ranks):
    assert_same_step(two_ranks["w2a1"], reference, "2 ranks")
    assert_same_step(two_ranks["w2a2"], reference, "2 ranks x 2")  # ranks and accumulation together


@pytest.mark.slow
def test_per_rank_negatives_differ(reference, two_ranks):
    local = two_ranks["local"]
    assert local["loss"] < reference["loss"]  # fewer negatives, smaller hardest violations
    assert any(not torch.allclose(local["grads"][k], reference["grads"][k]) for k in reference["grads"])


@pytest.mark.slow
def test_a_learnable_batch_level_module_gets_the_whole_batch_gradient(two_ranks):
    """HREM-style: a module inside batch_loss, over the gathered global batch, with accumulation."""
    ref, a2 = launch_steps(1, "vsepp_head", ("vsepp_head", 2))
    assert "head.weight" in ref["grads"]
    assert_same_step(a2, ref, "1 rank x 2")
    assert_same_step(two_ranks["head"], ref, "2 ranks x 2")
