"""Stage 4: DeeperCluster's alternating training: cluster every T epochs (03), train on Eq. (8).

Every T-th epoch starts by clustering the current trunk's features (03_kmeans, in-process): m
super-clusters u, k/m sub-classes z in each, the targets of Eq. (6)-(7): s = 4u + r (r = the
sample's rotation) and z. An epoch draws images uniformly over these pseudo-labels (Eq. (14)) and
minimises Eq. (8) with SGD. Cluster ids are arbitrary, so the heads restart at each round; the trunk
carries over. One loop serves the five methods of §8 (02_model.method_shape, --method), each with
its own official recipe (RECIPES). 04_train_last.pt holds all the state, so re-running the command
resumes exactly, also in mid-epoch (§11 pitfall 1). Ctrl-C or SIGTERM saves at the next iteration.

Paper:  PAPER.md §2-§3 Eq. (6)-(9), §5 Eq. (14), §6, §7 (SyncBN, gradient scale), §8, §11
Reads:  <out_dir>/02_model_init.pt (trunk architecture + weights; or --init), 04_train_last.pt
Writes: <out_dir>/03_kmeans_ep{E:03d}.npz/.json (clustering at epoch E's start), 04_train_last.pt,
        04_train_ep{E:03d}.pt, 04_train_seen{N}.pt, 04_train_log.jsonl, 04_train_curves.png
Run:    python 02_model.py --out_dir out && python 04_train.py --out_dir out
        torchrun --nproc_per_node=2 04_train.py --out_dir out    (same global batch, BN synced)
        torchrun --nproc_per_node=16 04_train.py --layout grouped --out_dir out   (PAPER.md §7)
Uses:   01_data, 02_model.Heads/hierarchical_loss, 03_kmeans.cluster; scaleout/ (--layout grouped)
"""
import importlib
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn

from support import clusterstats, common, parallel, resume, trainlog
from support.common import UserError

data = importlib.import_module("01_data")  # 01_data.py: sources, RotationDataset
m02 = importlib.import_module("02_model")  # 02_model.py: VGG trunk, Heads (V, W), Eq. (8)
m03 = importlib.import_module("03_kmeans")  # 03_kmeans.py: features -> PCA -> two-level k-means


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # all inputs and outputs live here
    init: str = ""  # initial trunk checkpoint ("" = <out_dir>/02_model_init.pt)
    data: str = "fashion-mnist"  # data source spec, see 01_data.make_source (paper: YFCC100M)
    subset: int = 20000  # seeded subset of the source, 0 = all of it (paper: 95.9M images)
    image_size: int = 32  # training and clustering crop in pixels (paper: 224)
    seed: int = 0  # one seed for sampling, augmentation, k-means, head init and dropout
    method: str = "deepercluster"  # deepercluster|rotnet|deepcluster|deepcluster-2level|supervised
    k: int = 160  # sub-classes over all super-clusters (paper: 320000)
    super_clusters: int = 4  # m; S = 4m super-classes with rotation (paper: 4, S = 16)
    pca_dim: int = 64  # PCA-whitening dimension D (paper: 4096)
    niter: int = 10  # Lloyd iterations per k-means level (paper: 10)
    kmeans_backend: str = "auto"  # 03's E-step: auto (faiss when it can run there, else torch)
    reassign: int = 0  # T: re-cluster every T epochs; 0 = the method's (paper: 3; DeepCluster: 1)
    epochs: int = 16  # total number of epochs (paper: 100)
    epoch_size: int = 0  # E images drawn per epoch, 0 = N (paper: about N)
    batch_size: int = 64  # global batch, split over ranks (paper: 48 per GPU x 64 GPUs = 3072)
    lr: float = 0.0  # constant lr; 0 = the method's (lr, batch) scaled to --batch_size (RECIPES)
    weight_decay: float = -1.0  # SGD weight decay; < 0 = the method's (paper: 1e-5)
    momentum: float = 0.9  # SGD momentum (paper: 0.9)
    reset_super_head: str = "auto"  # re-init V each round: auto (m > 1, §5.1) | always | never
    sub_grad_scale: bool = False  # W_s's gradient times B/B_s: the official per-group mean (§7)
    workers: int = 2  # DataLoader worker processes
    crop_min: float = -1.0  # smallest crop area; < 0 = the method's (RECIPES; paper: 0.08)
    top_layer: str = "auto"  # W_s init + momentum: auto (the method's) | linear | deepcluster
    amp: bool = False  # bf16 autocast + channels_last; fp32 on CPUs without bf16 (not in paper)
    deterministic: bool = False  # torch.use_deterministic_algorithms: a resumed run ends identical
    ckpt_minutes: float = 10.0  # also write 04_train_last.pt every N minutes of training (0 = off)
    ckpt_every: int = 0  # also write 04_train_last.pt every N iterations (0 = off)
    keep_every: int = 3  # keep 04_train_ep{E:03d}.pt every N epochs (and after the last one)
    keep_seen: str = ""  # keep 04_train_seen{N}.pt at N images seen, e.g. 250000,1000000 (curves)
    resume: bool = True  # resume from <out_dir>/04_train_last.pt when it exists
    force: bool = False  # start afresh over an incompatible 04_train_last.pt instead of refusing
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20  # refresh the progress bar's numbers every N iterations
    layout: str = "replicated"  # under torchrun: replicated (all heads everywhere) | grouped (§7)
    show_layout: bool = False  # print --layout grouped's rank table and head memory, then exit
    world_size: int = 0  # N for --show_layout / --plan (0 = S); under torchrun --nproc_per_node
    plan: bool = False  # print this run's memory per rank (scaleout/memory.py), then exit
    pca_sample: int = 100000  # at most this many seeded images fit the PCA (official: D(D-1)/2)


