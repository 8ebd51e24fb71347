"""Stage 3: cluster fc7 features into m super-clusters, then into k/m sub-classes inside each one.

04_train.py calls `cluster()` in-process every T epochs; run alone, this file clusters the images with a
saved trunk. Steps: φ(x) (fc7 before ReLU, eval mode, center crop, no rotation) -> PCA-whitening and
L2-normalisation -> Lloyd k-means at two levels with an explicit empty-cluster policy. The Lloyd loop is
ours, as in the official code; faiss (GPU when it sees one, else CPU) only speeds up the E-step, and a
plain torch E-step is the reference.

Paper:  PAPER.md §4 (Eq. (10)-(13)), §7 (sharded k-means), §9.3 Eq. (18), §11 pitfalls 1, 2, 6.
Reads:  <out_dir>/02_model_init.pt (or --ckpt: any checkpoint 02_model.load_trunk reads),
        <out_dir>/03_kmeans.npz when present (the previous clustering, for NMI)
Writes: <out_dir>/03_kmeans.npz {super, sub, centroids_super, centroids_sub, pca_mean, pca_proj, k_s},
        <out_dir>/03_kmeans.json (cluster sizes, empty clusters split, objective per iteration, NMI/ARI)
Run:    python 03_kmeans.py --out_dir out/demo --k 160 --super_clusters 4
        torchrun --nproc_per_node=2 03_kmeans.py --out_dir out/demo --k 160 --super_clusters 4
Uses:   01_data.make_source, 01_data.ClusterDataset, 02_model.load_trunk
"""
import dataclasses
import importlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import common

try:  # optional: the E-step speed-up (faiss-cpu or faiss-gpu); the torch E-step needs nothing
    import faiss
except ImportError:
    faiss = None

data = importlib.import_module("01_data")  # 01_data.py: sources and the clustering transform
model_lib = importlib.import_module("02_model")  # 02_model.py: load_trunk (VGG trunk, φ = fc7 before ReLU)


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder holding every stage's files
    ckpt: str = ""  # trunk checkpoint to cluster with ("" = <out_dir>/02_model_init.pt)
    data: str = "fashion-mnist"  # data source spec (see 01_data.make_source)
    subset: int = 20000  # use a seeded subset of N images (0 = all; paper: 96M YFCC100M images)
    image_size: int = 32  # crop size in px, must match the trunk (paper: 224)
    k: int = 160  # sub-classes over all super-clusters (paper: 320000; DeepCluster: 10000)
    super_clusters: int = 4  # m, level-1 clusters; S = 4m super-classes (paper: 4)
    pca_dim: int = 64  # D after PCA-whitening (paper: 4096; DeepCluster: 256; 0 = no PCA, only L2-normalise)
    pca_sample: int = 100000  # at most this many seeded rows fit the PCA (official: min(N, D(D-1)/2))
    niter: int = 10  # Lloyd iterations, then one more E-step (paper: 10)
    seed: int = 0  # seeds the k-means init, the empty-cluster donors and the PCA sample
    batch_size: int = 256  # images per forward pass during feature extraction
    workers: int = 0  # DataLoader worker processes for feature extraction
    kmeans_backend: str = "auto"  # E-step: faiss, torch, or auto (faiss when importable)
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N


# ---- §4.1 Features: φ(x) = fc7 before ReLU, eval mode, center crop, no rotation ----
@torch.no_grad()
def extract_features(model, dataset, batch_size, device, workers=0):
    """φ of every item (x, n) of `dataset`, in index order: (N, d) float32 on CPU, on every rank."""
    net = getattr(model, "module", model)  # unwrap DDP: its forward syncs buffers, and ranks have uneven batches
    was_training = net.training
    net.eval()  # BN running statistics, no dropout
    rank, world = common.get_rank(), common.world_size()
    shard = Subset(dataset, range(rank, len(dataset), world))  # DIST: this rank's images rank::world
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
    phis, ids = [torch.zeros(0, net.feature_dim)], [torch.zeros(0, dtype=torch.long)]
    for x, n in tqdm(loader, desc="features", disable=not common.is_main(), leave=False):
        phis.append(net(x.to(device)).float().cpu())  # (B, 3, S, S) -> (B, d)
        ids.append(torch.as_tensor(n, dtype=torch.long))
    net.train(was_training)
    # DIST: gather every rank's rows (on `device`: nccl only moves GPU tensors), then put them in index order
    phi = common.all_gather_cat(torch.cat(phis).to(device)).cpu()  # (N, d)
    ids = common.all_gather_cat(torch.cat(ids).to(device)).cpu()  # (N,)
    out = torch.empty_like(phi)
    out[ids] = phi
    return out


