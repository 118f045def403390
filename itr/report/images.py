"""The report's thumbnails: JPEG files under ``DIR/images/``, linked relatively from the page.

From the split's own pixels (raw-image data: the evaluation's center crop) or from a folder of the split's
image files named by their ids (``--images DIR``: e.g. the JPEGs beside a precomp split of pooled features;
the whole picture, so region boxes, normalized to it, fall where they belong). Written on first use only.
"""
from pathlib import Path

import numpy as np

from itr.errors import DataError


class Thumbs:
    def __init__(self, split, out, images_dir=None, size=256):
        self.split, self.out, self.size = split, Path(out), size
        self.dir = Path(images_dir) if images_dir else None
        self.done = {}
        if self.dir is not None:
            if not self.dir.is_dir():
                raise DataError(f"--images {images_dir}: not a folder")
            if not split.ids:
                raise DataError("--images needs the split's image ids ({split}_ids.txt) to find its files by name")
        self.enabled = self.dir is not None or split.image_key == "pixels"

    def _open(self, i):
        from PIL import Image

        if self.dir is None:
            return Image.fromarray(np.ascontiguousarray(np.asarray(self.split.images[i]).transpose(1, 2, 0)))
        path = self.dir / self.split.ids[i]
        if not path.is_file():
            raise DataError(f"--images {self.dir}: no file {path.name} for image {i} of the split (files are "
                            f"named by the split's ids)")
        try:
            return Image.open(path).convert("RGB")
        except Exception as e:
            raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None

    def get(self, i):
        """{"href", "w", "h"} of image ``i``'s thumbnail (written now if new), or None without pictures."""
        if not self.enabled:
            return None
        if i not in self.done:
            im = self._open(i)
            im.thumbnail((self.size, self.size))
            (self.out / "images").mkdir(parents=True, exist_ok=True)
            im.save(self.out / "images" / f"{i}.jpg", quality=85)
            self.done[i] = {"href": f"images/{i}.jpg", "w": im.width, "h": im.height}
        return self.done[i]
