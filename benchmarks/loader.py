"""The data path at paper sizes: does the shard loader keep up, and does its memory stay flat as data grows?

    python benchmarks/loader.py [--images 2000] [--rss-images 1000] [--tiny] [--json OUT]

1. Throughput: N images of 36 x 2048 float16 (147 KB each, 5 captions) as shards; one epoch of
   ``itr.data.loader.TrainLoader`` (batches of 128 pairs, tokenized, collated) with 0, 1 and 2 workers, against
   reading the same features in a shuffled order from ``np.load(mmap_mode="r")`` of the precomp file (no
   captions, no batching: a floor for any loader), and against the rate at which the trainer consumes pairs
   in VSE-infinity's recipe at paper sizes (BERT-base-sized random text encoder, 36 x 2048 regions, embed
   1024, batch 128) on this machine. Target: the loader >= 5x the consumption rate. Both reads are from a warm
   page cache (the files were just written), so the figures are the loader's own cost, not the disk's.
2. Memory: peak RSS (``ru_maxrss`` of the training process, ``data.num_workers=0`` so the loader runs inside
   it) of the same recipe and number of steps on a training split of M and 10 M images (dev and test alike).
   Target: less than 10% growth.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = [f"w{i}" for i in range(400)]
SIZES = {"tiny": dict(regions=4, dim=16, batch=8, images=120, rss_images=60, steps=2, embed=32,
                      bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
         "full": dict(regions=36, dim=2048, batch=128, images=2000, rss_images=1000, steps=3, embed=1024, bert={})}


def make_precomp(root, split, n, z, seed=0):
    """A precomp split written in blocks (never the whole array in memory): random features, 5 captions each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(root / f"{split}_ims.npy", "w+", np.float16, (n, z["regions"], z["dim"]))
    for a in range(0, n, 256):
        arr[a:a + 256] = rng.standard_normal((min(256, n - a), z["regions"], z["dim"]), dtype=np.float32)
    arr.flush()
    del arr
    words = np.array(WORDS)
    with open(root / f"{split}_caps.txt", "w") as f:
        for _ in range(5 * n):
            f.write(" ".join(rng.choice(words, rng.integers(8, 15))) + "\n")


def shard(src, out, split, per_shard=200):
    from itr.shards.precomp import shard_precomp

    shard_precomp(src, split, out, images_per_shard=per_shard, progress=False)


def mmap_rate(path, seed=0):
    """Images/s reading every image once, shuffled, from the memory-mapped .npy (copied out, as a loader must)."""
    arr = np.load(path, mmap_mode="r")
    order = np.random.default_rng(seed).permutation(len(arr))
    t = time.perf_counter()
    total = 0.0
    for i in order:
        total += float(np.array(arr[i])[0, 0])
    return len(arr) / (time.perf_counter() - t)


def loader_rate(shards, workers, batch, tok):
    """Pairs/s of one epoch of the training loader (decoding, shuffling, tokenizing with ``tok``, collating)."""
    from itr.data.loader import TrainLoader
    from itr.data.manifest import load_manifest

    loader = TrainLoader(load_manifest(shards, "train"), tok, batch, num_workers=workers, shuffle_buffer=5000)
    for _ in zip(range(2), loader.epoch(0)):
        pass  # imports and worker start-up of a first epoch are not the loader's steady rate
    t = time.perf_counter()
    pairs = sum(len(b["img_ids"]) for b in loader.epoch(1))
    return pairs / (time.perf_counter() - t), pairs


def vse_infty(z, work):
    """VSE-infinity's recipe at paper sizes with a BERT-base-sized random text encoder: (recipe, its tokenizer)."""
    from gpu_common import step_recipe, tiny_bert

    bert = tiny_bert(work / "bert", z["bert"])
    return step_recipe("vse_infty", dict(embed=z["embed"], word_dim=300), augment=True,
                       text={"name": "hf_words", "path": str(bert)},
                       optim={"name": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "text_lr_mult": 0.1})


def consumption_rate(z, recipe, tok):
    """Pairs/s the trainer's step consumes in that recipe (fp32, this machine)."""
    from gpu_common import make_batches, train_steps

    batches = make_batches(tok, 1, z["batch"], z["regions"], z["dim"], seed=2)
    return train_steps(recipe, tok, batches, z["dim"], "cpu", "no", timed=z["steps"])["samples_per_s"]


HWM = ("import atexit, sys\n"
       "def hwm():\n"
       "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
       "    print(f'[peak-rss-kb] {kb}', file=sys.stderr, flush=True)\n"
       "atexit.register(hwm)\n"
       "from itr.cli import main\n"
       "sys.exit(main(sys.argv[1:]))\n")


