"""Stage 5: judge the frozen features: linear probes per conv layer, kNN, clusters vs labels, PASCAL VOC07 transfer.

Unsupervised features are only as good as their transfer. The paper trains one linear classifier on each frozen conv layer
(average-pooled to < 10,000 dims) and fine-tunes on PASCAL VOC 2007 ("fc6-8": convs frozen, "all": everything trained).
We add two cheap checks (kNN, NMI/ARI of the pseudo-labels against the true classes) and a table comparing checkpoints.

Paper:  PAPER.md §9.1 (probes, Eq. (15)), §9.2 (VOC07, Eq. (16)-(17)), §9.3 (kNN, NMI Eq. (18)), §10, §11 pitfall 7 (Sobel).
Reads:  <out_dir>/02_model_init.pt (random init), <out_dir>/04_train_last.pt or 04_train_ep{E:03d}.pt (or --ckpt: ours, or an
        official DeeperCluster checkpoint), <out_dir>/04_train_log.jsonl (optional), a labelled source (--data) and --voc PATH.
Writes: <out_dir>/05_eval.json (every number with its settings), 05_eval.md (the results table), 05_eval_layers.png (probe
        accuracy per layer), 05_eval_clusters.png (images nearest the centre of a few clusters), 04_train_curves.png (+ NMI).
Run:    python 05_eval.py --out_dir out/demo                                   # random init vs trained, layers 2,4,7,10,13,fc7
        python 05_eval.py --out_dir out/demo --layers all --ckpt out/demo/04_train_ep009.pt
        python 05_eval.py --out_dir out/voc --ckpt deepercluster_vgg16.pth --voc voc2007:VOCdevkit/VOC2007 --voc_mode both
Uses:   01_data.make_source / ClusterDataset / train_transform / rng_for, 02_model.load_trunk (+ VGG.conv_outputs),
        04_train.plot_curves. Single process: at small scale every evaluation here is cheap next to training.
Features: conv i = the ReLU output after conv i, average-pooled below 10,000 dims; "fc7" = ReLU(phi) for the probe (what
the heads see), phi itself (fc7 before ReLU, the clustered feature, PAPER.md §4.1) for kNN. Deviations: cached center-crop
features (--probe_aug for the paper's crops), standardised probe inputs, the last probe epoch reported (no test-set pick).
"""
import copy
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from tqdm import tqdm

import common

data = importlib.import_module("01_data")  # 01_data.py: sources, transforms, per-sample generators
model_lib = importlib.import_module("02_model")  # 02_model.py: VGG trunk, load_trunk


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder with the 02/04 outputs; 05 writes here too
    ckpt: str = ""  # comma list of checkpoints (ours or official layout); default: out_dir/02_model_init.pt,04_train_last.pt
    data: str = ""  # source spec for probes and kNN (01_data); default: the checkpoint's training data, else fashion-mnist
    sobel: str = "auto"  # auto|on|off: the checkpoint's arch decides; on/off only asserts it (PAPER §11 pitfall 7)
    layers: str = "best"  # probe layers: best (= 2,4,7,10,13,fc7, the block ends), all (= 1..13,fc7), a comma list, or none
    train_subset: int = 10000  # labelled train images for probes and kNN bank, seeded subset; 0 = all (paper: ImageNet, 1.28M)
    test_subset: int = 2000  # test images, seeded subset; 0 = all (paper: the 50k ImageNet val images)
    probe_epochs: int = 5  # epochs over the train features (paper: 100)
    probe_lr: float = 0.01  # lr0 of Eq. (15) (paper: .005-.03 per layer, by 3-fold cross-validation)
    probe_wd: float = 1e-5  # weight decay (paper: 1e-5)
    probe_batch: int = 256  # (paper: 256)
    probe_aug: bool = False  # paper variant: RandomResizedCrop+flip every epoch, features recomputed (slow); default: cached
    probe_standardize: bool = True  # BN without affine before the linear layer; --no-probe_standardize = the paper
    knn_layer: str = "fc7"  # kNN feature: fc7 (phi, before ReLU) or a conv layer number 1..13 (pooled as for the probe)
    knn_k: str = "20,200"  # neighbours (common choice: 200)
    knn_tau: float = 0.07  # temperature of the vote weights exp(sim / tau)
    clusters_grid: int = 8  # clusters drawn in 05_eval_clusters.png (0 = no figure)
    voc: str = ""  # voc2007:PATH (PATH/JPEGImages, PATH/ImageSets/Main) to run the VOC07 transfer; empty = skip
    voc_mode: str = "fc6-8"  # fc6-8 (convs frozen) | all (everything trained) | both
    voc_train_split: str = "trainval"  # trainval -> tested on test (paper's report); train -> tested on val (model selection)
    voc_iters: int = 300  # SGD iterations (paper: 150000)
    voc_lr: float = 0.003  # initial lr (paper: 0.003)
    voc_stepsize: int = 100  # lr halved every stepsize iterations (paper: 20000 fc6-8, 10000 all)
    voc_wd: float = 1e-5  # weight decay (paper: 1e-5 fc6-8, 1e-4 all)
    voc_batch: int = 16  # (paper: 16)
    voc_image_size: int = 0  # crop size; 0 = the checkpoint's image_size (paper: 224)
    voc_crops: int = 10  # random crops whose logits are summed at test (paper: 10)
    batch_size: int = 256  # feature-extraction batch
    workers: int = 0  # DataLoader workers
    seed: int = 0  # subsets, shuffles, crops, head init
    device: str = "auto"  # auto = cuda when present


