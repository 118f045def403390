"""SCAN t2i all-pairs scores: our batched eval path vs the reference's per-caption loop, in the same run.

    python benchmarks/scan_allpairs.py                       # 1,000 images x 5,000 captions, 36 x 1024, ~12 words
    python benchmarks/scan_allpairs.py --images 200 --captions 1000
    python benchmarks/scan_allpairs.py --world 2             # also our path on 2 processes (gloo), the scaling
    python benchmarks/scan_allpairs.py --lengths ../shared/data/f8k_pooled/test_caps.txt   # real caption lengths

(a) ``itr.eval.scores.similarity_matrix`` with ``SCAN.score`` (every pair of a tile in batched tensor ops);
(b) the reference: kuanghuei/SCAN ``evaluation.py@053693f shard_xattn_t2i`` (128 x 128 tiles) calling
``model.py@053693f xattn_score_t2i``, which loops over the captions of a tile in Python (ported below:
``func_attention`` with clipped_l2norm, ``cosine_similarity``, LogSumExp pooling).
Embeddings are random (L2-normalized regions and words, as a randomly initialized SCAN produces); the
scores must agree to 1e-5. Prints both times and the speedup; with ``--world 2`` the 2-process time and the
scaling of our path.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn


def caption_lengths(path):
    """Token counts of a SCAN precomp ``*_caps.txt`` (whitespace words + <start> and <end>, as SCAN's data.py)."""
    with open(path) as f:
        lens = [len(line.split()) + 2 for line in f if line.strip()]
    if not lens:
        raise SystemExit(f"{path}: no captions")
    return torch.tensor(lens)


def make_inputs(n_img, n_cap, regions, dim, words, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, regions, dim, generator=g)
    img = img / (img.norm(dim=-1, keepdim=True) + 1e-8)
    if lengths is None:
        lens = torch.randint(max(2, words - 4), words + 5, (n_cap,), generator=g)  # ~words on average
    else:  # drawn from a real caption-length distribution
        lens = lengths[torch.randint(0, len(lengths), (n_cap,), generator=g)]
    L = int(lens.max())
    cap = torch.randn(n_cap, L, dim, generator=g)
    cap = cap / (cap.norm(dim=-1, keepdim=True) + 1e-8)
    cap = cap * (torch.arange(L)[None, :, None] < lens[:, None, None])
    return img, cap, lens


def build_model(dim, lambda_softmax=9.0, lambda_lse=6.0):
    from itr.config import load_recipe
    from itr.data.text import WordVocab
    from itr.models import build_model as build

    r = load_recipe(raw={"model": {"name": "scan", "embed_dim": dim, "direction": "t2i", "lambda_softmax": lambda_softmax,
                                   "lambda_lse": lambda_lse, "text": {"name": "gru_words", "word_dim": 8, "min_count": 1,
                                                                      "mask_word": False}}})
    model = build(r, 8, WordVocab.build(["a b c"], min_count=1))
    return model.eval()


# ----------------------------------------------------------------------------- the reference (kuanghuei/SCAN)


def _l2norm(x, dim, eps=1e-8):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _func_attention(query, context, smooth):
    b, q_len = query.shape[:2]
    s_len = context.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))
    attn = _l2norm(nn.LeakyReLU(0.1)(attn), 2)  # clipped_l2norm
    attn = attn.transpose(1, 2).contiguous().view(b * q_len, s_len)
    attn = torch.softmax(attn * smooth, dim=1).view(b, q_len, s_len)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous()).transpose(1, 2)


def _cosine(x1, x2, dim, eps=1e-8):
    return ((x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=eps)).squeeze()


def xattn_score_t2i(images, captions, cap_lens, lambda_softmax, lambda_lse):
    sims = []
    n_image = images.size(0)
    for i in range(captions.size(0)):
        n_word = int(cap_lens[i])
        cap_i = captions[i, :n_word, :].unsqueeze(0).contiguous().repeat(n_image, 1, 1)
        wei = _func_attention(cap_i, images, lambda_softmax)
        row = _cosine(cap_i, wei, dim=2).view(n_image, n_word)
        row = torch.log(row.mul(lambda_lse).exp().sum(dim=1, keepdim=True)) / lambda_lse
        sims.append(row)
    return torch.cat(sims, 1)


