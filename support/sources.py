"""The image sources behind `--data` (01_data.make_source): plumbing a reader of the paper skips.

make_source(spec, split, subset, seed) -> a Dataset, src[i] = (RGB PIL image, label or -1).
  fashion-mnist[:ROOT]  the default: Debian's copy, a torchvision-style copy, or a download
  cifar10:ROOT          the python-pickle layout (ROOT/cifar-10-batches-py/)
  tinyimagenet:ROOT     the official Tiny-ImageNet-200 layout (train/<wnid>/images/, val/)
  folder:PATH           one sub-folder per class, or a flat folder (unlabelled); train/ and
                        test/ (or val/) sub-folders for explicit splits
  yfcc100m:PATH         the official layout: PATH/AB/CDE.zip holds FGH.jpg for id ABCDEFGH
  synthetic[:N]         N procedural upright glyphs of 6 classes (default 2000): tests, offline use
Bad input (a missing, empty, corrupt or ambiguous source) is a one-line common.UserError naming
the file and what to do. Image files are decoded once, when the source is built: unreadable ones
are left out and counted, with one warning; more than half of them unreadable is an error.
"""
import colorsys
import gzip
import io
import math
import os
import pickle
import re
import socket
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from support import common
from support.images import IMG_EXTS, ArraySource, FileSource, _images, _warn, _why
from support.images import load_image, to_rgb  # noqa: F401  (sources.load_image: tests, scripts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository



FMNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]


def read_idx(path):
    """(Fashion-)MNIST's idx file, .gz or not: magic (0, 0, 0x08 = uint8, ndim), then ndim
    big-endian sizes, then the bytes. -> images (N, 28, 28) or labels (N,)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
            raw, why = fh.read(), "corrupt or truncated"
    except Exception as e:  # not gzip, a truncated stream, a bad CRC, unreadable
        raw, why = b"", _why(e)
    ndim = raw[3] if len(raw) >= 4 else 0
    dims = [int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise common.UserError(f"{path} is not a uint8 idx file ({why}); delete it and fetch "
                               f"Fashion-MNIST again")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _download_fmnist(root):
    """torchvision's downloader, into root/FashionMNIST/raw; an offline machine fails in 3 s."""
    socket.create_connection(("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80), 3).close()
    import torchvision
    for train in (True, False):
        torchvision.datasets.FashionMNIST(root, train=train, download=True)


def fashion_mnist(spec, root, split):
    """ROOT when given, else Debian's copy, then ./data and <repo>/data (each flat or with
    FashionMNIST/raw/, files .gz or not); downloaded into ROOT or <repo>/data when missing."""
    local = [root] if root else list(dict.fromkeys([os.path.abspath("data"), f"{ROOT}/data"]))
    roots = ([] if root else [FMNIST_DEBIAN]) + local  # an explicit ROOT: the only place looked
    dirs = [os.path.join(r, s) for r in roots for s in ("", "FashionMNIST/raw")]
    pre = "train" if split == "train" else "t10k"
    pairs = [(f"{d}/{pre}-images-idx3-ubyte{x}", f"{d}/{pre}-labels-idx1-ubyte{x}")
             for d in dirs for x in (".gz", "")]
    found = lambda: next((p for p in pairs if all(map(os.path.isfile, p))), None)  # noqa: E731
    target, err = root or f"{ROOT}/data", "downloaded files not found"
    if found() is None:
        try:
            _download_fmnist(target)
        except Exception as e:  # offline, proxy, disk full: say so in the message below
            err = _why(e)
    if found() is None:
        raw = " or ".join(os.path.join(r, "FashionMNIST/raw/") for r in local)
        raise common.UserError(
            f"--data {spec}: Fashion-MNIST not found. Options: (1) the Debian copy in "
            f"{FMNIST_DEBIAN}/ (sudo apt-get install dataset-fashion-mnist); (2) a torchvision-"
            f"style copy, {{train,t10k}}-*-ubyte[.gz] in {raw}; (3) a download into {target} "
            f"when online (failed: {err})")
    images, labels = map(read_idx, found())
    return ArraySource(spec, "fashion-mnist", images, labels, FMNIST_CLASSES)


def cifar10(spec, root, split):
    """The python CIFAR-10 (cifar-10-python.tar.gz unpacked): pickled dicts of (10000, 3072) rows.
    Unpickling runs code: only point this at files you trust."""
    d = root if os.path.isfile(f"{root}/batches.meta") else f"{root}/cifar-10-batches-py"
    files = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files + ["batches.meta"] if not os.path.isfile(f"{d}/{f}")]
    if missing:
        raise common.UserError(f"--data {spec}: {d} lacks {', '.join(missing)}; expected ROOT/"
                               f"cifar-10-batches-py/{{data_batch_1..5, test_batch, batches.meta}}")

    def load(f, key):  # python-2 pickles, hence latin1
        try:
            with open(f"{d}/{f}", "rb") as fh:
                return pickle.load(fh, encoding="latin1")[key]
        except Exception as e:  # truncated, not a pickle, another pickle
            raise common.UserError(f"--data {spec}: {d}/{f} is not a CIFAR-10 pickle "
                                   f"({_why(e)}); unpack cifar-10-python.tar.gz again")
    rows = np.concatenate([load(f, "data") for f in files])  # (N, 3072): 3 planes of 32 x 32
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N,32,32,3)
    labels = np.concatenate([load(f, "labels") for f in files])
    return ArraySource(spec, "cifar10", images, labels, load("batches.meta", "label_names"))


