"""Stage 5: judge the frozen features: linear probes per conv layer, kNN, clusters vs labels, VOC07.

Unsupervised features are only as good as their transfer. The paper trains one linear classifier on
each frozen conv layer (average-pooled below 10,000 dims) and fine-tunes on PASCAL VOC 2007
("fc6-8": convs frozen, "all": everything trained, each with its own weight decay and step size).
We add kNN and the NMI/ARI of the clusters against the labels, and compare checkpoints layer by
layer (trained minus random init). Features: conv i = the ReLU output after conv i, pooled;
"fc7" = ReLU(phi) for the probe (what the heads see), phi (the clustered feature, §4.1) for kNN.

Paper:  PAPER.md §9.1 (probes, Eq. (15)), §9.3 (kNN, NMI Eq. (18)), §9.2 (VOC07, Eq. (16)-(17)),
        §11 pitfall 7 (Sobel).
Reads:  <out_dir>/02_model_init.pt and 04_train_last.pt, or --ckpt (ours or an official file);
        the labelled --data; --voc voc2007:PATH (VOCdevkit layout).
Writes: <out_dir>/05_eval.json (every number and its settings), 05_eval.md (per-layer table and
        summary), 05_eval_layers.png (probe per layer), 05_eval_clusters.png (largest clusters).
Run:    python 05_eval.py --out_dir out/demo                       # random init vs trained
        python 05_eval.py --out_dir out/demo --layers all --ckpt out/demo/04_train_ep009.pt
        python 05_eval.py --ckpt dc.pth --voc voc2007:VOCdevkit/VOC2007 --voc_mode both
        (one process: at small scale every evaluation here is cheap next to training)
Uses:   01_data.train_transform / rng_for / ClusterDataset, 02_model.VGG.conv_outputs /
        method_shape; support/evalio.py (flags, checkpoints, labelled crops, tables, figures).
"""
import copy
import importlib
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from support import clusterstats, common  # flat cluster ids, NMI (Eq. (18)) and ARI
from support import evalio  # 05's inputs (flags, checkpoints, VOC files), outputs (tables, figures)

data = importlib.import_module("01_data")  # 01_data.py: sources, transforms, per-sample generators
m02 = importlib.import_module("02_model")  # 02_model.py: method_shape (which methods cluster)


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder with the 02/04 outputs; 05 writes here too
    ckpt: str = ""  # comma list of checkpoints; default: out_dir/02_model_init.pt,04_train_last.pt
    data: str = ""  # labelled source (01_data spec); default: the checkpoint's, or fashion-mnist
    sobel: str = "auto"  # auto|on|off: the checkpoint decides; on/off asserts it (§11 pitfall 7)
    layers: str = "best"  # best (2,4,7,10,13,fc7), all (1..13,fc7), none, or a comma list
    train_subset: int = 10000  # labelled train images (seeded subset); 0 = all (paper: 1.28M)
    test_subset: int = 2000  # test images (seeded subset); 0 = all (paper: 50k ImageNet val)
    probe_epochs: int = 5  # epochs over the train features (paper: 100)
    probe_lr: float = 0.01  # lr0 of Eq. (15) (paper: .005-.03 per layer, 3-fold cross-validation)
    probe_wd: float = 1e-5  # weight decay (paper: 1e-5)
    probe_batch: int = 256  # (paper: 256)
    probe_aug: bool = False  # paper: new RandomResizedCrop+flip every epoch (slow); default: cached
    probe_standardize: bool = True  # BN without affine before the linear layer; --no-... = paper
    knn_layer: str = "fc7"  # fc7 (phi) or convs 1..13, pooled as for probes; comma list, 1st leads
    knn_k: str = "20,200"  # neighbours, comma list (common choice: 200)
    knn_tau: float = 0.07  # temperature of the vote weights exp(sim / tau)
    clusters_grid: int = 8  # clusters drawn in 05_eval_clusters.png (0 = no figure)
    voc: str = ""  # voc2007:PATH (PATH/JPEGImages, PATH/ImageSets/Main) runs VOC07; empty = skip
    voc_mode: str = "fc6-8"  # fc6-8 (convs frozen) | all (everything trained) | both
    voc_train_split: str = "trainval"  # trainval (tested on test: report) | train (on val: tuning)
    voc_iters: int = 300  # SGD iterations per mode (paper: 150000)
    voc_lr: float = 0.003  # initial lr (paper: 0.003)
    voc_stepsize_fc68: int = 40  # fc6-8: lr halved every N iterations (paper: 20000; x 300/150000)
    voc_stepsize_all: int = 20  # all: lr halved every N iterations (paper: 10000; x 300/150000)
    voc_wd_fc68: float = 1e-5  # fc6-8: weight decay (paper: 1e-5)
    voc_wd_all: float = 1e-4  # all: weight decay (paper: 1e-4)
    voc_batch: int = 16  # (paper: 16)
    voc_image_size: int = 0  # crop size, 0 or >= 32; 0 = the checkpoint's image_size (paper: 224)
    voc_crops: int = 10  # random crops whose logits are summed at test (paper: 10)
    batch_size: int = 256  # feature-extraction batch
    feature_gb: float = 1.5  # memory for cached features; above it, one trunk pass per layer group
    workers: int = 0  # DataLoader worker processes (0 = in the main process)
    seed: int = 0  # subsets, shuffles, crops, head init
    device: str = "auto"  # auto = cuda when present