# ---- §9.1 linear probes: pooling to < 10,000 dims, Bottou's lr, SGD on frozen features ----
# The official eval_linear.py hard-codes one kernel per VGG block for a 224 crop (conv1-2, 3-4, 5-7, 8-10, 11-13);
# keyed here by the (channels, height) of conv i's output. The rule below gives the same grids, and the same kernels
# except at conv8-10, where it takes 7 (28 = 4 x 7, the whole map) and the official code 6 (drops the last 4 rows).
POOL_OFFICIAL = {(64, 226): 18, (128, 113): 14, (256, 56): 9, (512, 28): 6, (512, 14): 3}


def probe_pool(C, H, max_dim=10000):
    """Average-pool kernel (= stride) for a (C, H, H) map, and the pooled shape (C, h, h): the largest grid with
    C*h*h < max_dim."""
    k = POOL_OFFICIAL.get((C, H))
    if k is None:
        h = max([H // k for k in range(1, H + 1) if C * (H // k) ** 2 < max_dim], default=1)  # reachable grids H // k
        k = H // h  # the largest kernel giving that grid covers the most of the map
    return k, (C, H // k, H // k)


def bottou_lr(lr0, wd, t):
    """Eq. (15): lr_t = lr0 / sqrt(1 + lr0 * wd * t), t = iterations counted across epochs."""
    return lr0 / (1.0 + lr0 * wd * t) ** 0.5


def train_probe(epoch_batches, dim, n_classes, x_test, y_test, epochs, lr0, wd, standardize=True):
    """One linear layer on frozen features. epoch_batches(e) yields (x (B, dim), y (B,)) for epoch e; top-1 on the test set."""
    # DEVIATION(paper): features standardised by a BN without affine (running mean/std from train), because raw ReLU
    # activations differ in scale by orders of magnitude between layers and one lr0 then converges in a few epochs.
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if standardize else nn.Identity(), nn.Linear(dim, n_classes))
    nn.init.zeros_(probe[1].weight), nn.init.zeros_(probe[1].bias)  # convex problem: start at 0, no RNG needed
    opt = torch.optim.SGD(probe.parameters(), lr=lr0, momentum=0.9, weight_decay=wd)
    t, accs = 0, []
    for e in range(epochs):
        probe.train()
        for x, y in epoch_batches(e):
            if len(y) < 2 and standardize:
                continue  # a last batch of one sample: BN has no batch statistics for it
            for group in opt.param_groups:
                group["lr"] = bottou_lr(lr0, wd, t)  # Eq. (15)
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            t += 1
        probe.eval()
        with torch.no_grad():
            accs.append(sum((probe(x).argmax(1) == y).sum().item() for x, y in
                            zip(x_test.split(4096), y_test.split(4096))) / len(y_test))
    # Reported: the last epoch (choosing the best epoch on the test set, as DeepCluster's author did, is optimistic).
    return {"acc": accs[-1], "acc_per_epoch": accs, "iterations": t, "lr_last": opt.param_groups[0]["lr"],
            "loss_last": loss.item()}


class CropView(torch.utils.data.Dataset):
    """The paper's training crops (flip + RandomResizedCrop: 01_data.train_transform, no rotation) of source[n] = (PIL
    image, target), drawn from rng_for(seed, epoch, n): --probe_aug's epochs, VOC training and VOC's test crops."""
    def __init__(self, source, image_size, seed):
        self.source, self.image_size, self.seed, self.epoch = source, image_size, seed, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, n):
        img, y = self.source[n]
        return data.train_transform(img, self.image_size, data.rng_for(self.seed, self.epoch, n)), y


def pooled(model, x, layers):
    """{layer: (B, D)} in one pass: conv i's ReLU output average-pooled per probe_pool and flattened, and fc7's phi."""
    convs = sorted({int(l) for l in layers if l != "fc7"} | ({13} if "fc7" in layers else set()))
    maps, out = model.conv_outputs(x, convs) if convs else {}, {}
    for i in (l for l in layers if l != "fc7"):
        k, _ = probe_pool(maps[i].shape[1], maps[i].shape[2])  # maps[i]: (B, C, H, H), output of the ReLU after conv i
        out[i] = F.avg_pool2d(maps[i], k, k).flatten(1)  # (B, C, H, H) -> (B, C, h, h) -> (B, C*h*h)
    if "fc7" in layers:  # continue from conv13: pool5 (features[-1], torchvision's indices), fc6, ReLU, Dropout, fc7
        out["fc7"] = model.classifier(model.features[-1](maps[13]).flatten(1))  # (B, d): phi, before its ReLU (§1)
    return out


@torch.no_grad()
def extract(model, batches, layers, device):
    """{layer: (N, D) float32 CPU} over an iterable of (x, _) batches, model in eval mode (BN running stats, no dropout)."""
    model.eval()
    outs = {l: [] for l in layers}
    for x, _ in tqdm(batches, desc=f"features {','.join(map(str, layers))}", leave=False, disable=None):
        for l, f in pooled(model, x.to(device), layers).items():
            outs[l].append(f.float().cpu())
    return {l: torch.cat(v) for l, v in outs.items()}


def layer_groups(model, layers, n, budget=1.5e9):
    """Split layers into groups whose cached features (n images, float32) fit in `budget` bytes: one trunk pass each."""
    with torch.no_grad():
        x = torch.zeros(1, 3, model.image_size, model.image_size, device=next(model.parameters()).device)
        dims = {l: f.shape[1] for l, f in pooled(model.eval(), x, layers).items()}  # {layer: D}
    groups, size = [[]], 0
    for l in layers:
        if groups[-1] and size + 4 * n * dims[l] > budget:
            groups, size = groups + [[]], 0
        groups[-1].append(l)
        size += 4 * n * dims[l]
    return groups


def input_batches(source, image_size, cfg):
    """Center crops (01's clustering transform) of a source, batched; kept in memory when small, so every layer and
    checkpoint reuses them, else streamed."""
    loader = torch.utils.data.DataLoader(data.ClusterDataset(source, image_size), batch_size=cfg.batch_size,
                                         num_workers=cfg.workers)
    return list(loader) if len(source) * 3 * image_size ** 2 * 4 < 1.5e9 else loader


def run_probe(model, layer, x_tr, y_tr, x_te, y_te, n_classes, cfg, device, source=None):
    """Linear probe on one layer from its cached (train, test) features; with --probe_aug, x_tr is unused and the train
    features are recomputed every epoch from new random crops of `source`."""
    t0 = time.time()
    relu = torch.relu if layer == "fc7" else (lambda f: f)  # the fc7 probe reads f = ReLU(phi), like the heads
    if cfg.probe_aug:  # the paper: new random crops every epoch, so the trunk runs every epoch
        view = CropView(source, model.image_size, cfg.seed)
        def epoch_batches(e):
            view.epoch = e
            for x, y in torch.utils.data.DataLoader(view, batch_size=cfg.probe_batch, num_workers=cfg.workers, shuffle=True,
                                                    generator=torch.Generator().manual_seed(cfg.seed * 1000 + e)):
                with torch.no_grad():  # (yield outside the block: a generator would keep grad off for the caller)
                    f = relu(pooled(model.eval(), x.to(device), [layer])[layer]).cpu()
                yield f, y
    else:  # DEVIATION(paper): center-crop features computed once and cached for all epochs, because CPU
        x_tr = relu(x_tr)
        def epoch_batches(e):  # a seeded shuffle per epoch
            order = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(cfg.seed * 1000 + e))
            for idx in order.split(cfg.probe_batch):
                yield x_tr[idx], y_tr[idx]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread synchronisation costs more than it saves (7x slower on a busy 2-core CPU)
    try:
        r = train_probe(epoch_batches, x_te.shape[1], n_classes, relu(x_te), y_te, cfg.probe_epochs, cfg.probe_lr,
                        cfg.probe_wd, cfg.probe_standardize)
    finally:
        torch.set_num_threads(threads)
    return r | {"dim": x_te.shape[1], "seconds": round(time.time() - t0, 2)}


