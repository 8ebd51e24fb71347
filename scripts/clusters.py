"""What do the clusters follow? (results/tiny-imagenet/README.md)

Reads the labels a clustering round wrote (03_kmeans_epNNN.npz, or the 03_kmeans_epNNN_labels.npz
that scripts/reproduce.py keeps: super-cluster and sub-cluster of every training image) and asks
which image property they agree with, by normalised mutual information (NMI, geometric
normalisation as PAPER.md Eq. (18)):

  - the true classes (what the paper hopes the clusters find: objects);
  - low-level cues, each turned into a partition of the same images by k-means into the same
    number of clusters: mean colour (3 numbers), colour histogram (4x4x4 RGB bins), brightness
    and contrast (mean and std of grey), edges (mean Sobel magnitude and an 8-bin orientation
    histogram weighted by magnitude), layout (8x8 grey thumbnail).

Each cue also gets NMI against the true classes (how much class information the cue alone
carries), and every NMI has a chance level (the same partition against shuffled labels: two
partitions into hundreds of clusters share some information by chance). The cluster sizes are
summarised as well (largest cluster, effective number of clusters exp(entropy)).

Run (the image subset is chosen by the run's seed, so pass the run's --subset and --seed):
    python scripts/clusters.py --data folder:data/tiny-imagenet --subset 30000 --seed 0 \\
      --npz deepercluster=results/tiny-imagenet/runs/deepercluster_s0/03_kmeans_ep004_labels.npz \\
      --out results/tiny-imagenet/clusters_s0.md
"""
import argparse
import importlib
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common, sources  # noqa: E402
from support.clusterstats import nmi  # noqa: E402  (Eq. (18), the geometric mean)

km = importlib.import_module("03_kmeans")


def cluster_ids(npz):
    """One id per image: a 03_kmeans npz's super-cluster u, sub-cluster z (local to u) -> u*K+z."""
    z = np.load(npz)
    sup, sub = z["super"].astype(np.int64), z["sub"].astype(np.int64)
    return sup * (int(sub.max()) + 1) + sub


def load_images(src, size):
    """(N, size, size, 3) uint8, every image resized to size x size (bilinear): 1.2 GB for 100k
    images at 64 px (cues() converts a chunk at a time to floats)."""
    out = np.empty((len(src), size, size, 3), np.uint8)
    for i in range(len(src)):
        img = src[i][0]
        if img.size != (size, size):
            img = img.resize((size, size), resample=2)  # PIL.Image.BILINEAR
        out[i] = np.asarray(img, np.uint8)
    return out