# ---- §9.1 linear probes: pooling below 10,000 dims, Bottou's lr, SGD on frozen features ----
# The official code hard-codes one kernel per VGG block for a 224 crop, keyed here by the
# (channels, height) of conv i's output. The rule in probe_pool gives the same grids, and the same
# kernels except at conv8-10: 7 there (28 = 4 x 7), 6 in the official code (drops the last 4 rows).
POOL_OFFICIAL = {(64, 226): 18, (128, 113): 14, (256, 56): 9, (512, 28): 6, (512, 14): 3}


def probe_pool(C, H, max_dim=10000):
    """(kernel = stride, (C, h, h)) for a (C, H, H) map: the largest grid h with C*h*h < max_dim."""
    k = POOL_OFFICIAL.get((C, H))
    if k is None:
        h = max([H // k for k in range(1, H + 1) if C * (H // k) ** 2 < max_dim], default=1)
        k = H // h  # the largest kernel giving that grid covers the most of the map
    return k, (C, H // k, H // k)


def pooled(model, x, layers):
    """{layer: (B, D)} in one trunk pass: conv i's ReLU output pooled per probe_pool; fc7's phi."""
    convs = {int(l) for l in layers if l != "fc7"} | ({13} if "fc7" in layers else set())
    maps = model.conv_outputs(x, sorted(convs)) if convs else {}  # {i: (B, C, H, H)}
    out = {}
    for i in (l for l in layers if l != "fc7"):
        k, _ = probe_pool(maps[i].shape[1], maps[i].shape[2])
        out[i] = F.avg_pool2d(maps[i], k, k).flatten(1)  # (B, C, H, H) -> (B, C, h, h) -> (B, Chh)
    if "fc7" in layers:  # from conv13: pool5 (features[-1]), then fc6, ReLU, Dropout, fc7
        out["fc7"] = model.classifier(model.features[-1](maps[13]).flatten(1))  # (B, d): phi
    return out


@torch.no_grad()
def extract(model, batches, layers, device):
    """{layer: (N, D) float32 on device} of (x, _) batches in eval mode (BN's running stats)."""
    outs = {l: [] for l in layers}
    for x, _ in tqdm(batches, desc=f"features {layers}", leave=False, disable=None):
        for l, f in pooled(model.eval(), x.to(device, non_blocking=True), layers).items():
            outs[l].append(f.float())
    return {l: torch.cat(v) for l, v in outs.items()}


def bottou_lr(lr0, wd, t):
    """Eq. (15): lr_t = lr0 / sqrt(1 + lr0 * wd * t), t = iterations counted across epochs."""
    return lr0 / (1.0 + lr0 * wd * t) ** 0.5


def train_probe(epoch_batches, dim, n_classes, x_test, y_test, epochs, lr0, wd, standardize=True):
    """One linear layer on frozen features, on their device; epoch_batches(e) yields (x, y)."""
    # DEVIATION(paper): inputs standardised by a BN without affine (train running mean/std), because
    # raw ReLU activations differ in scale by orders of magnitude between layers: one lr0 fits all.
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if standardize else nn.Identity(),
                          nn.Linear(dim, n_classes)).to(x_test.device)
    nn.init.zeros_(probe[1].weight)  # a convex problem: start at 0, no RNG needed
    nn.init.zeros_(probe[1].bias)
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
        with torch.no_grad():
            hits = [(probe.eval()(x).argmax(1) == y).sum() for x, y in
                    zip(x_test.split(4096), y_test.split(4096))]
        accs.append(sum(hits).item() / len(y_test))
    # DEVIATION(paper): the last epoch is reported, because picking the best one on the test set
    # (as DeepCluster's author did, PAPER.md §9.1) is optimistic.
    return {"acc": accs[-1], "acc_per_epoch": accs, "iterations": t,
            "lr_last": opt.param_groups[0]["lr"], "loss_last": loss.item()}


class CropView(torch.utils.data.Dataset):
    """Training crops (flip + RandomResizedCrop, no rotation) of source[n] = (PIL image, target)
    from rng_for(seed, epoch, n): the epochs of --probe_aug, VOC training and VOC's test crops."""
    def __init__(self, source, image_size, seed):
        self.source, self.image_size, self.seed, self.epoch = source, image_size, seed, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, n):
        img, y = self.source[n]
        return data.train_transform(img, self.image_size, data.rng_for(self.seed, self.epoch, n)), y


def run_probe(model, layer, x_tr, y_tr, x_te, y_te, n_classes, cfg, device, source=None):
    """A probe on one layer from cached features; with --probe_aug the train features come from new
    random crops of `source` every epoch (x_tr unused)."""
    t0 = time.time()
    relu = torch.relu if layer == "fc7" else (lambda f: f)  # the fc7 probe reads ReLU(phi)
    seeded = lambda e: torch.Generator().manual_seed(cfg.seed * 1000 + e)  # a shuffle per epoch
    if cfg.probe_aug:  # the paper: new random crops every epoch, so the trunk runs every epoch
        view = CropView(source, model.image_size, cfg.seed)
        def epoch_batches(e):
            view.epoch = e
            for x, y in torch.utils.data.DataLoader(view, cfg.probe_batch, shuffle=True,
                                                    num_workers=cfg.workers, generator=seeded(e)):
                with torch.no_grad():  # (yield outside: the caller's backward needs grad mode)
                    f = pooled(model.eval(), x.to(device), [layer])[layer]
                yield relu(f), y.to(device)
    else:  # DEVIATION(paper): center-crop features cached for all epochs, because CPU
        x_tr = relu(x_tr)
        def epoch_batches(e):
            for idx in torch.randperm(len(y_tr), generator=seeded(e)).split(cfg.probe_batch):
                yield x_tr[idx], y_tr[idx]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU: tiny ops, threads cost more than they save (4-8x, busy 2 cores)
    r = train_probe(epoch_batches, x_te.shape[1], n_classes, relu(x_te), y_te, cfg.probe_epochs,
                    cfg.probe_lr, cfg.probe_wd, cfg.probe_standardize)
    torch.set_num_threads(threads)
    return r | {"dim": x_te.shape[1], "seconds": round(time.time() - t0, 2)}


# ---- §9.3 kNN (cosine similarity, vote weights exp(sim / tau)); clusters vs labels, Eq. (18) ----
def knn_predict(bank, bank_y, query, n_classes, ks=(20, 200), tau=0.07, chunk=1024):
    """{k: (Q,) predictions}: class c scores sum_{j in top-k} exp(sim_j / tau) 1[y_j = c]."""
    bank, query = F.normalize(bank, dim=1), F.normalize(query, dim=1)  # dot product = cosine
    kmax = min(max(ks), len(bank))
    preds = {k: [] for k in ks}
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(kmax, dim=1)  # (b, N) -> (b, kmax), most similar first
        w, y = (sim / tau).exp(), bank_y[idx]  # (b, kmax) vote weights and neighbour labels
        for k in ks:
            votes = q.new_zeros(len(q), n_classes).scatter_add_(1, y[:, :k], w[:, :k])  # (b, C)
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}


