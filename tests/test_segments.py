"""Resuming an epoch on another stream shape (itr.data.segments): the replay on caption indices equals what the
loaders emit, and the rest of an epoch dealt to new ranks holds every pair not yet trained on, none twice."""
import pytest

from itr.data.loader import TrainLoader, batches_per_epoch
from itr.data.plan import plan_epoch
from itr.data.segments import Shape, rank_order, shard_index, stream_plan



def loader(manifest, vocab, shape, rank, seed=0):
    return TrainLoader(manifest, vocab, shape.rank_batch, shape.world, rank, seed=seed, num_workers=shape.num_workers,
                       shuffle_buffer=shape.shuffle_buffer)


def emitted(manifest, vocab, shape, rank, epoch=0, skip=0, segments=()):
    batches = loader(manifest, vocab, shape, rank).epoch(epoch, skip=skip, segments=segments)
    return [c for b in batches for c in b["cap_ids"].tolist()]


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("world", [1, 2])
def test_the_replay_on_caption_indices_equals_the_loaders_stream(manifest, vocab, world, workers):
    """Workers with unequal shares (7 shards of 23 and 22 images): an exhausted worker drops out of the round
    robin, which the replay must follow."""
    shape = Shape(world, 16, workers, 50)
    index = shard_index(manifest)
    n = batches_per_epoch(manifest, 1, 0, world, 16)
    for rank in range(world):
        units = plan_epoch(manifest, 1, 0, world)[rank]
        assert rank_order(index, units, shape, 0, 1, rank)[:n * 16] == emitted(manifest, vocab, shape, rank, epoch=1)


def run_segment(manifest, vocab, shape, micro, segments, epoch=0):
    """Each rank's first ``micro`` batches of the stream after ``segments``."""
    return [emitted(manifest, vocab, shape, r, epoch, segments=segments)[:micro * shape.rank_batch]
            for r in range(shape.world)]


@pytest.mark.parametrize("first, second", [(Shape(2, 8, 2, 50), Shape(1, 16, 0, 100)),
                                           (Shape(1, 16, 0, 100), Shape(2, 8, 2, 50)),
                                           (Shape(2, 8, 1, 50), Shape(3, 8, 2, 30))])
def test_the_rest_of_an_epoch_on_another_shape_trains_every_pair_not_yet_seen_once(manifest, vocab, first, second):
    n1 = batches_per_epoch(manifest, 0, 0, first.world, first.rank_batch)
    epoch_set = {c for r in range(first.world) for c in emitted(manifest, vocab, first, r)}
    seen = [c for part in run_segment(manifest, vocab, first, 7, []) for c in part]
    segments = [{**first.as_dict(), "micro": 7}]
    rest = [c for r in range(second.world) for c in emitted(manifest, vocab, second, r, segments=segments)]
    assert len(set(seen)) == len(seen) == 7 * first.world * first.rank_batch
    assert len(set(rest)) == len(rest) and not set(rest) & set(seen)  # none twice
    assert set(rest) <= epoch_set  # nothing from outside the epoch
    left = epoch_set - set(seen) - set(rest)
    assert len(left) < second.world * second.rank_batch  # all but under one micro-step's pairs
    assert len(rest) % (second.world * second.rank_batch) == 0 and n1 > 7


def test_two_shape_changes_in_one_epoch_and_a_same_shape_resume_of_the_rest(manifest, vocab):
    a, b, c = Shape(2, 8, 2, 50), Shape(1, 16, 1, 40), Shape(2, 8, 0, 60)
    seen = [x for part in run_segment(manifest, vocab, a, 5, []) for x in part]
    seg_a = [{**a.as_dict(), "micro": 5}]
    full_b = emitted(manifest, vocab, b, 0, segments=seg_a)
    # same shape again: replay and skip (skip counts the epoch's micro-batches, those of the segments too)
    assert emitted(manifest, vocab, b, 0, skip=5 + 3, segments=seg_a) == full_b[3 * 16:]
    seen += full_b[:4 * 16]
    segs = seg_a + [{**b.as_dict(), "micro": 4}]
    rest = [x for r in range(2) for x in emitted(manifest, vocab, c, r, segments=segs)]
    assert len(seen) == len(set(seen)) and not set(rest) & set(seen) and len(set(rest)) == len(rest)
    epoch_set = {x for r in range(2) for x in emitted(manifest, vocab, a, r)}
    assert len(epoch_set - set(seen) - set(rest)) < 16


def test_the_plan_after_segments_has_disjoint_equal_shares(manifest):
    index = shard_index(manifest)
    plans, available = stream_plan(manifest, index, [{**Shape(2, 8, 2, 50).as_dict(), "micro": 3}],
                                   Shape(3, 8, 1, 50), 0, 0)
    masks = [keep for _, keep in plans]
    sizes = [int(m.sum()) for m in masks]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == int(available.sum())
    assert not (masks[0] & masks[1]).any() and not (masks[1] & masks[2]).any()


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_stopped_on_w_ranks_finishes_its_epoch_on_another_number(tiny_data, tmp_path, before, after):
    """tiny_overrides: 4 shards of 40 images, global batch 32. On 2 ranks each reads 2 shards (400 pairs, 25
    batches of 16), on 1 rank 25 batches of 32: the epoch is all 800 pairs in 25 steps. Stopped after 7 steps,
    the rest (800 - 7 x 32 pairs) is 18 steps on any number of ranks."""
    import json
    import subprocess
    import sys

    from conftest import tiny_overrides
    from test_distributed import DEMO, accelerate_launch

    def launch(n, *args):
        if n > 1:
            return accelerate_launch(n, *args)
        return subprocess.run([sys.executable, "-m", "itr", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    out = tmp_path / "run"
    common = [*tiny_overrides(tiny_data, **{"train.epochs": 1}), "tracking.enabled=false", "--out", out]
    p = launch(before, "train", DEMO, *common, f"train.world_size={before}", "train.max_steps=7")
    assert p.returncode == 0, p.stderr[-4000:]
    meta = json.loads((out / "last" / "itr.json").read_text())
    assert meta["train_state"]["global_step"] == 7 and meta["stream"]["world"] == before
    p = launch(after, "train", DEMO, *common, f"train.world_size={after}", "train.resume=latest")
    assert p.returncode == 0, p.stderr[-4000:]
    log = p.stdout + p.stderr
    assert "resuming epoch 1 on another data stream" in log and "at epoch 0 step 7" in log, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["global_step"] == 25 and res["world_size"] == after
    state = json.loads((out / "last" / "itr.json").read_text())["train_state"]
    assert state["segments"] == [] and state["epoch"] == 1
