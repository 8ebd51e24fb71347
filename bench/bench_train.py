"""Training throughput of 04_train.py's full step against a bare torchvision VGG-16-BN step, data loading against
training, and fp32 against bf16 + channels_last.

1. "ours": 04_train.train_step = trunk (Sobel + VGG-16-BN) + heads V and W_s + the hierarchical loss (Eq. (8)) + both
   SGD optimizers, on a mixed batch (s, z drawn at random). "bare": torchvision's own VGG class and make_layers with
   the width-scaled configuration D and batch norm, avgpool (1) and a classifier of the same shapes (fc6 C5 -> d, ReLU,
   dropout, fc7 d -> d), then ReLU and one plain k-way linear head with cross-entropy, one SGD optimizer (momentum,
   weight decay). Same image size, batch and dtype; one step of each in turn, repeated, medians compared (target: ours
   >= 0.9 of bare, issue 5). torchvision's default 7x7 avgpool would copy the 1x1 conv13 map 49 times at 32 px.
   "our trunk + plain head" splits the gap: the trunk's input path (02_model) vs the heads/loss/optimizers (04).
2. Data loading: 01_data.RotationDataset on the demo's Fashion-MNIST subset through a DataLoader with the demo's workers
   and 04_train.rank_batches, alone, against ours (target: >= 1.5x, so that loading never starves a step).
3. ours in fp32 against ours with --amp (bf16 autocast + channels_last), on the same device.
Run:    python bench/bench_train.py [--width 0.25 --image_size 32 --batch 64 --reps 10 --threads 1 --device cpu]
Writes: bench/RESULTS.md (appends a section)
"""
import argparse
import datetime
import importlib
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import VGG as TorchvisionVGG, make_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
data = importlib.import_module("01_data")  # 01_data.py: sources, RotationDataset
m02 = importlib.import_module("02_model")  # 02_model.py: VGG trunk, Heads
t4 = importlib.import_module("04_train")  # 04_train.py: Net, train_step, rank_batches


class TrunkPlain(nn.Module):
    """Our trunk (Sobel, 34 px input) + ReLU + a plain k-way head: isolates what 04's heads, loss, 2 optimizers cost."""

    def __init__(self, trunk, k):
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(trunk.feature_dim, k)

    def forward(self, x, y):
        return F.cross_entropy(self.head(F.relu(self.trunk(x))), y)


class Bare(nn.Module):
    """torchvision VGG-16-BN (width-scaled) + ReLU + a plain k-way head: the reference step."""

    def __init__(self, width, d, k):
        super().__init__()
        with torch.device("meta"):  # skip building torchvision's default 25088 x 4096 classifier
            self.vgg = TorchvisionVGG(nn.Sequential(), init_weights=False)
        cfg = [v if v == "M" else m02.channels(v, width) for v in m02.CFG_D]
        self.vgg.features = make_layers(cfg, batch_norm=True)
        self.vgg.avgpool = nn.AdaptiveAvgPool2d(1)
        self.vgg.classifier = nn.Sequential(nn.Linear(cfg[-2], d), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(d, d))
        self.head = nn.Linear(d, k)

    def forward(self, x, y):
        return F.cross_entropy(self.head(F.relu(self.vgg(x))), y)


def bare_step(model, opt, x, y):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=model.amp):
        loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())  # one sync, like ours