def tinyimagenet(spec, root, split):
    """The official Tiny-ImageNet-200 layout in ROOT (or in ROOT/tiny-imagenet-200): wnids.txt,
    words.txt (names), train/<wnid>/images/*.JPEG (our train split), val/images/ with
    val/val_annotations.txt (file, wnid, box; our labelled test split). test/ has no labels."""
    if not os.path.isfile(f"{root}/wnids.txt") and os.path.isdir(f"{root}/tiny-imagenet-200"):
        root = f"{root}/tiny-imagenet-200"
    if not os.path.isdir(root):
        raise common.UserError(f"--data {spec}: {root} does not exist; expected the folder "
                               f"tiny-imagenet-200/ of the official download, or its parent")
    need = ["wnids.txt", "train"] + (["val/val_annotations.txt"] if split == "test" else [])
    missing = [p for p in need if not os.path.exists(f"{root}/{p}")]
    if missing:
        raise common.UserError(f"--data {spec}: {root} lacks {', '.join(missing)}; expected the "
                               f"official layout tiny-imagenet-200/{{wnids.txt, words.txt, "
                               f"train/<wnid>/images/, val/images/, val/val_annotations.txt}}")
    with open(f"{root}/wnids.txt") as fh:
        listed = list(dict.fromkeys(fh.read().split()))
    # The classes are the wnids of wnids.txt that have training images, in its order (label =
    # position): some copies list extra wnids without a train/ folder, which cannot be learnt.
    train = {w: _images(f"{root}/train/{w}/images") for w in listed}
    wnids = [w for w in listed if train[w]]
    if not wnids:
        raise common.UserError(f"--data {spec}: no images in {root}/train/<wnid>/images/ for "
                               f"the {len(listed)} wnids of {root}/wnids.txt")
    if len(wnids) != 200 and split == "train":
        common.log(f"note: {root}: {len(wnids)} classes with training images (official: 200)")
    label = {w: k for k, w in enumerate(wnids)}
    if split == "train":
        files, where = [f for w in wnids for f in train[w]], f"{root}/train"
        labels = [label[w] for w in wnids for _ in train[w]]
    else:
        where = f"{root}/val/images"
        with open(f"{root}/val/val_annotations.txt") as fh:
            rows = [line.split("\t") for line in fh if line.strip()]
        if any(len(r) < 2 for r in rows):
            raise common.UserError(f"--data {spec}: {root}/val/val_annotations.txt is not "
                                   f"tab-separated 'file, wnid, box' lines; fetch it again")
        rows = [(f"{where}/{r[0]}", r[1].strip()) for r in rows if r[1].strip() in label]
        files, labels = [f for f, _ in rows], [label[w] for _, w in rows]  # only known classes
    names = {}  # words.txt: "wnid<TAB>name, synonym, ..."; a class is named by its first name
    if os.path.isfile(f"{root}/words.txt"):
        with open(f"{root}/words.txt") as fh:
            names = dict(ln.partition("\t")[::2] for ln in fh.read().splitlines())
    classes = [names.get(w, "").split(",")[0].strip() or w for w in wnids]
    classes = [c if classes.count(c) == 1 else f"{c} ({w})" for c, w in zip(classes, wnids)]
    src = FileSource(spec, "tiny-imagenet-200", files, labels, classes, where)
    src.wnids = wnids
    return src


