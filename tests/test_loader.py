import pytest

from itr.data.loader import TrainLoader, batches_per_epoch, plan_epoch
from itr.data.manifest import load_manifest
from itr.data.precomp import DataError
from itr.data.sources import split_captions
from itr.shards.precomp import shard_precomp



def _epoch(manifest, vocab, world, rank, epoch=0, workers=0, batch=16, skip=0, seed=0):
    loader = TrainLoader(manifest, vocab, batch, world, rank, seed=seed, num_workers=workers, shuffle_buffer=100)
    return [b for b in loader.epoch(epoch, skip=skip)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_equal_batches_and_disjoint_pairs(manifest, vocab, world):
    n = batches_per_epoch(manifest, 0, 0, world, 16)
    seen = []
    for rank in range(world):
        batches = _epoch(manifest, vocab, world, rank)
        assert len(batches) == n  # equal length on every rank, or DDP hangs
        assert all(len(b["cap_ids"]) == 16 for b in batches)
        seen += [c for b in batches for c in b["cap_ids"].tolist()]
    assert len(seen) == len(set(seen))  # no pair twice in an epoch, across ranks
    assert len(seen) >= 800 - world * (16 + 5 * 2)  # per rank: under a batch, plus a 2-image imbalance


def test_every_rank_is_assigned_all_images_exactly_once(manifest):
    for world in (1, 2, 3, 5, 8, 11):  # more ranks than shards too
        covered = []
        for units in plan_epoch(manifest, 0, 0, world):
            for s, part, parts in units:
                covered += [(s, i) for i in range(part, manifest["shards"][s]["num_images"], parts)]
        assert sorted(covered) == sorted((s, i) for s, sh in enumerate(manifest["shards"]) for i in range(sh["num_images"]))


def test_stream_is_deterministic_per_epoch_and_changes_across_epochs(manifest, vocab):
    a = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 1, 0, epoch=0)]
    b = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 1, 0, epoch=0)]
    c = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 1, 0, epoch=1)]
    assert a == b and a != c


def test_skip_resumes_the_same_stream(manifest, vocab):
    full = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 2, 1, epoch=3)]
    tail = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 2, 1, epoch=3, skip=5)]
    assert tail == full[5:]


def test_worker_processes_give_a_deterministic_stream(manifest, vocab):
    a = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 2, 0, workers=2)]
    b = [b["cap_ids"].tolist() for b in _epoch(manifest, vocab, 2, 0, workers=2)]
    assert a == b and len(a) == batches_per_epoch(manifest, 0, 0, 2, 16)


def test_batch_contents_match_the_captions(manifest, vocab):
    caps = split_captions(manifest)
    b = _epoch(manifest, vocab, 1, 0)[0]
    assert b["feats"].shape == (16, 8, 32) and str(b["feats"].dtype) == "torch.float16"
    for ids, n, cap, img in zip(b["text_ids"], b["text_lens"], b["cap_ids"], b["img_ids"]):
        assert ids[:n].tolist() == vocab.encode(caps[int(cap)])
        assert (ids[n:] == 0).all()
        assert int(cap) // 5 == int(img)


def test_corrupt_shard_mid_stream_names_the_file(tmp_path, tiny_data, vocab):
    shard_precomp(tiny_data, "train", tmp_path, images_per_shard=40, progress=False)
    m = load_manifest(tmp_path, "train")
    bad = tmp_path / m["shards"][2]["name"]
    bad.write_bytes(bad.read_bytes()[:20000])  # truncated, not re-verified
    with pytest.raises(DataError) as e:
        _epoch(m, vocab, 1, 0)
    assert bad.name in str(e.value)


def test_too_little_data_for_one_batch(manifest, vocab):
    with pytest.raises(DataError, match="batch_size"):
        _epoch(manifest, vocab, 2, 0, batch=512)
