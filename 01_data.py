"""Stage 1: the data. Image sources behind one spec string, the paper's two views of an image, and the rotation task.

DeeperCluster learns from non-curated images by predicting, for every sample, its rotation r and its cluster (PAPER.md
§2-§3). This file gives the later stages: the rotation rho_r; the training view (random resized crop + flip, then
rho_r) inside a rotation-task dataset; the clustering view (resize + center crop, no rotation) that 03 embeds; and the
sources, each a torch Dataset of RGB PIL images selected by `--data`:
  fashion-mnist[:ROOT]  the default: Debian's /usr/share/datasets/fashion-mnist, a torchvision-style copy, or a download
  cifar10:ROOT          the python-pickle layout (ROOT/cifar-10-batches-py/)
  folder:PATH           any image folder: one sub-folder per class, or a flat (unlabelled) dump; train/ + val|test/
  yfcc100m:PATH         the official layout: PATH/AB/CDE.zip holds FGH.jpg for id ABCDEFGH (ids from PATH/ids.txt or
                        PATH/flickr_unique_ids.npy when present, else every member of every zip)
  synthetic[:N]         N procedural upright glyphs, 6 classes (default N = 2000), deterministic: tests, offline use
Unreadable files are skipped with one counted warning; a missing or empty source is a UserError (one line, exit 2).

Paper:  PAPER.md §1 (rho_r), §2.1 (RotNet, Eq. (2)), §4.1 (clustering view), §5.2 (a rotation per sample), §5.4
Reads:  the source named by --data
Writes: <out_dir>/01_data.json (spec, N, image size, classes and per-class counts if labelled, skipped files)
        <out_dir>/01_data_rotations.png (a few images: clustering view, then one training view x the 4 rotations)
Run:    python 01_data.py --data fashion-mnist --out_dir out --subset 1000 --image_size 32
        (no torchrun here: later stages build these datasets in every rank and DataLoader worker)
Uses:   common (parse_config/run, UserError, save_json, log)
"""
import colorsys
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import socket
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

import common

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Config:
    data: str = "fashion-mnist"  # source: fashion-mnist[:ROOT], cifar10:ROOT, folder:PATH, yfcc100m:PATH, synthetic[:N]
    out_dir: str = "out"  # folder for 01_data.json and 01_data_rotations.png
    subset: int = 0  # keep a fixed, seeded random subset of this many training images (0 = all)
    image_size: int = 32  # crop side S in pixels (paper: 224)
    seed: int = 0  # seeds the subset choice and the views drawn in the figure


# ---- §1, §2.1 rotations: rho_r turns an image r quarter turns counter-clockwise; the RotNet label is r ----
def rotate(x, r):
    """rho_r on the last two dims of (C, H, W) or (N, C, H, W); equals torch.rot90(x, r, dims=(-2, -1))."""
    r = int(r) % 4
    if r == 1:  # transpose, then flip the rows: the top-right corner comes to the top-left
        return x.transpose(-2, -1).flip(-2)  # (.., H, W) -> (.., W, H)
    if r == 2:  # a half turn flips both axes
        return x.flip((-2, -1))
    if r == 3:  # transpose, then flip the columns: a quarter turn clockwise
        return x.transpose(-2, -1).flip(-1)
    return x.clone()  # r = 0: a copy, like torch.rot90


def rng_for(seed, epoch, index):
    """A torch.Generator seeded from (seed, epoch, index). Sample `index` of an epoch gets the same rotation, crop and
    flip in every process and DataLoader worker, whatever the worker count or fetch order; no global RNG is touched."""
    key = f"{int(seed)}/{int(epoch)}/{int(index)}"  # int(): a numpy or tensor index gives the same key as a python int
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid int64 seed


# ---- §4.1 and §5.4 the two views. Plain PIL + torch, checked pixel for pixel against torchvision in the tests ----
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as in the official code


def to_tensor(img):
    """PIL image -> normalised float tensor (3, H, W): torchvision's ToTensor then Normalize(MEAN, STD)."""
    a = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))  # (H, W, 3) uint8; grey becomes 3 equal channels
    x = a.permute(2, 0, 1).float().div_(255)  # (H, W, 3) -> (3, H, W) in [0, 1]
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