# Synthetic glyphs in a unit box [-1, 1]^2, y down. None looks the same after a quarter or half
# turn (rotation is learnable) and the shapes differ (classes are). Colours are random.
SYNTH_CLASSES = ["arrow", "T", "L", "cup", "mushroom", "person"]
_GLYPHS = {  # (how PIL draws it, points); "pie" is the upper half of the ellipse in its box
    "arrow": [("poly", [(0, -1), (.75, -.15), (.28, -.15), (.28, 1), (-.28, 1), (-.28, -.15),
                        (-.75, -.15)])],
    "T": [("poly", [(-.8, -1), (.8, -1), (.8, -.55), (.25, -.55), (.25, 1), (-.25, 1),
                    (-.25, -.55), (-.8, -.55)])],
    "L": [("poly", [(-.6, -1), (-.15, -1), (-.15, .55), (.7, .55), (.7, 1), (-.6, 1)])],
    "cup": [("poly", [(-.8, -1), (-.4, -1), (-.4, .5), (.4, .5), (.4, -1), (.8, -1), (.8, 1),
                      (-.8, 1)])],
    "mushroom": [("pie", [(-1, -1), (1, .6)]), ("poly", [(-.22, -.25), (.22, -.25), (.22, 1),
                                                        (-.22, 1)])],
    "person": [("ellipse", [(-.3, -1), (.3, -.45)]), ("poly", [(-.7, -.35), (.7, -.35), (.7, -.15),
                                                             (-.7, -.15)]),
               ("poly", [(-.14, -.45), (.14, -.45), (.14, .3), (-.14, .3)]),
               ("poly", [(-.14, .25), (.06, .3), (-.4, 1), (-.65, 1)]),  # the legs
               ("poly", [(.14, .25), (-.06, .3), (.4, 1), (.65, 1)])]}


def synthetic_image(index, split="train"):
    """Image `index` of a split: ((32, 32, 3) uint8, label = index mod 6), from its own generator,
    so synthetic:100 is a prefix of synthetic:1000 and the splits never share an image."""
    rng = np.random.default_rng([1993, split == "test", index])
    hsv = lambda h, s, v: tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1, s, v))  # noqa
    hue, dark = rng.random(), rng.random() < 0.5  # a light glyph on a dark ground, or reverse
    v_bg = rng.uniform(.15, .35) if dark else rng.uniform(.65, .9)
    im = Image.new("RGB", (64, 64), hsv(hue, rng.uniform(.2, .6), v_bg))  # 2x, halved below
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 64 - rng.integers(4, 12), 64, 64], fill=hsv(hue + .1, .5, v_bg * .5))
    v_fg = rng.uniform(.75, .95) if dark else rng.uniform(.05, .25)
    fg = hsv(hue + rng.uniform(.25, .75), rng.uniform(.4, .9), v_fg)
    s, cx, cy = rng.uniform(14, 22), 32 + rng.uniform(-6, 6), 30 + rng.uniform(-6, 6)
    for kind, pts in _GLYPHS[SYNTH_CLASSES[index % 6]]:
        xy = [(cx + s * u, cy + s * v) for u, v in pts]  # unit box -> canvas pixels
        if kind == "pie":  # PIL's angles run clockwise from 3 o'clock
            draw.pieslice(xy, 180, 360, fill=fg)
        else:
            (draw.polygon if kind == "poly" else draw.ellipse)(xy, fill=fg)
    a = np.asarray(im.reduce(2), dtype=np.float64) + rng.normal(0, 6, (32, 32, 3))  # noise
    return np.clip(a, 0, 255).astype(np.uint8), index % 6


