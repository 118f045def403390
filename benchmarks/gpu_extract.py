"""The ``extract`` section of ``benchmarks/gpu_check.py``: ``itr extract`` on the device (bf16 autocast, images
prepared in DataLoader workers) against the same backbone in fp32 on the CPU, and its images/s.

Full size: a ViT-B/16 (768-d, 12 layers, 224 x 224: 196 grid cells) with random weights and its image
processor, 512 random-noise 500 x 375 JPEGs (the Flickr size) in `itr shard images` shards; tiny: a toy ViT and
16 images.
"""
import io
import json
import time
from pathlib import Path

import numpy as np
import torch


def _inputs(s, n):
    from PIL import Image
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from itr.shards.images import shard_images

    model_dir, folder, shards = s.work / "vit", s.work / "jpegs", s.work / "image-shards"
    torch.manual_seed(0)
    cfg = (ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=8) if s.tiny else ViTConfig())  # ViTConfig's defaults: ViT-B/16 at 224
    ViTModel(cfg).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    caps = {"images": [{"filename": f"{i}.jpg", "imgid": i, "split": "bench",
                        "sentences": [{"raw": f"image {i}"}] * 5} for i in range(n)]}
    (s.work / "captions.json").write_text(json.dumps(caps))
    shard_images(s.work / "captions.json", folder, "bench", shards, images_per_shard=max(1, n // 4), progress=False)
    return model_dir, shards


def extract_section(s):
    """bf16 grid features on the device match fp32 on the CPU (first shard); images/s with 0 and 8 workers."""
    from itr.data.manifest import load_manifest, shard_paths
    from itr.shards.backbone import Backbone, PreparedImages
    from itr.shards.extract import _shard_samples, extract

    n = 16 if s.tiny else 512
    model_dir, shards = _inputs(s, n)
    speeds = {}
    for workers in (0, 2 if s.tiny else 8):
        out = s.work / f"out-{workers}"
        t = time.perf_counter()
        extract(model_dir, shards, out, batch_size=8 if s.tiny else 128, workers=workers, device=s.device,
                progress=False)
        if s.cuda:
            torch.cuda.synchronize()
        speeds[workers] = n / (time.perf_counter() - t)
        s.figure(f"images/s, {workers} workers", round(speeds[workers], 1), "img/s",
                 "ViT-B/16 grid, bf16 autocast" if s.cuda else "toy ViT on the CPU")
    a, b = speeds.values()
    s.figure("workers / in-process", round(b / a, 2), "x")
    import webdataset as wds

    first = shard_paths(load_manifest(out, "bench"))[0]
    got = np.stack([np.load(io.BytesIO(x["feat.npy"])) for x in wds.tarfile_samples([{"url": first}])])
    cpu = Backbone(model_dir, device="cpu")
    pixels = torch.stack([p for _, _, _, p in PreparedImages(_shard_samples(shards / Path(first).name),
                                                             cpu.pre)])
    ref = cpu.features(pixels)[0].numpy()
    err = float(np.abs(got.astype(np.float32) - ref).max() / np.abs(ref).max())
    s.figure("max abs(device - cpu fp32) / max abs(cpu)", f"{err:.2e}", "", "bf16 on CUDA, float16 storage")
    s.check("device features match the CPU's fp32 (relative 3e-2)", err < 3e-2, f"{err:.2e}")
