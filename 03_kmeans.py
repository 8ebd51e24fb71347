"""Stage 3: cluster fc7 features into m super-clusters, then into k/m sub-classes inside each one.

φ(x) (fc7 before ReLU, eval mode, center crop, no rotation) -> PCA-whitening, L2-normalisation ->
Lloyd k-means at two levels with an explicit empty-cluster policy (faiss, if installed, speeds up
the E-step: faiss-cpu on CPU, faiss-gpu on the GPU). Under torchrun each rank extracts, whitens
and clusters only its own shard of the images (§7). 04_train.py calls `cluster()` every T epochs;
run alone, this file clusters with a saved trunk, at the trunk's own width, Sobel setting and
input size.

Paper:  PAPER.md §4 (Eq. (10)-(13)), §7 (sharded k-means), §9.3 Eq. (18), §11 pitfalls 1, 2, 6.
Reads:  <out_dir>/02_model_init.pt (or --ckpt: any checkpoint support.interop.load_trunk reads),
        <out_dir>/03_kmeans.npz when present (the previous clustering, for NMI)
Writes: <out_dir>/03_kmeans.npz {super, sub, centroids_super, centroids_sub, pca_mean, pca_proj,
        k_s}, <out_dir>/03_kmeans.json (cluster sizes, empty clusters split, objectives, NMI)
Run:    python 03_kmeans.py --out_dir out/demo --k 160 --super_clusters 4
        torchrun --nproc_per_node=2 03_kmeans.py --out_dir out/demo --k 160 --super_clusters 4
Uses:   01_data.make_source, 01_data.ClusterDataset; support.interop.load_trunk (02's VGG)
"""
import dataclasses
import importlib
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from support import common
from support.common import UserError

try:  # optional: the E-step speed-up (faiss-cpu, or faiss-gpu: make gpu); torch needs nothing
    import faiss
except ImportError:
    faiss = None

CHUNK = 2 ** 24  # values per temporary in the loops over chunks of rows below (64 MB in fp32)
data = importlib.import_module("01_data")  # 01_data.py: sources and the clustering transform
from support import clusterstats, interop  # sizes and NMI of a round; reading a trunk checkpoint


@dataclasses.dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder holding every stage's files
    ckpt: str = ""  # trunk checkpoint to cluster with ("" = <out_dir>/02_model_init.pt)
    data: str = "fashion-mnist"  # data source spec (see 01_data.make_source)
    subset: int = 20000  # use a seeded subset of N images (0 = all; paper: 96M YFCC100M images)
    image_size: int = 0  # crop in px: 0 = the trunk's; another value is refused (paper: 224)
    k: int = 160  # sub-classes over all super-clusters (paper: 320000; DeepCluster: 10000)
    super_clusters: int = 4  # m, level-1 clusters; S = 4m super-classes (paper: 4)
    pca_dim: int = 64  # D after PCA-whitening (paper: 4096; DeepCluster: 256; 0 = L2 only)
    pca_sample: int = 100000  # at most this many seeded rows fit the PCA (official: D(D-1)/2)
    niter: int = 10  # Lloyd iterations, then one more E-step (paper: 10)
    seed: int = 0  # seeds the k-means init, the empty-cluster donors and the PCA sample
    batch_size: int = 256  # images per forward pass during feature extraction
    workers: int = 0  # DataLoader worker processes for feature extraction
    kmeans_backend: str = "auto"  # E-step: faiss, torch, or auto (faiss when it runs there)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N