# ---- §8 each method's own recipe, from its official code (PAPER.md §6, §8) ----
# lr: the official (lr, batch) scaled linearly to --batch_size (the per-sample step stays the
# official one; Goyal et al.), DeeperCluster's by the square root (scale="sqrt"). T: re-clustering
# period (epochs); wd: weight decay; w_std / head_momentum: W_s's init (None = nn.Linear's) and SGD
# momentum; crop: smallest RandomResizedCrop area, else 8% (both clustering codes; at 32 px level
# with or ahead of 20%). Sources: DeeperCluster main.sh (48 x 64 = 3072; deepcluster-2level keeps
# it), DeepCluster main.py (top layer re-made each round: N(0, 0.01), zero bias, no momentum),
# FeatureLearningRotNet (CIFAR; whole images: 20% crops cost its mid layers 2 points at 250k).
# DEVIATION(paper): one Sobel trunk, a constant lr for all (RotNet officially RGB; RotNet and
# supervised officially step the lr down), so the curves differ in the objective and recipe alone.
# DEVIATION(paper): DeeperCluster's 0.1 at 3072 scaled linearly to 64 is 0.0021, slower at 32 px
# than 0.0125 (1M, seed 0: kNN@20 fc7 2.4 vs 2.7, mid probe 7.2 vs 8.6); sqrt: 0.0144 (0.1 at 3072)
RECIPES = {"deepercluster": dict(lr=(0.1, 3072), T=3, wd=1e-5, w_std=None, head_momentum=0.9,
                                 scale="sqrt"),
           "deepcluster": dict(lr=(0.05, 256), T=1, wd=1e-5, w_std=0.01, head_momentum=0.0),
           "rotnet": dict(lr=(0.1, 128), T=1, wd=5e-4, w_std=None, head_momentum=0.9, crop=1.0),
           "supervised": dict(lr=(0.1, 256), T=1, wd=1e-4, w_std=None, head_momentum=0.9)}
