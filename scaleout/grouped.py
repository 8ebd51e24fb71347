"""The paper's own distributed layout (PAPER.md §7), used only under `--layout grouped`: a first
reader skips it.

Single process and the default `--layout replicated` never import this file. Under
`torchrun --nproc_per_node=N 04_train.py --layout grouped` (N a multiple of S) the ranks are laid
out as the official code does, so that the sub-class heads W_0..W_{S-1} are sharded (each training
group holds one W_t):
  training groups:   S groups of G = N/S consecutive ranks. Group t trains super-class t only:
                     super-cluster u = t // 4 under rotation r = t % 4 (without rotation u = t),
                     so s = 4u + r = t, Eq. (6). It holds V and W_t, b_t only, and its batches
                     hold images of super-cluster u rotated by r only.
  clustering groups: m groups of N/m = 4G consecutive ranks, the 4 training groups of
                     super-cluster u; level 2 of the k-means of super-cluster u runs inside
                     group u (level2_in_groups).
Trunk and V are data-parallel over all N ranks, W_t over the G ranks of group t, and batch norm is
synced over all N ranks: a group's batch holds one super-class, so per-group statistics would give
the heads a shortcut.
Gradient scale: every rank's loss is the mean over its b = B/N samples, and the gradients are
averaged, so
  trunk, V: (1/N) sum_ranks (1/b) sum_{n on rank} grad l_n   = (1/B) sum_n grad l_n,
            the single-process gradient;
  W_t:      (1/G) sum_{ranks of t} (1/b) sum_{n on rank} ...  = (1/B_t) sum_{n in t} grad l_n,
            B_t = G b = B/S: B/B_t = S times the single-process (1/B) sum_{n in t} grad l_n,
            the official per-group mean (§7).
--sub_grad_scale changes nothing here: each rank's batch is one super-class, so its factor B/B_s
is 1 on every rank.
Checkpoints resume in either layout with any valid N: up to GATHER_MAX_BYTES of sub-class
heads in the replicated format (all W stacked, gathered on rank 0), above it one file per training
group next to the checkpoint and an index in it (scaleout/shards.py).

Paper:  PAPER.md §7 (training groups, clustering groups, gradient scale, SyncBN)
Run:    torchrun --nproc_per_node=16 04_train.py --layout grouped --out_dir out
        python 04_train.py --layout grouped --show_layout --world_size 16
            (the rank table, no processes)
Uses:   02_model (_linear_init_, method_shape), 03_kmeans (kmeans, level2), support.parallel
        (synced BN), support.common (collectives), scaleout/shards.py (checkpoints)
"""
import functools
import importlib
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from scaleout import shards
from support import common
from support import parallel
from support.common import UserError

m02 = importlib.import_module("02_model")  # 02_model.py: the heads' init
m03 = importlib.import_module("03_kmeans")  # 03_kmeans.py: kmeans(group=)


# ---- the rank layout ----
def check_world(world, S):
    """Refuse an N that is not a multiple of S, listing valid ones."""
    if world < 1 or world % S:
        raise UserError(f"--layout grouped: N must be a multiple of S={S}: "
                        f"{', '.join(str(S * i) for i in range(1, 5))}"
                        f", ... (got N = {world} processes)")
    return world // S  # G, ranks per training group