# ---- §9.3 kNN: cosine similarity, weighted vote exp(sim / tau) ----
def knn_predict(bank, bank_y, query, n_classes, ks=(20, 200), tau=0.07, chunk=1024):
    """{k: (Q,) predictions}: class c scores sum_{j in top-k} exp(sim_j / tau) * 1[y_j = c], sim = cosine similarity."""
    bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)  # L2-normalised rows: dot product = cosine
    kmax = min(max(ks), len(bank))
    preds = {k: [] for k in ks}
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # (b, N) -> (b, kmax), most similar first
        w, y = (sim / tau).exp(), bank_y[idx]  # (b, kmax) vote weights and neighbour labels
        for k in ks:
            votes = torch.zeros(len(q), n_classes).scatter_add_(1, y[:, :k], w[:, :k])  # (b, n_classes)
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}


# ---- §9.3 clusters vs labels: NMI Eq. (18), ARI; a grid of images nearest each cluster's centre ----
def flat_clusters(super_, sub):
    """Flat cluster id u * k_s + z (any one-to-one map of the pair gives the same NMI/ARI), with k_s = max z + 1."""
    return super_.astype(np.int64) * (int(sub.max()) + 1) + sub


def cluster_agreement(flat, labels):
    return {"nmi": normalized_mutual_info_score(labels, flat, average_method="geometric"),  # Eq. (18)
            "ari": adjusted_rand_score(labels, flat), "n_clusters": int(len(np.unique(flat)))}