def synthetic(spec, arg, split):
    if not re.fullmatch(r"\d*", arg) or arg == "0":
        raise common.UserError(f"--data {spec}: expected synthetic or synthetic:N, N > 0")
    n = int(arg or 2000)
    n = n if split == "train" else max(n // 4, 60)  # test: a quarter of N, >= 10 per class
    images, labels = zip(*(synthetic_image(i, split) for i in range(n)))
    return ArraySource(spec, "synthetic", np.stack(images), labels, SYNTH_CLASSES)


def _scan(spec, d):
    """{class: files} from one sub-folder per class, or {None: files} for a flat folder."""
    entries = sorted(e for e in os.listdir(d) if not e.startswith("."))
    tree = {c: _images(os.path.join(d, c)) for c in entries if os.path.isdir(os.path.join(d, c))}
    tree = {c: files for c, files in tree.items() if files}
    top = [os.path.join(d, e) for e in entries
           if e.lower().endswith(IMG_EXTS) and os.path.isfile(os.path.join(d, e))]
    if top and tree:  # classes with stray images, or photos with a stray folder? Ask.
        raise common.UserError(f"--data {spec}: {d} has {len(top)} images at its top level and "
                               f"{len(tree)} sub-folder(s) of images ({', '.join(list(tree)[:3])}"
                               f"): ambiguous. For classes, move the top-level images into "
                               f"sub-folders; for an unlabelled folder, move all images up")
    return tree or {None: top}


def folder(spec, root, split):
    if not os.path.isdir(root):
        raise common.UserError(f"--data {spec}: {root} does not exist or is not a folder; expected"
                               f" images (one sub-folder per class, or a flat folder of photos)")
    root = os.path.normpath(root)
    test_dir = next((d for d in ("test", "val") if os.path.isdir(f"{root}/{d}")), None)
    if os.path.isdir(f"{root}/train") and test_dir:  # explicit splits: train/ and test/ (or val/)
        trees = {"train": _scan(spec, f"{root}/train"), "test": _scan(spec, f"{root}/{test_dir}")}
        where, tree = f"{root}/{'train' if split == 'train' else test_dir}", trees[split]
        classes = sorted({c for t in trees.values() for c in t if c is not None})  # shared ids
    else:
        where, tree = root, _scan(spec, root)
        if list(tree) == ["train"]:  # train/ alone: the collection, not a class named "train"
            common.log(f"note: {root} has train/ but no test/ or val/: reading {root}/train")
            where, tree = f"{root}/train", _scan(spec, f"{root}/train")
        classes = sorted(c for c in tree if c is not None)
        if not classes and split == "test":
            raise common.UserError(f"--data {spec}: {where} is a flat, unlabelled folder without "
                                   f"a test split (for one, add train/ and test/ or val/ folders)")
        rng = np.random.default_rng(1993)  # fixed, not --seed: train and test never overlap
        for c in classes:  # no explicit split: a seeded fifth of every class is the test split
            is_test = np.zeros(len(tree[c]), bool)
            is_test[rng.permutation(len(tree[c]))[: len(tree[c]) // 5]] = True
            tree[c] = [f for f, t in zip(tree[c], is_test) if t == (split == "test")]
    files = [f for c in tree for f in tree[c]]
    if not files:
        raise common.UserError(f"--data {spec}: no image files ({', '.join(IMG_EXTS)}) in "
                               f"{where}; expected one sub-folder per class, or a flat folder")
    classes = classes if None not in tree else []  # a flat split is unlabelled
    labels = [classes.index(c) for c in tree for _ in tree[c]] if classes else None
    return FileSource(spec, os.path.basename(root), files, labels, classes or None, where)


class YFCCSource(FileSource):
    """Items are Flickr ids; id ABCDEFGH is FGH.jpg inside PATH/AB/CDE.zip (the official layout).
    Zip handles are opened lazily and cached per process: a handle inherited through fork shares
    its file offset with the parent's, so a new pid starts a new cache; pickles carry none."""

    def _open(self, item):
        s = f"{int(item):08d}"
        path = os.path.join(self.where, s[:2], s[2:5] + ".zip")
        if getattr(self, "_pid", None) != os.getpid():
            self._zips, self._pid = {}, os.getpid()
        if path not in self._zips:
            if len(self._zips) >= 64:  # bound the open files; dropped handles close when unused
                self._zips = {}
            self._zips[path] = zipfile.ZipFile(path)
        return io.BytesIO(self._zips[path].read(s[5:] + ".jpg"))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_zips", "_pid")}


def yfcc100m(spec, root, split):
    """Ids from PATH/flickr_unique_ids.npy (the official list) or PATH/ids.txt (one per line),
    else every FGH.jpg member of every PATH/AB/CDE.zip."""
    if not os.path.isdir(root):
        raise common.UserError(f"--data {spec}: {root} does not exist; expected PATH/AB/CDE.zip")
    if split != "train":
        raise common.UserError(f"--data {spec}: YFCC100M is unlabelled and has no test split")
    npy, txt, ids = f"{root}/flickr_unique_ids.npy", f"{root}/ids.txt", []
    if os.path.isfile(npy):
        try:
            ids = np.load(npy).astype(np.int64).ravel()
        except Exception as e:  # truncated, not .npy, pickled objects, not numbers
            raise common.UserError(f"--data {spec}: {npy} is not a .npy array of ids "
                                   f"({_why(e)}); fetch it again, or delete it to use every id")
    elif os.path.isfile(txt):
        with open(txt) as fh:
            ids = [int(t) for t in fh.read().split() if t.isdigit()]
    else:
        zips = [f"{ab}/{z}" for ab in sorted(os.listdir(root)) if re.fullmatch(r"\d\d", ab)
                for z in sorted(os.listdir(f"{root}/{ab}")) if re.fullmatch(r"\d{3}\.zip", z)]
        for z in zips:  # "AB/CDE.zip" holds "FGH.jpg"
            try:
                with zipfile.ZipFile(f"{root}/{z}") as zf:
                    ids += [int(z[:2] + z[3:6] + m[:3]) for m in zf.namelist()
                            if re.fullmatch(r"\d{3}\.jpg", m)]
            except (OSError, zipfile.BadZipFile) as e:
                _warn(f"skipping unreadable zip {root}/{z} ({_why(e)})")
    if len(ids) == 0:
        raise common.UserError(f"--data {spec}: no images in {root}; expected PATH/AB/CDE.zip "
                               f"holding FGH.jpg for ids ABCDEFGH (optionally PATH/ids.txt)")
    return YFCCSource(spec, "yfcc100m", ids, None, None, root)


SOURCES = {"fashion-mnist": fashion_mnist, "synthetic": synthetic, "cifar10": cifar10,
           "tinyimagenet": tinyimagenet, "folder": folder, "yfcc100m": yfcc100m}


def make_source(spec, split="train", subset=None, seed=0):
    """The source named by `spec`, split "train" or "test", optionally a fixed random subset of
    `subset` images. Files are checked after the subset choice (cheap for a small subset)."""
    if split not in ("train", "test"):
        raise common.UserError(f"split must be 'train' or 'test', got {split!r}")
    if subset is not None and subset < 0:
        raise common.UserError(f"--subset must be >= 0 (0 = all images), got {subset}")
    kind, _, arg = spec.partition(":")
    if kind not in SOURCES or not (arg or kind in ("fashion-mnist", "synthetic")):
        raise common.UserError(f"--data {spec}: unknown source; use fashion-mnist[:ROOT], "
                               f"cifar10:ROOT, tinyimagenet:ROOT, folder:PATH, yfcc100m:PATH, "
                               f"synthetic[:N]")
    src = SOURCES[kind](spec, os.path.expanduser(arg), split)  # folder:~/photos works
    src._subset(subset, seed)
    if isinstance(src, FileSource):
        src.check()
    return src