def peak_rss_of_training(data, out, z, steps):
    """Peak RSS (GiB) of one `itr train` process on ``data`` (vse_infty, GRU text, no workers): its own VmHWM,
    read at exit. Not the parent's ru_maxrss of the child: Linux carries the forking parent's RSS into it."""
    over = {"data.root": data, "data.num_workers": 0, "data.shuffle_buffer": 2000, "data.verify": "size",
            "train.batch_size": z["batch"], "train.max_steps": steps, "train.epochs": 100, "train.log_every": 1000,
            "tracking.enabled": "false", "model.embed_dim": 256, "eval.batch_size": 128}
    cmd = [sys.executable, "-c", HWM, "train", str(ROOT / "recipes" / "synthetic" / "vse_infty.yaml"),
           *[f"{k}={v}" for k, v in over.items()], "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0 or "[peak-rss-kb]" not in p.stderr:
        raise SystemExit(f"training on {data} failed:\n{p.stderr[-3000:]}")
    return int(p.stderr.rsplit("[peak-rss-kb] ", 1)[1].split()[0]) / 2 ** 20


def rss_section(z, work, m):
    res = {}
    for name, n in (("1x", m), ("10x", 10 * m)):
        src, shards = work / f"rss_src_{name}", work / f"rss_{name}"
        make_precomp(src, "train", n, z, seed=1)
        for split in ("dev", "test"):
            make_precomp(src, split, max(m // 10, 20), z, seed=2)
        for split in ("train", "dev", "test"):
            shard(src, shards, split)
        for f in src.glob("*"):
            f.unlink()  # only the shards stay on disk
        res[name] = peak_rss_of_training(shards, work / f"run_{name}", z, steps=20 if z["regions"] > 4 else 4)
        print(f"  {n:6d} training images: peak RSS {res[name]:.3f} GiB", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, help="images in the throughput split")
    ap.add_argument("--rss-images", type=int, help="images in the smaller training split of the memory test")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (seconds): a smoke test of the script")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--no-rss", action="store_true", help="skip the memory section (two training runs)")
    ap.add_argument("--no-throughput", action="store_true", help="only the memory section")
    a = ap.parse_args()
    z = SIZES["tiny" if a.tiny else "full"]
    n, m = a.images or z["images"], a.rss_images or z["rss_images"]
    out = {"images": n, "sample_mb": z["regions"] * z["dim"] * 2 / 2 ** 20}  # MB of one image's features
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_throughput:
            throughput_section(z, Path(tmp), n, out)
        if not a.no_rss:
            print(f"memory: the same recipe and steps on {m} and {10 * m} training images")
            rss = rss_section(z, Path(tmp), m)
            out.update(rss_1x_gib=rss["1x"], rss_10x_gib=rss["10x"], rss_growth=rss["10x"] / rss["1x"] - 1)
            print(f"  peak RSS grows {100 * out['rss_growth']:+.1f}% for 10x the data (target < 10%)")
    _write(a.json, out)


def throughput_section(z, work, n, out):
    from itr.data.text import SPECIALS, WordVocab

    mb = out["sample_mb"]
    make_precomp(work / "src", "train", n, z)
    shard(work / "src", work / "shards", "train")
    print(f"throughput: {n} images of {z['regions']} x {z['dim']} float16 ({mb:.3f} MB each), batch {z['batch']}")
    ips = mmap_rate(work / "src" / "train_ims.npy")
    out["mmap_images_per_s"] = ips
    print(f"  np.load(mmap) shuffled reads: {ips:9.0f} images/s  {ips * mb:7.0f} MB/s  (= {5 * ips:.0f} pairs/s)")
    recipe, bert_tok = vse_infty(z, work)
    toks = {"bert": (bert_tok, "BERT WordPiece, VSE-infinity's"), "words": (WordVocab(SPECIALS + WORDS),
                                                                          "NLTK words, the GRU recipes'")}
    for name, (tok, what) in toks.items():
        print(f"  tokenizer: {what}")
        for w in (0, 1, 2):
            pps, pairs = loader_rate(work / "shards", w, z["batch"], tok)
            out[f"loader_{name}_{w}_pairs_per_s"] = pps
            print(f"    TrainLoader, {w} worker(s): {pps / 5:7.0f} images/s  {pps / 5 * mb:5.0f} MB/s  "
                  f"({pps:.0f} pairs/s, {pairs} pairs; mmap reads {5 * ips / pps:.0f}x faster)", flush=True)
    eat = consumption_rate(z, recipe, bert_tok)
    best = max(out[f"loader_bert_{w}_pairs_per_s"] for w in (0, 1, 2))
    out.update(consume_pairs_per_s=eat, margin=best / eat)
    print(f"  VSE-infinity step at paper sizes consumes {eat:.1f} pairs/s on this machine (fp32): "
          f"the loader keeps up with {best / eat:.0f}x margin (target >= 5x)")
    for f in (work / "src").glob("*"):
        f.unlink()


def _write(path, out):
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
