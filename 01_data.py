"""Stage 1: the data. The rotation rho_r, the paper's two views of an image, the rotation dataset.

DeeperCluster learns from non-curated images by predicting, for every sample, its rotation r and
its cluster (PAPER.md §2-§3). This file gives the later stages the rotation rho_r (§1); the
training view a(x) (random resized crop + flip, §5.4) followed by rho_r in a rotation-task dataset
(§2.1, §5.2); and the clustering view (resize + center crop, no rotation, §4.1) that 03 embeds.
The views are torchvision v2 transforms; the training view draws from a generator seeded per
sample, so a resumed or multi-worker run sees exactly the views an uninterrupted one does. Images:
from support/sources.py (plumbing a first reader can skip), make_source(spec, split, subset, seed):
  fashion-mnist[:ROOT] (default), cifar10:ROOT, tinyimagenet:ROOT, folder:PATH, yfcc100m:PATH,
  synthetic[:N]; unreadable image files are left out and counted.

Paper:  PAPER.md §1 (rho_r), §2.1 (RotNet, Eq. (2)), §4.1 (clustering view), §5.2, §5.4 (a(x))
Reads:  the source named by --data
Writes: <out_dir>/01_data.json (spec, N, image size, classes and per-class counts, skipped files)
        <out_dir>/01_data_rotations.png (clustering view, then one training view x 4 rotations)
Run:    python 01_data.py --data fashion-mnist --out_dir out --subset 1000 --image_size 32
        python 01_data.py --data tinyimagenet:~/tiny-imagenet-200 --out_dir out
        (no torchrun here: later stages build these datasets in every rank and DataLoader worker)
Uses:   support.sources.make_source (the image sources), support.common (run, UserError,
        save_json, save_figure, log)
"""
import functools
import hashlib
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from support import common
from support.sources import make_source  # noqa: F401  the --data sources (data.make_source)


@dataclass(frozen=True)
class Config:
    data: str = "fashion-mnist"  # source spec: support/sources.py (tinyimagenet:ROOT, folder:PATH)
    out_dir: str = "out"  # folder for 01_data.json and 01_data_rotations.png
    subset: int = 0  # keep a fixed, seeded random subset of this many training images (0 = all)
    image_size: int = 32  # crop side S in pixels (paper: 224)
    seed: int = 0  # seeds the subset choice and the views drawn in the figure


# ---- §1, §2.1 the rotation rho_r: r quarter turns counter-clockwise; RotNet's label is r ----
def rotate(x, r):
    """rho_r on the last two dims of (C, H, W) or (N, C, H, W); r = 0 gives a copy, not a view."""
    return torch.rot90(x, int(r) % 4, dims=(-2, -1))  # (.., H, W) -> (.., W, H) when r is odd


def rng_for(seed, epoch, index):
    """A torch.Generator seeded from (seed, epoch, index). Sample `index` of an epoch gets the same
    rotation, crop and flip in every process and DataLoader worker, whatever the worker count or
    fetch order, so a resumed run sees the views it would have seen."""
    key = f"{int(seed)}/{int(epoch)}/{int(index)}"  # int(): numpy/tensor indices give the same key
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # a 63-bit seed


# ---- §4.1, §5.4 the two views of an image, as torchvision v2 transforms of a PIL image ----
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as official


def _to_tensor():  # PIL (H, W) RGB -> (3, H, W) float32, scaled to [0, 1], then normalised
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
            v2.ToPureTensor()]


def cluster_transform(image_size):
    """The clustering view (§4.1): the short side resized to round(S * 256 / 224) (224 -> 256,
    32 -> 37), then CenterCrop(S); no flip, no rotation. Image -> (3, S, S)."""
    short = round(image_size * 256 / 224)
    return v2.Compose([v2.Resize(short), v2.CenterCrop(image_size), *_to_tensor()])


@functools.lru_cache(maxsize=8)
def train_view(image_size, crop_scale=(0.08, 1.0)):
    """The training augmentation a(.) (§5.4): RandomResizedCrop(S, scale) + horizontal flip
    (p = 0.5); no colour jitter, as in the paper. rho_r comes after it (RotationDataset); the
    per-channel Normalize commutes with it, so normalising first changes nothing."""
    crop = v2.RandomResizedCrop(image_size, scale=crop_scale)  # aspect ratio in [3/4, 4/3]
    return v2.Compose([crop, v2.RandomHorizontalFlip(0.5), *_to_tensor()])


