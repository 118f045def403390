"""Raw-image preprocessing with PIL and numpy (there is no torchvision here).

The standard ImageNet recipes (as vokenization's xmatching uses them):
train: random resized crop (scale 0.08-1, aspect 3/4-4/3) to ``size`` + horizontal flip;
eval: resize the short side to ``size * 256 / 224``, center crop ``size``.
Both return uint8 (3, size, size) arrays; the model normalizes with ``IMAGENET_MEAN/STD``
on its own device (uint8 is 4x smaller to move between processes than float32).
"""
import io
import math

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


def _to_array(img):
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def eval_transform(img, size=224):
    from PIL import Image

    resize = int(round(size * 256 / 224))
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return _to_array(img.crop((left, top, left + size, top + size)))


def train_transform(img, rng, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random resized crop + flip; ``rng`` is a ``random.Random`` (deterministic per worker)."""
    from PIL import Image

    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:  # fall back to a central crop at the allowed aspect ratio
        aspect = w / h
        if aspect < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif aspect > ratio[1]:
            cw, ch = int(round(h * ratio[1])), h
        else:
            cw, ch = w, h
        left, top = (w - cw) // 2, (h - ch) // 2
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _to_array(img)


def normalize(pixels):
    """uint8 (B, 3, H, W) tensor -> float, ImageNet-normalized, on the tensor's device."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std
