"""``itr extract`` throughput (images/s) against a naive per-image loop, in one run.

    python benchmarks/extract.py [--work /tmp/itr-extract] [--batch-sizes 1 8 32] [--ranks 2] [--threads 1] [--rounds 3]
    python benchmarks/extract.py --tiny      # a toy ViT and 16 images (tests: the plumbing)

The backbone is a ViT-S/16 (Touvron et al.'s DeiT-S sizes: 384-d, 12 layers, 6 heads, 224 x 224, 196 patches)
with random weights (no download; the speed is the same as trained weights'), saved with its image processor.
The images are the 100 real Flickr8k JPEGs of ../shared/data/f8k_images (random-noise JPEGs where that is
absent), in `itr shard images` shards. The baseline is the loop a feature-extraction script usually is: load
the model, then per image decode, the processor, a batch-1 forward pass, one .npy written. itr is `itr extract --grid` in this
process at each batch size (its model load, the digest of its weights for resuming, writing and verifying
the shards included), and with ``--ranks N`` under `accelerate launch` (start-up included: the whole command). Every path's grid features must agree with the baseline's (float16 tolerance); prints images/s and
the ratio to the baseline (median of the rounds, which alternate the paths).
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def backbone(work, tiny):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = work / ("vit-tiny" if tiny else "vit-s16")
    if not (d / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        cfg = (ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8) if tiny else
               ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                         image_size=224, patch_size=16))
        ViTModel(cfg).save_pretrained(d)
        ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(d)
    return d


def images(work, n):
    """(image shard directory, [(id, JPEG bytes)]) of ``n`` images."""
    src = SHARED / "f8k_images"
    folder = work / "jpegs"
    if (src / "ids.txt").is_file():
        names = (src / "ids.txt").read_text().split()[:n]
        folder, what = src, f"{len(names)} Flickr8k JPEGs from {src}"
    else:
        import numpy as np
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        names = [f"noise{i}.jpg" for i in range(n)]
        for name in names:
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / name, quality=90)
        what = f"{n} random-noise 500x375 JPEGs ({src} is absent)"
    caps = {"images": [{"filename": f, "imgid": i, "split": "bench", "sentences": [{"raw": f"image {i}"}] * 5}
                       for i, f in enumerate(names)]}
    (work / "captions.json").write_text(json.dumps(caps))
    from itr.shards.images import shard_images

    shards = work / "image-shards"  # rebuilt: the same images as the baseline's
    shard_images(work / "captions.json", folder, "bench", shards, images_per_shard=max(1, n // 4), force=True,
                 progress=False)
    print(what)
    return shards, [(f, (folder / f).read_bytes()) for f in names]


def naive(model_dir, jpegs):
    """{id: grid features} the per-image way, and images/s."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    t = time.perf_counter()  # from the model directory, as itr's time is
    proc = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = {}
    with torch.no_grad():
        for name, data in jpegs:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            h = model(**proc(images=img, return_tensors="pt")).last_hidden_state[0, 1:]
            buf = io.BytesIO()
            np.save(buf, h.numpy().astype(np.float16))
            out[name] = np.load(io.BytesIO(buf.getvalue()))
    return out, len(jpegs) / (time.perf_counter() - t)


def read_grid(root):
    import numpy as np
    import webdataset as wds

    from itr.data.manifest import load_manifest, shard_paths

    out = {}
    for path in shard_paths(load_manifest(root, "bench")):
        for s in wds.tarfile_samples([{"url": path}]):
            out[json.loads(s["json"])["id"]] = np.load(io.BytesIO(s["feat.npy"]))
    return out


def ours(model_dir, shards, out, batch_size, n, ranks=1):
    """images/s of `itr extract` (in this process, or the whole `accelerate launch` command)."""
    from itr.shards.extract import extract

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if ranks == 1:
        extract(model_dir, shards, out, batch_size=batch_size, progress=False)
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        env = dict(os.environ, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true",
                   OMP_NUM_THREADS=str(max(1, int(os.environ.get("BENCH_THREADS", "1")) // ranks)))
        p = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", str(ranks), "--num_machines",
                            "1", "--dynamo_backend", "no", "--mixed_precision", "no", "--main_process_port", "0", "-m",
                            "itr", "extract", str(model_dir), str(shards), str(out), "--batch-size", str(batch_size)],
                           env=env, capture_output=True, text=True, errors="replace")
        if p.returncode:
            raise SystemExit(f"accelerate launch failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/itr-extract"))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ranks", type=int, default=0, help="also N ranks under accelerate launch (0: not)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (shared by N ranks)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a toy ViT and 16 images")
    a = ap.parse_args()
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    os.environ["BENCH_THREADS"] = str(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    n = 16 if a.tiny else a.images
    model_dir = backbone(a.work, a.tiny)
    shards, jpegs = images(a.work, n)
    print(f"backbone {model_dir.name}, {torch.get_num_threads()} thread(s), {len(jpegs)} images")
    naive(model_dir, jpegs[:2])  # warm-up: first-call costs out of the baseline
    runs = [(b, 1) for b in a.batch_sizes] + ([(max(a.batch_sizes), a.ranks)] if a.ranks > 1 else [])
    speeds, same = {"naive": []}, True
    for _ in range(a.rounds):  # rounds alternate the paths: a shared machine's load changes under all of them alike
        ref, base = naive(model_dir, jpegs)
        speeds["naive"].append(base)
        for b, ranks in runs:
            speeds.setdefault((b, ranks), []).append(ours(model_dir, shards, a.work / "out", b, n, ranks))
            got = read_grid(a.work / "out")
            same &= got.keys() == ref.keys() and all(
                np.allclose(got[k].astype(np.float32), ref[k].astype(np.float32), rtol=1e-2, atol=1e-2) for k in ref)
    med = {k: float(np.median(v)) for k, v in speeds.items()}
    base = med.pop("naive")
    print(f"{'path':<28}{'images/s':>10}{'x naive':>10}   (median of {a.rounds} round(s))")
    print(f"{'naive per-image loop':<28}{base:>10.2f}{1.0:>10.2f}")
    for (b, ranks), speed in med.items():
        label = f"itr extract, batch {b}" + (f", {ranks} ranks" if ranks > 1 else "")
        print(f"{label:<28}{speed:>10.2f}{speed / base:>10.2f}")
    print(f"same features as the naive loop: {same}")
    print(f"speedup (best itr / naive): {max(med.values()) / base:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
