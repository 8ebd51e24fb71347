"""Synced batch norm, the DDP wrap, the batches of each rank: 04_train.py's distributed layer.

Plumbing, not the paper (STYLE.md §3): under torchrun, batch norm sees the global batch of all
ranks, so that N processes compute what one process does (PAPER.md §7: the grouped layout needs it,
since each group's batch holds a single super-class). torch.nn.SyncBatchNorm refuses CPU tensors,
so CPU/gloo uses the small layer below, built on the differentiable all-reduce; every function is
the identity in one process.
"""
import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from support import common
from support.common import world_size


# ---- DIST: batch norm over the global batch, and the DDP wrap ----
class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with training statistics over the global batch of all ranks (PAPER.md §7), for
    CPU/gloo where torch.nn.SyncBatchNorm refuses to run. Each rank computes centred statistics
    (count n_r, mean m_r, M2_r = sum (x - m_r)^2); two differentiable all-reduces combine them:
    mean = sum n_r m_r / n, M2 = sum M2_r + n_r (m_r - mean)^2. One-pass E[x^2] - mean^2 would
    lose every digit when |mean| >> std (float32)."""

    def _check_input_dim(self, x):
        pass  # (N, C), (N, C, L) and (N, C, H, W) all work

    def forward(self, x):
        if not self.training:  # eval: running statistics, nothing to synchronise
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        n_r = torch.tensor([x.numel() / C], dtype=torch.float32, device=x.device)
        m_r = xf.mean(dims)  # (C,) this rank's mean
        shape = [1, C] + [1] * (x.dim() - 2)
        M2_r = ((xf - m_r.view(shape)) ** 2).sum(dims)  # (C,) centred on this rank's mean
        first = dist_nn.all_reduce(torch.cat([n_r * m_r, n_r]))  # (C + 1,) summed over ranks
        n = first[-1]
        mean = first[:C] / n
        # (C,) biased: normalises the batch
        var = dist_nn.all_reduce(M2_r + n_r * (m_r - mean) ** 2) / n
        # running statistics exactly like nn.BatchNorm: momentum 0.1, unbiased variance
        with torch.no_grad():
            self.running_mean.copy_(self.momentum * mean
                                    + (1 - self.momentum) * self.running_mean)
            self.running_var.copy_(self.momentum * var * n / (n - 1)
                                   + (1 - self.momentum) * self.running_var)
            self.num_batches_tracked += 1
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (y * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


def convert_sync_bn(module):
    """Swap every BatchNorm1d/2d inside `module` for SyncBatchNorm, sharing its parameters and
    buffers."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, True)
            new.train(child.training)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module


def sync_bn(net, device):
    """Batch norm synced over all ranks: torch's SyncBatchNorm on GPU, ours on CPU. Identity in
    one process."""
    if world_size() == 1:
        return net
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return convert_sync_bn(net)


def wrap_ddp(net, device):
    """Under torchrun: synced batch norm, then DDP (gradients averaged over ranks). Identity in one
    process."""
    if world_size() == 1:
        return net
    return DDP(sync_bn(net, device), device_ids=[device] if device.type == "cuda" else None)


# ---- DIST: the plan's split over ranks (identity in one process) ----
def rank_batches(E, batch_size, rank, world, start=0):
    """The plan positions j this rank feeds, one list per iteration from `start`. Global batch b is
    plan[bB:(b+1)B] (an incomplete last batch is dropped); rank takes every world-th position of
    it, so the union over the ranks is exactly the single-process batch."""
    if batch_size % world:
        raise common.UserError(f"--batch_size {batch_size} must be a multiple of the {world} "
                               f"processes")
    B = batch_size
    return [list(range(b * B + rank, (b + 1) * B, world)) for b in range(start, E // B)]