# ---- §4.1 Features: φ(x) = fc7 before ReLU, eval mode, center crop, no rotation ----
@torch.no_grad()
def extract_features(model, dataset, batch_size, device, workers=0):
    """φ of this rank's contiguous shard of `dataset`'s (x, n), in index order: (n_r, d) on CPU."""
    net = getattr(model, "module", model)  # unwrap DDP: ranks have uneven batches here
    was_training = net.training
    net.eval()  # BN running statistics, no dropout
    N, rank, world = len(dataset), common.get_rank(), common.world_size()
    shard = Subset(dataset, range(rank * N // world, (rank + 1) * N // world))  # DIST: contiguous
    phi = torch.empty(len(shard), net.feature_dim)  # (n_r, d), filled batch by batch
    i = 0
    for x, _ in common.bar(DataLoader(shard, batch_size, num_workers=workers), desc="features",
                           leave=False):
        phi[i:i + len(x)] = net(x.to(device)).float().cpu()  # (B, 3, S, S) -> (B, d)
        i += len(x)
    net.train(was_training)
    return phi


# ---- §4.2 PCA-whitening, Eq. (10)-(11) ----
def check_pca(dim, d, n, warn=True):
    """Pitfall 6: check D against the feature dimension and the PCA sample before any work."""
    if not 0 <= dim <= min(d, n):
        raise UserError(f"--pca_dim {dim} must be in 0..{min(d, n)} (feature dimension {d}, {n} "
                        f"samples to fit the PCA); lower it, or 0 for no PCA")
    # DEVIATION(paper): warns, not fails (§4.2): small runs keep the default D; names a D that fits
    if warn and dim and n < dim * (dim - 1) // 2:
        good = int((1 + (1 + 8 * n) ** 0.5) / 2)  # largest D with D(D-1)/2 <= n
        common.log(f"warning: {n} PCA samples < D(D-1)/2 = {dim * (dim - 1) // 2}: the smallest "
                   f"whitened directions are mostly noise (PAPER.md §4.2); try --pca_dim {good}")


# Eq. (10)  μ = mean φ,  Σ = (1/|P|) Σ (φ−μ)(φ−μ)ᵀ = U diag(λ) Uᵀ,
#           λ_i ← max(λ_i, 1e-5·max_j λ_j),  keep the D largest
# Eq. (11)  g(φ) = h/‖h‖,  h = diag(λ_1..λ_D)^(-1/2) U_Dᵀ (φ − μ)
def fit_pca(x, dim, warn=True):
    """Rows x (|P|, d) -> (mean (d,), proj (d, D)) float32, the whitening folded into proj."""
    x = torch.as_tensor(x)  # on the device it comes on (03's cluster: the GPU, when there is one)
    n, d = x.shape
    check_pca(dim, d, n, warn)
    if dim == 0:
        return torch.zeros(d, device=x.device), torch.eye(d, device=x.device)
    mu = x.sum(0, dtype=torch.float64) / n  # (d,) float64: whitening divides by small eigenvalues
    cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for xb in x.split(max(1, CHUNK // d)):  # chunks of rows: no (|P|, d) float64 copy
        xb = xb.double() - mu
        cov += xb.T @ xb
    cov /= n  # (d, d) Eq. (10)
    lam, U = (t.flip(-1) for t in torch.linalg.eigh(cov))  # eigh is ascending: λ descending
    lam = lam.clamp_min(max(1e-5 * lam[0].item(), 1e-30))  # Eq. (10); 1e-30: constant features
    proj = U[:, :dim] * lam[:dim].rsqrt()  # (d, D) = U_D diag(λ)^(-1/2), power 0.5
    return mu.float(), proj.float().contiguous()  # contiguous: eigh's U is column-major


def apply_pca(x, mean, proj):
    """(N, d) -> (N, D) whitened, L2-normalised rows, Eq. (11)."""
    h = (torch.as_tensor(x, dtype=torch.float32) - mean) @ proj  # (N, d) -> (N, D)
    return torch.nn.functional.normalize(h, dim=1)  # g = h / ‖h‖


# ---- §4.3 k-means (Lloyd), Eq. (12); each rank holds a shard x of the N points ----
def _backend(name, device="cpu"):
    """auto: faiss when importable and it can run where the features are (on a GPU: a faiss-gpu
    build with code for it, common.faiss_gpu_ok), else torch, whose E-step runs on their device."""
    on_gpu = torch.device(device).type == "cuda"
    if name == "auto":
        usable = faiss is not None and (not on_gpu or common.faiss_gpu_ok(faiss, device))
        return "faiss" if usable else "torch"
    if name not in ("faiss", "torch") or (name == "faiss" and faiss is None):
        raise UserError(f"--kmeans_backend {name}: use auto, torch or faiss (needs faiss-cpu or "
                        f"faiss-gpu)")
    return name


# Eq. (12) E-step: a_n = argmin_j ‖x_n − c_j‖² = argmin_j (‖c_j‖² − 2x_nᵀc_j)
def _assign(x, c, backend):
    """-> (labels (n,) int64, squared distances (n,) float64) of this rank's points x (n, D)."""
    if backend == "faiss" and x.is_cuda and common.faiss_gpu_ok(faiss, x.device):
        d2, a = common.faiss_knn_gpu(x, c)  # faiss-gpu, on the shard's GPU: exact, no host copy
        return a, d2.double().clamp_min(0)
    if backend == "faiss":  # exact search: the same quantity as the torch branch
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(np.ascontiguousarray(c.cpu().numpy()))
        d2, a = index.search(np.ascontiguousarray(x.cpu().numpy()), 1)  # (n, 1) each
        d2, a = (torch.from_numpy(t[:, 0]).to(x.device) for t in (d2, a))
        return a, d2.double().clamp_min(0)
    cc = (c * c).sum(1)  # (k,) ‖c‖²
    labels, dists = [], []
    for xb in x.split(max(1, CHUNK // max(c.shape))):  # (b, k) distances, (b, D) squares
        dmin, a = torch.addmm(cc, xb, c.T, alpha=-2).min(1)  # (b, k) ‖c‖² − 2xᵀc
        labels.append(a)
        dists.append((dmin.double() + (xb * xb).sum(1).double()).clamp_min(0))  # (b,) + ‖x‖²
    return torch.cat(labels), torch.cat(dists)


def _sums_counts(x, a, k, group=None):
    """Per-cluster sums (k, D) and counts (k,) over all ranks (of `group`), float64: 1 = N ranks."""
    sc = torch.zeros(k, x.shape[1] + 1, dtype=torch.float64, device=x.device)  # (k, D+1)
    b = max(1, CHUNK // max(1, x.shape[1]))
    for xb, ab in zip(x.split(b), a.split(b)):  # chunks of rows: no (n, D) float64 copy of x
        sc[:, :-1].index_add_(0, ab, xb.double())
    sc[:, -1] = torch.bincount(a, minlength=k).double()
    common.all_reduce_sum(sc, group)  # DIST: one all-reduce for both
    return sc[:, :-1], sc[:, -1]


def _offset(x, group=None):
    """DIST: (N = rows of x over the ranks of `group`, global index of this rank's first row)."""
    sizes = common.all_gather_cat(torch.tensor([len(x)], device=x.device), group)  # (ranks,)
    return int(sizes.sum()), int(sizes[: common.get_rank(group)].sum())


def _rows(x, idx, offset, group=None):
    """DIST: the global rows idx (k,) of the sharded points, sent by their holders -> (k, D)."""
    idx = torch.as_tensor(idx, device=x.device)
    mine = (idx >= offset) & (idx < offset + x.shape[0])
    out = torch.zeros(len(idx), x.shape[1], dtype=torch.float64, device=x.device)
    out[mine] = x[idx[mine] - offset].double()
    return common.all_reduce_sum(out, group).float()


def kmeans(x, k, niter=10, seed=0, backend="auto", group=None):
    """Lloyd on this rank's shard x (n, D) -> (centroids (k, D), labels (n,) int64, stats); the
    shards of `group` (default all ranks), in rank order, are the N points. stats: objective (mean
    ‖x − c_a‖² per E-step), n_empty_split (re-seeded and fixed), n_empty_final (fixed)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    N, offset = _offset(x, group)
    if k > N:
        raise UserError(f"k-means into k={k} clusters needs N >= k points, not {N}: lower --k")
    backend = _backend(backend, x.device)
    rng = np.random.default_rng(seed)  # pitfall 2: owned by this call, the same on every rank
    c = _rows(x, rng.choice(N, size=k, replace=False), offset, group)  # (k, D) distinct points
    objective, n_split = [], 0
    for it in range(niter + 1):  # niter E+M steps, then the final E-step: 11 E, 10 M in all
        a, d2 = _assign(x, c, backend)  # E-step, Eq. (12)
        objective.append(common.all_reduce_sum(d2.sum().reshape(1), group).item() / N)
        if it == niter:
            break
        sums, counts = _sums_counts(x, a, k, group)  # M-step: all-reduced sums and counts
        full = counts > 0
        c[full] = (sums[full] / counts[full, None]).float()  # Eq. (12): c_j = mean{x_n : a_n = j}
        c = _split_empty(c, counts, rng)  # §4.4: an empty cluster kept its c_j: re-seed it
        n_split += int((counts == 0).sum())
    a, c, n_fixed = _fix_empty(x, a, c, rng, group)  # §4.4: no empty cluster when N >= k
    if n_fixed:  # the objective of the labels returned, in chunks of rows
        b = max(1, CHUNK // x.shape[1])
        d2 = sum(((xb - c[ab]) ** 2).sum().double() for xb, ab in zip(x.split(b), a.split(b)))
        objective[-1] = common.all_reduce_sum(d2.reshape(1), group).item() / N
    stats = {"objective": objective, "n_empty_split": n_split + n_fixed, "n_empty_final": n_fixed}
    return c, a, stats


# ---- §4.4 Empty clusters, Eq. (13), with a generator owned by k-means (pitfall 2) ----
# Eq. (13)  c_j ← c_c + εδ,  c_c ← c_c − εδ,  δ = (+1, −1, +1, …)
#           n_j ← ⌊n_c/2⌋,  n_c ← n_c − n_j  (n_j of c's points move to j)
# The official loop applies it after every pass, the last (E-step only) included: a uniform
# donor, ε = 1e-7, and the donor's first ⌊n_c/2⌋ members (n_c after the update) in each rank's
# own index order relabelled j. Ours has two steps. _split_empty, after each M-step, moves only
# centroids (the next E-step reassigns points): c_j ← c_c·(1 + εδ), c_c ← c_c·(1 − εδ).
# DEVIATION(paper): faiss's rule (DeepCluster paper's), donor ∝ n_c − 1, relative ε = 1/1024,
# because a one-point donor only leaves another cluster empty; big clusters are worth splitting.
def _split_empty(c, counts, rng, eps=1 / 1024):
    counts = counts.cpu().numpy().copy()  # (k,) global: the same draws on every rank
    delta = 1 - 2 * (torch.arange(c.shape[1], device=c.device) % 2)  # (D,) δ = (+1, −1, +1, …)
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)  # N >= k: some cluster has 2 points while one is empty
        donor = rng.choice(len(counts), p=p / p.sum())
        c[j] = c[donor] * (1 + eps * delta)  # Eq. (13)
        c[donor] = c[donor] * (1 - eps * delta)
        counts[j] = counts[donor] // 2
        counts[donor] -= counts[j]
    return c


# _fix_empty, after the final E-step (whose labels 04 trains on), moves points: the donor c gives
# j its members on the +δ side of their mean μ_c (for any ε > 0, nearer to μ_c + εδ than to
# μ_c − εδ), or, if all coincide along δ, its last ⌊n_c/2⌋ in global index order; the two
# centroids become means. Only sums and counts are all-reduced: ranks move what one process would.
# DEVIATION(paper): the +δ side moves (not n_j = ⌊n_c/2⌋ points) and centroids are means (not
# c_c ± εδ), because the official count per rank, in each rank's index order, makes the labels
# depend on the number of ranks; by side, each point joins the nearer half, and means fit labels.
def _fix_empty(x, a, c, rng, group=None):
    counts = _sums_counts(x[:, :0], a, c.shape[0], group)[1].cpu().numpy()  # (k,) global sizes
    delta = (1 - 2 * (torch.arange(x.shape[1], device=x.device) % 2)).double()  # (D,)
    n_fixed = 0
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        donor = int(rng.choice(len(counts), p=p / p.sum()))
        mem = (a == donor).nonzero().squeeze(1)  # this rank's members of the donor
        xm = x[mem].double()
        total = common.all_reduce_sum(xm.sum(0), group)  # (D,) the donor's sum
        move = (xm - total / counts[donor]) @ delta > 0  # the +δ side of μ_c
        n_move = int(common.all_reduce_sum(move.sum().reshape(1).double(), group).item())
        if n_move == 0 or n_move == counts[donor]:  # all on one side: split by global index
            pos = _offset(mem, group)[1] + torch.arange(len(mem), device=x.device)  # in donor
            move = pos >= float(counts[donor] - counts[donor] // 2)
            n_move = int(counts[donor] // 2)
        a[mem[move]] = j
        s_move = common.all_reduce_sum(xm[move].sum(0), group)  # (D,)
        c[j] = (s_move / n_move).float()
        c[donor] = ((total - s_move) / (counts[donor] - n_move)).float()
        counts[j] = n_move
        counts[donor] -= n_move
        n_fixed += 1
    return a, c, n_fixed


# ---- §4.3 Two levels: m super-clusters u, then k_s = k/m sub-classes z inside each u ----
def check_sizes(N, k, m):
    for flag, v in (("--super_clusters", m), ("--k", k)):
        if not 1 <= v <= N:
            raise UserError(f"{flag} {v} must be in 1..N = {N} images; lower it or use more images")
    if k % m:
        raise UserError(f"--k {k} is not a multiple of --super_clusters {m} (k_s = k/m, Eq. (7))")


def level2(x, u, n_u, k_s, niter, seed, backend):
    """Level 2: k-means into k_s inside each super-cluster v, on v's members alone -> (z (n,) local
    to u, centroids_sub (m, k_s, D), clusters split, objective_sub (niter+1,) weighted by size,
    small super-clusters). Every rank runs the same loop, so the collectives inside stay in step;
    the paper's layout clusters each v in its own group of ranks (scaleout/grouped.py)."""
    m, N = len(n_u), int(n_u.sum())
    z, small, split_sub, obj_sub = torch.zeros_like(u), [], 0, np.zeros(niter + 1)
    c_sub = torch.zeros(m, k_s, x.shape[1], device=x.device)  # (m, k_s, D)
    for v in range(m):
        mem = (u == v).nonzero().squeeze(1)
        if n_u[v] < k_s:
            # DEVIATION(paper): a super-cluster with n_u < k_s points gets one sub-class per
            # point (ids 0..n_u-1, the others stay empty), because the official draw with
            # replacement only makes empty duplicates.
            z[mem] = _offset(mem)[1] + torch.arange(len(mem), device=x.device)  # index order
            c_sub[v, : n_u[v]] = common.all_gather_cat(x[mem])  # (n_u, D), tiny: n_u < k_s
            small.append(v)
        else:  # k-means on u's members alone (k_s = 1: z = 0, the mean)
            c_sub[v], z[mem], st = kmeans(x[mem], k_s, niter, seed + 1 + v, backend)
            split_sub += st["n_empty_split"]
            obj_sub += np.array(st["objective"]) * n_u[v].item() / N  # small u: 0
    return z, c_sub, split_sub, obj_sub, small


def two_level(x, k, m, niter=10, seed=0, backend="auto", level2_fn=level2):
    """-> dict(super (n,), sub (n,) in 0..k_s-1, centroids_super (m, D), centroids_sub (m, k_s, D),
    k_s, stats) for this rank's shard x (n, D). level2_fn: level2, or the paper's layout's
    (the same result, scaleout/grouped.py)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    N = _offset(x)[0]
    check_sizes(N, k, m)
    k_s = k // m  # Eq. (7)
    c_super, u, st1 = kmeans(x, m, niter, seed, backend)  # level 1 (m = 1: u = 0, the mean)
    n_u = _sums_counts(x[:, :0], u, m)[1].long().cpu()  # (m,) global super-cluster sizes
    z, c_sub, split_sub, obj_sub, small = level2_fn(x, u, n_u, k_s, niter, seed, backend)
    if small:
        common.log(f"warning: super-clusters {small} have < k_s = {k_s} points: one sub-class each")
    stats = {"objective": st1["objective"] if m > 1 else [], "sizes_super": n_u.tolist(),
             "objective_sub": obj_sub.tolist() if k_s > 1 else [], "n_small_super": len(small),
             "n_empty_split": st1["n_empty_split"] + split_sub, "n_empty_split_sub": split_sub}
    return dict(super=u, sub=z, centroids_super=c_super, centroids_sub=c_sub, k_s=k_s, stats=stats)


# ---- The whole stage, in-process (04_train.py calls this every T epochs) ----
def cluster(model, source, cfg, device, prev=None, epoch=None, m=None, level2_fn=level2):
    """features -> PCA -> two_level, each rank on its shard of the images -> two_level's dict (on
    CPU, all N labels) + pca_mean, pca_proj, diagnostics. cfg: k, super_clusters, pca_dim, niter,
    seed, batch_size, workers, kmeans_backend (pca_sample optional). epoch: the k-means seed is
    cfg.seed + epoch. m: default cfg.super_clusters (04: 1 for DeepCluster). level2_fn: as in
    two_level."""
    m = cfg.super_clusters if m is None else m
    t0, net = time.time(), getattr(model, "module", model)
    N, d = len(source), int(net.feature_dim)
    n_fit = min(N, getattr(cfg, "pca_sample", 0) or N)
    rows = np.sort(np.random.default_rng(cfg.seed).choice(N, n_fit, replace=False))  # (|P|,) P
    check_sizes(N, cfg.k, m)  # guard rails before extraction
    check_pca(cfg.pca_dim, d, n_fit)
    _backend(cfg.kmeans_backend)
    rank, world = common.get_rank(), common.world_size()
    lo, hi = rank * N // world, (rank + 1) * N // world  # DIST: this rank's shard of the images
    common.log(f"feature shard: {hi - lo} x {d} float32 = {(hi - lo) * d / 2 ** 18:.1f} MiB")
    views = data.ClusterDataset(source, net.image_size)  # §4.1: center crop, no rotation
    batch = max(1, cfg.batch_size // world)  # 04's batch is global: a rank's share
    phi = extract_features(net, views, batch, device, cfg.workers)  # (n_r, d) rows lo..hi-1
    t1 = time.time()
    # DIST: P is gathered once (each rank sends the rows of P it holds: in rank order, P's order);
    # rank 0 fits the PCA on `device` and broadcasts it (eigenvector signs could differ by rank)
    mine = torch.from_numpy(rows[(rows >= lo) & (rows < hi)] - lo)
    sample = common.all_gather_cat(phi[mine].to(device))  # (|P|, d); nccl: on `device`
    mean, proj = torch.zeros(d, device=device), torch.zeros(d, cfg.pca_dim or d, device=device)
    if common.is_main():
        mean, proj = fit_pca(sample, cfg.pca_dim, warn=False)
    del sample
    mean, proj = (common.broadcast(t) for t in (mean, proj))
    x = torch.empty(len(phi), proj.shape[1], device=device)  # (n_r, D) the whitened shard
    b = max(1, CHUNK // d)
    seed = cfg.seed if epoch is None else cfg.seed + epoch
    with common.full_fp32():  # distances in fp32 even where training uses TF32 (fast_cuda)
        for i in range(0, len(phi), b):  # on `device`, in chunks of rows
            x[i:i + b] = apply_pca(phi[i:i + b].to(device), mean, proj)  # Eq. (11)
        del phi
        res = two_level(x, cfg.k, m, cfg.niter, seed, cfg.kmeans_backend, level2_fn)
    common.faiss_release()  # faiss-gpu's scratch memory: one per round, freed for training
    res |= {key: common.all_gather_cat(res[key]).cpu() for key in ("super", "sub")}  # DIST: (N,)
    res |= {key: res[key].cpu() for key in ("centroids_super", "centroids_sub")}
    res |= dict(pca_mean=mean.cpu(), pca_proj=proj.cpu())
    res["stats"] |= dict(epoch=epoch, seconds_features=t1 - t0, seconds_kmeans=time.time() - t1)
    # sizes, NMI (Eq. (18)) against the previous round and the labels
    res["diagnostics"] = clusterstats.diagnostics(res, getattr(source, "labels", None), prev)
    return res


def save_clustering(result, out_dir, name="03_kmeans"):
    """Rank 0 writes <out_dir>/<name>.npz (arrays) and <name>.json (diagnostics) -> the paths."""
    paths = (os.path.join(out_dir, f"{name}.npz"), os.path.join(out_dir, f"{name}.json"))
    keys = ("super", "sub", "centroids_super", "centroids_sub", "pca_mean", "pca_proj")
    if common.is_main():
        arr = {key: torch.as_tensor(result[key]).cpu().numpy() for key in keys}
        common.save_npz(paths[0], **arr, k_s=np.int64(result["k_s"]))
        common.save_json(result["diagnostics"], paths[1])
    return paths


def main(cfg):
    common.check_ranges(cfg, ("k", "super_clusters", "batch_size"),
                        ("subset", "image_size", "pca_dim", "pca_sample", "niter", "workers"))
    rank, world, device = common.init_dist(cfg.device)
    common.log(f"03_kmeans config: {dataclasses.asdict(cfg)} | world {world} | device {device}")
    ckpt = cfg.ckpt or os.path.join(cfg.out_dir, "02_model_init.pt")
    model, _ = interop.load_trunk(ckpt)  # width, Sobel and input size come from the checkpoint
    if cfg.image_size not in (0, model.image_size):
        raise UserError(f"--image_size {cfg.image_size} but {ckpt} holds a trunk for "
                        f"{model.image_size} px: leave --image_size at 0 (the trunk's size)")
    source = data.make_source(cfg.data, "train", subset=cfg.subset or None, seed=cfg.seed)
    prev_path = os.path.join(cfg.out_dir, "03_kmeans.npz")
    prev = common.load_npz(prev_path) if os.path.exists(prev_path) else None  # for nmi_prev
    res = cluster(model.to(device), source, cfg, device, prev=prev)
    common.log("wrote " + ", ".join(save_clustering(res, cfg.out_dir)))
    common.log(clusterstats.summary(res["diagnostics"]))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run(main, Config)
