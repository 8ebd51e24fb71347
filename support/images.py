"""Reading image files and the Source datasets behind support/sources.py: src[i] -> (RGB PIL
image, label or -1). Every mode becomes 8-bit RGB; an unreadable file raises, and the file sources
leave such files out with a count (FileSource.check). Plumbing a first reader skips.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps

from support import common


# ---- reading image files: every mode becomes 8-bit RGB; unreadable files raise ----
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
            ".pbm")
MAX_UNREADABLE = 0.5  # a source with a larger fraction of unreadable files is refused


def to_rgb(im):
    """Any PIL mode -> RGB. 16/32-bit grey is rescaled to 8 bits (65535 -> 255), not clipped;
    transparency is composited on white; CMYK, palette, grey and the rest use PIL's conversion."""
    if im.mode.startswith("I") or im.mode == "F":  # I;16, I;16B, I (32-bit int), F (float)
        a = np.asarray(im, dtype=np.float64)  # (H, W)
        if im.mode.startswith("I;16") or a.max() > 255:  # a 16-bit range or wider: scale it
            a = a * (255 / max(65535.0, a.max()))
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def load_image(fp):
    """Decode now (a truncated file fails here, not in a worker), undo the EXIF orientation
    (cameras store photos sideways; the rotation task needs them upright), convert to RGB."""
    with Image.open(fp) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def _why(e):  # an exception as one short line, for the one-line errors and warnings
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _warn(msg):
    if common.is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _images(d):
    """The image files under folder d (searched recursively), sorted; hidden files are ignored."""
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                  if f.lower().endswith(IMG_EXTS) and not f.startswith("."))


# ---- the sources: src[i] -> (RGB PIL image, label or -1) ----
class Source(torch.utils.data.Dataset):
    """Attributes: spec, name, labels (int64 array or None), classes (names or None), skipped
    (unreadable files left out), indices (positions in the full source, after --subset)."""
    per_item = ("labels",)  # arrays with one row per image: a subset or the checks slice them
    labels = classes = None
    skipped = 0

    def __len__(self):
        return len(self.indices)

    def _keep(self, keep, indices):  # keep: positions or a mask into the current items
        for name in self.per_item:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])
        self.indices = indices

    def _subset(self, subset, seed):
        """--subset N: a fixed random choice of N images (np.random.default_rng(seed)), sorted."""
        self.indices = np.arange(len(getattr(self, self.per_item[0])))
        if subset and subset < len(self.indices):
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(len(self.indices), size=subset, replace=False))
            self._keep(keep, keep)


class ArraySource(Source):
    """Fashion-MNIST, CIFAR-10, synthetic: uint8 `images` (N, H, W[, 3]) in memory."""
    per_item = ("images", "labels")

    def __init__(self, spec, name, images, labels, classes):
        self.spec, self.name, self.images, self.classes = spec, name, images, list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i):  # grey (H, W) becomes 3 equal channels
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])


class FileSource(Source):
    """Image files (paths; YFCC ids), decoded when indexed. check() decodes each once, up front:
    the unreadable ones are left out and counted in `skipped` (one warning); more than
    MAX_UNREADABLE of them is a UserError. A file that fails later has changed on disk since:
    an error too, never silently replaced by another image."""
    per_item = ("files", "labels")

    def __init__(self, spec, name, files, labels, classes, where):
        self.spec, self.name, self.classes, self.where = spec, name, classes, where
        is_path = len(files) and isinstance(files[0], str)  # YFCC ids: int64, 8 bytes each
        self.files = np.array(files, dtype=object) if is_path else np.asarray(files, np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def _open(self, item):  # what PIL opens: a path here, a zip member in YFCCSource
        return item

    def _error(self, item):  # a cheap full decode (JPEG at 1/8 scale still reads the whole stream)
        try:
            with Image.open(self._open(item)) as im:
                im.draft("RGB", (1, 1))
                im.load()
                to_rgb(im)
        except Exception as e:  # truncated, empty, not an image, unsupported: "unreadable"
            return _why(e)

    def check(self):
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:  # PIL releases the GIL
            errors = list(ex.map(self._error, self.files))
        bad = [k for k, e in enumerate(errors) if e]
        if not bad:
            return
        n, first = len(errors), f"first: {self.files[bad[0]]}: {errors[bad[0]]}"
        if len(bad) > MAX_UNREADABLE * n:
            raise common.UserError(
                f"--data {self.spec}: {len(bad)} of the {n} image files in {self.where} are "
                f"unreadable ({first}); point --data at the right folder or convert the files")
        _warn(f"skipped {len(bad)} unreadable image file(s) of {n} in {self.where} ({first})")
        keep = np.array([e is None for e in errors])
        self._keep(keep, self.indices[keep])
        self.skipped = len(bad)

    def __getitem__(self, i):
        try:
            img = load_image(self._open(self.files[i]))
        except Exception as e:
            raise common.UserError(
                f"--data {self.spec}: {self.files[i]} became unreadable after the source was "
                f"checked ({_why(e)}); restore it, or re-run to leave it out") from None
        return img, -1 if self.labels is None else int(self.labels[i])