RECIPES["deepcluster-2level"] = RECIPES["deepercluster"]
RECIPE_KEYS = ("lr", "reassign", "weight_decay", "crop_min", "w_std", "head_momentum")


def recipe(cfg):
    """-> {RECIPE_KEYS}: each flag if given, else the method's RECIPES value (lr at this batch)."""
    r = RECIPES[cfg.method]
    lr0, batch0 = r["lr"]
    top = {"auto": r, "linear": RECIPES["deepercluster"], "deepcluster": RECIPES["deepcluster"]}
    top = top[cfg.top_layer]  # nn.Linear's init and momentum, or DeepCluster's top layer
    power = 0.5 if r.get("scale") == "sqrt" else 1.0  # how lr follows the batch (see RECIPES)
    lr = cfg.lr or lr0 * (cfg.batch_size / batch0) ** power
    return dict(lr=lr, reassign=cfg.reassign or r["T"],
                weight_decay=r["wd"] if cfg.weight_decay < 0 else cfg.weight_decay,
                crop_min=r.get("crop", 0.08) if cfg.crop_min < 0 else cfg.crop_min,
                w_std=top["w_std"], head_momentum=top["head_momentum"])


def method_setup(cfg, source):
    """-> method_shape's dict + super/sub (N,): rotnet's, supervised's fixed labels, else None."""
    N, zeros = len(source), np.zeros(len(source), np.int64)
    if cfg.method == "supervised":  # one super-class whose sub-class is the true label
        if source.labels is None:
            raise UserError(f"--method supervised needs labels, and --data {cfg.data} has none")
        labels = np.asarray(source.labels, np.int64)  # (N,)
        n_cls = len(source.classes) if source.classes else int(labels.max()) + 1
        # NOTE: the sampler (Eq. (14)) then draws class-balanced epochs, not images uniformly
        return m02.method_shape("supervised", 0, 1, n_cls) | dict(super=zeros, sub=labels)
    shape = m02.method_shape(cfg.method, cfg.k, cfg.super_clusters)
    if not shape["cluster"]:  # rotnet: m = k_s = 1, the sub-class loss is 0, V is kept
        return shape | dict(super=zeros, sub=zeros)
    m = shape["m"]
    if m < 1 or cfg.k < m or cfg.k % m:
        raise UserError(f"--k {cfg.k} must be a positive multiple of --super_clusters {m} "
                        f"(k_s = k/m, Eq. (7))")
    if cfg.k > N:
        raise UserError(f"--k {cfg.k} exceeds the {N} images of --data {cfg.data}: lower --k or "
                        f"raise --subset")
    return shape | dict(super=None, sub=None)


# ---- §3 targets, Eq. (6)-(7): super-class s = (super-cluster u, rotation r), sub-class z ----
def make_targets(u, z, r, rotate):
    """(u, z, r) per sample -> (s, z). With rotation s = 4u + r (the official order), else s = u."""
    return (4 * u + r if rotate else u), z  # Eq. (6)