# ---- §4.2 PCA-whitening, Eq. (10)-(11) ----
def check_pca(dim, d, n, warn=True):
    """Pitfall 6: check D against the feature dimension and the PCA sample before any work."""
    if dim < 0 or dim > d:
        raise common.UserError(f"--pca_dim {dim} must be in 0..{d} (the feature dimension d); "
                               f"use --pca_dim {min(d, 64)}, or 0 for no PCA")
    if dim > n:
        raise common.UserError(f"--pca_dim {dim} is larger than the {n} samples that fit the PCA "
                               f"(the covariance would be rank-deficient); use --pca_dim <= {n} or more data")
    if warn and dim and n < dim * (dim - 1) // 2:
        good = int((1 + math.sqrt(1 + 8 * n)) / 2)  # largest D with D(D-1)/2 <= n
        common.log(f"warning: PCA fitted on {n} samples < D(D-1)/2 = {dim * (dim - 1) // 2} for --pca_dim {dim}: "
                   f"the smallest whitened directions are mostly noise (PAPER.md §4.2); consider --pca_dim {good}")


# Eq. (10)  μ = mean φ,  Σ = (1/|P|) Σ (φ−μ)(φ−μ)ᵀ = U diag(λ) Uᵀ,  λ_i ← max(λ_i, 1e-5·max λ),  keep the D largest
# Eq. (11)  g(φ) = h/‖h‖,  h = diag(λ_1..λ_D)^(-1/2) U_Dᵀ (φ − μ)
def fit_pca(x, dim, sample=None, seed=0, warn=True):
    """-> (mean (d,), proj (d, D)) float32 with the whitening folded into proj. dim = 0: no PCA (identity)."""
    x = torch.as_tensor(x)
    if sample and x.shape[0] > sample:  # a seeded sample P of the rows
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=sample, replace=False))
        x = x[torch.from_numpy(rows)]
    n, d = x.shape
    check_pca(dim, d, n, warn)
    if dim == 0:
        return torch.zeros(d), torch.eye(d)
    x = x.double()  # float64: the small eigenvalues are the ones whitening divides by
    mu = x.mean(0)  # (d,)
    cov = (x - mu).T @ (x - mu) / n  # (d, d) Eq. (10)
    lam, U = torch.linalg.eigh(cov)  # ascending
    lam, U = lam.flip(0), U.flip(1)  # descending
    lam = lam.clamp_min(max(1e-5 * lam[0].item(), 1e-30))  # eigenvalue floor (the 1e-30 only guards constant features)
    proj = U[:, :dim] * lam[:dim].rsqrt()  # (d, D) = U_D diag(λ)^(-1/2), power 0.5
    return mu.float(), proj.float().contiguous()  # eigh's U is column-major: broadcast needs contiguous memory


def apply_pca(x, mean, proj):
    """(N, d) -> (N, D) whitened, L2-normalised rows, Eq. (11)."""
    h = (torch.as_tensor(x, dtype=torch.float32) - mean) @ proj  # (N, d) -> (N, D)
    return F.normalize(h, dim=1)  # g = h / ‖h‖


# ---- §4.3 k-means (Lloyd), Eq. (12); each rank holds a shard x of the N points ----
def _backend(name):
    if name == "auto":
        return "faiss" if faiss is not None else "torch"
    if name == "faiss" and faiss is None:
        raise common.UserError("--kmeans_backend faiss: faiss is not installed; install faiss-cpu (or faiss-gpu) "
                               "or use --kmeans_backend torch")
    if name not in ("faiss", "torch"):
        raise common.UserError(f"--kmeans_backend {name!r}: use auto, faiss or torch")
    return name