def timed(fn, device):
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.25)  # the demo's trunk (Makefile)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=160)
    p.add_argument("--super_clusters", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)  # the demo's DataLoader workers
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads; 0 = torch's default")
    a = p.parse_args(argv)
    if a.threads:  # 1 by default: on a busy shared CPU, OpenMP threads wait on each other and the times scatter
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    g = torch.Generator().manual_seed(0)
    S, k_s, B = 4 * a.super_clusters, a.k // a.super_clusters, a.batch
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=1e-5)

    # ---- the contenders: ours fp32, ours bf16 + channels_last, bare fp32, bare bf16 + channels_last ----
    runs = {}
    for amp in (False, True):
        fmt = torch.channels_last if amp else torch.contiguous_format
        trunk = m02.VGG(a.width, a.image_size, sobel=True, generator=torch.Generator().manual_seed(1))
        heads = m02.Heads(trunk.feature_dim, S, k_s, generator=torch.Generator().manual_seed(2))
        net = t4.Net(trunk, heads).to(device, memory_format=fmt).train()
        opts = (torch.optim.SGD([q for q in trunk.parameters() if q.requires_grad], **sgd),
                torch.optim.SGD(heads.parameters(), **sgd))
        bare = Bare(a.width, trunk.feature_dim, a.k).to(device, memory_format=fmt).train()
        bare.amp = amp
        bopt = torch.optim.SGD(bare.parameters(), **sgd)
        x = torch.randn(B, 3, a.image_size, a.image_size, generator=g).to(device, memory_format=fmt)
        s, z, y = torch.randint(S, (B,), generator=g), torch.randint(k_s, (B,), generator=g), torch.randint(a.k, (B,))
        s, z, y = s.to(device), z.to(device), y.to(device)
        tag = "bf16+cl" if amp else "fp32"
        if not amp:
            plain = TrunkPlain(m02.VGG(a.width, a.image_size, sobel=True), a.k).to(device).train()
            plain.amp, popt = False, torch.optim.SGD(plain.parameters(), **sgd)
            runs["our trunk + plain head fp32"] = lambda plain=plain, popt=popt, x=x, y=y: bare_step(plain, popt, x, y)
        runs[f"ours {tag}"] = lambda net=net, opts=opts, x=x, s=s, z=z, amp=amp: t4.train_step(net, opts, x, s, z, amp)
        runs[f"bare {tag}"] = lambda bare=bare, bopt=bopt, x=x, y=y: bare_step(bare, bopt, x, y)
    for fn in runs.values():  # warm-up (allocator, oneDNN kernels)
        fn(), fn()
    times = {name: [] for name in runs}
    for _ in range(a.reps):  # interleaved: machine load hits every contender alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    ips = {name: B / statistics.median(t) for name, t in times.items()}  # images per second

    # ---- data loading alone: RotationDataset through the demo's DataLoader ----
    src = data.make_source(a.data, "train", 10000, 0)
    ds = data.RotationDataset(src, a.image_size, 0)
    ds.set_plan(0, torch.randperm(len(src), generator=g).numpy(), None)
    n_batches = min(40, len(ds) // B)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=t4.rank_batches(len(ds), B, 0, 1)[:n_batches],
                                         num_workers=a.workers, generator=torch.Generator())
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0 = time.perf_counter()
    n = sum(len(batch[0]) for batch in it)
    load_ips = n / (time.perf_counter() - t0)

    r_ours = ips["ours fp32"] / ips["bare fp32"]
    r_bf16 = ips["ours bf16+cl"] / ips["ours fp32"]
    r_load = load_ips / ips["ours fp32"]
    machine = (f"{platform.machine()} {os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), device {device}")
    cmd = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ips[name]:.0f} |" for name in runs]
    text = "\n".join([
        f"\n## 04_train: training step, data loading, bf16 ({datetime.datetime.now():%Y-%m-%d %H:%M}, `{cmd.strip()}`)",
        f"Machine: {machine}. Setting: {a.image_size} px, width {a.width}, batch {B}, S = {S}, k_s = {k_s} (bare: one "
        f"{a.k}-way head), train mode, median of {a.reps} interleaved steps.",
        "", "| step | ms / step | images / s |", "|---|---|---|", *rows, "",
        f"- ours / bare (fp32): **{r_ours:.2f}** (target >= 0.9); our trunk with a plain head / bare: "
        f"{ips['our trunk + plain head fp32'] / ips['bare fp32']:.2f} (the trunk's input path, 02_model); "
        f"ours / our trunk with a plain head: {ips['ours fp32'] / ips['our trunk + plain head fp32']:.2f} "
        f"(what 04's heads, Eq. (8) and the 2 optimizers cost)",
        f"- data loading ({a.data}, {a.workers} workers, RotationDataset + train transform): {load_ips:.0f} images/s = "
        f"**{r_load:.2f}x** ours fp32 training (target >= 1.5)",
        f"- ours bf16 + channels_last / ours fp32: **{r_bf16:.2f}x** "
        f"(bare: {ips['bare bf16+cl'] / ips['bare fp32']:.2f}x)", ""])
    print(text)
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