def cues(images, chunk=4096):
    """Low-level descriptors of uint8 images (N, H, W, 3) -> {name: (N, D) float32}, computed
    `chunk` images at a time (the per-pixel temporaries of 100k images would take ~15 GB)."""
    parts = [chunk_cues(images[i:i + chunk].astype(np.float32) / 255)
             for i in range(0, len(images), chunk)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def chunk_cues(x):
    """The descriptors of images x (n, H, W, 3) float32 in [0, 1]; each row depends on its image
    only."""
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)  # (N, H, W)
    q = np.minimum((x * 4).astype(np.int64), 3)  # 4 levels per channel
    bins = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]  # (N, H, W) in [0, 64)
    hist = np.stack([np.bincount(b.ravel(), minlength=64) for b in bins]).astype(np.float32)
    hist /= hist.sum(1, keepdims=True)
    gx = grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]  # central differences (a Sobel without smoothing)
    gy = grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]
    mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)  # orientation, sign ignored
    ob = np.minimum((ang / np.pi * 8).astype(np.int64), 7)
    orient = np.stack([np.bincount(o.ravel(), weights=m.ravel(), minlength=8)
                       for o, m in zip(ob, mag)])
    orient /= orient.sum(1, keepdims=True) + 1e-12
    n, h, w = grey.shape
    thumb = grey[:, : h // 8 * 8, : w // 8 * 8].reshape(n, 8, h // 8, 8, w // 8)
    thumb = thumb.mean((2, 4)).reshape(n, 64)
    edges = np.concatenate([mag.mean((1, 2))[:, None] * 10, orient], 1)
    return {"mean colour": x.mean((1, 2)), "colour histogram": hist,
            "brightness, contrast": np.stack([grey.mean((1, 2)), grey.std((1, 2))], 1),
            "edges (strength, orientation)": edges,
            "layout (8x8 grey)": thumb - thumb.mean(1, keepdims=True)}


def kmeans_labels(f, k, seed):
    """Partition rows of f into k clusters (standardised columns, the project's k-means)."""
    f = (f - f.mean(0)) / (f.std(0) + 1e-8)
    return km.kmeans(np.ascontiguousarray(f, np.float32), k, niter=20, seed=seed)[1].numpy()


def size_stats(c):
    n = np.bincount(c)
    n = n[n > 0]
    p = n / n.sum()
    return {"clusters": len(n), "largest %": 100 * p.max(),
            "effective": float(np.exp(-(p * np.log(p)).sum()))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (it chose the subset)")
    p.add_argument("--npz", nargs="+", required=True,
                   help="NAME=PATH of a 03_kmeans_epNNN.npz, one or more")
    p.add_argument("--size", type=int, default=64,
                   help="images are resized to this before the cues")
    p.add_argument("--out", default="", help="markdown file for the table")
    a = p.parse_args()
    runs = {}
    for spec in a.npz:
        name, _, path = spec.rpartition("=")
        if not os.path.exists(path):
            raise SystemExit(f"--npz {spec}: no such file")
        runs[name or path] = cluster_ids(path)
    src = sources.make_source(a.data, "train", a.subset or None, a.seed)
    if src.labels is None:
        raise SystemExit(f"--data {a.data} has no labels: nothing to compare the clusters with")
    for name, c in runs.items():
        if len(c) != len(src):
            raise SystemExit(f"{name}: {len(c)} cluster labels but --data/--subset/--seed give "
                             f"{len(src)} images; pass the run's --subset and --seed")
    t0 = time.time()
    x = load_images(src, a.size)
    labels = np.asarray(src.labels)
    k = max(len(np.unique(c)) for c in runs.values())
    parts = {name: kmeans_labels(f, k, a.seed) for name, f in cues(x).items()}
    print(f"{len(x)} images, cues and their k-means ({k}) in {time.time() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(a.seed)
    targets = {"true classes": labels, **parts}
    # the same sizes, no relation to the images
    shuffled = {n: rng.permutation(t) for n, t in targets.items()}
    lines = [f"# What the clusters follow (`{a.data}`, N = {len(x)}, seed {a.seed}; each cue "
             f"k-means'd into {k} clusters)", "", "NMI above chance: NMI(clusters, target) minus "
             "NMI(clusters, the target shuffled over the images).", "",
             "| clustering | clusters | largest % | effective clusters | NMI vs classes (chance) | "
             + " | ".join(targets) + " |", "|---|---|---|---|---|" + "---|" * len(targets)]
    rows = list(runs.items()) + [(f"cue: {n}", c) for n, c in parts.items()]
    for name, c in rows:
        st = size_stats(c)
        excess = [nmi(c, t) - nmi(c, shuffled[n]) for n, t in targets.items()]
        cells = ["–" if name == f"cue: {n}" else f"{v:+.3f}" for n, v in zip(targets, excess)]
        lines.append(f"| {name} | {st['clusters']} | {st['largest %']:.1f} | "
                     f"{st['effective']:.0f} | {nmi(c, labels):.3f} "
                     f"({nmi(c, shuffled['true classes']):.3f}) | " + " | ".join(cells) + " |")
    lines += ["", "NMI: geometric normalisation (PAPER.md Eq. (18)); two partitions into hundreds "
              "of clusters share information by chance, hence the shuffled baseline. Effective "
              "clusters: exp(entropy of the cluster sizes). Rows 'cue: ...' are the cues' own "
              "partitions: their column 'true classes' is what that cue alone tells about the "
              "class."]
    print("\n".join(lines))
    if a.out:
        common.save_text("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