def make_groups(setup, rank, world):
    """-> this rank's place in the grouped layout (t, G, ...) and its process groups. Collective:
    every rank creates every group, in the same order (torch.distributed.new_group's rule), also
    those it is not in."""
    S = setup["S"]
    G = check_world(world, S)
    g = SimpleNamespace(S=S, G=G, t=rank // G, world=world, train=None, leaders=None, cluster=None)
    if world > 1:
        # averages W_t's gradient
        train = [dist.new_group(list(range(t * G, (t + 1) * G))) for t in range(S)]
        g.train = train[g.t]
        # the first rank of every group: checkpoints
        g.leaders = dist.new_group(list(range(0, world, G)))
        # m groups of N/m ranks
        g.cluster = cluster_groups(setup["m"]) if setup["cluster"] else None
    return g


class ShardedHeads(nn.Module):
    """The heads of training group t: V (S, d), the same on all ranks, and only W_t (k_s, d) and
    b_t (k_s,), kept as W (1, k_s, d), b (1, k_s): row t of m02.Heads' stacked W (S, k_s, d),
    b (S, k_s)."""

    def __init__(self, d, S, k_s, t, w_std=None):
        super().__init__()
        self.d, self.S, self.k_s, self.t, self.w_std = int(d), int(S), int(k_s), int(t), w_std
        self.V = nn.Linear(self.d, self.S)
        self.W = nn.Parameter(torch.empty(1, self.k_s, self.d))
        self.b = nn.Parameter(torch.empty(1, self.k_s))
        self.reset()

    def reset(self, generator=None):
        """m02.Heads.reset keeping row t: V from `generator`, the S per-super-class seeds, and
        W_t, b_t from a generator seeded with seed t; only this rank's k_s x d numbers are drawn,
        the same as row t of the single-process heads (on CPU and on a CUDA generator)."""
        m02._linear_init_(self.V.weight, self.V.bias, generator)
        g = m02.row_generators(self.S, generator)[self.t]
        m02._linear_init_(self.W[0], self.b[0], g, self.w_std)

    def sub_heads(self, ts):
        """[(W_t (k_s, d), b_t (k_s,))]: m02.hierarchical_loss asks only for this rank's t
        (group_batches)."""
        if list(ts) != [self.t]:
            raise RuntimeError(f"training group {self.t} got samples of super-classes {list(ts)}")
        return [(self.W[0], self.b[0])]


class GroupedNet(nn.Module):
    """Net under the grouped layout, without DDP: DDP averages every parameter over all ranks, and
    each group holds a different W_t. reduce_grads (ReducedSGD calls it after backward) averages
    the trunk and V over all ranks and W_t, b_t over group t. Nothing is broadcast at the start
    (DDP does): every rank loads the same trunk and draws the same heads. Unlike DDP,
    communication does not overlap the backward pass (simpler, a little slower)."""

    def __init__(self, net, groups):
        super().__init__()
        # .module, like DDP's, so that getattr(model, "module", model) works
        self.module, self.groups = net, groups

    def forward(self, x, s, z, counts=None):
        return self.module(x, s, z, counts)

    def reduce_grads(self):
        trunk, heads, g = self.module.trunk, self.module.heads, self.groups
        shared = [p for p in trunk.parameters() if p.requires_grad] + list(heads.V.parameters())
        for params, group, n in ((shared, None, g.world), ([heads.W, heads.b], g.train, g.G)):
            # one all-reduce per set of parameters
            flat = torch.cat([p.grad.flatten() for p in params])
            # the mean over all ranks, or over the G ranks of group t
            common.all_reduce_sum(flat, group).div_(n)
            for p, v in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(v.view_as(p))


class ReducedSGD(torch.optim.SGD):
    """SGD whose step first calls `reduce` (GroupedNet.reduce_grads): 04's loop steps the trunk's
    optimizer first, so one reduce serves both optimizers, and the loop needs no branch."""

    def __init__(self, params, reduce, **kw):
        super().__init__(params, **kw)
        self._reduce = reduce

    def step(self, closure=None):
        self._reduce()
        return super().step(closure)


class GroupedLayout:
    """04_train.Replicated's methods for the paper's layout: ShardedHeads (V and W_t), GroupedNet
    (BN synced over all ranks, W_t averaged in its group), each group's batches of its own
    super-class, level 2 of the k-means inside the clustering groups, checkpoints gathered or in
    per-group shards. 04's main() builds it under --layout grouped and nowhere else."""

    def __init__(self, cfg, setup, rank, world):
        self.g = make_groups(setup, rank, world)
        self.batch_size, self.S = cfg.batch_size, setup["S"]
        self.rank, self.world, self.net = rank, world, None
        # DIST: level 2 of super-cluster u in clustering group u (the all-ranks loop in one process)
        self.level2 = (functools.partial(level2_in_groups, groups=self.g.cluster)
                       if self.g.cluster is not None else m03.level2)

    def heads(self, d, S, k_s, w_std):
        return ShardedHeads(d, S, k_s, self.g.t, w_std=w_std)

    def wrap(self, net, device):
        """Under torchrun: batch norm synced over ALL ranks (not inside a group), then
        GroupedNet."""
        self.net = net if self.g.world == 1 else GroupedNet(parallel.sync_bn(net, device), self.g)
        return self.net

    def optimizers(self, trunk, heads, sgd, sgd_heads):
        reduce = self.net.reduce_grads if self.g.world > 1 else (lambda: None)  # (one process)
        return (ReducedSGD([p for p in trunk.parameters() if p.requires_grad], reduce, **sgd),
                torch.optim.SGD(heads.parameters(), **sgd_heads))

    def batches(self, plan_s, start):
        return group_batches(plan_s, self.batch_size, self.rank, self.world, self.S, start)

    def head_states(self, heads, opt, path):
        return shards.head_states(heads, opt, self.g, path)

    def saved(self, path, head_sd):
        shards.drop_stale_shards(path, head_sd)  # the shards of earlier saves

    def load_heads(self, heads, opt, ck, path):
        shards.load_heads(heads, opt, ck, self.g, path)


def group_batches(plan_s, batch_size, rank, world, S, start=0):
    """The grouped layout's rank_batches: the plan positions j this rank feeds, one list per
    iteration from `start`. plan_s (E,): the super-class of every plan position. Group
    t = rank // G takes the positions of super-class t in plan order (its share of Eq. (14)'s plan,
    E/S draws); global batch b holds B/S of them per group, and the G ranks of the group take every
    G-th. The union over the ranks: a batch of B with exactly B/S samples of each s."""
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} must be a multiple of the {world} processes")
    G, B_t = world // S, batch_size // S  # ranks per group, samples per group and batch
    counts = np.bincount(plan_s, minlength=S)  # (S,) E/S each, unless a super-cluster is empty
    if counts.min() < len(plan_s) // S:
        raise UserError(f"--layout grouped: super-class {int(counts.argmin())} has no images "
                        f"this epoch (an empty super-cluster), so its training group would idle: "
                        f"use --layout replicated")
    mine = np.flatnonzero(plan_s == rank // G)  # (about E/S,) the positions of super-class t
    return [mine[b * B_t + rank % G:(b + 1) * B_t:G].tolist()
            for b in range(start, int(counts.min()) // B_t)]


def head_params(S, k_s, d):
    """Head parameters on one rank -> (replicated: V + all W_s, b_s, grouped: V + W_t, b_t)."""
    V = S * d + S
    return V + S * k_s * (d + 1), V + k_s * (d + 1)


def show_layout(cfg):
    """--show_layout: print the grouped layout for --world_size ranks, and the head memory per
    rank; no processes."""
    if cfg.method not in ("deepercluster", "deepcluster", "deepcluster-2level", "rotnet"):
        raise UserError(f"--show_layout knows deepercluster, deepcluster(-2level) and rotnet "
                        f"(--method {cfg.method}: supervised has S = 1, a single group, "
                        f"and its k_s needs the data)")
    shape = m02.method_shape(cfg.method, cfg.k, cfg.super_clusters)
    S, m, k_s, rotate = shape["S"], shape["m"], shape["k_s"], shape["rotate"]
    if m < 1 or cfg.k % m:
        raise UserError(f"--k {cfg.k} must be a positive multiple of --super_clusters {m} "
                        f"(k_s = k/m, Eq. (7))")
    N = cfg.world_size or S
    G, C = check_world(N, S), N // m
    print(f"--layout grouped with N = {N} ranks: S = {S} super-classes ({m} super-cluster(s) x "
          f"{4 if rotate else 1} rotation(s)), k_s = {k_s}\n"
          f"{S} training groups of N/S = {G} rank(s); "
          f"{m} clustering group(s) of N/m = {C} rank(s)\n")
    print("rank | training group t | super-class s = 4u + r | super-cluster u | rotation r "
          "| clustering group")
    for rank in range(N):
        t = rank // G
        u, r = (t // 4, t % 4) if rotate else (t, 0)
        print(f"{rank:4d} | {t:16d} | {t:22d} | {u:15d} | {r:10d} | {rank // C:16d}")
    # d = fc7's width, from the trunk's arch
    init = cfg.init or os.path.join(cfg.out_dir, "02_model_init.pt")
    d, known = ((common.load_ckpt(init)["arch"]["fc_dim"], "") if os.path.exists(init)
                else (4096, f", no {init}"))
    # (decimal units)
    gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"  # noqa: E731
    # fp32: 4 bytes per parameter
    size = lambda n: f"{n:,d} = {gb(4 * n)} (x3: {gb(12 * n)})"  # noqa: E731
    print("\nhead parameters per rank, fp32; x3 with their gradients and SGD momentum")
    for name, (S_, k_, k_s_, d_) in ((f"this run (d = {d}{known})", (S, m * k_s, k_s, d)),
                                     ("paper", (16, 320000, 80000, 4096))):
        rep, grp = head_params(S_, k_s_, d_)
        print(f"  {name}: S = {S_}, k = {k_:,d}, k_s = {k_s_:,d}, d = {d_}\n"
              f"    replicated (V + all W_s, b_s): {size(rep)}\n"
              f"    grouped    (V + W_t, b_t):     {size(grp)}, {rep / grp:.1f}x less")


# ---- level 2 of the k-means inside the clustering groups (03_kmeans.two_level calls this) ----
def cluster_groups(m):
    """-> the m clustering groups (group u: ranks u*N/m .. (u+1)*N/m - 1), None in one process.
    Collective: every rank creates every group, in the same order (torch.distributed.new_group's
    rule), also those it is not in."""
    world = common.world_size()
    if world % m:
        raise common.UserError(f"clustering groups: the {world} processes must be a multiple of "
                               f"the {m} super-clusters")
    C = world // m  # ranks per clustering group
    return ([dist.new_group(list(range(v * C, (v + 1) * C))) for v in range(m)] if world > 1
            else None)


def _exchange(t, send, recv):
    """DIST: send send[r] rows of t (in order) to rank r, and get recv[r] rows from rank r ->
    (sum(recv), ...) in rank order (torch.distributed.all_to_all_single; gloo and nccl)."""
    out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send)
    return out


def level2_in_groups(x, u, n_u, k_s, niter, seed, backend, groups):
    """two_level's level 2 with super-cluster v clustered by the ranks of groups[v] only -> (z of
    this rank's points, centroids_sub (m, k_s, D), clusters split, objective_sub (niter+1,), small
    super-clusters): the values of the all-ranks loop, because rank j of group v receives the j-th
    contiguous share of v's members in index order (the order of that loop's x[mem]) and
    kmeans(group=) gives one process's result on the concatenated shares.
    Memory per rank, beyond the shard x (n, D): one super-cluster's members of x at a time (the
    send buffer, about n/m rows) and the received share (n_v/C rows; about n when the
    super-clusters are balanced), then the k-means buffers of that share; never all N x D."""
    if k_s == 1:  # z = 0 everywhere: nothing to move
        return m03.level2(x, u, n_u, k_s, niter, seed, backend)
    m, rank, world, D = len(groups), common.get_rank(), common.world_size(), x.shape[1]
    C = world // m  # ranks per clustering group
    v, j = rank // C, rank % C  # my super-cluster, my place in its clustering group
    N = int(n_u.sum())
    # held[r, w]: rank r's members of w; they are places before[r, w] .. + held[r, w] - 1 of w's
    # member list (index order = rank order, then each rank's order)
    held = common.all_gather_cat(torch.bincount(u, minlength=m)[None]).cpu()  # (world, m)
    before = held.cumsum(0) - held  # (world, m)
    cut = torch.arange(C + 1) * n_u[:, None] // C  # (m, C+1): rank i of group w gets cut[w, i:i+2]
    start, end = before[:, :, None], (before + held)[:, :, None]  # (world, m, 1)
    # moved[r, w, i]: rows that rank r sends to rank i of group w, rank w*C + i
    moved = (torch.minimum(end, cut[:, 1:]) - torch.maximum(start, cut[:, :-1])).clamp_min(0)
    for w in range(m):  # one round per super-cluster: the send buffer holds one of them
        send = torch.zeros(m, C, dtype=torch.int64)
        send[w] = moved[rank, w]
        recv = moved[:, v, j] if w == v else torch.zeros(world, dtype=torch.int64)
        got = _exchange(x[u == w], send.flatten().tolist(), recv.tolist())  # (sum(recv), D)
        if w == v:
            x_v = got  # (about n_v/C, D) my share of v's members, in index order
    c_sub = torch.zeros(m, k_s, D, device=x.device)
    # [objective_sub (niter+1), clusters split]
    stats = torch.zeros(niter + 2, dtype=torch.float64, device=x.device)
    # a small super-cluster, as in two_level's loop: one sub-class per point, in index order
    if n_u[v] < k_s:
        z_v = torch.arange(int(cut[v, j]), int(cut[v, j + 1]), device=x.device)
        x_all = common.all_gather_cat(x_v, groups[v])  # (n_v, D), tiny: n_v < k_s
        if j == 0:
            c_sub[v, : n_u[v]] = x_all
    else:
        c, z_v, st = m03.kmeans(x_v, k_s, niter, seed + 1 + v, backend, group=groups[v])
        # the group's first rank reports its centroids and stats (the same on all the group's
        # ranks)
        if j == 0:
            c_sub[v] = c
            stats[:-1] = torch.tensor(st["objective"], dtype=torch.float64) * n_u[v].item() / N
            stats[-1] = st["n_empty_split"]
    # Back to the ranks that sent the points: rank (w, i) returns the z of the rows it got, so
    # this rank gets its rows' z sorted by (u, index)
    z = torch.empty_like(u)
    z[torch.argsort(u, stable=True)] = _exchange(z_v, moved[:, v, j].tolist(),
                                                 moved[rank].flatten().tolist())
    common.all_reduce_sum(c_sub)
    common.all_reduce_sum(stats)
    small = [w for w in range(m) if n_u[w] < k_s]
    return z, c_sub, int(stats[-1]), stats[:-1].cpu().numpy(), small