@torch.no_grad()
def cluster_grid(model, source, flat, path, n_clusters, per_row=8, device="cpu", seed=0):
    """For the n largest clusters: the members whose phi is most similar (cosine) to the cluster's mean phi."""
    plt = pyplot()
    ids, sizes = np.unique(flat, return_counts=True)
    top = ids[np.argsort(-sizes, kind="stable")[:n_clusters]]
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(top), per_row, figsize=(per_row * 1.1, len(top) * 1.25), squeeze=False)
    ds = data.ClusterDataset(source, model.image_size)
    for row, c in enumerate(top):
        members = np.flatnonzero(flat == c)
        members = np.sort(rng.choice(members, min(len(members), 256), replace=False))  # a seeded sample of big clusters
        phi = F.normalize(extract(model, [(torch.stack([ds[int(n)][0] for n in members]), None)], ["fc7"], device)["fc7"], dim=1)
        near = members[(phi @ F.normalize(phi.mean(0), dim=0)).argsort(descending=True)[:per_row].numpy()]  # (per_row,)
        labels = source.labels[np.flatnonzero(flat == c)] if source.labels is not None else None
        title = f"cluster {c}, n={int((flat == c).sum())}"
        if labels is not None and source.classes:
            maj = np.bincount(labels).argmax()
            title += f": {(labels == maj).mean():.0%} {source.classes[maj]}"
        for j, ax in enumerate(axes[row]):
            ax.axis("off")
            if j < len(near):
                ax.imshow(source[int(near[j])][0])
        axes[row][0].set_title(title, fontsize=7, loc="left")
    fig.suptitle(f"the {len(top)} largest clusters: members nearest the cluster's mean fc7 feature", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- §9.2 PASCAL VOC 2007 classification: masked BCE Eq. (16), 10-crop test, AP Eq. (17) ----
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
               "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def parse_voc(root, split):
    """(ids [N], targets (N, 20) int64): the files' 1 / -1 / 0 become 1 (present) / 0 (absent) / -1 (difficult, ignored)."""
    ids, cols = None, []
    for c in VOC_CLASSES:
        path = os.path.join(root, "ImageSets", "Main", f"{c}_{split}.txt")
        if not os.path.exists(path):
            raise common.UserError(f"{path} is missing: --voc voc2007:PATH expects the VOCdevkit layout "
                                   f"PATH/JPEGImages and PATH/ImageSets/Main/<class>_{split}.txt")
        rows = dict(line.split()[:2] for line in open(path) if line.strip())  # "000005 -1" -> {"000005": "-1"}
        ids = ids or list(rows)
        if set(rows) != set(ids):
            raise common.UserError(f"{path} lists other images than {VOC_CLASSES[0]}_{split}.txt; is the devkit complete?")
        cols.append([int(rows[i]) for i in ids])
    t = np.array(cols, dtype=np.int64).T  # (N, 20) in {1, -1, 0}
    return ids, np.where(t == 1, 1, np.where(t == -1, 0, -1))


def average_precision(scores, targets):
    """Eq. (17) for one class, non-interpolated, over non-difficult images; ties broken against positives (o - 1e-5 t).
    Equals sklearn's average_precision_score(t, o - 1e-5 t): one precision/recall point per distinct score."""
    keep = targets >= 0
    t = targets[keep].astype(np.float64)
    if t.sum() == 0:
        return float("nan")  # no positive test image: AP undefined, left out of the mAP
    o = scores[keep].astype(np.float64) - 1e-5 * t
    order = np.argsort(-o, kind="stable")
    o, t = o[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(o)), len(o) - 1]  # last index of each distinct score = one threshold
    tp = np.cumsum(t)[last]
    precision, recall = tp / (last + 1), tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))  # sum_i (R_i - R_{i-1}) P_i


