"""Stage 4: DeeperCluster's alternating training: cluster every T epochs (stage 03), train on Eq. (8) in between.

At the start of every T-th epoch the current trunk's features are clustered in-process (03_kmeans.cluster): m super-
clusters u, and k/m sub-classes z inside each. They define the targets of Eq. (6)-(7): super-class s = 4u + r (r = the
sample's rotation) and sub-class z. An epoch draws images uniformly over these pseudo-labels (Eq. (14)) and minimises
Eq. (8) with SGD. Cluster ids are arbitrary, so the heads restart from scratch at each round; the trunk carries over.
One loop serves four methods (PAPER.md §8): deepercluster (default), rotnet (S = 4, no clusters), deepcluster (no
rotation, S = m) and supervised (true labels as z: the upper baseline). 04_train_last.pt holds everything needed to
resume exactly, also in the middle of an epoch (PAPER.md §11, pitfall 1); re-running the command resumes.

Paper:  PAPER.md §2-§3 Eq. (6)-(9), §5 Eq. (14), §7 (SyncBN, gradient scale), §8 (special cases), §11 pitfalls 1, 8.
Reads:  <out_dir>/02_model_init.pt (trunk architecture + initial weights; or --init), 04_train_last.pt (to resume)
Writes: <out_dir>/03_kmeans_ep{E:03d}.npz/.json (the clustering at the start of epoch E), 04_train_last.pt,
        04_train_ep{E:03d}.pt (state after E epochs), 04_train_log.jsonl (one line per epoch), 04_train_curves.png
Run:    python 02_model.py --out_dir out && python 04_train.py --out_dir out
        torchrun --nproc_per_node=2 04_train.py --out_dir out        (same global batch; BN synced over all ranks)
        torchrun --nproc_per_node=16 04_train.py --layout grouped --out_dir out   (the paper's layout, PAPER.md §7)
        python 04_train.py --layout grouped --show_layout --world_size 16      (its rank table and head memory)
        python 04_train.py --method rotnet --init out/02_model_init.pt --out_dir out/rotnet
Uses:   01_data.make_source/RotationDataset, 02_model.load_trunk/build_model/Heads/hierarchical_loss,
        03_kmeans.cluster/save_clustering/cluster_groups
"""
import dataclasses
import importlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from common import UserError

data = importlib.import_module("01_data")  # 01_data.py: sources, RotationDataset (seeded per-sample augmentation)
m02 = importlib.import_module("02_model")  # 02_model.py: VGG trunk, Heads (V, W), hierarchical_loss (Eq. (8))
m03 = importlib.import_module("03_kmeans")  # 03_kmeans.py: features -> PCA-whitening -> two-level k-means


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # all inputs and outputs live here
    init: str = ""  # initial trunk checkpoint, default <out_dir>/02_model_init.pt (its architecture and weights)
    data: str = "fashion-mnist"  # data source spec, see 01_data.make_source (paper: YFCC100M)
    subset: int = 20000  # seeded subset of the source, 0 = all of it (paper: 95.9M images)
    image_size: int = 32  # training and clustering crop in pixels (paper: 224)
    seed: int = 0  # one seed for sampling, augmentation, k-means, head init and dropout
    method: str = "deepercluster"  # deepercluster | rotnet | deepcluster | deepcluster-2level | supervised (§8)
    k: int = 160  # sub-classes over all super-clusters (paper: 320000)
    super_clusters: int = 4  # m super-clusters; S = 4m super-classes with rotation (paper: 4, S = 16)
    pca_dim: int = 64  # PCA-whitening dimension D (paper: 4096)
    niter: int = 10  # Lloyd iterations per k-means level (paper: 10)
    kmeans_backend: str = "auto"  # 03_kmeans backend (auto picks faiss when present)
    reassign: int = 2  # T: re-cluster every T epochs (paper: 3; DeepCluster: 1; 2 gives the 16-epoch demo 8 rounds)
    epochs: int = 16  # total number of epochs (paper: 100)
    epoch_size: int = 0  # E images drawn per epoch, 0 = N (paper: about N)
    batch_size: int = 64  # global batch, split over ranks (paper: 48 per GPU x 64 GPUs = 3072)
    lr: float = 0.05  # constant learning rate, trunk and heads (paper: 0.1 at batch 3072; 0.05 at batch 64 here)
    weight_decay: float = 1e-5  # SGD weight decay (paper: 1e-5)
    momentum: float = 0.9  # SGD momentum (paper: 0.9)
    reset_super_head: str = "auto"  # re-initialise V at each round: auto (when m > 1, PAPER.md §5.1) | always | never
    sub_grad_scale: bool = False  # scale each W_s gradient by B/B_s like the official per-group average (PAPER.md §7)
    workers: int = 2  # DataLoader worker processes
    crop_min: float = 0.5  # smallest RandomResizedCrop area fraction (paper: 0.08 at 224 px; too small at 32 px, README)
    amp: bool = False  # bf16 autocast + channels_last, on CPU or CUDA (not in the paper)
    deterministic: bool = False  # torch.use_deterministic_algorithms: a resumed run ends with identical weights
    ckpt_every: int = 0  # also write 04_train_last.pt every N iterations (0 = at epoch ends only)
    keep_every: int = 3  # keep 04_train_ep{E:03d}.pt every N epochs (and after the last one)
    resume: bool = True  # resume from <out_dir>/04_train_last.pt when it exists
    force: bool = False  # start afresh over an incompatible 04_train_last.pt instead of refusing
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20  # refresh the progress bar's numbers every N iterations
    layout: str = "replicated"  # under torchrun: replicated (all heads on all ranks) | grouped (paper's, PAPER.md §7)
    show_layout: bool = False  # print --layout grouped's rank table for --world_size ranks and head memory, then exit
    world_size: int = 0  # N for --show_layout (0 = S, the smallest valid N); under torchrun N = --nproc_per_node