def split_super(s, rotate):
    """Inverse of Eq. (6): s -> (u, r)."""
    return (s // 4, s % 4) if rotate else (s, s * 0)


# ---- §5.2 uniform sampling over pseudo-labels, Eq. (14) ----
# P(n, r) = (1/S) (1/K_{u_n}) 1/|{n' : u_n' = u_n, z_n' = z_n}|,  s = 4 u_n + r
def uniform_plan(super_, sub, S, rotate, E, rng):
    """-> (indices (E,), rotations (E,)) int64, the epoch's sample order. Each super-class s gets
    E/S draws from its super-cluster u, spread evenly over u's NON-EMPTY sub-classes and uniform
    inside each (with replacement only when a sub-class has fewer images than its share), all
    rotated by r; then one shuffle. rng: a np.random.Generator."""
    kz = int(sub.max()) + 1
    flat = clusterstats.flat_ids(super_, sub, kz)  # (N,) one id per (u, z) pair
    order = np.argsort(flat, kind="stable")
    ids, first, sizes = np.unique(flat[order], return_index=True, return_counts=True)  # non-empty
    members = {}  # u -> [member indices of each non-empty z]
    for i, f, c in zip(ids, first, sizes):
        members.setdefault(int(i) // kz, []).append(order[f:f + c])
    supers = [s for s in range(S) if int(split_super(s, rotate)[0]) in members]  # with images
    quota = np.full(len(supers), E // len(supers))
    quota[rng.permutation(len(supers))[: E % len(supers)]] += 1  # E/S each, the remainder at random
    idx, rot = [], []
    for s, q in zip(supers, quota):
        u, r = split_super(s, rotate)
        subs = members[int(u)]  # the K_u non-empty sub-classes of u
        # DEVIATION(paper): the official code draws floor(E/(S K_u)) + 1 per sub-class and truncates
        # the shuffled total; we drop the surplus at random, so every super-class gets exactly E/S,
        # sub-classes differ by <= 1.
        per = np.full(len(subs), q // len(subs))
        per[rng.permutation(len(subs))[: q % len(subs)]] += 1
        idx += [rng.choice(mem, c, replace=len(mem) < c) for mem, c in zip(subs, per)]
        rot.append(np.full(q, r))
    p = rng.permutation(E)  # (E,) one shuffle over everything
    return np.concatenate(idx)[p].astype(np.int64), np.concatenate(rot)[p].astype(np.int64)


# ---- §5.1 head reset after each clustering round; the network of Eq. (8) ----
def reset_heads(heads, head_opt, generator, reset_V):
    """Re-initialise W, b (and V when reset_V) from `generator`, and drop their momentum buffers."""
    keep = {k: v.clone() for k, v in heads.V.state_dict().items()}
    heads.reset(generator=generator)
    if not reset_V:  # in place: the Parameter objects (optimizer, DDP) stay the same
        heads.V.load_state_dict(keep)
    for name, p in heads.named_parameters():
        if reset_V or not name.startswith("V."):
            head_opt.state.pop(p, None)  # fresh SGD momentum for the new heads


class Net(nn.Module):
    """Trunk + heads as one module, so that DDP averages both gradients; returns Eq. (8)'s dict."""
    def __init__(self, trunk, heads, sub_grad_scale=False):
        super().__init__()
        self.trunk, self.heads, self.sub_grad_scale = trunk, heads, sub_grad_scale

    # DEVIATION(paper): mixed batches, not one super-class per GPU group, so W_s's gradient is B_s/B
    # of the official per-group mean; --sub_grad_scale restores it (§7; under torchrun per rank).
    def forward(self, x, s, z, counts=None):  # counts: B_s from the host (m02.hierarchical_loss)
        phi = self.trunk(x)  # (B, d) fc7 before ReLU
        return m02.hierarchical_loss(self.heads, phi, s, z, self.sub_grad_scale, counts)


# ---- DIST: where the heads live over the ranks ----
class Replicated:
    """--layout replicated (the default; one process too): every rank holds all heads, DDP averages
    every gradient, each rank feeds every world-th sample of the global batch. The paper's layout
    (scaleout/grouped.py, --layout grouped) has the same methods and shards the heads."""
    level2 = staticmethod(m03.level2)  # 03's level 2: every rank loops over the super-clusters

    def __init__(self, cfg, setup, rank, world):
        self.batch_size, self.rank, self.world = cfg.batch_size, rank, world

    def heads(self, d, S, k_s, w_std):
        return m02.Heads(d, S, k_s, w_std=w_std)

    def wrap(self, net, device):  # under torchrun: synced batch norm, then DDP
        return parallel.wrap_ddp(net, device)

    def optimizers(self, trunk, heads, sgd, sgd_heads):
        return (torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], **sgd),
                torch.optim.SGD(heads.parameters(), **sgd_heads))  # (the Sobel filters are fixed)

    def batches(self, plan_s, start):  # this rank's plan positions, one list per iteration
        return parallel.rank_batches(len(plan_s), self.batch_size, self.rank, self.world, start)

    def head_states(self, heads, opt, path):  # what a checkpoint holds; after it is written,
        return heads.state_dict(), opt.state_dict()  # saved() has nothing to tidy

    def saved(self, path, head_sd): pass  # noqa: E704

    def load_heads(self, heads, opt, ck, path):  # "sharded": --layout grouped's files hold the rows
        sd, osd = ((ck["heads"], ck["head_optimizer"]) if "sharded" not in ck["heads"] else
                   importlib.import_module("scaleout.shards").assemble_heads(ck, path))
        heads.load_state_dict(sd)
        opt.load_state_dict(osd)


# ---- §5.1 the alternation: every T epochs cluster, reset the heads; the plan; SGD on Eq. (8) ----
CLUSTERS = ("super", "sub", "pca_mean", "pca_proj", "centroids_super", "centroids_sub")  # one round


def new_round(cfg, setup, source, trunk, heads, head_opt, epoch, prev, level2):
    """Cluster the current features (stage 03: eval mode, no rotation, PCA-whitening, two-level
    k-means), reset the heads -> (clusters: u, z of every image, PCA, centroids; log line stats)."""
    t0, device = time.time(), next(trunk.parameters()).device
    prev = None if prev["super"] is None else prev | {"k_s": setup["k_s"]}
    res = m03.cluster(trunk, source, cfg, device, prev=prev, epoch=epoch, m=setup["m"],
                      level2_fn=level2)
    trunk.train()
    m03.save_clustering(res, cfg.out_dir, name=f"03_kmeans_ep{epoch:03d}")
    clusters = {key: torch.as_tensor(res[key]).cpu() for key in CLUSTERS}
    clusters |= {key: clusters[key].long() for key in ("super", "sub")}  # (N,) u, and z local to u
    # k-means numbers its clusters arbitrarily: W (and V when m > 1) restart with fresh momentum
    reset_V = {"auto": setup["m"] > 1, "always": True, "never": False}[cfg.reset_super_head]
    g = torch.Generator(device).manual_seed(cfg.seed * 7919 + epoch)
    reset_heads(heads, head_opt, g, reset_V)
    return clusters, trainlog.clustering_stats(res["diagnostics"], time.time() - t0)


def epoch_loader(cfg, ds, epoch, plan, super_, rotate, layout, it, pin=False):
    """The DataLoader over this rank's share of the plan, from iteration `it`."""
    ds.set_plan(epoch, plan[0].numpy(), plan[1].numpy())
    plan_s = make_targets(super_[plan[0]], None, plan[1], rotate)[0]  # (E,) s of every draw
    return torch.utils.data.DataLoader(ds, batch_sampler=layout.batches(plan_s.numpy(), it),
                                       num_workers=cfg.workers, generator=torch.Generator(),
                                       pin_memory=pin)  # its own RNG: the global one is dropout's


def train(cfg, setup, source, trunk, heads, model, opts, layout, ck=None):
    """Train to cfg.epochs (from `ck` when resuming); 04_train_last.pt holds the variables below."""
    device, last = next(trunk.parameters()).device, os.path.join(cfg.out_dir, "04_train_last.pt")
    ds = data.RotationDataset(source, cfg.image_size, cfg.seed, crop_scale=(setup["crop_min"], 1))
    E = cfg.epoch_size or len(source)  # images per epoch, n_iter steps
    n_iter, S, rotate = E // cfg.batch_size, setup["S"], setup["rotate"]
    fmt = torch.channels_last if cfg.amp else torch.contiguous_format
    keep_seen = common.parse_counts(cfg.keep_seen, "--keep_seen")  # curve points, images seen
    # clusters: the current round's labels u (super) and z (sub) of every image, PCA, centroids;
    # plan: the epoch's (indices, rotations), None between epochs; sums: the epoch's metric sums.
    if ck is None:
        epoch, it, plan, metrics, seconds, round_stats, sums = 0, 0, None, [], 0.0, {}, None
        clusters = dict.fromkeys(CLUSTERS)
        if not setup["cluster"]:  # rotnet / supervised: fixed labels
            clusters |= {key: torch.from_numpy(setup[key]) for key in ("super", "sub")}
    else:
        epoch, it, metrics = ck["epoch"], ck["iteration"], ck["metrics"]
        plan = (ck["plan_indices"], ck["plan_rotations"]) if len(ck["plan_indices"]) else None
        clusters = {key: ck[key] for key in CLUSTERS}
        sums, seconds, round_stats = ck["sums"].to(device), ck["seconds"], ck["round"]
        common.log(f"resuming {last}: epoch {epoch}, iteration {it}")

    def checkpoint(path, x=None):  # all ranks: exact resume, never diverged weights (x: finite?)
        if not resume.healthy([trunk, heads], device, trunk, x):
            raise FloatingPointError("non-finite weights or outputs after the last update")
        head_sd, head_osd = layout.head_states(heads, opts[1], path)
        idx, rot = plan or (torch.zeros(0, dtype=torch.long),) * 2
        state = {"epoch": epoch, "iteration": it, "plan_indices": idx, "plan_rotations": rot,
                 "round": round_stats, "sums": sums.cpu(), "seconds": clock(),
                 "metrics": metrics, "arch": trunk.arch(), "model": trunk.state_dict(),
                 "heads": head_sd, "optimizer": opts[0].state_dict(), "head_optimizer": head_osd,
                 "method": cfg.method, "recipe": {k: setup[k] for k in RECIPE_KEYS},
                 "rng": resume.rng_states(device)}  # every rank's dropout RNG
        if common.is_main():
            common.save_ckpt(common.ckpt_header("04_train", cfg) | state | clusters, path)
            layout.saved(path, head_sd)
        stop.saved()

    def after_step(x):  # a signal only set a flag: the step and `it` agree (DIST: all ranks stop)
        if it % cfg.log_every == 0 or it == n_iter:
            means = dict(zip(m02.TRAIN_KEYS, (sums[:-1] / sums[-1]).tolist()))
            bar.set_postfix_str(trainlog.progress(means, float(sums[-1]), clock()), refresh=False)
        bar.update()
        seen = (epoch * n_iter + it) * cfg.batch_size  # images seen so far
        for n_seen in (m for m in keep_seen if seen - cfg.batch_size < m <= seen):
            checkpoint(os.path.join(cfg.out_dir, f"04_train_seen{n_seen}.pt"), x)
        stopping, due = stop.poll(device)
        if stopping:
            checkpoint(last, x)
            stop.exit(last, epoch, it)  # says how to resume, exit status 130
        if it < n_iter and (due or (cfg.ckpt_every and it % cfg.ckpt_every == 0)):
            checkpoint(last, x)

    stop = resume.StopFlag(every_s=60 * cfg.ckpt_minutes)  # SIGINT / SIGTERM: a flag
    clock = lambda: seconds + time.time() - t0  # noqa: E731  (epoch's training seconds; t0 below)
    try:
        while epoch < cfg.epochs:
            if plan is None:  # a new epoch (a resume inside one already has its plan)
                round_stats = {}
                # 1-2. Every T epochs: cluster, and reset the heads.
                if setup["cluster"] and epoch % setup["reassign"] == 0:
                    clusters, round_stats = new_round(cfg, setup, source, trunk, heads, opts[1],
                                                      epoch, clusters, layout.level2)
                # 3. The epoch's plan, Eq. (14), seeded by (seed, epoch), never the global RNG.
                rng = np.random.default_rng([cfg.seed, epoch])
                u, z = clusters["super"].numpy(), clusters["sub"].numpy()
                plan = tuple(map(torch.from_numpy, uniform_plan(u, z, S, rotate, E, rng)))
                it, seconds, t0 = 0, 0.0, time.time()
                sums = torch.zeros(7, dtype=torch.float64, device=device)
                if round_stats:
                    checkpoint(last)  # a resume after a (long) clustering does not redo it
            # 4. SGD steps on Eq. (8) over the plan, from iteration `it`.
            loader = epoch_loader(cfg, ds, epoch, plan, clusters["super"], rotate, layout, it,
                                  pin=device.type == "cuda")
            bar = common.bar(total=n_iter, initial=it, desc=f"epoch {epoch}", leave=False)
            t0 = time.time()
            for x, r, n in loader:  # x (b, 3, P, P) rotated crops, r (b,) rotations, n (b,) ids
                s, z = make_targets(clusters["super"][n], clusters["sub"][n], r, rotate)  # Eq. (6)
                B_s = torch.bincount(s, minlength=S).tolist()  # counted here: no sync on a GPU
                x, s, z = x.to(device, memory_format=fmt), s.to(device), z.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    out = model(x, s, z, B_s)  # phi = trunk(x), the heads, Eq. (8)
                step_sums = m02.batch_sums(out, len(s))  # the global batch's metrics
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                out["loss"].backward()  # the gradients, averaged over the ranks (DDP)
                sums += m02.check_finite(step_sums)  # NaN: stop before any update
                for opt in opts:
                    opt.step()
                it += 1
                after_step(x)  # progress, curve checkpoints, signals, periodic saves
            bar.close()
            # 5. End of the epoch: one log line, the checkpoints, the curves.
            seconds = clock()
            means = dict(zip(m02.TRAIN_KEYS, (sums[:-1] / sums[-1].clamp(min=1)).tolist()))
            metrics.append(trainlog.epoch_line(epoch, means, float(sums[-1]), seconds, round_stats,
                                               setup["lr"]))
            epoch, it, plan = epoch + 1, 0, None
            checkpoint(last)
            if (cfg.keep_every and epoch % cfg.keep_every == 0) or epoch == cfg.epochs:
                checkpoint(os.path.join(cfg.out_dir, f"04_train_ep{epoch:03d}.pt"))
            trainlog.write_log(metrics, cfg.out_dir)
    except FloatingPointError as err:  # nothing saved: 04_train_last.pt keeps the last good state
        print(f"error: {err} at epoch {epoch} iteration {it}; stopped without saving, {last} "
              f"keeps the last good state: lower --lr (now {setup['lr']:g})", file=sys.stderr)
        sys.exit(1)
    finally:
        stop.close()


# ---- the script: check the flags, load or resume, train ----
COMPAT = ("method", "k", "super_clusters", "data", "subset", "image_size")  # the state depends on
COMPAT_MID_EPOCH = ("batch_size", "seed", "epoch_size", "crop_min")  # and a mid-epoch plan on


def check_flags(cfg):
    """Every numeric flag and choice, before any data is read."""
    ones = ("k", "super_clusters", "niter", "epochs", "batch_size", "log_every", "image_size")
    zeros = ("subset", "epoch_size", "workers", "ckpt_every", "keep_every", "world_size", "pca_dim",
             "momentum", "reassign", "ckpt_minutes", "pca_sample", "lr")
    common.check_ranges(cfg, at_least_1=ones, at_least_0=zeros,
                        choices={"method": m02.METHODS, "layout": ("replicated", "grouped"),
                                 "top_layer": ("auto", "linear", "deepcluster"),
                                 "reset_super_head": ("auto", "always", "never")})
    if cfg.crop_min == 0 or cfg.crop_min > 1:
        raise UserError(f"--crop_min {cfg.crop_min} must be in (0, 1], or < 0 for the method's")
    if (cfg.epoch_size or cfg.batch_size) < cfg.batch_size:
        raise UserError(f"--epoch_size {cfg.epoch_size} is less than one --batch_size")
    common.parse_counts(cfg.keep_seen, "--keep_seen")


def main(cfg):
    check_flags(cfg)
    if cfg.show_layout:  # the grouped layout's rank table and head memory; no processes, no data
        return importlib.import_module("scaleout.grouped").show_layout(cfg)
    if cfg.plan:  # per-rank memory of this run; no processes, no training
        return importlib.import_module("scaleout.memory").print_plan(cfg)
    rank, world, device = common.init_dist(cfg.device)
    cfg = replace(cfg, amp=common.resolve_amp(cfg.amp, device))  # fp32 where bf16 is emulated
    if cfg.deterministic:  # bit-identical reruns and resumes
        common.set_deterministic()
    common.log(f"04_train: {asdict(cfg)} | {world} process(es) on {device}")
    source = data.make_source(cfg.data, "train", cfg.subset or None, cfg.seed)
    if (cfg.epoch_size or len(source)) < cfg.batch_size:
        raise UserError(f"--batch_size {cfg.batch_size} exceeds the {len(source)} images")
    setup = method_setup(cfg, source) | recipe(cfg)  # S, k_s, m, rotate; lr, T, crop, ...
    common.log("recipe: " + ", ".join(f"{k} {setup[k]}" for k in RECIPE_KEYS))
    # DIST: the one fork of the paper's layout (§7): heads, net, optimizers, batches, level 2
    layout = (importlib.import_module("scaleout.grouped").GroupedLayout
              if cfg.layout == "grouped" else Replicated)(cfg, setup, rank, world)
    last = os.path.join(cfg.out_dir, "04_train_last.pt")
    cfg = replace(cfg, crop_min=setup["crop_min"])  # saved and compared: the crop actually used
    trunk, ck = resume.load_start(cfg, last, "04_train", COMPAT, COMPAT_MID_EPOCH)  # or --init's
    if trunk.image_size != cfg.image_size:  # 03 clusters and 05 evaluates at the trunk's size
        raise UserError(f"--image_size {cfg.image_size}, but the trunk (02_model.py or --init) is "
                        f"built for {trunk.image_size} px: pass --image_size {trunk.image_size}")
    if ck is not None:  # a warning when the recipe changed, or when it has nothing left to train
        resume.notes(ck, {k: setup[k] for k in RECIPE_KEYS}, cfg.epochs, last)
    heads = layout.heads(trunk.feature_dim, setup["S"], setup["k_s"], setup["w_std"])
    fmt = torch.channels_last if cfg.amp else torch.contiguous_format
    net = Net(trunk, heads, cfg.sub_grad_scale).to(device, memory_format=fmt)
    model = layout.wrap(net, device)  # DIST: under torchrun, BN synced over all ranks, then DDP
    sgd = dict(lr=setup["lr"], momentum=cfg.momentum, weight_decay=setup["weight_decay"])
    sgd_heads = sgd | {"momentum": setup["head_momentum"]}  # DeepCluster's top layer: none
    opts = layout.optimizers(trunk, heads, sgd, sgd_heads)
    torch.manual_seed(cfg.seed * 1000 + rank)  # the global torch RNG now only draws dropout masks
    if ck is None:  # a fresh run (the clustering methods reset the heads again at epoch 0)
        reset_heads(heads, opts[1], torch.Generator(device).manual_seed(cfg.seed * 7919), True)
    else:
        layout.load_heads(heads, opts[1], ck, last)
        resume.restore(ck, opts, (sgd, sgd_heads), rank, device)  # the flags win over saved ones
    model.train()
    train(cfg, setup, source, trunk, heads, model, opts, layout, ck)
    common.log(f"done: {cfg.epochs} epochs; 04_train_last.pt, log and curves in {cfg.out_dir}")


if __name__ == "__main__":
    common.run(main, Config)