def mean_ap(scores, targets):
    """(mAP, [AP_c]) over the columns of scores / targets (N, C): mAP = (1/C) sum_c AP_c, classes without positives left out."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    return float(np.nanmean(aps)), aps


class VOCSource(torch.utils.data.Dataset):
    """voc[j] -> (PIL image, targets (20,) in {1, 0, -1}) for one split of a VOCdevkit folder."""
    def __init__(self, root, split, crop_size=0):
        self.root, self.crop_size, (self.ids, self.targets) = root, crop_size, parse_voc(root, split)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, j):
        with Image.open(os.path.join(self.root, "JPEGImages", self.ids[j] + ".jpg")) as img:
            if self.crop_size:  # small crops: let the JPEG decoder downscale by 2-8 while keeping >= 4x the crop size
                img.draft("RGB", (4 * self.crop_size, 4 * self.crop_size))  # (the crops are drawn in relative units)
            return img.convert("RGB"), torch.as_tensor(self.targets[j])


class VOCNet(nn.Module):
    """Pretrained convs -> pool5 -> fc6, ReLU, Dropout, fc7, ReLU, fc8 (20), all three N(0, 0.01), bias 0.1 (§9.2).
    fc6/fc7 are built afresh rather than re-initialised in place (the same thing), so any crop size fits."""
    def __init__(self, trunk, image_size, generator):
        super().__init__()
        self.trunk = trunk.eval()
        with torch.no_grad():
            c13 = trunk.conv_outputs(torch.zeros(1, 3, image_size, image_size), [13])[13]  # (1, C, H, H)
        d_in, d = c13.shape[1] * (c13.shape[2] // 2) ** 2, trunk.feature_dim
        self.head = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 20))
        for m in self.head:
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01, generator=generator), m.bias.data.fill_(0.1)

    def forward(self, x):
        return self.head(F.max_pool2d(self.trunk.conv_outputs(x, [13])[13], 2).flatten(1))  # pool5 -> (B, C*h*w) -> (B, 20)


def voc_fit(net, train, mode, size, cfg, device):
    """SGD on Eq. (16) for cfg.voc_iters iterations, in place; fc6-8 freezes the convs. -> the last loss."""
    net.trunk.requires_grad_(mode != "fc6-8")  # fc6-8: conv layers (and their BN) frozen; all: trained
    net.trunk.sobel_layer.requires_grad_(False)  # the Sobel filters are fixed in both (PAPER.md §5.3)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.voc_lr, momentum=0.9, weight_decay=cfg.voc_wd)
    view, it = CropView(train, size, cfg.seed), 0
    while it < cfg.voc_iters:
        net.train()  # dropout active (global RNG) ...
        for m in net.trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # ... but BN always uses its running statistics, in both modes
        for x, y in torch.utils.data.DataLoader(view, batch_size=cfg.voc_batch, shuffle=True, num_workers=cfg.workers,
                                                generator=torch.Generator().manual_seed(cfg.seed * 1000 + view.epoch)):
            if it > 0 and it % cfg.voc_stepsize == 0:
                for group in opt.param_groups:
                    group["lr"] *= 0.5  # step decay
            x, y = x.to(device), y.to(device)
            bce = F.binary_cross_entropy_with_logits(net(x), y.clamp(min=0).float(), reduction="none")  # (B, 20)
            loss = (bce * (y >= 0)).sum() / len(y)  # Eq. (16): difficult labels masked out
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            it += 1
            if it == cfg.voc_iters:
                break
        view.epoch += 1
    return loss.item()


def voc_transfer(model, root, mode, cfg, device):
    """Train on voc_train_split (trainval or train), test on test (or val): mAP and AP per class, for fc6-8 or all."""
    t0, size = time.time(), cfg.voc_image_size or model.image_size
    test_split = "test" if cfg.voc_train_split == "trainval" else "val"
    train, test = VOCSource(root, cfg.voc_train_split, size), VOCSource(root, test_split, size)
    net = VOCNet(copy.deepcopy(model).cpu(), size, torch.Generator().manual_seed(cfg.seed)).to(device)
    loss = voc_fit(net, train, mode, size, cfg, device)
    net.eval()
    view, scores = CropView(test, size, cfg.seed + 1), 0
    for view.epoch in range(cfg.voc_crops):  # crop c of image j from rng_for(seed + 1, c, j); logits summed over crops
        with torch.no_grad():
            scores = scores + torch.cat([net(x.to(device)).cpu() for x, _ in torch.utils.data.DataLoader(
                view, batch_size=cfg.batch_size, num_workers=cfg.workers)]).numpy()  # (N, 20)
    m_ap, aps = mean_ap(scores, test.targets)
    return {"map": m_ap, "ap": dict(zip(VOC_CLASSES, aps)), "train": f"{cfg.voc_train_split} ({len(train)})",
            "test": f"{test_split} ({len(test)})", "image_size": size, "iterations": cfg.voc_iters, "loss_last": loss,
            "seconds": round(time.time() - t0, 2)}


# ---- outputs: one summary row per checkpoint, the markdown table, the figures ----
def summary_row(r):
    """The headline numbers of one checkpoint (fractions in [0, 1]; None when not measured)."""
    probe, knn, cl = r.get("probe", {}), r.get("knn", {}), r.get("clusters", {})
    convs = {l: v["acc"] for l, v in probe.items() if l != "fc7"}
    best = max(convs, key=convs.get) if convs else None
    return {"checkpoint": r["name"], "method": r["method"], "knn20": knn.get("20"), "knn200": knn.get("200"),
            "probe_best": convs.get(best), "probe_best_layer": best, "probe_fc7": probe.get("fc7", {}).get("acc"),
            "probe_layers": {l: v["acc"] for l, v in probe.items()}, "nmi_labels": cl.get("nmi"), "ari_labels": cl.get("ari"),
            "voc_map": {m: v["map"] for m, v in r.get("voc", {}).items()}}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(rows, cfg, spec, sizes=None):
    voc = [m for m in ("fc6-8", "all") if any(m in row["voc_map"] for row in rows)]
    lines = ["| checkpoint | method | kNN@20 | kNN@200 | best conv probe (layer) | fc7 probe | NMI vs labels | ARI |" +
             "".join(f" VOC07 mAP {m} |" for m in voc), "|---" * (8 + len(voc)) + "|"]
    for w in rows:
        best = f"{pct(w['probe_best'])} (conv{w['probe_best_layer']})" if w["probe_best_layer"] else "-"
        cells = [w["checkpoint"], w["method"], pct(w["knn20"]), pct(w["knn200"]), best, pct(w["probe_fc7"])]
        cells += ["-" if w[k] is None else f"{w[k]:.3f}" for k in ("nmi_labels", "ari_labels")]
        lines.append("| " + " | ".join(cells + [pct(w["voc_map"].get(m)) for m in voc]) + " |")
    return "\n".join(lines) + (f"\n\nTop-1 % on the {spec} test split ({sizes[1] if sizes else '-'} images). Linear probes: "
                               f"{cfg.probe_epochs} epochs, lr0 {cfg.probe_lr}, {sizes[0] if sizes else '-'} train images, "
                               f"{'random crops' if cfg.probe_aug else 'cached center crops'}. kNN on {cfg.knn_layer}, "
                               f"tau {cfg.knn_tau}. NMI (Eq. (18)) / ARI: the checkpoint's last clusters u*k_s+z vs the "
                               f"true classes.\n")


def layer_keys(probe_layers):
    """The probed layers of one summary row, shallow to deep ("2", ..., "13", "fc7"), and their display names."""
    keys = sorted(probe_layers, key=lambda l: 99 if l == "fc7" else int(l))
    return keys, [k if k == "fc7" else f"conv{k}" for k in keys]


def layers_table(rows):
    """Linear-probe top-1 per layer, one row per checkpoint, then each later checkpoint minus the first one (in the demo:
    trained minus random init). The "best conv" column above compares different layers (random init often peaks at
    conv2, trained features deeper); this table shows the gain at every depth, the paper's per-layer view."""
    w0 = next((w for w in rows if w["probe_layers"]), None)
    if w0 is None:
        return ""
    keys, names = layer_keys(w0["probe_layers"])
    lines = ["| checkpoint | " + " | ".join(names) + " |", "|---" * (1 + len(keys)) + "|"]
    for w in rows:
        lines.append(f"| {w['checkpoint']} | " + " | ".join(pct(w["probe_layers"].get(k)) for k in keys) + " |")
    for w in rows:
        if w is not w0 and w["probe_layers"]:
            d = [w["probe_layers"].get(k) - w0["probe_layers"][k] if k in w["probe_layers"] else None for k in keys]
            lines.append(f"| {w['checkpoint']} minus {w0['checkpoint']} | " +
                         " | ".join("-" if v is None else f"{100 * v:+.1f}" for v in d) + " |")
    return "\nLinear probe top-1 % per layer:\n\n" + "\n".join(lines) + "\n"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_layers(rows, path):
    """Linear-probe top-1 per layer, one line per checkpoint: the small-scale counterpart of the paper's per-layer figure."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for w in (w for w in rows if w["probe_layers"]):
        keys, names = layer_keys(w["probe_layers"])
        ax.plot(names, [100 * w["probe_layers"][k] for k in keys], "o-",
                label=f"{w['checkpoint']} ({w['method']})")
    ax.set(ylabel="linear probe top-1 (%)", title="linear probe per layer (PAPER.md §9.1)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(log_path, path):
    """04_train_curves.png redrawn from 04_train_log.jsonl by 04's own plot (loss, accuracies, NMI and ARI panels)."""
    log = [json.loads(line) for line in open(log_path) if line.strip()]
    importlib.import_module("04_train").plot_curves([{"epoch": i} | e for i, e in enumerate(log)], path)  # keys may be missing