def has_clusters(method):
    """Whether a checkpoint's method ('deepcluster-2level (epoch 3)') trains on clusters of its own:
    deepercluster, deepcluster, deepcluster-2level (PAPER.md §8); rotnet and supervised do not."""
    name = method.split()[0]
    return name in m02.METHODS and m02.method_shape(name, 1, 1)["cluster"]


# ---- §9.2 PASCAL VOC 2007: masked BCE Eq. (16), 10 random crops at test, AP Eq. (17) ----
VOC_TEST_SPLIT = {"trainval": "test", "train": "val"}  # the only pairs: report, and model selection


class VOCNet(nn.Module):
    """Convs -> pool5 -> fc6, ReLU, Dropout, fc7, ReLU, fc8 (20); all three N(0, 0.01), bias 0.1.
    fc6/fc7 are built afresh (the same as re-initialised in place), so any crop size fits."""
    def __init__(self, trunk, image_size, generator):
        super().__init__()
        self.trunk = trunk.eval()
        with torch.no_grad():
            c13 = trunk.conv_outputs(torch.zeros(1, 3, image_size, image_size), [13])[13]
        d_in, d = c13.shape[1] * (c13.shape[2] // 2) ** 2, trunk.feature_dim  # c13: (1, C, H, H)
        self.head = nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 20))
        for m in (self.head[0], self.head[3], self.head[5]):  # fc6, fc7, fc8
            m.weight.data.normal_(0, 0.01, generator=generator)
            m.bias.data.fill_(0.1)

    def forward(self, x):
        pool5 = F.max_pool2d(self.trunk.conv_outputs(x, [13])[13], 2).flatten(1)  # (B, C*h*w)
        return self.head(pool5)  # (B, 20)


