"""A local transformers vision backbone as a feature extractor (for ``itr extract``).

Loaded with ``AutoConfig`` / ``AutoModel`` from a directory only (``local_files_only``: never a download). A
dual-encoder checkpoint (CLIP, SigLIP: a ``vision_model`` beside a text tower) gives its vision tower.

Two outputs per image, as VSE-infinity's grid-feature setting uses a backbone (its feature map taken as a set of
regions, Chen et al., CVPR 2021):

- grid: a ViT-family model's patch tokens (the tokens before them, CLS / distillation / registers, dropped) or a
  CNN's last feature map, row-major, each cell with its box (x1, y1, x2, y2) normalised to the image the backbone
  saw (after resize and crop), the layout ``boxes.npy`` has everywhere in itr;
- pooled: the model's ``pooler_output`` (ResNet: global average pool, ConvNeXt: the normed mean, CLIP: the
  normed CLS token, ViT: its pooler on CLS), or the grid's mean where the model has none; its box the whole image.

Images are prepared by the directory's own image processor (``preprocessor_config.json``, through
``AutoImageProcessor``, whose PIL backend needs no torchvision), else by itr's evaluation transform (resize the
short side to ``S * 256 / 224``, center crop ``S``) with the ImageNet mean and std.
"""
import hashlib
import inspect
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from itr.data.precomp import DataError