# ---- loading: checkpoints (ours or official) and the labelled sources ----
def load_checkpoint(path, sobel):
    """(model, meta). The checkpoint's arch decides Sobel; --sobel on/off that disagrees is an error (PAPER §11 pitfall 7)."""
    if not os.path.exists(path):
        stage = "04_train.py" if "04_train" in path else "02_model.py" if "02_model" in path else "the stage that writes it"
        raise common.UserError(f"{path} does not exist: run {stage} first (or pass --ckpt)")
    model, _ = model_lib.load_trunk(path)  # ours or the official layout; unreadable files fail here, naming the file
    ck = torch.load(path, map_location="cpu", weights_only=True)  # ours also carry config, method and assignments
    ck = ck if ck.get("format") == common.FORMAT else {}
    if sobel != "auto" and (sobel == "on") != bool(model.sobel):
        raise common.UserError(f"--sobel {sobel}, but {path} was built with sobel={bool(model.sobel)}; its arch decides: "
                               f"drop --sobel or pass --sobel {'on' if model.sobel else 'off'}")
    cfg = ck.get("config", {})
    method = {"02_model": "random init", "04_train": ck.get("method") or cfg.get("method", "?")}.get(ck.get("stage"), "official")
    if ck.get("stage") == "04_train" and "epoch" in ck:
        method += f" (epoch {ck['epoch']})"
    return model, {"stage": ck.get("stage", "official"), "method": method, "config": cfg, "super": ck.get("super"),
                   "sub": ck.get("sub")}


