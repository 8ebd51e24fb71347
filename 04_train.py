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
        python 04_train.py --method rotnet --init out/02_model_init.pt --out_dir out/rotnet
Uses:   01_data.make_source/RotationDataset, 02_model.load_trunk/build_model/Heads/hierarchical_loss,
        03_kmeans.cluster/save_clustering
"""
import dataclasses
import importlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
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
    subset: int = 10000  # seeded subset of the source, 0 = all of it (paper: 95.9M images)
    image_size: int = 32  # training and clustering crop in pixels (paper: 224)
    seed: int = 0  # one seed for sampling, augmentation, k-means, head init and dropout
    method: str = "deepercluster"  # deepercluster | rotnet | deepcluster | supervised (PAPER.md §8)
    k: int = 160  # sub-classes over all super-clusters (paper: 320000)
    super_clusters: int = 4  # m super-clusters; S = 4m super-classes with rotation (paper: 4, S = 16)
    pca_dim: int = 64  # PCA-whitening dimension D (paper: 4096)
    niter: int = 10  # Lloyd iterations per k-means level (paper: 10)
    kmeans_backend: str = "auto"  # 03_kmeans backend (auto picks faiss when present)
    reassign: int = 3  # T: re-cluster every T epochs (paper: 3; DeepCluster: 1)
    epochs: int = 6  # total number of epochs (paper: 100)
    epoch_size: int = 0  # E images drawn per epoch, 0 = N (paper: about N)
    batch_size: int = 64  # global batch, split over ranks (paper: 48 per GPU x 64 GPUs = 3072)
    lr: float = 0.1  # constant learning rate, trunk and heads (paper: 0.1; small batches may need less)
    weight_decay: float = 1e-5  # SGD weight decay (paper: 1e-5)
    momentum: float = 0.9  # SGD momentum (paper: 0.9)
    reset_super_head: str = "auto"  # re-initialise V at each round: auto (when m > 1, PAPER.md §5.1) | always | never
    sub_grad_scale: bool = False  # scale each W_s gradient by B/B_s like the official per-group average (PAPER.md §7)
    workers: int = 2  # DataLoader worker processes
    amp: bool = False  # bf16 autocast + channels_last, on CPU or CUDA (not in the paper)
    deterministic: bool = False  # torch.use_deterministic_algorithms: a resumed run ends with identical weights
    ckpt_every: int = 0  # also write 04_train_last.pt every N iterations (0 = at epoch ends only)
    keep_every: int = 3  # keep 04_train_ep{E:03d}.pt every N epochs (and after the last one)
    resume: bool = True  # resume from <out_dir>/04_train_last.pt when it exists
    force: bool = False  # start afresh over an incompatible 04_train_last.pt instead of refusing
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20  # refresh the progress bar's numbers every N iterations


# ---- §8 four methods, one loop: the number of super-classes S, sub-classes k_s, rotation on or off ----
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
    if cfg.method not in ("deepercluster", "deepcluster"):
        raise UserError(f"--method {cfg.method} is unknown: use deepercluster, rotnet, deepcluster or supervised")
    m = cfg.super_clusters
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


def wrap_model(net, device, world):
    """Replicated layout: every rank holds the trunk and all heads (PAPER.md §7, single-process equivalent)."""
    if world == 1:
        return net
    cuda = device.type == "cuda"
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if cuda else convert_sync_bn(net)
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
    row = lambda t: t[rank if rank < len(t) else 0]  # noqa: E731  (a resume on another world size: rank 0's state)
    torch.set_rng_state(row(rng["torch"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(row(rng["cuda"]), device)
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    random.setstate(rng["python"])
# ---- end DIST ----


# ---- checkpoints: 04_train_last.pt holds all state (PAPER.md §11 pitfall 1: the pseudo-labels too) ----
STATE = ("epoch", "iteration", "plan_indices", "plan_rotations", "super", "sub", "pca_mean", "pca_proj",
         "centroids_super", "centroids_sub", "round", "sums", "seconds", "metrics")
COMPAT = ("method", "k", "super_clusters", "data", "subset", "image_size")


def save(ctx, st, path, gather=True):
    rng = rng_states(ctx.device, gather)  # collective under torchrun: every rank calls save
    if common.is_main():
        o0, o1 = ctx.opts
        common.save_ckpt(common.ckpt_header("04_train", ctx.cfg) | {
            "arch": ctx.trunk.arch(), "model": ctx.trunk.state_dict(), "heads": ctx.heads.state_dict(),
            "optimizer": o0.state_dict(), "head_optimizer": o1.state_dict(), "method": ctx.cfg.method,
            "rng": rng} | {k: st[k] for k in STATE}, path)


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
        res = m03.cluster(ctx.trunk, ctx.source, cfg, ctx.device, prev=prev, epoch=e)  # eval mode, no rotation
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
    loader = torch.utils.data.DataLoader(  # its own generator, so that the global RNG (dropout) only serves dropout
        ctx.ds, batch_sampler=rank_batches(len(ctx.ds), cfg.batch_size, ctx.rank, ctx.world, st["iteration"]),
        num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
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
    rank, world, device = common.init_dist(cfg.device)
    if cfg.deterministic:  # bit-identical reruns and resumes (CUDA also needs the cuBLAS workspace setting)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    common.log(f"04_train: {dataclasses.asdict(cfg)} | {world} process(es) on {device}")
    source = data.make_source(cfg.data, "train", cfg.subset or None, cfg.seed)
    setup = method_setup(cfg, source)
    last = os.path.join(cfg.out_dir, "04_train_last.pt")
    trunk, ck = load_start(cfg, last)
    heads = m02.Heads(trunk.feature_dim, setup["S"], setup["k_s"])
    fmt = torch.channels_last if cfg.amp else torch.contiguous_format
    net = Net(trunk, heads, cfg.sub_grad_scale).to(device, memory_format=fmt)
    model = wrap_model(net, device, world)  # under torchrun: DDP, BatchNorm -> synced BatchNorm
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opts = (torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], **sgd),  # Sobel stays frozen
            torch.optim.SGD(heads.parameters(), **sgd))
    ctx = SimpleNamespace(cfg=cfg, setup=setup, source=source, trunk=trunk, heads=heads, model=model, opts=opts,
                          device=device, rank=rank, world=world, fmt=fmt, last=last,
                          ds=data.RotationDataset(source, cfg.image_size, cfg.seed))
    torch.manual_seed(cfg.seed * 1000 + rank)  # the global torch RNG now only draws dropout masks
    if ck is None:  # a fresh run; the clustering methods get their labels (and new heads) at epoch 0
        lab = {k: None if setup[k] is None else torch.from_numpy(setup[k]) for k in ("super", "sub")}
        st = dict.fromkeys(STATE) | lab | dict(epoch=0, iteration=0, plan_indices=torch.zeros(0, dtype=torch.long),
                                               round={}, sums=torch.zeros(7, dtype=torch.float64), seconds=0.0,
                                               metrics=[])
        reset_heads(heads, opts[1], torch.Generator(device).manual_seed(cfg.seed * 7919), True)
    else:
        heads.load_state_dict(ck["heads"])
        opts[0].load_state_dict(ck["optimizer"])
        opts[1].load_state_dict(ck["head_optimizer"])
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
        save(ctx, st, last, gather=False)  # not collective: the ranks may be interrupted at different points
        common.log(f"\ninterrupted: saved {last} (epoch {st['epoch']}, iteration {st['iteration']}); "
                   f"re-run the same command to resume")
        sys.exit(130)
    common.log(f"done: {cfg.epochs} epochs; wrote {last}, 04_train_log.jsonl and 04_train_curves.png in {cfg.out_dir}")


if __name__ == "__main__":
    common.run(main, Config)