def voc_fit(net, train, mode, size, cfg, device):
    """SGD on Eq. (16) for cfg.voc_iters iterations with the mode's own weight decay and step size;
    fc6-8 freezes the convs. In place; -> {loss_last, lr_last, wd, stepsize}."""
    wd = {"fc6-8": cfg.voc_wd_fc68, "all": cfg.voc_wd_all}[mode]
    stepsize = {"fc6-8": cfg.voc_stepsize_fc68, "all": cfg.voc_stepsize_all}[mode]
    net.trunk.requires_grad_(mode == "all")  # fc6-8: conv layers (and their BN) frozen
    net.trunk.sobel_layer.requires_grad_(False)  # the Sobel filters are fixed in both (§5.3)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.voc_lr, momentum=0.9, weight_decay=wd)
    view, it = CropView(train, size, cfg.seed), 0
    while it < cfg.voc_iters:
        net.head.train()  # dropout active (global RNG) ...
        net.trunk.eval()  # ... but BN keeps its running statistics, in both modes
        g = torch.Generator().manual_seed(cfg.seed * 1000 + view.epoch)
        for x, y in torch.utils.data.DataLoader(view, cfg.voc_batch, shuffle=True, generator=g,
                                                num_workers=cfg.workers):
            lr = cfg.voc_lr * 0.5 ** (it // stepsize)  # halved every stepsize iterations
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = x.to(device), y.to(device)  # y: (B, 20) in {1, 0, -1}
            bce = F.binary_cross_entropy_with_logits(net(x), y.clamp(min=0).float(),
                                                     reduction="none")  # (B, 20)
            loss = (bce * (y >= 0)).sum() / len(y)  # Eq. (16): difficult labels masked out
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            it += 1
            if it == cfg.voc_iters:
                break
        view.epoch += 1
    return {"loss_last": loss.item(), "lr_last": lr, "wd": wd, "stepsize": stepsize}


def average_precision(scores, targets):
    """Eq. (17) for one class, non-interpolated, over non-difficult images; ties broken against
    positives (o - 1e-5 t). Equals sklearn's average_precision_score(t, o - 1e-5 t)."""
    keep = targets >= 0
    t = targets[keep].astype(np.float64)
    if t.sum() == 0:
        return float("nan")  # no positive test image: AP undefined, left out of the mAP
    o = scores[keep].astype(np.float64) - 1e-5 * t
    order = np.argsort(-o, kind="stable")
    o, t = o[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(o)), len(o) - 1]  # last index of each distinct score
    tp = np.cumsum(t)[last]
    precision, recall = tp / (last + 1), tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))  # Eq. (17)