# ---- §8 four methods, one loop: the number of super-classes S, sub-classes k_s, rotation on or off ----
METHODS = ("deepercluster", "rotnet", "deepcluster", "deepcluster-2level", "supervised")


def method_setup(cfg, source):
    """-> dict(S, k_s, m, rotate, cluster, super, sub); super/sub (N,): fixed labels of the non-clustering methods."""
    N, zeros = len(source), np.zeros(len(source), np.int64)
    if (cfg.epoch_size or N) < cfg.batch_size or cfg.reset_super_head not in ("auto", "always", "never"):
        raise UserError(f"need --epoch_size (0 = N = {N}) >= --batch_size {cfg.batch_size} and --reset_super_head "
                        f"in auto|always|never (got {cfg.epoch_size}, {cfg.batch_size}, {cfg.reset_super_head!r})")
    if cfg.method == "rotnet":  # m = 1, k_s = 1: the sub-class loss is identically 0 and V (4 rotations) is never reset
        return dict(S=4, k_s=1, m=1, rotate=True, cluster=False, super=zeros, sub=zeros)
    if cfg.method == "supervised":  # one super-class whose sub-class is the true label: plain cross-entropy
        if source.labels is None:
            raise UserError(f"--method supervised needs a labelled source, and --data {cfg.data} has no labels")
        labels = np.asarray(source.labels, np.int64)  # (N,)
        n_cls = len(source.classes) if source.classes else int(labels.max()) + 1
        return dict(S=1, k_s=n_cls, m=1, rotate=False, cluster=False, super=zeros, sub=labels)
    if cfg.method not in METHODS:
        raise UserError(f"--method {cfg.method} is unknown: use {', '.join(METHODS)}")
    # deepcluster is DeepCluster itself (PAPER.md §8): one super-cluster (m = 1, so S = 1 and V is a 1-way head whose
    # loss is 0), flat k-means into k clusters, one k-way head W_0, no rotation: Eq. (4). deepcluster-2level keeps
    # the two-level clustering without rotation (S = m super-classes, k/m sub-classes in each).
    m = 1 if cfg.method == "deepcluster" else cfg.super_clusters
    if m < 1 or cfg.k < m or cfg.k % m:
        raise UserError(f"--k {cfg.k} must be a positive multiple of --super_clusters {m} (k_s = k/m, Eq. (7))")
    if cfg.k > N:
        raise UserError(f"--k {cfg.k} exceeds the {N} images of --data {cfg.data}: lower --k or raise --subset")
    rotate = cfg.method == "deepercluster"  # deepcluster: rotation off, so s = u and S = m (PAPER.md §8)
    return dict(S=4 * m if rotate else m, k_s=cfg.k // m, m=m, rotate=rotate, cluster=True, super=None, sub=None)


# ---- §3 targets, Eq. (6)-(7): super-class s = (super-cluster u, rotation r), sub-class z local to u ----
def make_targets(u, z, r, rotate):
    """(u, z, r) per sample -> (s, z). With rotation s = 4u + r (the official numbering), without it s = u."""
    return (4 * u + r if rotate else u), z  # Eq. (6)


def split_super(s, rotate):
    """Inverse of Eq. (6): s -> (u, r)."""
    return (s // 4, s % 4) if rotate else (s, s * 0)


# ---- §5.2 uniform sampling over pseudo-labels, Eq. (14) ----
# P(n, r) = (1/S) (1/K_{u_n}) 1/|{n' : u_n' = u_n, z_n' = z_n}|,  s = 4 u_n + r
def uniform_plan(super_, sub, S, rotate, E, rng):
    """-> (indices (E,), rotations (E,)) int64, the epoch's sample order. Each super-class s gets E/S draws from its
    super-cluster u, spread evenly over u's NON-EMPTY sub-classes and uniform inside each (with replacement only when
    a sub-class has fewer images than its share), all rotated by r; then one shuffle. rng: a np.random.Generator."""
    kz = int(sub.max()) + 1
    flat = super_ * kz + sub  # (N,) one id per (u, z) pair
    order = np.argsort(flat, kind="stable")
    ids, first, sizes = np.unique(flat[order], return_index=True, return_counts=True)  # non-empty (u, z) pairs only
    groups = {}  # u -> [member indices of each non-empty z]
    for i, f, c in zip(ids, first, sizes):
        groups.setdefault(int(i) // kz, []).append(order[f:f + c])
    supers = [s for s in range(S) if int(split_super(s, rotate)[0]) in groups]  # super-classes that have images
    quota = np.full(len(supers), E // len(supers))
    quota[rng.permutation(len(supers))[: E % len(supers)]] += 1  # E/S each, the remainder to random super-classes
    idx, rot = [], []
    for s, q in zip(supers, quota):
        u, r = split_super(s, rotate)
        subs = groups[int(u)]  # the K_u non-empty sub-classes of u
        # DEVIATION(paper): the official code draws floor(E/(S K_u)) + 1 per sub-class and truncates the shuffled
        # total; we drop the surplus at random, so every super-class gets exactly E/S and sub-classes differ by <= 1.
        per = np.full(len(subs), q // len(subs))
        per[rng.permutation(len(subs))[: q % len(subs)]] += 1
        idx += [rng.choice(mem, c, replace=len(mem) < c) for mem, c in zip(subs, per)]
        rot.append(np.full(q, r))
    p = rng.permutation(E)  # (E,) one shuffle over everything
    return np.concatenate(idx)[p].astype(np.int64), np.concatenate(rot)[p].astype(np.int64)


# ---- §5.1 head reset after each clustering round ----
def reset_heads(heads, head_opt, generator, reset_V):
    """Re-initialise W, b (and V when reset_V) from `generator`, and drop their momentum buffers."""
    keep = {k: v.clone() for k, v in heads.V.state_dict().items()}
    heads.reset(generator=generator)
    if not reset_V:
        heads.V.load_state_dict(keep)  # in place: the Parameter objects (optimizer, DDP) stay the same
    for name, p in heads.named_parameters():
        if reset_V or not name.startswith("V."):
            head_opt.state.pop(p, None)  # fresh SGD momentum for the new heads


class Net(nn.Module):
    """Trunk + heads as one module, so that DDP averages both gradients; forward returns Eq. (8)'s dict."""

    def __init__(self, trunk, heads, sub_grad_scale=False):
        super().__init__()
        self.trunk, self.heads, self.sub_grad_scale = trunk, heads, sub_grad_scale

    # DEVIATION(paper): mixed batches (every super-class in every batch, all heads in one process) instead of one
    # super-class per GPU group, so by default W_s's gradient is B_s/B of the official per-group mean; --sub_grad_scale
    # restores the official scale (PAPER.md §7; under torchrun B_s counts each rank's share of the batch).
    def forward(self, x, s, z):  # phi = fc7 before ReLU: (B, d)
        return m02.hierarchical_loss(self.heads, self.trunk(x), s, z, sub_grad_scale=self.sub_grad_scale)


KEYS = ("loss", "loss_super", "loss_sub", "acc_super", "acc_sub", "acc_joint")


def train_step(model, opts, x, s, z, amp=False):
    """One SGD step of Eq. (8) on this rank's part of the global batch -> (7,) sums over the global batch
    (the 6 KEYS times b, then b). Raises FloatingPointError, before any update, when the loss is not finite."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x, s, z)
    b = float(len(s))
    vals = [float(out[k].detach() if torch.is_tensor(out[k]) else out[k]) * b for k in KEYS] + [b]
    sums = common.all_reduce_sum(torch.tensor(vals, dtype=torch.float64, device=x.device)).cpu()  # one per step
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"loss is {sums[0] / sums[-1]:.4g}")
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    out["loss"].backward()  # DDP averages the gradients of trunk and heads over ranks here
    getattr(model, "reduce_grads", lambda: None)()  # --layout grouped: GroupedNet averages them now (DIST below)
    for opt in opts:
        opt.step()
    return sums


# ---- DIST: synced BatchNorm on CPU, the DDP wrap and the plan's split over ranks (identity in one process) ----
class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with training statistics over the global batch of all ranks (PAPER.md §7), for CPU/gloo where
    torch.nn.SyncBatchNorm refuses to run: one differentiable all-reduce of per-channel [sum, sum of squares, count]."""

    def _check_input_dim(self, x):
        pass  # (N, C), (N, C, L) and (N, C, H, W) all work

    def forward(self, x):
        if not self.training:  # eval: running statistics, nothing to synchronise
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        C, dims, xf = x.shape[1], [0] + list(range(2, x.dim())), x.float()
        count = torch.tensor([x.numel() / C], dtype=torch.float32, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))  # (2C+1,) sum over ranks
        n = stats[-1]
        mean = stats[:C] / n  # (C,)
        var = (stats[C:2 * C] / n - mean * mean).clamp(min=0)  # (C,) biased: what normalises the batch
        with torch.no_grad():  # running statistics exactly like nn.BatchNorm: momentum 0.1, unbiased variance
            self.running_mean.copy_(self.momentum * mean + (1 - self.momentum) * self.running_mean)
            self.running_var.copy_(self.momentum * var * n / (n - 1) + (1 - self.momentum) * self.running_var)
            self.num_batches_tracked += 1
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


def convert_sync_bn(module):
    """Swap every BatchNorm1d/2d inside `module` for SyncBatchNorm, sharing its parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, True).train(child.training)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module


def wrap_model(net, device, world, groups=None):
    """Replicated layout: every rank holds the trunk and all heads (PAPER.md §7, single-process equivalent).
    Grouped layout (groups given): GroupedNet, with batch norm synced over ALL ranks too, not inside a group."""
    if world == 1:
        return net
    cuda = device.type == "cuda"
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else convert_sync_bn(net)
    if groups is not None:
        return GroupedNet(net, groups)
    return DDP(net, device_ids=[device] if cuda else None)


def rank_batches(E, batch_size, rank, world, start=0):
    """The plan positions j this rank feeds, one list per iteration from `start`. Global batch b is plan[bB:(b+1)B]
    (an incomplete last batch is dropped); rank takes every world-th position of it, so the union over the ranks
    is exactly the single-process batch."""
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} must be a multiple of the {world} processes")
    return [list(range(b * batch_size + rank, (b + 1) * batch_size, world)) for b in range(start, E // batch_size)]


def rng_states(device, gather):
    """Global RNG states: torch's CPU and CUDA ones (dropout masks) from every rank when `gather` (a collective)."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    many = gather and common.world_size() > 1
    np_state = np.random.get_state()
    return {k: common.all_gather_cat(v[None].to(device)).cpu() if many else v[None] for k, v in mine.items()} | {
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64))] + list(np_state[2:]),
        "python": random.getstate()}  # (world or 1, 5056) uint8 rows for torch, (NumPy, Python: for completeness)


def set_rng_states(rng, rank, device):
    # a resume on another world size takes rank 0's state; clone: torch.set_rng_state crashes (SIGSEGV) on a row view
    row = lambda t: t[rank if rank < len(t) else 0].clone()  # noqa: E731
    torch.set_rng_state(row(rng["torch"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(row(rng["cuda"]), device)
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    random.setstate(rng["python"])
# ---- end DIST ----


# ---- DIST: grouped layout (PAPER.md §7) ----
# --layout grouped under torchrun --nproc_per_node=N, N a multiple of S, lays the ranks out as the official code does:
#   training groups:   S groups of G = N/S consecutive ranks. Group t trains super-class t only: super-cluster
#                      u = t // 4 under rotation r = t % 4 (without rotation u = t), so s = 4u + r = t, Eq. (6). It
#                      holds V and W_t, b_t only, and its batches hold images of super-cluster u rotated by r only.
#   clustering groups: m groups of N/m = 4G consecutive ranks, the 4 training groups of super-cluster u; level 2 of
#                      the k-means of super-cluster u runs inside group u (03_kmeans.level2_in_groups).
# Trunk and V are data-parallel over all N ranks, W_t over the G ranks of group t, and batch norm is synced over all
# N ranks: a group's batch holds one super-class, so per-group statistics would give the heads a shortcut.
# Gradient scale: every rank's loss is the mean over its b = B/N samples, and the gradients are averaged, so
#   trunk, V: (1/N) sum_ranks (1/b) sum_{n on rank} grad l_n   = (1/B) sum_n grad l_n, the single-process gradient;
#   W_t:      (1/G) sum_{ranks of t} (1/b) sum_{n on rank} ...  = (1/B_t) sum_{n in t} grad l_n, B_t = G b = B/S:
#             B/B_t = S times the single-process (1/B) sum_{n in t} grad l_n, the official per-group mean (§7).
# --sub_grad_scale changes nothing here: each rank's batch is one super-class, so its factor B/B_s is 1 on every rank.
def check_world(world, S):
    """Refuse an N that is not a multiple of S, listing valid ones."""
    if world < 1 or world % S:
        raise UserError(f"--layout grouped: N must be a multiple of S={S}: {', '.join(str(S * i) for i in range(1, 5))}"
                        f", ... (got N = {world} processes)")
    return world // S  # G, ranks per training group


def make_groups(layout, setup, rank, world):
    """-> None (replicated), or this rank's place in the grouped layout and its process groups. Collective: every
    rank creates every group, in the same order (torch.distributed.new_group's rule), also those it is not in."""
    if layout not in ("replicated", "grouped"):
        raise UserError(f"--layout {layout!r}: use replicated or grouped")
    if layout == "replicated":
        return None
    S = setup["S"]
    G = check_world(world, S)
    g = SimpleNamespace(S=S, G=G, t=rank // G, world=world, train=None, leaders=None, cluster=None)
    if world > 1:
        train = [dist.new_group(list(range(t * G, (t + 1) * G))) for t in range(S)]  # averages W_t's gradient
        g.train = train[g.t]
        g.leaders = dist.new_group(list(range(0, world, G)))  # the first rank of every group: checkpoints
        g.cluster = m03.cluster_groups(setup["m"]) if setup["cluster"] else None  # m groups of N/m ranks
    return g


class ShardedHeads(nn.Module):
    """The heads of training group t: V (S, d), the same on all ranks, and only W_t (k_s, d) and b_t (k_s,),
    kept as W (1, k_s, d), b (1, k_s): row t of m02.Heads' stacked W (S, k_s, d), b (S, k_s)."""

    def __init__(self, d, S, k_s, t):
        super().__init__()
        self.d, self.S, self.k_s, self.t = int(d), int(S), int(k_s), int(t)
        self.V = nn.Linear(self.d, self.S)
        self.W = nn.Parameter(torch.empty(1, self.k_s, self.d))
        self.b = nn.Parameter(torch.empty(1, self.k_s))
        self.reset()

    def reset(self, generator=None):
        """m02.Heads.reset's draws (V; W_0..W_{S-1}; b_0..b_{S-1}) keeping row t: the single-process heads, never
        all of W in memory. Equal on CPU; a CUDA generator draws S chunks differently from one tensor, but every rank
        of group t still draws the same W_t, and every rank the same V."""
        m02._linear_init_(self.V.weight, self.V.bias, generator)
        bound = 1 / math.sqrt(self.d)  # nn.Linear's default, as in m02._linear_init_
        with torch.no_grad():
            for p in (self.W, self.b):
                row = torch.empty_like(p[0])
                for s in range(self.S):
                    row.uniform_(-bound, bound, generator=generator)
                    if s == self.t:
                        p[0].copy_(row)

    def forward(self, f, s, grad_scale=None):
        """f (b, d), s (b,), all t (group_batches) -> logits_super (b, S), logits_sub (b, k_s) = W_t f + b_t."""
        return self.V(f), F.linear(f, self.W[0], self.b[0])  # grad_scale is all ones (see --sub_grad_scale above)


class GroupedNet(nn.Module):
    """Net under the grouped layout, without DDP: DDP averages every parameter over all ranks, and each group holds a
    different W_t. reduce_grads (train_step calls it after backward) averages the trunk and V over all ranks and
    W_t, b_t over group t. Nothing is broadcast at the start (DDP does): every rank loads the same trunk and draws
    the same heads. Unlike DDP, communication does not overlap the backward pass (simpler, a little slower)."""

    def __init__(self, net, groups):
        super().__init__()
        self.module, self.groups = net, groups  # .module, like DDP's, so that getattr(model, "module", model) works

    def forward(self, x, s, z):
        return self.module(x, s, z)

    def reduce_grads(self):
        trunk, heads, g = self.module.trunk, self.module.heads, self.groups
        shared = [p for p in trunk.parameters() if p.requires_grad] + list(heads.V.parameters())
        for params, group, n in ((shared, None, g.world), ([heads.W, heads.b], g.train, g.G)):
            flat = torch.cat([p.grad.flatten() for p in params])  # one all-reduce per set of parameters
            common.all_reduce_sum(flat, group).div_(n)  # the mean over all ranks, or over the G ranks of group t
            for p, v in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(v.view_as(p))


def group_batches(plan_s, batch_size, rank, world, S, start=0):
    """The grouped layout's rank_batches: the plan positions j this rank feeds, one list per iteration from `start`.
    plan_s (E,): the super-class of every plan position. Group t = rank // G takes the positions of super-class t in
    plan order (its share of Eq. (14)'s plan, E/S draws); global batch b holds B/S of them per group, and the G ranks
    of the group take every G-th. The union over the ranks: a batch of B with exactly B/S samples of each s."""
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} must be a multiple of the {world} processes")
    G, B_t = world // S, batch_size // S  # ranks per group, samples per group and batch
    counts = np.bincount(plan_s, minlength=S)  # (S,) E/S each, unless a super-cluster is empty
    if counts.min() < len(plan_s) // S:
        raise UserError(f"--layout grouped: super-class {int(counts.argmin())} has no images this epoch (an empty "
                        f"super-cluster), so its training group would idle: use --layout replicated")
    mine = np.flatnonzero(plan_s == rank // G)  # (about E/S,) the positions of super-class t
    return [mine[b * B_t + rank % G:(b + 1) * B_t:G].tolist() for b in range(start, int(counts.min()) // B_t)]


def _gather_rows(p, groups):
    """Row t (1, ...) of the first rank of every training group -> (S, ...) on rank 0 (None on the other ranks)."""
    if groups.world == 1:
        return p
    if common.get_rank() % groups.G:  # not a group's first rank: its row is a copy of that rank's
        return None
    rows = [torch.empty_like(p) for _ in range(groups.S)] if common.is_main() else None
    dist.gather(p.detach().contiguous(), rows, dst=0, group=groups.leaders)
    return torch.cat(rows) if common.is_main() else None  # S x (1, k_s, d) -> (S, k_s, d)


def head_states(heads, opt, groups):
    """-> (heads state, head optimizer state) in the replicated format: W (S, k_s, d), b (S, k_s), and their SGD
    momentum, so a checkpoint loads in any layout. Grouped: collective; rank 0 gathers them (None elsewhere). At the
    paper's scale rank 0 then holds all of W (21 GB), as the single checkpoint file does."""
    sd, osd = heads.state_dict(), opt.state_dict()
    if groups is None:
        return sd, osd
    pos = {name: i for i, (name, _) in enumerate(heads.named_parameters())}  # the optimizer's keys are positions
    osd = dict(osd, state=dict(osd["state"]))  # shallow copies: the live optimizer state is left untouched
    for name in ("W", "b"):
        sd[name] = _gather_rows(sd[name], groups)
        if pos[name] in osd["state"]:  # no momentum right after a head reset; the same on every rank
            st = osd["state"][pos[name]]
            osd["state"][pos[name]] = dict(st, momentum_buffer=_gather_rows(st["momentum_buffer"], groups))
    return (sd, osd) if common.is_main() else (None, None)


def load_heads(heads, opt, ck, groups):
    """Load checkpoint ck's heads and head optimizer; the grouped layout keeps row t of W, b and of their momentum."""
    sd, osd = ck["heads"], ck["head_optimizer"]
    if groups is not None:
        t, pos = groups.t, {name: i for i, (name, _) in enumerate(heads.named_parameters())}
        sd = dict(sd, W=sd["W"][t:t + 1], b=sd["b"][t:t + 1])  # (S, k_s, d) -> (1, k_s, d), (S, k_s) -> (1, k_s)
        osd = dict(osd, state=dict(osd["state"]))
        for name in ("W", "b"):
            if pos[name] in osd["state"]:
                st = osd["state"][pos[name]]  # clone: the optimizer would otherwise keep a view of all S rows
                osd["state"][pos[name]] = dict(st, momentum_buffer=st["momentum_buffer"][t:t + 1].clone())
    heads.load_state_dict(sd)
    opt.load_state_dict(osd)


def head_params(S, k_s, d):
    """Head parameters on one rank -> (replicated: V + all W_s, b_s, grouped: V + W_t, b_t)."""
    V = S * d + S
    return V + S * k_s * (d + 1), V + k_s * (d + 1)


def show_layout(cfg):
    """--show_layout: print the grouped layout for --world_size ranks, and the head memory per rank; no processes."""
    if cfg.method not in ("deepercluster", "deepcluster", "deepcluster-2level", "rotnet"):
        raise UserError(f"--show_layout knows deepercluster, deepcluster(-2level) and rotnet (--method {cfg.method}: "
                        f"supervised has S = 1, a single group, and its k_s needs the data)")
    rotate = cfg.method not in ("deepcluster", "deepcluster-2level")
    m = 1 if cfg.method in ("rotnet", "deepcluster") else cfg.super_clusters
    S, k_s = 4 * m if rotate else m, 1 if cfg.method == "rotnet" else cfg.k // m
    if m < 1 or cfg.k % m:
        raise UserError(f"--k {cfg.k} must be a positive multiple of --super_clusters {m} (k_s = k/m, Eq. (7))")
    N = cfg.world_size or S
    G, C = check_world(N, S), N // m
    print(f"--layout grouped with N = {N} ranks: S = {S} super-classes ({m} super-cluster(s) x "
          f"{4 if rotate else 1} rotation(s)), k_s = {k_s}\n{S} training groups of N/S = {G} rank(s); "
          f"{m} clustering group(s) of N/m = {C} rank(s)\n")
    print("rank | training group t | super-class s = 4u + r | super-cluster u | rotation r | clustering group")
    for rank in range(N):
        t = rank // G
        u, r = (t // 4, t % 4) if rotate else (t, 0)
        print(f"{rank:4d} | {t:16d} | {t:22d} | {u:15d} | {r:10d} | {rank // C:16d}")
    init = cfg.init or os.path.join(cfg.out_dir, "02_model_init.pt")  # d = fc7's width, from the trunk's arch
    d, known = (common.load_ckpt(init)["arch"]["fc_dim"], "") if os.path.exists(init) else (4096, f", no {init}")
    gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"  # noqa: E731  (decimal units)
    size = lambda n: f"{n:,d} = {gb(4 * n)} (x3: {gb(12 * n)})"  # noqa: E731  fp32: 4 bytes per parameter
    print("\nhead parameters per rank, fp32; x3 with their gradients and SGD momentum")
    for name, (S_, k_, k_s_, d_) in ((f"this run (d = {d}{known})", (S, m * k_s, k_s, d)),
                                     ("paper", (16, 320000, 80000, 4096))):
        rep, grp = head_params(S_, k_s_, d_)
        print(f"  {name}: S = {S_}, k = {k_:,d}, k_s = {k_s_:,d}, d = {d_}\n"
              f"    replicated (V + all W_s, b_s): {size(rep)}\n    grouped    (V + W_t, b_t):     {size(grp)}, "
              f"{rep / grp:.1f}x less")
# ---- end DIST ----


# ---- checkpoints: 04_train_last.pt holds all state (PAPER.md §11 pitfall 1: the pseudo-labels too) ----
STATE = ("epoch", "iteration", "plan_indices", "plan_rotations", "super", "sub", "pca_mean", "pca_proj",
         "centroids_super", "centroids_sub", "round", "sums", "seconds", "metrics")
COMPAT = ("method", "k", "super_clusters", "data", "subset", "image_size")


def save(ctx, st, path, gather=True):
    """Write the checkpoint (rank 0); returns False when the grouped layout cannot (after Ctrl-C, gather=False)."""
    if not gather and ctx.groups is not None and ctx.world > 1:  # DIST: the sharded heads need every rank
        common.log(f"--layout grouped: no checkpoint after an interrupt (gathering the heads W_t needs all ranks "
                   f"in step); {path} keeps the last saved state")
        return False
    rng = rng_states(ctx.device, gather)  # collective under torchrun: every rank calls save
    heads, head_opt = head_states(ctx.heads, ctx.opts[1], ctx.groups)  # DIST: collective in the grouped layout
    if common.is_main():
        common.save_ckpt(common.ckpt_header("04_train", ctx.cfg) | {
            "arch": ctx.trunk.arch(), "model": ctx.trunk.state_dict(), "heads": heads,
            "optimizer": ctx.opts[0].state_dict(), "head_optimizer": head_opt, "method": ctx.cfg.method,
            "rng": rng} | {k: st[k] for k in STATE}, path)
    return True


def incompatible(ck, cfg, arch):
    """The settings in which checkpoint `ck` differs from this run, as readable strings."""
    old = ck["config"]
    diff = [f"--{key} {old.get(key)!r} there vs {getattr(cfg, key)!r} now" for key in COMPAT
            if old.get(key) != getattr(cfg, key)]
    return diff + [f"trunk {key} {ck['arch'].get(key)!r} there vs {arch.get(key)!r} in the init checkpoint"
                   for key in ("width", "sobel", "image_size", "fc_dim") if ck["arch"].get(key) != arch.get(key)]


def load_start(cfg, last):
    """-> (trunk, ck): the trunk of 04_train_last.pt when resuming (ck = that checkpoint), else of the init one."""
    init = cfg.init or os.path.join(cfg.out_dir, "02_model_init.pt")
    ck = None
    if os.path.exists(last) and cfg.resume:
        ck = common.load_ckpt(last, "04_train")
        diff = incompatible(ck, cfg, m02.load_trunk(init)[0].arch() if os.path.exists(init) else ck["arch"])
        if diff and not cfg.force:
            raise UserError(f"{last} is from an incompatible run ({'; '.join(diff)}): use another --out_dir, "
                            f"or --force to start afresh and overwrite it")
        if diff:
            common.log(f"--force: ignoring {last} ({'; '.join(diff)}); it will be overwritten")
            ck = None
    elif os.path.exists(last):
        common.log(f"--no-resume: starting afresh; {last} will be overwritten")
    if ck is not None:
        trunk = m02.build_model(ck["arch"])
        trunk.load_state_dict(ck["model"])
        return trunk, ck
    if not os.path.exists(init):
        raise UserError(f"{init} does not exist: run 02_model.py --out_dir {cfg.out_dir} first (or pass --init PATH)")
    return m02.load_trunk(init)[0], None


# ---- the alternation (PAPER.md §5.1): cluster every T epochs, then train on Eq. (8) ----
def start_epoch(ctx, st):
    """Before epoch e: every T epochs cluster and reset the heads; then draw the epoch's plan (Eq. (14))."""
    cfg, e, setup = ctx.cfg, st["epoch"], ctx.setup
    if setup["cluster"] and e % cfg.reassign == 0:
        t0 = time.time()
        prev = None if st["super"] is None else {"super": st["super"], "sub": st["sub"], "k_s": setup["k_s"]}
        res = m03.cluster(ctx.trunk, ctx.source, cfg, ctx.device, prev=prev, epoch=e,  # eval mode, no rotation
                          groups=getattr(ctx.groups, "cluster", None),  # DIST: grouped: level 2 per u
                          m=setup["m"])
        ctx.trunk.train()
        if common.is_main():
            m03.save_clustering(res, cfg.out_dir, name=f"03_kmeans_ep{e:03d}")
        st.update({key: torch.as_tensor(res[key]).cpu() for key in STATE[4:10]})  # kept in every checkpoint
        st["super"], st["sub"] = st["super"].long(), st["sub"].long()  # (N,) u and z of every image
        dg = res["diagnostics"]
        st["round"] = {key: None if dg.get(key) is None else float(dg[key]) for key in ("nmi_prev", "nmi_labels",
                       "ari_labels")} | {"n_empty": int(dg["n_empty_split"]), "cluster_min": dg["sizes"]["min"],
                                         "cluster_max": dg["sizes"]["max"], "cluster_seconds": time.time() - t0}
        # The ids of this round are unrelated to the previous round's (k-means numbers its clusters arbitrarily), so
        # the sub-class heads W (and V when m > 1: super-cluster ids are arbitrary too) restart from scratch, with
        # fresh optimizer state. The trunk and its optimizer carry over (PAPER.md §5.1).
        reset_V = {"auto": setup["m"] > 1, "always": True, "never": False}[cfg.reset_super_head]
        reset_heads(ctx.heads, ctx.opts[1], torch.Generator(ctx.device).manual_seed(cfg.seed * 7919 + e), reset_V)
    else:
        st["round"] = {}
    E = cfg.epoch_size or len(ctx.source)
    rng = np.random.default_rng([cfg.seed, e])  # seeded by (seed, epoch): never the global NumPy RNG
    idx, rot = uniform_plan(st["super"].numpy(), st["sub"].numpy(), setup["S"], setup["rotate"], E, rng)
    st.update(plan_indices=torch.from_numpy(idx), plan_rotations=torch.from_numpy(rot), iteration=0)
    if st["round"]:
        save(ctx, st, ctx.last)  # a resume after a (possibly long) clustering does not redo it


def train_epoch(ctx, st):
    """Train epoch st["epoch"] from iteration st["iteration"]; st stays resumable after every iteration."""
    cfg, e, setup = ctx.cfg, st["epoch"], ctx.setup
    ctx.ds.set_plan(e, st["plan_indices"].numpy(), st["plan_rotations"].numpy())
    n_iter = len(ctx.ds) // cfg.batch_size
    if ctx.groups is None:
        batches = rank_batches(len(ctx.ds), cfg.batch_size, ctx.rank, ctx.world, st["iteration"])
    else:  # DIST: --layout grouped, every training group feeds on its own super-class's share of the plan
        plan_s = make_targets(st["super"][st["plan_indices"]], None, st["plan_rotations"], setup["rotate"])[0]
        batches = group_batches(plan_s.numpy(), cfg.batch_size, ctx.rank, ctx.world, setup["S"], st["iteration"])
    loader = torch.utils.data.DataLoader(  # its own generator, so that the global RNG (dropout) only serves dropout
        ctx.ds, batch_sampler=batches, num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda",
        generator=torch.Generator())
    bar = tqdm(total=n_iter, initial=st["iteration"], desc=f"epoch {e}", disable=not common.is_main(), leave=False)
    t0, seconds0 = time.time(), st["seconds"]
    for x, r, n in loader:  # x (b, 3, P, P) rotated crops, r (b,) rotations, n (b,) image indices
        s, z = make_targets(st["super"][n], st["sub"][n], r, setup["rotate"])  # Eq. (6)-(7): (b,), (b,)
        x = x.to(ctx.device, non_blocking=True, memory_format=ctx.fmt)
        st["sums"] += train_step(ctx.model, ctx.opts, x, s.to(ctx.device), z.to(ctx.device), cfg.amp)
        st["iteration"] += 1
        st["seconds"] = seconds0 + time.time() - t0
        it = st["iteration"]
        if it % cfg.log_every == 0 or it == n_iter:
            m = st["sums"][:-1] / st["sums"][-1]
            bar.set_postfix_str(f"loss {m[0]:.3f} (super {m[1]:.3f} sub {m[2]:.3f}) acc joint {m[5]:.1%} "
                                f"{st['sums'][-1] / st['seconds']:.0f} img/s", refresh=False)
        bar.update()
        if cfg.ckpt_every and it % cfg.ckpt_every == 0 and it < n_iter:
            save(ctx, st, ctx.last)
        # ---- TEST HOOK (tests/test_train.py only): DC_TEST_KILL_AT_ITER=N[:INT] sends this process SIGKILL (a crash)
        # or SIGINT (Ctrl-C) right after global iteration N ----
        hook = os.environ.get("DC_TEST_KILL_AT_ITER", "").split(":")
        if hook[0] == str(e * n_iter + it):
            os.kill(os.getpid(), signal.SIGINT if hook[1:] == ["INT"] else signal.SIGKILL)
    bar.close()
    m = (st["sums"][:-1] / st["sums"][-1].clamp(min=1)).tolist()
    return {"epoch": e, **dict(zip(KEYS, m)), **{key: st["round"].get(key) for key in
            ("nmi_prev", "nmi_labels", "ari_labels", "n_empty", "cluster_min", "cluster_max")},
            "seconds": st["seconds"] + st["round"].get("cluster_seconds", 0.0),
            "images_per_s": float(st["sums"][-1]) / max(st["seconds"], 1e-9), "lr": cfg.lr}


def finish_epoch(ctx, st, line):
    """Log the epoch, advance the state to the next epoch (no plan yet) and write the files (rank 0)."""
    cfg, e = ctx.cfg, st["epoch"]
    st["metrics"].append(line)
    st.update(epoch=e + 1, iteration=0, plan_indices=torch.zeros(0, dtype=torch.long),
              plan_rotations=torch.zeros(0, dtype=torch.long), sums=torch.zeros(7, dtype=torch.float64), seconds=0.0)
    save(ctx, st, ctx.last)
    if (cfg.keep_every and (e + 1) % cfg.keep_every == 0) or e + 1 == cfg.epochs:
        save(ctx, st, os.path.join(cfg.out_dir, f"04_train_ep{e + 1:03d}.pt"))
    if not common.is_main():
        return
    log_path = os.path.join(cfg.out_dir, "04_train_log.jsonl")
    with open(log_path + ".tmp", "w") as fh:  # rewritten from the checkpoint's metrics: a resume never duplicates
        fh.writelines(json.dumps(m) + "\n" for m in st["metrics"])
    os.replace(log_path + ".tmp", log_path)
    plot_curves(st["metrics"], os.path.join(cfg.out_dir, "04_train_curves.png"))
    nmi = "" if line["nmi_labels"] is None else f" | NMI labels {line['nmi_labels']:.3f}"
    common.log(f"epoch {e} | loss {line['loss']:.3f} (super {line['loss_super']:.3f} sub {line['loss_sub']:.3f}) | "
               f"acc super {line['acc_super']:.1%} sub {line['acc_sub']:.1%} joint {line['acc_joint']:.1%}{nmi} | "
               f"{line['seconds']:.1f} s, {line['images_per_s']:.0f} img/s")


def plot_curves(metrics, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("loss", "loss_super", "loss_sub"), ("acc_super", "acc_sub", "acc_joint"),
              ("nmi_prev", "nmi_labels", "ari_labels")]
    for ax, keys, title in zip(axes, panels, ("Eq. (8) loss", "training accuracy, Eq. (9)", "clustering")):
        for key in keys:
            pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(cfg):
    if cfg.show_layout:  # DIST: the grouped layout's table and head memory; no processes, no data
        return show_layout(cfg)
    rank, world, device = common.init_dist(cfg.device)
    if cfg.deterministic:  # bit-identical reruns and resumes (CUDA also needs the cuBLAS workspace setting)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    common.log(f"04_train: {dataclasses.asdict(cfg)} | {world} process(es) on {device}")
    source = data.make_source(cfg.data, "train", cfg.subset or None, cfg.seed)
    setup = method_setup(cfg, source)
    groups = make_groups(cfg.layout, setup, rank, world)  # DIST: None in the replicated layout
    last = os.path.join(cfg.out_dir, "04_train_last.pt")
    trunk, ck = load_start(cfg, last)
    d, S, k_s = trunk.feature_dim, setup["S"], setup["k_s"]
    heads = m02.Heads(d, S, k_s) if groups is None else ShardedHeads(d, S, k_s, groups.t)  # DIST: grouped: W_t only
    fmt = torch.channels_last if cfg.amp else torch.contiguous_format
    net = Net(trunk, heads, cfg.sub_grad_scale).to(device, memory_format=fmt)
    model = wrap_model(net, device, world, groups)  # under torchrun: DDP (or GroupedNet), BatchNorm -> synced
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opts = (torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], **sgd),  # Sobel stays frozen
            torch.optim.SGD(heads.parameters(), **sgd))
    # DEVIATION(paper): RandomResizedCrop keeps at least --crop_min = 50% of the image (paper: 8%), because at 32 px an
    # 8% crop is a 9x9-pixel patch whose rotation and cluster cannot be predicted (README, Results: finding 3).
    ctx = SimpleNamespace(cfg=cfg, setup=setup, source=source, trunk=trunk, heads=heads, model=model, opts=opts,
                          device=device, rank=rank, world=world, fmt=fmt, last=last, groups=groups,
                          ds=data.RotationDataset(source, cfg.image_size, cfg.seed, crop_scale=(cfg.crop_min, 1.0)))
    torch.manual_seed(cfg.seed * 1000 + rank)  # the global torch RNG now only draws dropout masks
    if ck is None:  # a fresh run; the clustering methods get their labels (and new heads) at epoch 0
        lab = {k: None if setup[k] is None else torch.from_numpy(setup[k]) for k in ("super", "sub")}
        st = dict.fromkeys(STATE) | lab | dict(epoch=0, iteration=0, plan_indices=torch.zeros(0, dtype=torch.long),
                                               round={}, sums=torch.zeros(7, dtype=torch.float64), seconds=0.0,
                                               metrics=[])
        reset_heads(heads, opts[1], torch.Generator(device).manual_seed(cfg.seed * 7919), True)
    else:
        load_heads(heads, opts[1], ck, groups)  # DIST: the grouped layout keeps its row t of W and of its momentum
        opts[0].load_state_dict(ck["optimizer"])
        for group in opts[0].param_groups + opts[1].param_groups:
            group.update(sgd)  # the flags win over the saved hyper-parameters (e.g. a lower --lr after a NaN)
        set_rng_states(ck["rng"], rank, device)
        st = {k: ck[k] for k in STATE}
        common.log(f"resuming {last}: epoch {st['epoch']}, iteration {st['iteration']}")
    model.train()
    try:
        while st["epoch"] < cfg.epochs:
            if len(st["plan_indices"]) == 0:  # a new epoch, not a resume inside one
                start_epoch(ctx, st)
            finish_epoch(ctx, st, train_epoch(ctx, st))
    except FloatingPointError as err:  # nothing saved: 04_train_last.pt still holds the last good state
        print(f"error: non-finite loss at epoch {st['epoch']} iteration {st['iteration'] + 1} ({err}); stopped "
              f"without saving, {last} keeps the last good state: lower --lr (now {cfg.lr})", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if save(ctx, st, last, gather=False):  # not collective: the ranks may be interrupted at different points
            common.log(f"\ninterrupted: saved {last} (epoch {st['epoch']}, iteration {st['iteration']}); "
                       f"re-run the same command to resume")
        sys.exit(130)
    common.log(f"done: {cfg.epochs} epochs; wrote {last}, 04_train_log.jsonl and 04_train_curves.png in {cfg.out_dir}")


if __name__ == "__main__":
    common.run(main, Config)