@torch.no_grad()
def shard_xattn_t2i(images, captions, caplens, lambda_softmax, lambda_lse, shard_size=128):
    n_im, n_cap = images.shape[0], captions.shape[0]
    d = np.zeros((n_im, n_cap), dtype=np.float32)
    for i0 in range(0, n_im, shard_size):
        i1 = min(i0 + shard_size, n_im)
        for j0 in range(0, n_cap, shard_size):
            j1 = min(j0 + shard_size, n_cap)
            d[i0:i1, j0:j1] = xattn_score_t2i(images[i0:i1], captions[j0:j1], caplens[j0:j1],
                                              lambda_softmax, lambda_lse).numpy()
    return d


# ----------------------------------------------------------------------------- our path, 1 or N processes


def ours(args, rank=0, world=1):
    from itr.eval.scores import similarity_matrix

    img, cap, lens = make_inputs(args.images, args.captions, args.regions, args.dim, args.words, args.seed, args.lens)
    model = build_model(args.dim)
    t = time.perf_counter()
    sims = similarity_matrix(model.score, img, {"words": cap, "lens": lens}, chunk=args.chunk, rank=rank, world=world)
    return sims, time.perf_counter() - t


def _worker(rank, world, args, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.distributed.barrier()
    sims, dt = ours(args, rank, world)
    t = torch.tensor([dt])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        np.save(out, sims)
        with open(out + ".time", "w") as f:
            f.write(str(float(t)))
    torch.distributed.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--words", type=int, default=12, help="mean caption length (lengths uniform in words-4..words+4)")
    p.add_argument("--lengths", default=None, metavar="CAPS_TXT",
                   help="draw caption lengths from this SCAN *_caps.txt (e.g. ../shared/data/f8k_pooled/"
                        "test_caps.txt) instead of uniform in words-4..words+4")
    p.add_argument("--chunk", type=int, default=1024, help="eval tile size (eval.chunk_size)")
    p.add_argument("--world", type=int, default=1, help="also run our path on this many processes (gloo)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the same for 1 and --world "
                                                           "processes: give each process its own cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.lens = caption_lengths(args.lengths) if args.lengths else None
    if args.lens is not None:
        args.words = f"{args.lens.float().mean():.1f} (max {int(args.lens.max())}, from {args.lengths})"
    print(f"SCAN t2i all pairs: {args.images} images x {args.captions} captions, {args.regions} regions x {args.dim}-d, "
          f"~{args.words} words; {args.threads} threads", flush=True)

    sims, t_ours = ours(args)
    print(f"ours (similarity_matrix + SCAN.score, tile {args.chunk}): {t_ours:.2f} s", flush=True)
    if not args.skip_reference:
        img, cap, lens = make_inputs(args.images, args.captions, args.regions, args.dim, args.words, args.seed, args.lens)
        t = time.perf_counter()
        ref = shard_xattn_t2i(img, cap, lens, 9.0, 6.0)
        t_ref = time.perf_counter() - t
        err = float(np.abs(sims - ref).max())
        print(f"reference (shard_xattn_t2i, 128 x 128 tiles, loop over captions): {t_ref:.2f} s", flush=True)
        print(f"max |ours - reference| = {err:.2e}")
        assert err <= 1e-5, f"scores differ by {err}"
        print(f"speedup: {t_ref / t_ours:.1f}x")
    if args.world > 1:
        import socket
        import tempfile

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tempfile.mkdtemp(), "sims.npy")
        mp.spawn(_worker, args=(args.world, args, port, out), nprocs=args.world, join=True)
        t_w = float(open(out + ".time").read())
        same = np.array_equal(np.load(out), sims)
        print(f"ours on {args.world} processes ({args.threads} thread(s) each): {t_w:.2f} s; "
              f"scaling {t_ours / t_w:.2f}x vs 1 process (ideal {args.world}x); bitwise equal: {same}")
        assert np.allclose(np.load(out), sims, rtol=0, atol=1e-5)


if __name__ == "__main__":
    main()