def mean_ap(scores, targets):
    """(mAP, [AP_c]) over the columns of (N, C) arrays; classes without positives left out."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    return float(np.nanmean(aps)), aps


def voc_transfer(model, root, mode, cfg, device):
    """Train on trainval (or train), test on test (or val): mAP and AP per class, fc6-8 or all."""
    t0, size = time.time(), cfg.voc_image_size or model.image_size
    split = VOC_TEST_SPLIT[cfg.voc_train_split]
    train = evalio.VOCSource(root, cfg.voc_train_split, size)  # (PIL image, targets (20,))
    test = evalio.VOCSource(root, split, size)
    net = VOCNet(copy.deepcopy(model).cpu(), size, torch.Generator().manual_seed(cfg.seed))
    fit = voc_fit(net.to(device), train, mode, size, cfg, device)
    view, scores = CropView(test, size, cfg.seed + 1), 0
    for view.epoch in range(cfg.voc_crops):  # crop c of image j from rng_for(seed + 1, c, j)
        with torch.no_grad():  # logits summed over the crops: (N, 20)
            loader = torch.utils.data.DataLoader(view, cfg.batch_size, num_workers=cfg.workers)
            scores = scores + torch.cat([net.eval()(x.to(device)).cpu() for x, _ in loader]).numpy()
    m_ap, aps = mean_ap(scores, test.targets)
    return fit | {"map": m_ap, "ap": dict(zip(evalio.VOC_CLASSES, aps)), "image_size": size,
                  "train": f"{cfg.voc_train_split} ({len(train)})", "iterations": cfg.voc_iters,
                  "test": f"{split} ({len(test)})", "seconds": round(time.time() - t0, 2)}


# ---- main: every checkpoint -> probes and kNN, clusters vs labels, VOC07 -> evalio.py ----
def feature_evals(model, ins, layers, knn_layers, ks, cfg, device):
    """§9.1 probes on every layer and §9.3 kNN on each knn layer, for one trunk, from features
    cached on `device`. -> (probes, {knn layer: {k: accuracy}})."""
    y_tr, y_te = ins["y_tr"].to(device), ins["y_te"].to(device)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    x0 = torch.zeros(1, 3, model.image_size, model.image_size, device=device)
    with torch.no_grad():
        want = layers + [l for l in knn_layers if l not in layers]
        dims = {l: f.shape[1] for l, f in pooled(model.eval(), x0, want).items()}
    probes, knn = {}, {}
    for chunk in evalio.layer_chunks(dims, len(y_tr) + len(y_te), cfg.feature_gb * 1e9):
        t0 = time.time()
        f_tr = extract(model, ins["b_tr"], chunk, device)  # {layer: (N_train, D)}
        f_te = extract(model, ins["b_te"], chunk, device)  # {layer: (N_test, D)}
        common.log(f"features of {chunk}: {time.time() - t0:.1f} s ({len(y_tr)} + {len(y_te)})")
        for kl in (l for l in knn_layers if l in chunk):
            preds = knn_predict(f_tr[kl], y_tr, f_te[kl], n_classes, ks, cfg.knn_tau)
            acc = {str(k): (p == y_te).float().mean().item() for k, p in preds.items()}
            common.log(f"kNN on {evalio.layer_name(kl)}: "
                       + ", ".join(f"k={k} {evalio.pct(acc[str(k)])}%" for k in ks))
            knn[str(kl)] = acc | {"layer": str(kl), "tau": cfg.knn_tau}
        for l in (l for l in chunk if l in layers):
            probes[str(l)] = p = run_probe(model, l, f_tr[l], y_tr, f_te[l], y_te, n_classes, cfg,
                                           device, ins["source"])
            common.log(f"probe {evalio.layer_name(l)}: top-1 {evalio.pct(p['acc'])}% "
                       f"(dim {p['dim']}, {p['seconds']} s)")
    return probes, knn


def cluster_evals(model, meta, spec, png, cfg, device):
    """Eq. (18): NMI/ARI of a 04 checkpoint's last clusters vs labels, on the images clustered."""
    src = evalio.clustered_source(meta, spec)
    flat = clusterstats.flat_ids(meta["super"].numpy(), meta["sub"].numpy())
    if len(flat) != len(src):
        return {"skipped": f"{len(flat)} assignments, {len(src)} images in {src.spec}"}
    if png:  # the figure: members nearest each cluster's mean phi
        phi = lambda x: extract(model, [(x, None)], ["fc7"], device)["fc7"].cpu()  # (n, d)
        evalio.cluster_grid(src, data.ClusterDataset(src, model.image_size), flat, png,
                            cfg.clusters_grid, phi, seed=cfg.seed)
    if src.labels is None:
        return {"n_clusters": len(np.unique(flat))}
    return clusterstats.agreement(flat, src.labels)  # Eq. (18)