def labelled_sources(spec, cfg):
    """(train, test) seeded subsets of the source's two splits; test is None when the source has no test split."""
    train = data.make_source(spec, "train", subset=cfg.train_subset or None, seed=cfg.seed)
    try:
        return train, data.make_source(spec, "test", subset=cfg.test_subset or None, seed=cfg.seed)
    except common.UserError as e:  # e.g. an unlabelled folder or yfcc100m: no probes then
        common.log(f"{spec}: no test split ({e})")
        return train, None


def parse_layers(spec):
    named = {"best": "2,4,7,10,13,fc7", "all": ",".join(map(str, range(1, 14))) + ",fc7", "none": ""}
    layers = [l.strip() for l in named.get(spec, spec).split(",") if l.strip()]
    bad = [l for l in layers if l != "fc7" and not (l.isdigit() and 1 <= int(l) <= 13)]
    if bad:
        raise common.UserError(f"--layers {spec}: {bad} not understood; use best, all, none or a comma list of 1..13 and fc7")
    return [l if l == "fc7" else int(l) for l in layers]


# ---- main: every checkpoint -> probes, kNN, clusters, VOC -> json, table, figures ----
def feature_evals(model, ins, layers, knn_layer, ks, cfg, device):
    """Linear probes on every layer and kNN on one, for one trunk; ins: the labelled sources and their center crops.
    One trunk pass extracts a whole group of layers (the default group holds them all)."""
    (b_tr, y_tr), (b_te, y_te) = (ins["b_tr"], ins["y_tr"]), (ins["b_te"], ins["y_te"])
    n_classes, probes, knn, todo = int(max(y_tr.max(), y_te.max())) + 1, {}, {}, layers + [knn_layer] * (knn_layer not in layers)
    for group in layer_groups(model, todo, len(y_tr) + len(y_te)):
        t0 = time.time()
        f_tr, f_te = extract(model, b_tr, group, device), extract(model, b_te, group, device)
        seconds = (time.time() - t0) / len(group)  # extraction time, shared out over the group's layers
        common.log(f"features of {group}: {time.time() - t0:.1f} s for {len(y_tr)} + {len(y_te)} images")
        for l in group:
            if l == knn_layer:
                t0 = time.time()
                preds = knn_predict(f_tr[l], y_tr, f_te[l], n_classes, ks, cfg.knn_tau)
                knn = {str(k): (p == y_te).float().mean().item() for k, p in preds.items()}
                knn |= {"layer": str(l), "tau": cfg.knn_tau, "seconds": round(time.time() - t0 + seconds, 2)}
                common.log(f"kNN on {l}: " + ", ".join(f"k={k} {pct(knn[str(k)])}%" for k in ks) + f" ({knn['seconds']} s)")
            if l in layers:
                probes[str(l)] = p = run_probe(model, l, f_tr[l], y_tr, f_te[l], y_te, n_classes, cfg, device, ins["tr"])
                p["seconds"] = round(p["seconds"] + seconds, 2)
                common.log(f"probe {l if l == 'fc7' else f'conv{l}'}: top-1 {pct(p['acc'])}% (dim {p['dim']}, {p['seconds']} s)")
            del f_tr[l], f_te[l]  # free each layer's features once used
    return probes, knn


def cluster_evals(model, meta, spec, path_png, cfg, device):
    """NMI/ARI of a 04 checkpoint's last assignments vs labels, on the source 04 trained on (same spec, subset, seed)."""
    c = meta["config"]
    src = data.make_source(c.get("data", spec), "train", subset=c.get("subset") or None, seed=c.get("seed", 0))
    flat = flat_clusters(meta["super"].numpy(), meta["sub"].numpy())
    if len(flat) != len(src):
        return {"skipped": f"{len(flat)} assignments but {len(src)} images in the rebuilt source {c.get('data', spec)}"}
    if path_png:
        cluster_grid(model, src, flat, path_png, cfg.clusters_grid, device=device, seed=cfg.seed)
        common.log(f"wrote {path_png}")
    return cluster_agreement(flat, src.labels) if src.labels is not None else {"n_clusters": int(len(np.unique(flat)))}