class ClusterTransform:
    """Clustering view (§4.1): Resize(round(S*256/224)) of the short side -> CenterCrop(S) -> ToTensor -> Normalize.
    A top-level class (not a lambda) so DataLoader workers can unpickle it."""

    def __init__(self, image_size):
        self.size, self.short = image_size, round(image_size * 256 / 224)  # 224 -> 256, 32 -> 37

    def __call__(self, img):
        w, h = img.size
        long = int(self.short * max(w, h) / min(w, h))  # keep the aspect ratio, as torchvision's Resize(int)
        new = (self.short, long) if w <= h else (long, self.short)  # (width, height)
        if new != (w, h):
            img = img.resize(new, Image.BILINEAR)
        top, left = int(round((new[1] - self.size) / 2.0)), int(round((new[0] - self.size) / 2.0))
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))  # (3, S, S)


cluster_transform = ClusterTransform  # cluster_transform(S) -> a callable PIL image -> (3, S, S), the contract's name


def crop_params(height, width, scale, g, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's parameters (top i, left j, h, w), drawn from generator g with torchvision's exact recipe:
    up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio, else a central crop."""
    area = height * width
    lo, hi = torch.log(torch.tensor(ratio)).tolist()
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(lo, hi, generator=g).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return i, j, h, w
    w, h = width, height  # fallback: the whole image, its aspect ratio clamped into `ratio`
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img, image_size, g, crop_scale=(0.08, 1.0)):
    """Training view a(x) (§5.4): RandomResizedCrop(S, scale) + horizontal flip (p = 0.5), all randomness from g, then
    ToTensor + Normalize -> (3, S, S). No colour jitter (paper). The dataset applies rho_r afterwards."""
    i, j, h, w = crop_params(img.height, img.width, crop_scale, g)
    img = img.crop((j, i, j + w, i + h)).resize((image_size, image_size), Image.BILINEAR)
    if torch.rand(1, generator=g).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


# ---- reading image files: every mode becomes RGB; unreadable files raise (the sources count and skip them) ----
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
VALIDATE_MAX = 20000  # sources with more files are checked lazily, at read time, instead of all up front


def to_rgb(im):
    """Any PIL mode -> RGB. 16/32-bit grey is rescaled to 8 bits (65535 -> 255), not clipped; transparency is
    composited on white; CMYK, palette, grey and the rest use PIL's conversion."""
    if im.mode.startswith("I") or im.mode == "F":  # I;16, I;16B (16-bit), I (32-bit int), F (float)
        a = np.asarray(im, dtype=np.float64)  # (H, W)
        if im.mode.startswith("I;16") or a.max() > 255:  # a 16-bit range, or wider: then scale by the maximum
            a = a * (255 / max(65535.0, a.max()))
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def load_image(fp):
    """Open and decode now (a truncated file fails here, not later in a worker), undo the EXIF orientation (cameras
    store photos sideways, and the rotation task needs them upright), convert to RGB."""
    with Image.open(fp) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def _check(fp):
    """The up-front validation: a cheap full decode (JPEG at reduced scale: the whole stream is still read)."""
    with Image.open(fp) as im:
        im.draft("RGB", (64, 64))
        im.load()
        to_rgb(im)


def _warn(msg):
    if common.is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---- sources: src[i] -> (RGB PIL image, label or -1); attributes spec, name, labels, classes, skipped, indices ----
class Source(torch.utils.data.Dataset):
    per_item = ("labels",)  # arrays with one row per image; a subset or the validation slices them together
    labels = classes = None
    skipped = 0

    def __len__(self):
        return len(self.indices)

    def _keep(self, keep, indices):  # keep: positions (int array) or mask (bool array) into the current items
        for name in self.per_item:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[keep])
        self.indices = indices

    def _subset(self, subset, seed):
        """--subset N: a fixed random choice of N images (np.random.default_rng(seed)); labels follow. `indices` keeps
        the chosen positions in the full source, sorted."""
        self.indices = np.arange(len(getattr(self, self.per_item[0])))
        if subset and subset < len(self.indices):
            keep = np.sort(np.random.default_rng(seed).choice(len(self.indices), size=subset, replace=False))
            self._keep(keep, keep)


class ArraySource(Source):
    """Fashion-MNIST, CIFAR-10, synthetic: uint8 `images` (N, H, W) or (N, H, W, 3) in memory; PIL made on demand."""
    per_item = ("images", "labels")

    def __init__(self, spec, name, images, labels, classes):
        self.spec, self.name, self.images, self.classes = spec, name, images, list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])  # grey -> 3 equal channels


FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def read_idx(path):
    """The idx format of (Fashion-)MNIST, .gz or not: magic (0, 0, dtype 0x08 = uint8, ndim), ndim big-endian sizes."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise common.UserError(f"{path} is not a uint8 idx file (corrupt or truncated); delete it and fetch it again")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)  # images (N, 28, 28), labels (N,)


def _find_fmnist(roots, split):
    prefix = "train" if split == "train" else "t10k"
    for d in (os.path.join(r, s) for r in roots for s in ("", "FashionMNIST/raw")):
        for ext in (".gz", ""):
            paths = [os.path.join(d, f"{prefix}-{kind}-ubyte{ext}") for kind in ("images-idx3", "labels-idx1")]
            if all(os.path.isfile(p) for p in paths):
                return paths
    return None


def _download_fmnist(root):
    """torchvision's downloader, into root/FashionMNIST/raw. Imported only here (torchvision costs seconds to import);
    a 3 s connection test first, so an offline machine fails fast instead of hanging."""
    socket.create_connection(("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80), timeout=3).close()
    import torchvision
    for train in (True, False):
        torchvision.datasets.FashionMNIST(root, train=train, download=True)


def fashion_mnist(spec, root, split):
    local = [root] if root else list(dict.fromkeys([os.path.abspath("data"), os.path.join(HERE, "data")]))
    roots = local if root else [FMNIST_DEBIAN] + local  # an explicit ROOT is the only place looked at
    found, target = _find_fmnist(roots, split), root or os.path.join(HERE, "data")
    if found is None:
        try:
            _download_fmnist(target)
            found, err = _find_fmnist([target], split), "downloaded files not found"
        except Exception as e:  # offline, proxy, disk full: say so in the message below
            err = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if found is None:
        raise common.UserError(
            f"--data {spec}: Fashion-MNIST not found. Options: (1) the Debian copy in {FMNIST_DEBIAN}/ "
            f"(sudo apt-get install dataset-fashion-mnist); (2) a torchvision-style copy, {{train,t10k}}-*-ubyte[.gz] "
            f"in {' or '.join(os.path.join(r, 'FashionMNIST/raw/') for r in local)}; "
            f"(3) a download into {target} when online (failed: {err})")
    images, labels = read_idx(found[0]), read_idx(found[1])
    return ArraySource(spec, "fashion-mnist", images, labels, FMNIST_CLASSES)


def cifar10(spec, root, split):
    """The python version of CIFAR-10 (cifar-10-python.tar.gz unpacked): pickled dicts of (10000, 3072) uint8 rows."""
    d = root if os.path.isfile(os.path.join(root, "batches.meta")) else os.path.join(root, "cifar-10-batches-py")
    files = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files + ["batches.meta"] if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise common.UserError(f"--data {spec}: {d} lacks {', '.join(missing)}; expected the python CIFAR-10 layout "
                               f"ROOT/cifar-10-batches-py/{{data_batch_1..5, test_batch, batches.meta}}")

    def load(f):  # python-2 pickles, hence latin1. Unpickling runs code: only point this at files you trust
        with open(os.path.join(d, f), "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    parts = [load(f) for f in files]
    images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, 3, 32, 32)
    images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # -> (N, 32, 32, 3), as PIL wants it
    labels = np.concatenate([p["labels"] for p in parts])
    return ArraySource(spec, "cifar10", images, labels, load("batches.meta")["label_names"])


# Synthetic glyphs, drawn in a unit box [-1, 1]^2 with y pointing down. None looks the same after a quarter or half
# turn, so rotation is learnable, and the shapes differ, so classes are. Colours are random: shape is the only cue.
SYNTH_CLASSES = ["arrow", "T", "L", "cup", "mushroom", "person"]
_GLYPHS = {
    "arrow": [("poly", [(0, -1), (.75, -.15), (.28, -.15), (.28, 1), (-.28, 1), (-.28, -.15), (-.75, -.15)])],
    "T": [("poly", [(-.8, -1), (.8, -1), (.8, -.55), (.25, -.55), (.25, 1), (-.25, 1), (-.25, -.55), (-.8, -.55)])],
    "L": [("poly", [(-.6, -1), (-.15, -1), (-.15, .55), (.7, .55), (.7, 1), (-.6, 1)])],
    "cup": [("poly", [(-.8, -1), (-.4, -1), (-.4, .5), (.4, .5), (.4, -1), (.8, -1), (.8, 1), (-.8, 1)])],
    "mushroom": [("pie", [(-1, -1), (1, .6)]), ("poly", [(-.22, -.25), (.22, -.25), (.22, 1), (-.22, 1)])],
    "person": [("ellipse", [(-.3, -1), (.3, -.45)]), ("poly", [(-.7, -.35), (.7, -.35), (.7, -.15), (-.7, -.15)]),
               ("poly", [(-.14, -.45), (.14, -.45), (.14, .3), (-.14, .3)]),
               ("poly", [(-.14, .25), (.06, .3), (-.4, 1), (-.65, 1)]),  # legs
               ("poly", [(.14, .25), (-.06, .3), (.4, 1), (.65, 1)])],
}


def _hsv(h, s, v):
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))


def synthetic_image(index, split="train"):
    """Image `index` of a split: ((32, 32, 3) uint8, label = index mod 6). Its own generator per image, so image i never
    depends on N (synthetic:100 is a prefix of synthetic:1000) and the splits never share an image."""
    rng = np.random.default_rng([1993, split == "test", index])
    hue, dark = rng.random(), rng.random() < 0.5  # light glyph on a dark ground, or the reverse
    v_bg = rng.uniform(.15, .35) if dark else rng.uniform(.65, .9)
    im = Image.new("RGB", (64, 64), _hsv(hue, rng.uniform(.2, .6), v_bg))  # drawn at 2x, then halved (antialiasing)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 64 - rng.integers(4, 12), 64, 64], fill=_hsv(hue + .1, .5, v_bg * .5))  # a ground band
    v_fg = rng.uniform(.75, .95) if dark else rng.uniform(.05, .25)
    fg = _hsv(hue + rng.uniform(.25, .75), rng.uniform(.4, .9), v_fg)
    s, cx, cy = rng.uniform(14, 22), 32 + rng.uniform(-6, 6), 30 + rng.uniform(-6, 6)  # jitter in scale and position
    for kind, pts in _GLYPHS[SYNTH_CLASSES[index % len(SYNTH_CLASSES)]]:
        xy = [(cx + s * u, cy + s * v) for u, v in pts]  # unit box -> canvas pixels
        if kind == "poly":
            draw.polygon(xy, fill=fg)
        elif kind == "ellipse":
            draw.ellipse(xy, fill=fg)
        else:  # "pie": the upper half of an ellipse (PIL angles run clockwise from 3 o'clock)
            draw.pieslice(xy, 180, 360, fill=fg)
    a = np.asarray(im.reduce(2), dtype=np.float64) + rng.normal(0, 6, (32, 32, 3))  # pixel noise
    return np.clip(a, 0, 255).astype(np.uint8), index % len(SYNTH_CLASSES)


def synthetic(spec, arg, split):
    if not re.fullmatch(r"\d*", arg) or arg == "0":
        raise common.UserError(f"--data {spec}: expected synthetic or synthetic:N with N a positive integer")
    n = int(arg or 2000)
    n = n if split == "train" else max(n // 4, 10 * len(SYNTH_CLASSES))  # test: a quarter of N, at least 10 per class
    images, labels = zip(*(synthetic_image(i, split) for i in range(n)))
    return ArraySource(spec, "synthetic", np.stack(images), labels, SYNTH_CLASSES)  # (N, 32, 32, 3)


class FileSource(Source):
    """Image files, read when indexed. An unreadable file (not validated, or changed since) is replaced by the next
    readable one and counted in `skipped` (per process: DataLoader workers count their own)."""
    per_item = ("files", "labels")

    def __init__(self, spec, name, files, labels, classes, where):
        self.spec, self.name, self.classes, self.where = spec, name, classes, where
        str_items = len(files) and isinstance(files[0], str)  # paths (folder) or int64 ids (YFCC: 8 bytes each)
        self.files = np.array(files, dtype=object) if str_items else np.asarray(files, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._bad = set()

    def _open(self, item):  # what PIL opens: a path here, a zip member in YFCCSource
        return item

    def _error(self, item):
        try:
            _check(self._open(item))
        except Exception as e:  # truncated, empty, not an image, unsupported mode: all "unreadable"
            return f"{type(e).__name__}: {e}"

    def _validate(self):
        n = len(self.files)
        if n > VALIDATE_MAX:
            common.log(f"note: {n} images in {self.where}: checked when read, not up front (> {VALIDATE_MAX})")
            return
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:  # PIL decodes without holding the GIL
            errors = list(ex.map(self._error, self.files))
        bad = [k for k, e in enumerate(errors) if e]
        if len(bad) == n:
            raise common.UserError(f"--data {self.spec}: none of the {n} image files in {self.where} is readable "
                                   f"(first: {self.files[0]}: {errors[0]})")
        if bad:
            _warn(f"skipped {len(bad)} unreadable image file(s) of {n} in {self.where} "
                  f"(first: {self.files[bad[0]]}: {errors[bad[0]]})")
            keep = np.array([e is None for e in errors])
            self._keep(keep, self.indices[keep])
            self.skipped = len(bad)

    def __getitem__(self, i):
        for t in range(min(len(self), 1000)):
            j = (i + t) % len(self)
            try:
                return load_image(self._open(self.files[j])), -1 if self.labels is None else int(self.labels[j])
            except Exception as e:
                if j not in self._bad:
                    self._bad.add(j)
                    self.skipped += 1
                    if len(self._bad) == 1:
                        _warn(f"{self.files[j]} is unreadable ({e}); using the next image instead (counted in skipped)")
        raise RuntimeError(f"--data {self.spec}: no readable image near index {i} in {self.where}")


def _scan(d):
    """{class: sorted files} from one sub-folder per class (searched recursively), or {None: files} for a flat folder
    (then only its top-level files count)."""
    is_img = lambda f: f.lower().endswith(IMG_EXTS) and not f.startswith(".")  # noqa: E731
    tree = {}
    for c in sorted(os.listdir(d)):
        if os.path.isdir(os.path.join(d, c)) and not c.startswith("."):
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, c)) for f in fs if is_img(f))
            tree.update({c: files} if files else {})
    return tree or {None: sorted(os.path.join(d, f) for f in os.listdir(d)
                                 if is_img(f) and os.path.isfile(os.path.join(d, f)))}


def folder(spec, root, split):
    if not os.path.isdir(root):
        raise common.UserError(f"--data {spec}: {root} does not exist or is not a folder; expected a folder of "
                               f"images (one sub-folder per class, or a flat folder of photos)")
    test_dir = next((d for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_dir:  # explicit splits: PATH/train, PATH/test (or PATH/val)
        trees = {"train": _scan(os.path.join(root, "train")), "test": _scan(os.path.join(root, test_dir))}
        where, tree = os.path.join(root, "train" if split == "train" else test_dir), trees[split]
        classes = sorted({c for t in trees.values() for c in t if c is not None})  # the same ids in both splits
    else:
        where, tree = root, _scan(root)
        classes = sorted(c for c in tree if c is not None)
        if not classes and split == "test":
            raise common.UserError(f"--data {spec}: {root} is a flat, unlabelled folder without a test split "
                                   f"(for one, add train/ and test/ or val/ sub-folders)")
        rng = np.random.default_rng(1993)  # fixed, not --seed: train and test must never overlap, whatever the seed
        for c in classes:  # labelled, no explicit split: every 5th image of a class (a seeded 80/20 split) is test
            is_test = np.zeros(len(tree[c]), bool)
            is_test[rng.permutation(len(tree[c]))[: len(tree[c]) // 5]] = True
            tree[c] = [f for f, t in zip(tree[c], is_test) if t == (split == "test")]
    files = [f for c in tree for f in tree[c]]
    if not files:
        raise common.UserError(f"--data {spec}: no image files ({', '.join(IMG_EXTS)}) in {where}; expected a "
                               f"folder of images (one sub-folder per class, or a flat folder of photos)")
    classes = classes if None not in tree else []  # a flat split is unlabelled, even if the other one has classes
    labels = [classes.index(c) for c in tree for _ in tree[c]] if classes else None
    return FileSource(spec, os.path.basename(os.path.normpath(root)), files, labels, classes or None, where)


class YFCCSource(FileSource):
    """Items are Flickr ids; id ABCDEFGH is FGH.jpg inside PATH/AB/CDE.zip (the official layout). Zip handles are opened
    lazily and cached per process: a handle inherited through fork shares its file offset with the parent's, so a new
    pid starts a new cache, and pickling (spawned workers) carries no handles."""

    def _open(self, item):
        s = f"{int(item):08d}"
        path = os.path.join(self.where, s[:2], s[2:5] + ".zip")
        if getattr(self, "_pid", None) != os.getpid():
            self._zips, self._pid = {}, os.getpid()
        if path not in self._zips:
            if len(self._zips) >= 64:  # bound the open files; dropped handles close when the last reader is done
                self._zips = {}
            self._zips[path] = zipfile.ZipFile(path)
        return io.BytesIO(self._zips[path].read(s[5:] + ".jpg"))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_zips", "_pid")}


def yfcc100m(spec, root, split):
    if not os.path.isdir(root):
        raise common.UserError(f"--data {spec}: {root} does not exist; expected the YFCC100M zip tree PATH/AB/CDE.zip")
    if split != "train":
        raise common.UserError(f"--data {spec}: YFCC100M is unlabelled and has no test split; evaluate on another one")
    if os.path.isfile(os.path.join(root, "flickr_unique_ids.npy")):  # the official id list
        ids = np.load(os.path.join(root, "flickr_unique_ids.npy")).astype(np.int64)
    elif os.path.isfile(os.path.join(root, "ids.txt")):  # one id per line
        with open(os.path.join(root, "ids.txt")) as fh:
            ids = [int(t) for t in fh.read().split() if t.isdigit()]
    else:  # no list: every FGH.jpg member of every AB/CDE.zip
        ids = []
        for ab in sorted(d for d in os.listdir(root) if re.fullmatch(r"\d\d", d)):
            for z in sorted(f for f in os.listdir(os.path.join(root, ab)) if re.fullmatch(r"\d{3}\.zip", f)):
                try:
                    with zipfile.ZipFile(os.path.join(root, ab, z)) as zf:
                        ids += [int(ab + z[:3] + m[:3]) for m in zf.namelist() if re.fullmatch(r"\d{3}\.jpg", m)]
                except (OSError, zipfile.BadZipFile) as e:
                    _warn(f"skipping unreadable zip {os.path.join(root, ab, z)} ({e})")
    if len(ids) == 0:
        raise common.UserError(f"--data {spec}: no images in {root}; expected PATH/AB/CDE.zip files holding FGH.jpg "
                               f"for 8-digit ids ABCDEFGH (optionally listed in PATH/ids.txt)")
    return YFCCSource(spec, "yfcc100m", ids, None, None, root)


def make_source(spec, split="train", subset=None, seed=0):
    """The source named by `spec` (split "train" or "test"), optionally a fixed random subset of `subset` images.
    File sources are validated after the subset choice (cheap for a small subset of a huge folder)."""
    if split not in ("train", "test"):
        raise common.UserError(f"split must be 'train' or 'test', got {split!r}")
    if subset is not None and subset < 0:
        raise common.UserError(f"--subset must be >= 0 (0 = all images), got {subset}")
    kind, _, arg = spec.partition(":")
    arg = os.path.expanduser(arg)
    if kind == "fashion-mnist":
        src = fashion_mnist(spec, arg or None, split)
    elif kind == "synthetic":
        src = synthetic(spec, arg, split)
    elif kind in ("cifar10", "folder", "yfcc100m") and arg:
        src = {"cifar10": cifar10, "folder": folder, "yfcc100m": yfcc100m}[kind](spec, arg, split)
    else:
        raise common.UserError(f"--data {spec}: unknown source; use fashion-mnist[:ROOT], cifar10:ROOT, folder:PATH, "
                               f"yfcc100m:PATH or synthetic[:N]")
    src._subset(subset, seed)
    if isinstance(src, FileSource):
        src._validate()
    return src


# ---- §2.1, §5.2 the datasets the later stages iterate ----
class RotationDataset(torch.utils.data.Dataset):
    """The training view. An epoch's plan is (indices, rotations) of length E; ds[j] -> (rho_r(a(x_n)) (3, S, S), r, n)
    with n = indices[j]. Rotation, crop and flip come from rng_for(seed, epoch, j); the rotation is always drawn first,
    so a given rotation leaves the crop and flip unchanged. Call set_plan before creating the DataLoader iterator."""

    def __init__(self, source, image_size, seed, crop_scale=(0.08, 1.0)):
        self.source, self.image_size, self.seed, self.crop_scale = source, image_size, seed, tuple(crop_scale)
        self.set_plan(0, np.arange(len(source)), None)

    def set_plan(self, epoch, indices, rotations=None):
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self.source)):
            raise ValueError(f"plan indices must lie in [0, {len(self.source)})")
        if rotations is not None:
            rotations = np.asarray(rotations, dtype=np.int64)
            if rotations.shape != indices.shape or ((rotations < 0) | (rotations > 3)).any():
                raise ValueError("rotations must be None or an array of 0..3 as long as indices")
        self.epoch, self.indices, self.rotations = int(epoch), indices, rotations

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        g = rng_for(self.seed, self.epoch, j)
        r = int(torch.randint(4, (1,), generator=g))  # uniform over {0, 1, 2, 3} (§5.2: one rotation per sample)
        r = r if self.rotations is None else int(self.rotations[j])
        n = int(self.indices[j])
        x = train_transform(self.source[n][0], self.image_size, g, self.crop_scale)  # a(x_n): (3, S, S)
        return rotate(x, r), r, n  # rho_r(a(x_n)), the RotNet label r, the image index n


class ClusterDataset(torch.utils.data.Dataset):
    """The clustering view (§4.1): ds[n] -> (center-cropped x_n (3, S, S), n); no augmentation, no rotation."""

    def __init__(self, source, image_size):
        self.source, self.transform = source, cluster_transform(image_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, n):
        return self.transform(self.source[n][0]), n


# ---- the script: validate a source, describe it, draw the pretext task ----
def plot_rotations(src, image_size, seed, path, rows=6):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if src.labels is not None:  # one image of each of the first classes
        picks = [int(np.flatnonzero(src.labels == c)[0]) for c in np.unique(src.labels)[:rows]]
    else:
        picks = sorted(np.random.default_rng(seed).choice(len(src), min(rows, len(src)), replace=False).tolist())

    def show(x):  # undo Normalize: (3, S, S) -> (S, S, 3) in [0, 1]
        return (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).clamp(0, 1).permute(1, 2, 0)
    fig, axes = plt.subplots(len(picks), 5, figsize=(7, 1.45 * len(picks) + .4), squeeze=False)
    for row, n in enumerate(picks):
        img = src[n][0]
        x = train_transform(img, image_size, rng_for(seed, 0, n))  # one training view a(x_n), then its 4 rotations
        for col, (v, title) in enumerate([(cluster_transform(image_size)(img), "clustering view")] +
                                         [(rotate(x, r), f"train view, r={r}") for r in range(4)]):
            axes[row, col].imshow(show(v).numpy())
            axes[row, col].set_xticks([]), axes[row, col].set_yticks([])
            axes[0, col].set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(src.classes[src.labels[n]] if src.labels is not None else f"#{n}", fontsize=8)
    fig.suptitle(f"{src.spec}: the rotation task (r quarter turns counter-clockwise, label r)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)  # atomic, like every write (STYLE.md §5)
    plt.close(fig)


def main(cfg):
    common.log(f"config: {asdict(cfg)}")
    if cfg.image_size < 8:
        raise common.UserError(f"--image_size must be >= 8 pixels, got {cfg.image_size}")
    src = make_source(cfg.data, "train", cfg.subset or None, cfg.seed)
    try:  # does a test split exist (05 evaluates on it)?
        n_test = len(make_source(cfg.data, "test"))
    except common.UserError:
        n_test = None
    info = {"spec": cfg.data, "name": src.name, "N": len(src), "N_test": n_test, "image_size": cfg.image_size,
            "subset": cfg.subset, "seed": cfg.seed, "skipped": src.skipped, "labelled": src.labels is not None}
    if src.labels is not None:
        counts = np.bincount(src.labels, minlength=len(src.classes))
        info.update(classes=src.classes, per_class_counts=dict(zip(src.classes, counts.tolist())))
    os.makedirs(cfg.out_dir, exist_ok=True)
    json_path = common.save_json(info, os.path.join(cfg.out_dir, "01_data.json"))
    png_path = os.path.join(cfg.out_dir, "01_data_rotations.png")
    plot_rotations(src, cfg.image_size, cfg.seed, png_path)
    common.log(f"{src.name}: N = {len(src)} training images ({src.skipped} unreadable skipped), "
               f"{len(src.classes or [])} classes, test split: {n_test if n_test is not None else 'none'}")
    common.log(f"wrote {json_path}\nwrote {png_path}")


if __name__ == "__main__":
    common.run(main, Config)