_GPU_RES = []  # one faiss.StandardGpuResources, made on first use (GPU builds of faiss only)


def _assign(x, c, backend, xnp=None):
    """E-step, Eq. (12): a_n = argmin_j ‖x_n − c_j‖² -> (labels (n,) int64, squared distances (n,) float64)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(0, dtype=torch.float64, device=x.device)
    if backend == "faiss":  # exact search, the same quantity as the torch branch
        index = faiss.IndexFlatL2(c.shape[1])
        if faiss.get_num_gpus() > 0:  # untested here (CPU machine): faiss-gpu with a visible GPU
            _GPU_RES[:] = _GPU_RES or [faiss.StandardGpuResources()]
            index = faiss.index_cpu_to_gpu(_GPU_RES[0], x.device.index or 0, index)
        index.add(np.ascontiguousarray(c.cpu().numpy()))
        dist, lab = index.search(xnp, 1)  # (n, 1) each
        return (torch.from_numpy(lab[:, 0]).long().to(x.device),
                torch.from_numpy(dist[:, 0]).double().clamp_min(0).to(x.device))
    cc = (c * c).sum(1)  # (k,) ‖c‖²
    labels, dists, step = [], [], max(1, 2 ** 24 // c.shape[0])  # chunks of ≤ 16M distances (64 MB)
    for xb in x.split(step):
        dmin, a = torch.addmm(cc, xb, c.T, alpha=-2).min(1)  # (b, k) ‖c‖² − 2xᵀc: ‖x‖² does not change the argmin
        labels.append(a)
        dists.append((dmin.double() + (xb * xb).sum(1).double()).clamp_min(0))  # (b,) + ‖x‖²
    return torch.cat(labels), torch.cat(dists)


def _sums_counts(x, a, k, group=None):
    """DIST: per-cluster sums (k, D) and counts (k,) over all ranks (of `group`), in float64 so 1 and N ranks agree."""
    sc = torch.zeros(k, x.shape[1] + 1, dtype=torch.float64, device=x.device)  # (k, D+1), one all-reduce
    sc[:, :-1].index_add_(0, a, x.double())
    sc[:, -1] = torch.bincount(a, minlength=k).double()
    common.all_reduce_sum(sc, group)
    return sc[:, :-1], sc[:, -1]


def _means(x, a, k):
    """(k, D) mean of each cluster's members over all ranks (0 for an empty cluster)."""
    sums, counts = _sums_counts(x, a, k)
    return (sums / counts.clamp_min(1)[:, None]).float()


def init_indices(N, k, rng):
    """Distinct global row indices (k,) of the initial centroids (§4.3), drawn from the k-means generator."""
    return rng.choice(N, size=k, replace=False)


def _rows(x, idx, offset, group=None):
    """DIST: the global rows idx (k,) of the sharded points, on every rank: each row comes from the rank holding it."""
    idx = torch.as_tensor(idx, device=x.device)
    mine = (idx >= offset) & (idx < offset + x.shape[0])
    out = torch.zeros(len(idx), x.shape[1], dtype=torch.float64, device=x.device)
    out[mine] = x[idx[mine] - offset].double()
    return common.all_reduce_sum(out, group).float()  # (k, D)


# ---- §4.4 Empty clusters: an explicit policy, with a generator owned by k-means (pitfall 2) ----
# During the iterations (Eq. (13), faiss's variant): each empty cluster j takes a donor c drawn with probability
# ∝ (n_c − 1); c_j ← c_c·(1 + εδ), c_c ← c_c·(1 − εδ), δ = (+1, −1, +1, …), ε = 1/1024; n_j = ⌊n_c/2⌋ for later draws.
# DEVIATION(paper): the official loop draws the donor uniformly and perturbs by an absolute 1e-7; we use faiss's rule
# (the one the DeepCluster paper describes), because big clusters are the ones worth splitting and 1e-7 is below
# float32 resolution for coordinates near 1.
def _split_empty(c, counts, rng, eps=1 / 1024):
    counts = counts.cpu().numpy().copy()  # global counts: identical on every rank, so are the draws
    delta = torch.ones(c.shape[1], device=c.device)
    delta[1::2] = -1
    n_split = 0
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        if p.sum() == 0:  # no cluster has 2 points left (only possible when N < k)
            break
        donor = rng.choice(len(counts), p=p / p.sum())
        c[j] = c[donor] * (1 + eps * delta)
        c[donor] = c[donor] * (1 - eps * delta)
        counts[j] = counts[donor] // 2
        counts[donor] -= counts[j]
        n_split += 1
    return c, n_split