def train_transform(img, image_size, g, crop_scale=(0.08, 1.0)):
    """a(img) -> (3, S, S), every random draw taken from the torch.Generator g.
    torchvision's random transforms draw from torch's global generator, so for the call that
    generator holds g's state and g gets the advanced state back: the crop and flip are g's next
    draws, and the global generator is left untouched (fork_rng restores it). One process holds
    one global generator: do not call this from several threads at once (DataLoader workers are
    processes)."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        x = train_view(image_size, tuple(crop_scale))(img)
        g.set_state(torch.get_rng_state())
    return x


# ---- §2.1, §5.2 the datasets the later stages iterate ----
class RotationDataset(torch.utils.data.Dataset):
    """The training view with its rotation. An epoch's plan is (indices, rotations) of length E;
    ds[j] -> (rho_r(a(x_n)) (3, S, S), r, n) with n = indices[j]. Rotation, crop and flip come from
    rng_for(seed, epoch, j), the rotation drawn first, so a given rotation leaves crop and flip as
    they would be. Call set_plan before creating the DataLoader iterator."""

    def __init__(self, source, image_size, seed, crop_scale=(0.08, 1.0)):
        self.source, self.image_size, self.seed = source, image_size, seed
        self.crop_scale = tuple(crop_scale)
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
        r = int(torch.randint(4, (1,), generator=g))  # uniform in {0..3}: one rotation per sample
        r = r if self.rotations is None else int(self.rotations[j])  # the plan's r (Eq. (14))
        n = int(self.indices[j])
        x = train_transform(self.source[n][0], self.image_size, g, self.crop_scale)  # a(x_n)
        return rotate(x, r), r, n  # x~_n = rho_r(a(x_n)) of Eq. (2), (8): (3, S, S); label r; n


class ClusterDataset(torch.utils.data.Dataset):
    """The clustering view (§4.1): ds[n] -> (center-cropped x_n (3, S, S), n); no augmentation."""

    def __init__(self, source, image_size):
        self.source, self.transform = source, cluster_transform(image_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, n):
        return self.transform(self.source[n][0]), n


# ---- the script: check a source, describe it, draw the pretext task ----
def plot_rotations(src, image_size, seed, path, rows=6):
    plt = common.pyplot()
    if src.labels is not None:  # one image of each of the first classes
        picks = [int(np.flatnonzero(src.labels == c)[0]) for c in np.unique(src.labels)[:rows]]
    else:
        rng = np.random.default_rng(seed)
        picks = sorted(rng.choice(len(src), min(rows, len(src)), replace=False).tolist())
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    fig, axes = plt.subplots(len(picks), 5, figsize=(7, 1.45 * len(picks) + .4), squeeze=False)
    for row, n in enumerate(picks):
        img = src[n][0]
        x = train_transform(img, image_size, rng_for(seed, 0, n))  # one a(x_n), 4 rotations
        views = [(cluster_transform(image_size)(img), "clustering view")]
        views += [(rotate(x, r), f"train view, r={r}") for r in range(4)]
        for col, (v, title) in enumerate(views):
            v = (v * std + mean).clamp(0, 1).permute(1, 2, 0)  # undo Normalize: (S, S, 3)
            axes[row, col].imshow(v.numpy())
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            axes[0, col].set_title(title, fontsize=8)
        label = src.classes[src.labels[n]] if src.labels is not None else f"#{n}"
        axes[row, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"{src.spec}: the rotation task (r quarter turns counter-clockwise, label r)",
                 fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=100)  # atomic, like every write (STYLE.md §5)


def main(cfg):
    common.log(f"config: {asdict(cfg)}")
    if cfg.image_size < 8:
        raise common.UserError(f"--image_size must be >= 8 pixels, got {cfg.image_size}")
    src = make_source(cfg.data, "train", cfg.subset or None, cfg.seed)
    try:  # does a test split exist (05 evaluates on it)?
        n_test = len(make_source(cfg.data, "test"))
    except common.UserError:
        n_test = None
    info = {"spec": cfg.data, "name": src.name, "N": len(src), "N_test": n_test,
            "image_size": cfg.image_size, "subset": cfg.subset, "seed": cfg.seed,
            "skipped": src.skipped, "labelled": src.labels is not None}
    if src.labels is not None:
        counts = np.bincount(src.labels, minlength=len(src.classes)).tolist()
        info.update(classes=src.classes, per_class_counts=dict(zip(src.classes, counts)))
    os.makedirs(cfg.out_dir, exist_ok=True)
    json_path = common.save_json(info, os.path.join(cfg.out_dir, "01_data.json"))
    png_path = os.path.join(cfg.out_dir, "01_data_rotations.png")
    plot_rotations(src, cfg.image_size, cfg.seed, png_path)
    common.log(f"{src.name}: N = {len(src)} training images ({src.skipped} unreadable skipped), "
               f"{len(src.classes or [])} classes, test split: {n_test or 'none'}")
    common.log(f"wrote {json_path}\nwrote {png_path}")


if __name__ == "__main__":
    common.run(main, Config)
