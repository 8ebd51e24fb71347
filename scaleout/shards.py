"""Checkpoints of the paper's layout (PAPER.md §7): the sub-class heads W_0..W_{S-1} live on
different training groups, so a checkpoint either gathers them on rank 0 into the replicated format
(W (S, k_s, d), the format one process writes) or, above GATHER_MAX_BYTES, lets each group's first
rank write its own rows to a file next to the checkpoint, with an index in it. Either loads in
either layout with any valid number of ranks (assemble_heads, load_heads). A first reader skips it.

Uses:   support.common (atomic saves, collectives)
"""
import os

import torch
import torch.distributed as dist

from support import common
from support.common import UserError


# The gathered checkpoint format holds all of W, b (and their momentum) on rank 0: up to this many
# bytes; above it (and when the checkpoint's path is known) each training group writes its own rows
GATHER_MAX_BYTES = 10 ** 9


def _gather_rows(p, groups):
    """Row t (1, ...) of the first rank of every training group -> (S, ...) on rank 0 (None on the
    other ranks)."""
    if groups.world == 1:
        return p
    if common.get_rank() % groups.G:  # not a group's first rank: its row is a copy of that rank's
        return None
    rows = [torch.empty_like(p) for _ in range(groups.S)] if common.is_main() else None
    dist.gather(p.detach().contiguous(), rows, dst=0, group=groups.leaders)
    return torch.cat(rows) if common.is_main() else None  # S x (1, k_s, d) -> (S, k_s, d)


def shard_path(path, t, token):
    """The file of training group t's rows next to checkpoint `path`, named by the save's token: a
    new save never overwrites the shards the checkpoint on disk still points to."""
    return f"{path}.heads_t{t:03d}.{int(token):x}.pt"


def drop_stale_shards(path, index):
    """Rank 0, after writing checkpoint `path` whose heads state is `index`: delete the shard files
    of `path` that it does not list (those of earlier saves)."""
    keep = set(index.get("files", [])) if "sharded" in index else set()
    folder, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(folder):
        if name.startswith(base + ".heads_t") and name.endswith(".pt") and name not in keep:
            os.remove(os.path.join(folder, name))


def head_states(heads, opt, groups, path=None):
    """-> (heads state, head optimizer state) of a checkpoint, so that it loads in any layout.
    Grouped: collective, (None, None) on ranks other than 0. Gathered format (up to
    GATHER_MAX_BYTES, or no path given): rank 0 gathers W (S, k_s, d), b (S, k_s) and their SGD
    momentum, the replicated format. Sharded format: the first rank of group t writes W_t, b_t and
    their momentum to shard_path(path, t, token); the heads state is an index
    {"sharded": S, "files", "token", V.weight, V.bias}, and the optimizer state lacks W's and b's
    momentum."""
    sd, osd = heads.state_dict(), opt.state_dict()
    # the optimizer's keys are positions
    pos = {name: i for i, (name, _) in enumerate(heads.named_parameters())}
    # shallow copies: the live optimizer state is left untouched
    osd = dict(osd, state=dict(osd["state"]))
    moms = {name: osd["state"][pos[name]]["momentum_buffer"]
            for name in ("W", "b") if pos[name] in osd["state"]}
    total = groups.S * sum(p.numel() * p.element_size() for p in [sd["W"], sd["b"], *moms.values()])
    if path is None or total <= GATHER_MAX_BYTES:
        for name in ("W", "b"):
            sd[name] = _gather_rows(sd[name], groups)
            # no momentum right after a head reset; the same on every rank
            if name in moms:
                st = osd["state"][pos[name]]
                osd["state"][pos[name]] = dict(st, momentum_buffer=_gather_rows(moms[name], groups))
        return (sd, osd) if common.is_main() else (None, None)
    # a token ties the shards to this index: a crash between the shards and the index is caught
    # (os.urandom: torch's RNG draws the dropout masks, and a resume restores it; on W's device
    # for nccl)
    token = torch.tensor([int.from_bytes(os.urandom(7), "little")], device=sd["W"].device)
    token = common.broadcast(token, 0).cpu()
    if common.get_rank() % groups.G == 0:  # the first rank of group t writes row t
        shard = {"t": groups.t, "token": token, "W": sd["W"].cpu(), "b": sd["b"].cpu()}
        shard |= {f"{name}_momentum": v.cpu() for name, v in moms.items()}
        common.save_ckpt(shard, shard_path(path, groups.t, token))
    common.barrier()  # every shard is on disk before rank 0 writes the index
    index = {"sharded": groups.S, "token": token, "V.weight": sd["V.weight"],
             "V.bias": sd["V.bias"],
             "files": [os.path.basename(shard_path(path, t, token))
                       for t in range(groups.S)]}
    for name in moms:
        del osd["state"][pos[name]]
    return (index, osd) if common.is_main() else (None, None)