def _load_model(path):
    from transformers import AutoConfig, AutoModel

    if not path.is_dir():
        raise DataError(f"backbone directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise DataError(f"{path} has no config.json: not a transformers model directory (write one with "
                        f"save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataError(f"{path / 'config.json'}: not a transformers config ({type(e).__name__}: {e})") from None
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataError(f"{path}: cannot load the {config.model_type} model ({type(e).__name__}: {e})") from None
    if hasattr(model, "vision_model"):  # CLIP, SigLIP ...: the image tower of a dual encoder
        model = model.vision_model
    params = inspect.signature(model.forward).parameters
    if "pixel_values" not in params:
        raise DataError(f"{path} holds a {type(model).__name__} (model_type {config.model_type!r}), not a vision "
                        f"backbone: its forward takes no pixel_values")
    return model.eval(), config, "interpolate_pos_encoding" in params


def _processor(path):
    """The directory's image processor, or None where it has no preprocessor_config.json."""
    if not (path / "preprocessor_config.json").is_file():
        return None
    import transformers
    from transformers import AutoImageProcessor

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "requires torchvision; falling back to the PIL backend"
    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataError(f"{path / 'preprocessor_config.json'}: cannot build its image processor "
                        f"({type(e).__name__}: {e})") from None
    finally:
        transformers.logging.set_verbosity(level)


def _size_overrides(proc, s):
    """Processor call arguments that make its output ``s`` x ``s``."""
    size = dict(getattr(proc, "size", None) or {})
    out = {}
    if "height" in size or "width" in size:
        out["size"] = {"height": s, "width": s}
    elif "shortest_edge" in size:
        out["size"] = {"shortest_edge": s}
    if getattr(proc, "crop_size", None) and getattr(proc, "do_center_crop", True):
        out["crop_size"] = {"height": s, "width": s}
    return out


def grid_boxes(gh, gw):
    """(gh * gw, 4) float32 boxes of a row-major grid, normalised (x1, y1, x2, y2)."""
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([c / gw, r / gh, (c + 1) / gw, (r + 1) / gh], -1).reshape(-1, 4).astype(np.float32)


class Preprocess:
    """PIL images -> a float (B, 3, H, W) CPU tensor, as the backbone wants them (picklable: runs in workers)."""

    def __init__(self, path, image_size=None, native=None):
        self.proc = _processor(path)
        self.overrides = _size_overrides(self.proc, image_size) if self.proc is not None and image_size else {}
        self.size = image_size or native or 224

    def __call__(self, images):
        if self.proc is not None:
            return self.proc(images=images, return_tensors="pt", **self.overrides)["pixel_values"].float()
        from itr.data.images import eval_transform, normalize

        return normalize(torch.from_numpy(np.stack([eval_transform(im, self.size) for im in images])))


def decode(data, where):
    """An RGB PIL image from encoded bytes; an error naming ``where`` if they are not an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"{where} is not a readable image ({type(e).__name__}: {e})") from None


class PreparedImages(IterableDataset):
    """(key, json, where, pixels) of ``samples()`` in order; in DataLoader workers, sample ``k`` is prepared by
    worker ``k % n`` (a DataLoader yields its workers' items round robin, so the order stays the input's). A bad
    image ends the stream with (None, message, where, None): the main process raises it without a worker's
    traceback."""

    def __init__(self, samples, pre):
        self.samples, self.pre = samples, pre

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        try:
            for k, (key, meta, data, where) in enumerate(self.samples()):
                if k % nw == wid:
                    yield key, meta, where, self.pre([decode(data, where)])[0]
        except DataError as e:
            yield None, str(e), None, None


class Backbone:
    """``pre`` (PIL images -> pixels) and ``features`` (pixels -> grid, boxes, pooled) of one model."""

    def __init__(self, path, image_size=None, device="cpu"):
        self.path = Path(path)
        self.model, self.config, self._interp = _load_model(self.path)
        self.vision_config = getattr(self.model, "config", self.config)
        self.device = torch.device(device)
        self.model.to(self.device)
        native = getattr(self.vision_config, "image_size", None)
        self.native = native if isinstance(native, int) else None
        self.pre = Preprocess(self.path, image_size, self.native)

    def prepare(self, images):
        """A list of RGB PIL images -> float (B, 3, H, W) on the model's device."""
        return self.pre(images).to(self.device)

    @torch.no_grad()
    def features(self, pixels):
        """(grid (B, R, D), boxes (R, 4) numpy, pooled (B, D)) in float32; bf16 autocast on a GPU."""
        kw = {}
        if self._interp and self.native and pixels.shape[-1] != self.native:
            kw["interpolate_pos_encoding"] = True  # a ViT at another resolution: its position table resized
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(pixel_values=pixels, **kw)
        h = out.last_hidden_state.float()
        if h.dim() == 4:  # a CNN's (B, C, h, w) map
            gh, gw = h.shape[2:]
            grid = h.flatten(2).transpose(1, 2)
        else:
            gh, gw = self._token_grid(h.shape[1], pixels.shape[-2:])
            grid = h[:, h.shape[1] - gh * gw:]
        pooled = getattr(out, "pooler_output", None)
        pooled = grid.mean(1) if pooled is None else pooled.float().flatten(1)
        return grid, grid_boxes(gh, gw), pooled

    def _token_grid(self, n, hw):
        """The patch grid of ``n`` tokens: the image over the patch size, the tokens before it prefix tokens."""
        p = getattr(self.vision_config, "patch_size", None)
        p = (p, p) if isinstance(p, int) else tuple(p) if p else None
        if p and hw[0] // p[0] * (hw[1] // p[1]) <= n:
            return hw[0] // p[0], hw[1] // p[1]
        side = math.isqrt(n)
        if side * side == n and hw[0] == hw[1]:  # a hierarchical model (Swin): a square token map
            return side, side
        raise DataError(f"{self.path}: cannot tell the patch grid of {n} tokens for a {hw[0]}x{hw[1]} image "
                        f"(patch_size {p})")

    def identity(self):
        """What defines the output (for resuming): config and processor files, and the weights' digest."""
        h = hashlib.sha256()
        for f in sorted(self.path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
        return {"dir": str(self.path.resolve()), "model_type": self.config.model_type,
                "class": type(self.model).__name__, "digest": h.hexdigest()[:16],
                "processor": json.loads((self.path / "preprocessor_config.json").read_text())
                if self.pre.proc is not None else "itr eval_transform, ImageNet mean/std"}
