"""A cascade on the synthetic region data: SCAN reranking a VSE-infinity shortlist at several K, against SCAN
scoring every pair, in one run.

    python benchmarks/cascade.py [--work /tmp/itr-cascade] [--ks 10 50 100] [--split dev] [--threads 1]
    python benchmarks/cascade.py --shortlist RUN/best --rerank RUN/best   # reuse trained checkpoints

Without checkpoints it writes the synthetic data (``itr synth``: 3,000 / 1,000 / 1,000 images, 36 regions x
256-d) and trains ``recipes/synthetic/vse_infty.yaml`` and ``recipes/synthetic/scan_t2i.yaml`` as they stand
(~5 and ~13 minutes on this project's 2-core machine; kept in ``--work`` for the next run). Then, on one
process: both models embed the split; SCAN scores every pair (``score_embeddings``, the streamed job path);
VSE-infinity's top-max(K) lists are streamed once (``streamed_shortlists``) and cut to each K (the lists are
sorted, so a prefix is the top-K); SCAN reranks each (``cascade_metrics``). Prints, per K: the share of
queries whose ground truth is in the shortlist, rsum and R@1 against full SCAN's, and the time of shortlist +
rerank against full scoring. The default split is dev: a K read off this table is a choice, and choices are
not made on test.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "itr", *map(str, args)], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"itr {' '.join(map(str, args[:3]))} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                         f"{p.stderr[-2000:]}")


TINY = ["train.epochs=1", "model.embed_dim=16", "model.text.word_dim=16", "model.text.min_count=1",
        "train.batch_size=32", "data.num_workers=0", "data.images_per_shard=40", "eval.batch_size=64"]


def trained(work, recipe, data, extra=()):
    """``work/NAME/best`` of a run of ``recipe`` on ``data`` (trained now unless a finished one is there)."""
    out = work / Path(recipe).stem
    if not (out / "best").is_dir():
        t = time.perf_counter()
        print(f"training {recipe} -> {out} ...", flush=True)
        sh("train", ROOT / recipe, f"data.root={data}", "tracking.enabled=false", *extra, "--out", out)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return out / "best"


def in_list(idx, targets):
    """Share of queries (rows of ``idx``) with at least one of their ``targets`` among their candidates."""
    return float((idx[:, :, None] == targets[:, None, :]).any(2).any(1).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/itr-cascade"))
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--split", default="dev")
    ap.add_argument("--shortlist", type=Path, help="a global-score checkpoint (default: train synthetic/vse_infty)")
    ap.add_argument("--rerank", type=Path, help="the reranking checkpoint (default: train synthetic/scan_t2i)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true", help="toy data and a 1-epoch training (tests: the plumbing)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    data = a.work / "data"
    if not (a.shortlist and a.rerank) and not (data / "synthetic.json").is_file():
        sizes = (160, 40, 40, 32, 8) if a.tiny else (3000, 1000, 1000, 256, 36)
        sh("synth", data, *(x for pair in zip(("--train", "--dev", "--test", "--dim", "--regions"), sizes) for x in pair))
    extra = TINY if a.tiny else []
    first = a.shortlist or trained(a.work, "recipes/synthetic/vse_infty.yaml", data, extra)
    second = a.rerank or trained(a.work, "recipes/synthetic/scan_t2i.yaml", data, extra)

    from itr.checkpoint import load_for_eval
    from itr.data.sources import load_split
    from itr.eval.cascade import cascade_metrics, streamed_shortlists
    from itr.eval.embed import embed_split
    from itr.eval.job import score_embeddings

    models = {}
    for name, ckpt in (("shortlist", first), ("rerank", second)):
        model, tok, recipe, _ = load_for_eval(ckpt, "cpu")
        split = load_split(data if data.is_dir() else recipe.data.root, a.split, recipe.data.image_size)
        with torch.no_grad():
            models[name] = (model, *embed_split(model, split, tok, 256))
    n = split.num_images
    print(f"{a.split}: {n} images x {5 * n} captions; shortlist {first}, rerank {second}; {a.threads} thread(s)")

    model, img, cap = models["rerank"]
    t = time.perf_counter()
    full, _ = score_embeddings(model.score, img, cap, "1k", a.chunk)
    t_full = time.perf_counter() - t
    g_model, g_img, g_cap = models["shortlist"]
    t = time.perf_counter()
    glob, _ = score_embeddings(g_model.score, g_img, g_cap, "1k", a.chunk)
    t = time.perf_counter()
    (i2t_all, t2i_all), = streamed_shortlists(g_model.score, g_img, g_cap, max(a.ks), "1k", a.chunk)
    t_list = time.perf_counter() - t
    gt_caps = 5 * torch.arange(n)[:, None] + torch.arange(5)[None]
    gt_imgs = (torch.arange(5 * n) // 5)[:, None]

    print(f"full SCAN: rsum {full['rsum']:.1f}, R@1 i2t {full['i2t_R1']:.1f} t2i {full['t2i_R1']:.1f}, {t_full:.1f} s"
          f"; VSE-infinity alone: rsum {glob['rsum']:.1f}; top-{max(a.ks)} lists {t_list:.1f} s")
    print(f"{'K':>4} {'GT in list i2t/t2i %':>21} {'rsum':>7} {'lost':>6} {'R@1 i2t/t2i':>13} "
          f"{'list+rerank s':>14} {'speedup':>8}")
    for k in sorted(a.ks):
        lists = [(i2t_all[:, :k].contiguous(), t2i_all[:, :k].contiguous())]
        t = time.perf_counter()
        m = cascade_metrics(model, img, cap, lists, "1k")
        t_rerank = time.perf_counter() - t
        took = t_list + t_rerank  # the top-max(K) lists cost about what top-K would: one pass over every pair
        print(f"{k:>4} {100 * in_list(lists[0][0], gt_caps):>10.1f} / {100 * in_list(lists[0][1], gt_imgs):<8.1f} "
              f"{m['rsum']:7.1f} {full['rsum'] - m['rsum']:6.1f} {m['i2t_R1']:6.1f} / {m['t2i_R1']:<4.1f} "
              f"{t_list:5.1f} + {t_rerank:<6.1f} {t_full / took:7.1f}x")


if __name__ == "__main__":
    main()