def main(cfg):
    common.log(f"05_eval config: {asdict(cfg)}")
    layers, knn_layers, ks, voc_root = evalio.check_flags(cfg, VOC_TEST_SPLIT)
    device = common.init_dist(cfg.device)[2]  # one process; on CUDA: TF32, cuDNN's autotuner
    paths, loaded, spec = evalio.load_checkpoints(cfg)  # all checked before any work
    png = f"{cfg.out_dir}/05_eval_clusters.png" if cfg.clusters_grid else None
    modes = ["fc6-8", "all"] if cfg.voc_mode == "both" else [cfg.voc_mode]
    results, inputs = [], {}  # inputs: {image size: labelled center crops}, shared by checkpoints
    for path, (model, meta) in zip(paths, loaded):
        t0, model = time.time(), model.to(device).eval()
        common.log(f"== {path}: {meta['method']}, arch {model.arch()}")
        r = {"checkpoint": path, "name": os.path.basename(path), "method": meta["method"],
             "arch": model.arch(), "data": spec}
        if model.image_size not in inputs:
            inputs[model.image_size] = evalio.labelled_inputs(spec, model.image_size, cfg,
                                                              data.ClusterDataset, device)
        if inputs[model.image_size]:  # §9.1, §9.3
            ins = inputs[model.image_size]
            r["probe"], knn = feature_evals(model, ins, layers, knn_layers, ks, cfg, device)
            r["knn"] = knn[str(knn_layers[0])]  # the headline kNN; every layer's in knn_layers
            r["knn_layers"] = knn
        if meta["super"] is not None and has_clusters(meta["method"]):  # §9.3
            r["clusters"] = cluster_evals(model, meta, spec, png, cfg, device)
            png = None  # one figure: the first checkpoint with clusters
            common.log(f"clusters vs labels: {r['clusters']}")
        for mode in modes if voc_root else []:  # §9.2, each mode with its own wd and step size
            r.setdefault("voc", {})[mode] = v = voc_transfer(model, voc_root, mode, cfg, device)
            common.log(f"VOC07 {mode}: mAP {evalio.pct(v['map'])}% (wd {v['wd']}, stepsize "
                       f"{v['stepsize']}, {v['seconds']} s)")
        results.append(r | {"seconds": round(time.time() - t0, 1)})
    written, table = evalio.write_outputs(results, inputs, cfg, spec)  # json, md, figure
    common.log("wrote " + ", ".join(written) + "\n\n" + table)


if __name__ == "__main__":
    common.run(main, Config)