# After the final E-step a cluster can still be empty (e.g. duplicated points). Then points move: the donor's
# members on the +δ side of their mean go to j (they are nearer to c_c + εδ than to c_c − εδ, the two halves of
# Eq. (13)); if all members coincide along δ, the last ⌊n_c/2⌋ in global index order go. Only sums and counts are
# all-reduced, so sharded data is never gathered, and every rank moves exactly what one process would move.
# DEVIATION(paper): the official code returns the final E-step's labels as they are, because it has no such step; we
# add it so that no pseudo-class is ever empty when N >= k (the invariant §4.4 asks to test).
def _fix_empty(x, a, c, rng, offset, group=None):
    k, counts = c.shape[0], _sums_counts(x[:, :0], a, c.shape[0], group)[1].cpu().numpy()  # (k,) global sizes
    delta = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    delta[1::2] = -1
    n_fixed = 0
    for j in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        if p.sum() == 0:
            break
        donor = int(rng.choice(k, p=p / p.sum()))
        mem = (a == donor).nonzero().squeeze(1)  # this rank's members of the donor
        xm = x[mem].double()
        total = common.all_reduce_sum(xm.sum(0), group)  # (D,)
        move = (xm - total / counts[donor]) @ delta > 0  # projections have mean 0 over the donor
        n_move = int(common.all_reduce_sum(move.sum().reshape(1).double(), group).item())
        if n_move == 0 or n_move == counts[donor]:  # all members coincide along δ: split by global index
            sizes = common.all_gather_cat(torch.tensor([len(mem)], device=x.device), group)  # (ranks of group,)
            pos = sizes[: common.get_rank(group)].sum() + torch.arange(len(mem), device=x.device)  # order in donor
            move = pos >= float(counts[donor] - counts[donor] // 2)
            n_move = int(counts[donor] // 2)
        a[mem[move]] = j
        s_move = common.all_reduce_sum(xm[move].sum(0), group)
        c[j] = (s_move / n_move).float()  # the two new centroids are the means of their members
        c[donor] = ((total - s_move) / (counts[donor] - n_move)).float()
        counts[j], counts[donor] = n_move, counts[donor] - n_move
        n_fixed += 1
    return a, c, n_fixed


def kmeans(x, k, niter=10, seed=0, backend="auto", group=None):
    """Lloyd on this rank's shard x (n, D) -> (centroids (k, D), labels (n,) int64, stats).

    Under torchrun the shards, in rank order, are the N points: init, donors and M-steps are global, so the
    labels equal those of one process on the concatenated points (up to float summation order).
    group: the process group whose ranks hold the shards (default: all ranks; a clustering group, PAPER.md §7).
    stats: objective (mean ‖x − c_a‖², one per E-step: niter + 1), n_empty_split (iterations + final fix).
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    sizes = common.all_gather_cat(torch.tensor([x.shape[0]], device=x.device), group)  # DIST: (world,) shard sizes
    N, offset = int(sizes.sum()), int(sizes[: common.get_rank(group)].sum())
    if k > N:
        raise common.UserError(f"k-means with k={k} clusters on only N={N} points: lower --k / --super_clusters "
                               f"or use more images (--subset)")
    backend = _backend(backend)
    xnp = np.ascontiguousarray(x.cpu().numpy()) if backend == "faiss" else None
    rng = np.random.default_rng(seed)  # pitfall 2: owned by this call, the same on every rank
    c = _rows(x, init_indices(N, k, rng), offset, group)  # (k, D) distinct data points
    objective, n_split = [], 0
    for it in range(niter + 1):  # niter E+M steps, then the final E-step: 11 E-steps, 10 M-steps
        a, d2 = _assign(x, c, backend, xnp)  # E-step
        objective.append(common.all_reduce_sum(d2.sum().reshape(1), group).item() / N)
        if it == niter:
            break
        sums, counts = _sums_counts(x, a, k, group)  # M-step, c_j = mean{x_n : a_n = j}
        ne = counts > 0
        c[ne] = (sums[ne] / counts[ne, None]).float()
        c, s = _split_empty(c, counts, rng)  # §4.4: re-seeds the empty clusters (which kept their old centroid)
        n_split += s
    a, c, n_fixed = _fix_empty(x, a, c, rng, offset, group)  # no empty cluster is returned when N >= k
    if n_fixed:
        objective[-1] = common.all_reduce_sum(((x - c[a]) ** 2).sum().double().reshape(1), group).item() / N
    return c, a, {"objective": objective, "n_empty_split": n_split + n_fixed, "n_empty_final": n_fixed}


# ---- §4.3 Two levels: m super-clusters u over all points, then k_s = k/m sub-classes z inside each ----
def check_sizes(N, k, m):
    """Guard rails before any heavy work; each message names the flag to change."""
    if m < 1 or m > N:
        raise common.UserError(f"--super_clusters {m} must be in 1..N = {N} images; lower it or use more images")
    if k < 1 or k > N:
        raise common.UserError(f"--k {k} must be in 1..N = {N} images; lower --k or use more images (--subset)")
    if k % m:
        raise common.UserError(f"--k {k} is not a multiple of --super_clusters {m}; use e.g. --k {max(m, k // m * m)}")


def two_level(x, k, m, niter=10, seed=0, backend="auto", groups=None):
    """-> dict(super (n,), sub (n,) in 0..k_s-1, centroids_super (m, D), centroids_sub (m, k_s, D), k_s, stats).
    groups: the m clustering groups of the grouped layout (cluster_groups); the result is the same."""
    x = torch.as_tensor(x, dtype=torch.float32)  # (n, D) this rank's shard
    N = int(common.all_reduce_sum(torch.tensor([x.shape[0]], device=x.device)).item())
    check_sizes(N, k, m)
    k_s, D = k // m, x.shape[1]  # Eq. (7)
    if m == 1:  # pure RotNet / DeepCluster: level 1 is skipped
        u, st1 = torch.zeros(x.shape[0], dtype=torch.long, device=x.device), {"objective": [], "n_empty_split": 0}
        c_super = _means(x, u, 1)  # (1, D)
    else:
        c_super, u, st1 = kmeans(x, m, niter, seed, backend)
    n_u = _sums_counts(x[:, :0], u, m)[1].long().cpu()  # (m,) global super-cluster sizes
    z = torch.zeros_like(u)
    c_sub = torch.zeros(m, k_s, D, device=x.device)
    small, split_sub, obj_sub = [], 0, np.zeros(niter + 1)
    if groups is not None and k_s > 1:  # DIST: --layout grouped, each super-cluster in its own group of ranks
        z, c_sub, split_sub, obj_sub, small = level2_in_groups(x, u, n_u, k_s, niter, seed, backend, groups)
    else:
        for v in range(m):  # the same loop on every rank: the collectives inside stay in step
            mem = (u == v).nonzero().squeeze(1)
            if k_s == 1:  # pure RotNet: one sub-class, its centroid is the super-cluster's mean
                c_sub[v] = _means(x[mem], z[mem], 1)  # (1, D)
            elif n_u[v] < k_s:
                # DEVIATION(paper): a super-cluster with n_u < k_s points gets one sub-class per point (ids 0..n_u-1,
                # the other ids stay empty), because the official draw with replacement only makes empty duplicates.
                before = common.all_gather_cat(torch.tensor([len(mem)], device=x.device))[: common.get_rank()].sum()
                z[mem] = before + torch.arange(len(mem), device=x.device)  # global order inside u
                c_sub[v, : n_u[v]] = common.all_gather_cat(x[mem])  # (n_u, D), tiny: n_u < k_s
                small.append(v)
            else:
                c_sub[v], z[mem], st = kmeans(x[mem], k_s, niter, seed + 1 + v, backend)
                split_sub += st["n_empty_split"]
                obj_sub += np.array(st["objective"]) * n_u[v].item() / N  # points of small u sit on their centroid
    if small:
        common.log(f"warning: {len(small)} super-cluster(s) {small} have fewer points than k_s = {k_s}: each of "
                   f"their points is its own sub-class and the remaining sub-class ids stay empty")
    stats = {"objective": st1["objective"], "objective_sub": obj_sub.tolist() if k_s > 1 else [],
             "n_empty_split": st1["n_empty_split"] + split_sub, "n_empty_split_super": st1["n_empty_split"],
             "n_empty_split_sub": split_sub, "n_small_super": len(small), "sizes_super": n_u.tolist()}
    return dict(super=u, sub=z, centroids_super=c_super, centroids_sub=c_sub, k_s=k_s, stats=stats)


# ---- DIST: grouped layout (PAPER.md §7): level 2 of super-cluster u runs inside clustering group u ----
# The official layout splits the N ranks into m clustering groups of N/m consecutive ranks (4N/S with rotation: the 4
# training groups of super-cluster u, see 04_train.py). Level 1 runs over all ranks; level 2 of super-cluster u runs
# in group u only, so the m level-2 k-means run side by side instead of one after the other on all ranks.
def cluster_groups(m):
    """-> the m clustering groups (group u: ranks u*N/m .. (u+1)*N/m - 1), None in one process. Collective: every
    rank creates every group, in the same order (torch.distributed.new_group's rule), also those it is not in."""
    world = common.world_size()
    if world % m:
        raise common.UserError(f"clustering groups: the {world} processes must be a multiple of the {m} super-clusters")
    C = world // m  # ranks per clustering group
    return [dist.new_group(list(range(v * C, (v + 1) * C))) for v in range(m)] if world > 1 else None


def level2_in_groups(x, u, n_u, k_s, niter, seed, backend, groups):
    """two_level's level 2 with super-cluster v clustered by the ranks of groups[v] only -> (z of this rank's points,
    centroids_sub (m, k_s, D), clusters split, objective_sub (niter+1,), small super-clusters): the values of the
    all-ranks loop, because group v's ranks hold contiguous shares of v's members in index order (the order of that
    loop's x[mem]) and kmeans(group=) gives one process's result on the concatenated shares."""
    m, rank, D = len(groups), common.get_rank(), x.shape[1]
    C = common.world_size() // m
    v, j = rank // C, rank % C  # my super-cluster, my place in its clustering group
    # Redistribute: level 1 puts v's members on any rank. Gather all points (every rank already holds all of phi
    # (N, d) from extract_features, so this at most doubles that), then take this rank's share of v's members.
    x_all, u_all = common.all_gather_cat(x), common.all_gather_cat(u)  # (N, D), (N,) in index order
    N, mem = len(u_all), (u_all == v).nonzero().squeeze(1)  # (n_v,) global indices of v's members
    lo, hi = j * len(mem) // C, (j + 1) * len(mem) // C
    mine = mem[lo:hi]  # (about n_v/C,) this rank's share
    c_sub = torch.zeros(m, k_s, D, device=x.device)
    stats = torch.zeros(niter + 2, dtype=torch.float64, device=x.device)  # [objective_sub (niter+1), clusters split]
    if n_u[v] < k_s:  # a small super-cluster, as in two_level's loop: one sub-class per point, in index order
        z_mine = torch.arange(lo, hi, device=x.device)
        if j == 0:
            c_sub[v, : n_u[v]] = x_all[mem]
    else:
        c, z_mine, st = kmeans(x_all[mine], k_s, niter, seed + 1 + v, backend, group=groups[v])  # group v only
        if j == 0:  # the group's first rank reports its centroids and stats (the same on all the group's ranks)
            c_sub[v] = c
            stats[:-1] = torch.tensor(st["objective"], dtype=torch.float64) * n_u[v].item() / N
            stats[-1] = st["n_empty_split"]
    # Back to all ranks: every rank's (index, sub-class) pairs; the centroids and stats of the groups' first ranks.
    z_all = torch.zeros_like(u_all)  # (N,)
    z_all[common.all_gather_cat(mine)] = common.all_gather_cat(z_mine)
    common.all_reduce_sum(c_sub)
    common.all_reduce_sum(stats)
    start = int(common.all_gather_cat(torch.tensor([x.shape[0]], device=x.device))[:rank].sum())
    small = [w for w in range(m) if n_u[w] < k_s]
    return z_all[start:start + x.shape[0]], c_sub, int(stats[-1]), stats[:-1].cpu().numpy(), small
# ---- end DIST ----


# ---- Diagnostics: cluster sizes, NMI (Eq. (18), geometric mean) against the previous round and the labels ----
def _flat(res):
    """u·k_s + z as a numpy array, from a cluster()/two_level dict, a 03_kmeans.npz dict, or flat labels."""
    if isinstance(res, dict):
        return np.asarray(res["super"], dtype=np.int64) * int(res["k_s"]) + np.asarray(res["sub"], dtype=np.int64)
    return np.asarray(res, dtype=np.int64)


def diagnostics(res, labels=None, prev=None):
    flat = _flat(res)
    sizes = np.bincount(flat, minlength=len(res["centroids_super"]) * res["k_s"])
    bins = {"0": (0, 0), "1": (1, 1), "2-9": (2, 9), "10-99": (10, 99), "100-999": (100, 999), "1000+": (1000, np.inf)}
    out = {"n_images": len(flat), "k": len(sizes), "m": len(res["centroids_super"]), "k_s": res["k_s"],
           "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                     "n_empty": int((sizes == 0).sum()),
                     "histogram": {b: int(((sizes >= lo) & (sizes <= hi)).sum()) for b, (lo, hi) in bins.items()}}}
    out |= res["stats"]
    if prev is not None:  # stability between consecutive rounds; None when N changed
        p = _flat(prev)
        same_n = len(p) == len(flat)
        out["nmi_prev"] = normalized_mutual_info_score(p, flat, average_method="geometric") if same_n else None
    if labels is not None:  # quality against true classes, on the flat label
        out["nmi_labels"] = normalized_mutual_info_score(labels, flat, average_method="geometric")
        out["ari_labels"] = adjusted_rand_score(labels, flat)
    return out


# ---- The whole stage, in-process (04_train.py calls this every T epochs) ----
def cluster(model, source, cfg, device, prev=None, epoch=None, groups=None, m=None):
    """features -> PCA -> two_level, on every rank; returns two_level's dict (on CPU) + pca_mean, pca_proj, diagnostics.
    groups: the clustering groups of 04_train.py's --layout grouped (cluster_groups), None: level 2 on all ranks.

    cfg needs k, super_clusters, pca_dim, niter, seed, batch_size, workers, image_size, kmeans_backend
    (pca_sample optional). The k-means seed is cfg.seed + epoch when epoch is given. m: the number of
    super-clusters, default cfg.super_clusters (04_train.py passes 1 for DeepCluster: flat k-means into k).
    """
    m = cfg.super_clusters if m is None else m
    t0, net = time.time(), getattr(model, "module", model)
    N, d = len(source), int(net.feature_dim)
    n_fit = min(N, getattr(cfg, "pca_sample", 0) or N)
    check_sizes(N, cfg.k, m)  # guard rails before extraction
    check_pca(cfg.pca_dim, d, n_fit)
    common.log(f"feature cache: N x d = {N} x {d} float32 = {N * d * 4 / 2 ** 20:.1f} MiB on every rank")
    phi = extract_features(net, data.ClusterDataset(source, cfg.image_size), cfg.batch_size, device, cfg.workers)
    t1 = time.time()
    # DIST: PCA is fitted once, on rank 0, and broadcast (eigenvector signs could differ between processes)
    D = cfg.pca_dim or d
    mean, proj = torch.zeros(d), torch.zeros(d, D)
    if common.is_main():
        mean, proj = fit_pca(phi, cfg.pca_dim, n_fit, cfg.seed, warn=False)
    mean, proj = (common.broadcast(t.to(device).contiguous()).cpu() for t in (mean, proj))  # gloo sends raw memory
    rank, world = common.get_rank(), common.world_size()
    lo, hi = rank * N // world, (rank + 1) * N // world  # DIST: contiguous shards, so rank order = index order
    x = apply_pca(phi[lo:hi], mean, proj).to(device)  # (n_r, D)
    seed = cfg.seed if epoch is None else cfg.seed + epoch
    res = two_level(x, cfg.k, m, cfg.niter, seed, cfg.kmeans_backend, groups)
    res["super"] = common.all_gather_cat(res["super"]).cpu()  # DIST: (N,) on every rank
    res["sub"] = common.all_gather_cat(res["sub"]).cpu()
    res["centroids_super"], res["centroids_sub"] = res["centroids_super"].cpu(), res["centroids_sub"].cpu()
    res.update(pca_mean=mean, pca_proj=proj)
    res["stats"] |= {"epoch": epoch, "seconds_features": t1 - t0, "seconds_kmeans": time.time() - t1}
    res["diagnostics"] = diagnostics(res, getattr(source, "labels", None), prev)
    return res


def save_clustering(result, out_dir, name="03_kmeans"):
    """Rank 0 writes <out_dir>/<name>.npz (arrays) and <name>.json (diagnostics); returns the two paths."""
    paths = (os.path.join(out_dir, f"{name}.npz"), os.path.join(out_dir, f"{name}.json"))
    if common.is_main():
        arr = {key: np.asarray(torch.as_tensor(result[key]).cpu().numpy()) for key in
               ("super", "sub", "centroids_super", "centroids_sub", "pca_mean", "pca_proj")}
        common.save_npz(paths[0], **arr, k_s=np.int64(result["k_s"]))
        common.save_json(result["diagnostics"], paths[1])
    return paths


def main(cfg):
    rank, world, device = common.init_dist(cfg.device)
    common.log(f"03_kmeans config: {dataclasses.asdict(cfg)} | world {world} | device {device}")
    ckpt = cfg.ckpt or os.path.join(cfg.out_dir, "02_model_init.pt")
    if not os.path.exists(ckpt):
        raise common.UserError(f"{ckpt} does not exist: run 02_model.py --out_dir {cfg.out_dir} first (or pass --ckpt)")
    model, _ = model_lib.load_trunk(ckpt)
    model.to(device)
    if getattr(model, "image_size", cfg.image_size) != cfg.image_size:
        common.log(f"warning: --image_size {cfg.image_size} but the trunk was built for {model.image_size} px")
    source = data.make_source(cfg.data, "train", subset=cfg.subset or None, seed=cfg.seed)
    prev_path = os.path.join(cfg.out_dir, "03_kmeans.npz")
    prev = common.load_npz(prev_path) if os.path.exists(prev_path) else None  # the previous run, for nmi_prev
    t0 = time.time()
    res = cluster(model, source, cfg, device, prev=prev)
    dg = res["diagnostics"]
    for path in save_clustering(res, cfg.out_dir):
        common.log(f"wrote {path}")
    obj = dg["objective"] or dg["objective_sub"] or [float("nan")]
    common.log(f"03_kmeans: N {dg['n_images']} | k {cfg.k} = m {cfg.super_clusters} x k_s {res['k_s']} | "
               f"objective {obj[0]:.4f} -> {obj[-1]:.4f} | empty clusters split {dg['n_empty_split']} | "
               f"sizes min {dg['sizes']['min']} median {dg['sizes']['median']:g} max {dg['sizes']['max']} | "
               + (f"NMI labels {dg['nmi_labels']:.3f} ARI {dg['ari_labels']:.3f} | " if "nmi_labels" in dg else "")
               + (f"NMI prev {dg['nmi_prev']:.3f} | " if dg.get("nmi_prev") is not None else "")
               + f"{time.time() - t0:.1f} s")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    common.run(main, Config)