def _read_shard(ck, path, t):
    """Row t's shard of a sharded checkpoint `path` (ck: its contents), checked against the
    index."""
    if path is None:
        raise UserError("the checkpoint keeps its sub-class heads in per-group files: give its "
                        "path to grouped.load_heads / assemble_heads")
    name = os.path.join(os.path.dirname(os.path.abspath(path)), ck["heads"]["files"][t])
    hint = f"{path} keeps training group {t}'s sub-class head there; copy it along"
    if not os.path.exists(name):
        raise UserError(f"{name} does not exist: {hint}")
    shard = torch.load(name, map_location="cpu", weights_only=True)
    if shard.get("t") != t or not torch.equal(shard.get("token"), ck["heads"]["token"]):
        raise UserError(f"{name} belongs to another checkpoint than {path} (a run stopped while "
                        f"saving?): resume from another checkpoint")
    return shard


def _with_rows(ck, path, rows, heads_keys):
    """(heads state, optimizer state) with W, b and their momentum = rows' shards stacked."""
    index, osd = ck["heads"], ck["head_optimizer"]
    shards = [_read_shard(ck, path, t) for t in rows]
    sd = {"V.weight": index["V.weight"], "V.bias": index["V.bias"]}
    osd = dict(osd, state=dict(osd["state"]))
    pos = {name: i for i, name in enumerate(heads_keys)}
    for name in ("W", "b"):
        sd[name] = torch.cat([s[name] for s in shards])
        if f"{name}_momentum" in shards[0]:
            osd["state"][pos[name]] = {
                "momentum_buffer": torch.cat([s[f"{name}_momentum"] for s in shards])}
    return sd, osd


# m02.Heads' and ShardedHeads' parameter order, the optimizer's keys (own parameters before
# V's)
HEAD_KEYS = ("W", "b", "V.weight", "V.bias")


def assemble_heads(ck, path=None):
    """-> (heads state, head optimizer state) of checkpoint ck (read from `path`) in the
    replicated format (W (S, k_s, d)), whichever format it was written in: one process, or
    --layout replicated, loads these."""
    if "sharded" not in ck["heads"]:
        return ck["heads"], ck["head_optimizer"]
    return _with_rows(ck, path, range(ck["heads"]["sharded"]), HEAD_KEYS)


def load_heads(heads, opt, ck, groups, path=None):
    """Load checkpoint ck's heads and head optimizer into ShardedHeads (either format; path: ck's
    file, needed for the sharded one): row t of W, b and of their momentum; a sharded checkpoint's
    own shard only. (One process or --layout replicated loads assemble_heads' full rows.)"""
    keys = [name for name, _ in heads.named_parameters()]
    if "sharded" in ck["heads"]:
        sd, osd = _with_rows(ck, path, [groups.t], keys)
    else:
        sd, osd = ck["heads"], ck["head_optimizer"]
        t, pos = groups.t, {name: i for i, name in enumerate(keys)}
        # (S, k_s, d) -> (1, k_s, d), (S, k_s) -> (1, k_s)
        sd = dict(sd, W=sd["W"][t:t + 1], b=sd["b"][t:t + 1])
        osd = dict(osd, state=dict(osd["state"]))
        for name in ("W", "b"):
            if pos[name] in osd["state"]:
                # clone: the optimizer would otherwise keep a view of all S rows
                st = osd["state"][pos[name]]
                osd["state"][pos[name]] = dict(
                    st, momentum_buffer=st["momentum_buffer"][t:t + 1].clone())
    heads.load_state_dict(sd)
    opt.load_state_dict(osd)