def main(cfg):
    common.log(f"05_eval config: {asdict(cfg)}")
    device, out = common.pick_device(cfg.device), cfg.out_dir
    os.makedirs(out, exist_ok=True)
    for flag, value, valid in (("sobel", cfg.sobel, ("auto", "on", "off")), ("voc_mode", cfg.voc_mode, ("fc6-8", "all", "both"))):
        if value not in valid:
            raise common.UserError(f"--{flag} {value}: use one of {', '.join(valid)}")
    layers, ks = parse_layers(cfg.layers), [int(k) for k in cfg.knn_k.split(",")]
    knn_layer = cfg.knn_layer if cfg.knn_layer == "fc7" else parse_layers(cfg.knn_layer)[0]
    default = [f"{out}/02_model_init.pt", f"{out}/04_train_last.pt"]  # random init vs trained, when they exist
    paths = cfg.ckpt.split(",") if cfg.ckpt else [p for p in default if os.path.exists(p)]
    if not paths:
        raise common.UserError(f"no checkpoint in {out}: run 02_model.py (random init) and 04_train.py --out_dir {out}, "
                               f"or pass --ckpt")
    if not cfg.ckpt and len(paths) == 1:
        common.log(f"only {paths[0]}: run 04_train.py --out_dir {out} (or 02_model.py) to compare random init and trained")
    voc_root = cfg.voc.split(":", 1)[1] if cfg.voc.startswith("voc2007:") else None
    if cfg.voc and not (voc_root and os.path.isdir(os.path.join(voc_root, "JPEGImages"))):
        raise common.UserError(f"--voc {cfg.voc}: expected voc2007:PATH with PATH/JPEGImages and PATH/ImageSets/Main")
    loaded = [load_checkpoint(path, cfg.sobel) for path in paths]  # every file and --sobel checked before any work
    # one labelled source for every checkpoint: --data, else the data a 04 checkpoint was trained on
    spec = cfg.data or next((m["config"]["data"] for _, m in loaded if m["config"].get("data")), "fashion-mnist")
    results, cache, grid_png = [], {}, f"{out}/05_eval_clusters.png" if cfg.clusters_grid else None
    for path, (model, meta) in zip(paths, loaded):
        t0, model = time.time(), model.to(device).eval()
        r = {"checkpoint": path, "name": os.path.basename(path), "method": meta["method"], "arch": model.arch(), "data": spec}
        common.log(f"== {path}: {meta['method']}, arch {model.arch()}")
        key = (spec, model.image_size)  # center crops shared by every checkpoint with the same data and image size
        if key not in cache:
            tr, te = labelled_sources(spec, cfg)
            cache[key] = {"tr": tr}
            if te is not None and tr.labels is not None and te.labels is not None:
                cache[key] |= {"y_tr": torch.as_tensor(tr.labels), "y_te": torch.as_tensor(te.labels),
                               "b_tr": input_batches(tr, model.image_size, cfg), "b_te": input_batches(te, model.image_size, cfg)}
            common.log(f"{spec}: {len(tr)} train / {len(te) if te is not None else 0} test images, {time.time() - t0:.1f} s")
        if "b_tr" in cache[key]:
            r["probe"], r["knn"] = feature_evals(model, cache[key], layers, knn_layer, ks, cfg, device)
        else:
            common.log(f"{spec} has no labelled test split: no probes, no kNN")
        if meta["super"] is not None and meta["method"].split()[0] in ("deepcluster", "deepercluster"):  # rotnet: 1 cluster
            r["clusters"] = cluster_evals(model, meta, spec, grid_png, cfg, device)
            grid_png = None  # one figure: the first checkpoint with assignments
            common.log(f"clusters vs labels: {r['clusters']}")
        for mode in (["fc6-8", "all"] if cfg.voc_mode == "both" else [cfg.voc_mode]) if voc_root else []:
            r.setdefault("voc", {})[mode] = v = voc_transfer(model, voc_root, mode, cfg, device)
            common.log(f"VOC07 {mode}: mAP {pct(v['map'])}% ({v['seconds']} s)")
        results.append(r | {"seconds": round(time.time() - t0, 1)})
    rows = [summary_row(r) for r in results]
    sizes = next(((len(c["y_tr"]), len(c["y_te"])) for c in cache.values() if "y_tr" in c), None)
    table = markdown_table(rows, cfg, spec, sizes) + layers_table(rows)
    written = [common.save_json({"config": asdict(cfg), "rows": rows, "results": results}, f"{out}/05_eval.json"),
               common.save_text(table, f"{out}/05_eval.md")]
    if any(w["probe_layers"] for w in rows):
        plot_layers(rows, f"{out}/05_eval_layers.png")
        written.append(f"{out}/05_eval_layers.png")
    if os.path.exists(f"{out}/04_train_log.jsonl"):
        plot_curves(f"{out}/04_train_log.jsonl", f"{out}/04_train_curves.png")
        written.append(f"{out}/04_train_curves.png")
    common.log("wrote " + ", ".join(written) + "\n\n" + table)


if __name__ == "__main__":
    common.run(main, Config)
