"""The streamed evaluation (itr.eval.stream): the same ranks and metrics as the full-matrix path for every
protocol and tile size, ties included; top-K lists equal a full sort; cascades from a saved top-K file and
from another model; a killed evaluation resumes from its finished tiles."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from itr.eval.metrics import evaluate_sims
from itr.eval.scores import similarity_matrix
from itr.eval.stream import Streamer, protocol_blocks, stream_ranks

from conftest import ROOT, small_overrides


def dot(a, b):
    return a @ b.t()


def embeddings(n=40, d=6, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    cap = torch.repeat_interleave(img, 5, 0) + 1.5 * torch.randn(5 * n, d, generator=g)
    if ties:  # integer scores: ties everywhere
        img, cap = img.round(), cap.round()
    return img, cap


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk", [3, 16, 1024])
@pytest.mark.parametrize("protocol", ["1k", "5k", "coco-5fold"])
def test_streamed_metrics_equal_the_full_matrix_path(protocol, chunk, ties):
    from itr.eval.job import score_embeddings

    img, cap = embeddings(ties=ties)
    full = evaluate_sims(similarity_matrix(dot, img, cap, chunk), protocol)
    got, _ = score_embeddings(dot, img, cap, protocol, chunk)
    assert {k: got[k] for k in full if k != "folds"} == {k: full[k] for k in full if k != "folds"}
    assert ("folds" in got) == (protocol == "coco-5fold")


@pytest.mark.parametrize("where", ["image", "caption"])
def test_a_non_finite_embedding_anywhere_is_an_error_before_any_tile(where):
    """Checked in blocks of rows (the check must not copy the gallery): a NaN in the last block is found too."""
    from itr.eval.job import score_embeddings

    img, cap = embeddings(n=1000)  # 5,000 captions: two blocks of 4,096 rows
    (img if where == "image" else cap)[-1, 2] = float("nan")
    calls = []
    with pytest.raises(ValueError, match=f"NaN or inf in the {where} embeddings"):
        score_embeddings(lambda a, b: calls.append(1) or a @ b.t(), img, cap, "1k", 16)
    assert not calls


def test_only_tiles_of_the_protocol_blocks_are_scored():
    img, cap = embeddings(n=50)
    calls = []

    def counted(a, b):
        calls.append(a.shape[0] * b.shape[0])
        return a @ b.t()

    stream_ranks(Streamer(counted, img, cap, chunk=10), "coco-5fold")
    everything = 50 * 250
    assert sum(calls) < 0.5 * everything  # the 5 diagonal blocks (1/5) and the ground-truth tiles, not the matrix


def test_topk_lists_equal_a_full_sort_and_mark_the_ground_truth(tmp_path):
    from itr.eval.topk import save_topk

    img, cap = embeddings(n=30)
    sims = similarity_matrix(dot, img, cap, 7)
    _, tops = stream_ranks(Streamer(dot, img, cap, chunk=7), "1k", topk=4)
    top = tops[0]
    assert np.array_equal(top.c_i2t, np.argsort(-sims, 1, kind="stable")[:, :4])
    assert np.array_equal(top.c_t2i, np.argsort(-sims.T, 1, kind="stable")[:, :4])
    np.testing.assert_array_equal(top.s_i2t, np.take_along_axis(sims, top.c_i2t, 1))
    save_topk(tmp_path / "t.npz", tops, protocol_blocks(30, "1k"))
    z = np.load(tmp_path / "t.npz")
    assert set(z.files) >= {"i2t_query", "i2t_rank", "i2t_candidate", "i2t_score", "i2t_is_gt", "t2i_is_gt"}
    assert len(z["i2t_query"]) == 30 * 4 and len(z["t2i_query"]) == 150 * 4
    assert np.array_equal(z["i2t_is_gt"], z["i2t_candidate"] // 5 == z["i2t_query"])


def test_a_cascade_from_a_saved_topk_file_with_every_candidate_is_exact(tmp_path):
    from itr.eval.cascade import cascade_metrics, file_shortlists
    from itr.eval.topk import save_topk

    class Dot(torch.nn.Module):
        @staticmethod
        def score(a, b):
            return a @ b.t()

    img, cap = embeddings(n=20)
    full = evaluate_sims(similarity_matrix(dot, img, cap, 8), "1k")
    _, tops = stream_ranks(Streamer(dot, img, cap, chunk=8), "1k", topk=100)
    save_topk(tmp_path / "all.npz", tops, protocol_blocks(20, "1k"))
    every = cascade_metrics(Dot(), img, cap, file_shortlists(tmp_path / "all.npz", 20, 100, "1k"))
    assert every == pytest.approx(full)
    short = cascade_metrics(Dot(), img, cap, file_shortlists(tmp_path / "all.npz", 20, 3, "1k"))
    assert short["i2t_R5"] == short["i2t_R10"] <= full["i2t_R10"]  # a ground truth outside the 3 is a miss


def test_scan_reranks_a_vsepp_shortlist(tmp_path, tiny_data):
    """Any model by any model: a VSE++ checkpoint's top-K lists, reranked by SCAN's cross-attention."""
    from itr.config import load_recipe
    from itr.eval.job import run_eval
    from itr.train import train

    o = small_overrides(tiny_data, **{"train.epochs": 1, "data.root": tiny_data, "model.embed_dim": 16})
    train(load_recipe(ROOT / "recipes/synthetic/vsepp_gru.yaml", o), tmp_path / "vsepp")
    train(load_recipe(ROOT / "recipes/synthetic/scan_t2i.yaml", o + ["model.text.min_count=1"]), tmp_path / "scan")
    full = run_eval(tmp_path / "scan" / "best", tiny_data, "test")
    cas = run_eval(tmp_path / "scan" / "best", tiny_data, "test", shortlist=tmp_path / "vsepp" / "best", k=200,
                   compare_full=True, json_out=tmp_path / "c.json")
    assert cas["rsum"] == pytest.approx(full["rsum"])  # every caption shortlisted: SCAN decides alone
    vsepp = run_eval(tmp_path / "vsepp" / "best", tiny_data, "test", save_topk=10, topk_path=tmp_path / "v.npz")
    short = run_eval(tmp_path / "scan" / "best", tiny_data, "test", shortlist=tmp_path / "v.npz", k=10)
    # in a top-10 shortlist every ground truth it holds ranks < 10: R@10 is the shortlist's own R@10
    assert (short["i2t_R10"], short["t2i_R10"]) == (vsepp["i2t_R10"], vsepp["t2i_R10"])
    assert json.loads((tmp_path / "c.json").read_text())["two_stage"]["rsum_lost"] == pytest.approx(0.0)


@pytest.mark.slow
def test_a_killed_evaluation_resumes_from_its_finished_tiles(tmp_path, tiny_data):
    from itr.config import load_recipe
    from itr.train import train

    train(load_recipe(ROOT / "recipes/synthetic/vsepp_gru.yaml",
                      small_overrides(tiny_data, **{"train.epochs": 1, "data.root": tiny_data})), tmp_path / "run")
    args = [sys.executable, "-m", "itr", "eval", str(tmp_path / "run" / "best"), "--data", str(tiny_data), "--split",
            "test", "--chunk-size", "8", "--state", str(tmp_path / "state"), "--state-every", "0"]
    killed = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=300,
                            env=dict(os.environ, ITR_FAULT="kill@eval tile:12"))
    assert killed.returncode == -9
    assert (tmp_path / "state" / "state-rank0.npz").is_file()
    done = subprocess.run(args + ["--json", str(tmp_path / "m.json")], capture_output=True, text=True, errors="replace",
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the evaluation" in done.stdout and "12 of this rank's tiles are done" in done.stdout
    # a preemption signal (SIGTERM here; SLURM's USR1 alike) saves the state and exits 75 for a requeue
    term = subprocess.run(args[:-4] + ["--state", str(tmp_path / "s2"), "--json", str(tmp_path / "t.json")],
                          capture_output=True, text=True, errors="replace", timeout=300,
                          env=dict(os.environ, ITR_FAULT="term@eval tile:7"))
    assert term.returncode == 75 and "run the same command again to resume" in term.stdout, term.stderr[-2000:]
    again = subprocess.run(args[:-4] + ["--state", str(tmp_path / "s2"), "--json", str(tmp_path / "t.json")],
                           capture_output=True, text=True, errors="replace", timeout=300)
    assert again.returncode == 0 and "resuming the evaluation" in again.stdout
    ref = subprocess.run(args[:-4] + ["--json", str(tmp_path / "ref.json")], capture_output=True, text=True,
                         errors="replace", timeout=300)
    assert ref.returncode == 0
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((tmp_path / "ref.json").read_text())
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads((tmp_path / "ref.json").read_text())


# ----------------------------------------------------------------------------- embeddings spilled to disk

def test_disk_rows_read_back_what_was_written_in_any_order(tmp_path):
    from itr.eval.spill import DiskRows

    x = torch.randn(50, 7)
    disk = DiskRows(50, 7, tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked from the start: a killed job leaves no file
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    for a in range(0, 50, 16):  # scattered rows, as the length-sorted caption batches write them
        disk.write(perm[a:a + 16].numpy(), x[perm[a:a + 16]])
    assert disk.shape == x.shape and torch.equal(disk[0:50], x) and torch.equal(disk[13:29], x[13:29])
    assert disk[49:60].shape == (1, 7)
    with pytest.raises(ValueError, match="NaN or inf"):
        disk.write([3], torch.tensor([[float("nan")] * 7]))
    disk.close()


class _Words:
    """A tokenizer of whitespace words into their lengths (captions of many lengths: the sorted order matters)."""
    pad_id = 0

    def encode(self, text):
        return [len(w) for w in text.split()]


class _Mean(torch.nn.Module):
    def embed_captions(self, batch):
        ids, lens = batch["text_ids"].float(), batch["text_lens"].float()
        return torch.stack([ids.sum(1) / lens, lens, ids.max(1).values], 1)


def test_spilled_caption_embeddings_are_the_in_memory_ones_in_caption_order():
    from itr.eval.embed import Spill, embed_captions
    from itr.eval.spill import DiskRows

    rng = np.random.default_rng(0)
    caps = [" ".join("w" * int(rng.integers(1, 9)) for _ in range(int(rng.integers(1, 12)))) for _ in range(37)]
    held = embed_captions(_Mean(), caps, _Words(), batch_size=5)
    disk = embed_captions(_Mean(), caps, _Words(), batch_size=5, spill=Spill(0.0))
    assert isinstance(disk, DiskRows) and torch.equal(disk[0:37], held)
    assert not isinstance(embed_captions(_Mean(), caps, _Words(), batch_size=5, spill=Spill(1.0)), DiskRows)


def test_streamed_metrics_from_spilled_embeddings_are_bitwise_the_same(tmp_path):
    from itr.eval.job import score_embeddings
    from itr.eval.spill import DiskRows

    img, cap = embeddings(n=40, d=6, ties=True)
    disk_img, disk_cap = DiskRows(40, 6, tmp_path), DiskRows(200, 6, tmp_path)
    disk_img.write(np.arange(40), img)
    disk_cap.write(np.arange(200), cap)
    held = score_embeddings(dot, img, cap, "coco-5fold", 16, topk=5)
    spilled = score_embeddings(dot, disk_img, disk_cap, "coco-5fold", 16, topk=5)
    assert spilled[0] == held[0]
    for a, b in zip(held[1], spilled[1]):
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values()))
