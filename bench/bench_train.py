"""Training throughput: what the hierarchical heads cost over a plain head, 04's whole step
against a bare torchvision VGG-16-BN step, data loading against training, fp32 against bf16.

Every step below is: autocast (bf16 runs, with channels_last), forward, zero_grad, backward, SGD
step (momentum 0.9, weight decay 1e-5), one host sync for the loss. All contenders are timed in one
process, one step of each in turn, repeated (interleaved: machine load hits every contender
alike). A ratio is the median over rounds of the two steps' time ratio in that round.
1. "heads": our trunk (Sobel + VGG-16-BN to fc7) + 02_model.Heads (V and W_s, S x k_s) +
   02_model.hierarchical_loss (Eq. (8)), one SGD optimizer, a mixed batch (s, z drawn at random).
   "plain k": our trunk + ReLU + one nn.Linear(d, k) + cross-entropy; "plain S*k_s": a flat softmax
   over all S*k_s (super-class, sub-class) pairs, Eq. (5), with as many head parameters as Heads.
   heads / plain k is the cost of 02's heads and loss (issue 13 target: >= 0.95, fp32 and bf16).
2. "04 step": 04's loop body (tests/steps.py) = Net (trunk + Heads + loss) + both SGD optimizers + the
   logged sums. "bare": torchvision's VGG class and make_layers with the width-scaled
   configuration D and batch norm, avgpool (1) and a classifier of the same shapes (fc6 C5 -> d,
   ReLU, dropout, fc7 d -> d), then ReLU and a plain k-way head (target: 04 step >= 0.9 of bare).
   torchvision's default 7x7 avgpool would copy the 1x1 conv13 map 49 times at 32 px.
3. Data loading: 01_data.RotationDataset on the demo's Fashion-MNIST subset through a DataLoader
   with the demo's workers and parallel.rank_batches, alone, against the 04 step (target >= 1.5x).
Run:    python bench/bench_train.py [--width 0.25 --image_size 32 --batch 64 --reps 10 --device cpu]
Writes: bench/RESULTS.md (appends a section; --results elsewhere)
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
m02 = importlib.import_module("02_model")  # 02_model.py: VGG trunk, Heads, hierarchical_loss
t4 = importlib.import_module("04_train")  # 04_train.py: Net
sys.path.insert(0, os.path.join(ROOT, "tests"))
from steps import train_step  # noqa: E402  (04's loop body: forward, sums, backward, both steps)
parallel = importlib.import_module("support.parallel")  # support/parallel.py: rank_batches


class TrunkPlain(nn.Module):
    """Our trunk + ReLU + a plain n-way head: the reference for what 02's heads and loss cost."""

    def __init__(self, trunk, n):
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(trunk.feature_dim, n)

    def forward(self, x, y):
        return F.cross_entropy(self.head(F.relu(self.trunk(x))), y)


class TrunkHeads(nn.Module):
    """Our trunk + Heads + the hierarchical loss of Eq. (8); y = (s, z)."""

    def __init__(self, trunk, heads):
        super().__init__()
        self.trunk, self.heads = trunk, heads

    def forward(self, x, y):
        return m02.hierarchical_loss(self.heads, self.trunk(x), *y)["loss"]


class Bare(nn.Module):
    """torchvision VGG-16-BN (width-scaled) + ReLU + a plain k-way head."""

    def __init__(self, width, d, k):
        super().__init__()
        with torch.device("meta"):  # skip building torchvision's default 25088 x 4096 classifier
            self.vgg = TorchvisionVGG(nn.Sequential(), init_weights=False)
        cfg = [v if v == "M" else m02.channels(v, width) for v in m02.CFG_D]
        self.vgg.features = make_layers(cfg, batch_norm=True)
        self.vgg.avgpool = nn.AdaptiveAvgPool2d(1)
        self.vgg.classifier = nn.Sequential(nn.Linear(cfg[-2], d), nn.ReLU(True), nn.Dropout(0.5),
                                            nn.Linear(d, d))
        self.head = nn.Linear(d, k)

    def forward(self, x, y):
        return F.cross_entropy(self.head(F.relu(self.vgg(x))), y)


def step(model, opt, x, y, amp):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())  # one sync, like 04's step


def timed(fn, device):
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def contenders(a, device, S, k_s, x, s, z, y, y_flat, amp):
    """{name: a function that runs one training step} for one dtype."""
    fmt = torch.channels_last if amp else torch.contiguous_format
    tag = "bf16" if amp else "fp32"
    sgd = dict(lr=0.01, momentum=0.9, weight_decay=1e-5)

    def trunk():  # the same initial trunk for every contender built on ours
        g1 = torch.Generator().manual_seed(1)
        return m02.VGG(a.width, a.image_size, sobel=True, generator=g1)

    def heads(d):
        return m02.Heads(d, S, k_s, generator=torch.Generator().manual_seed(2))

    def one_opt(model, target):
        model = model.to(device, memory_format=fmt).train()
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], **sgd)
        return lambda: step(model, opt, x, target, amp)

    runs = {}
    t = trunk()
    runs[f"heads {tag}"] = one_opt(TrunkHeads(t, heads(t.feature_dim)), (s, z))
    runs[f"plain k {tag}"] = one_opt(TrunkPlain(trunk(), a.k), y)
    runs[f"plain S*k_s {tag}"] = one_opt(TrunkPlain(trunk(), S * k_s), y_flat)
    t = trunk()
    net = t4.Net(t, heads(t.feature_dim)).to(device, memory_format=fmt).train()
    opts = (torch.optim.SGD([q for q in t.parameters() if q.requires_grad], **sgd),
            torch.optim.SGD(net.heads.parameters(), **sgd))
    runs[f"04 step {tag}"] = lambda: train_step(net, opts, x, s, z, amp)
    runs[f"bare {tag}"] = one_opt(Bare(a.width, t.feature_dim, a.k), y)
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.25)  # the demo's trunk (Makefile): d = 1024
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=160)
    p.add_argument("--super_clusters", type=int, default=4)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)  # the demo's DataLoader workers
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--no_data", action="store_true", help="skip the data loading measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads; 0 = torch's default")
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"),
                   help="the file the section is appended to")
    a = p.parse_args(argv)
    if a.threads:  # 1 by default: on a busy shared CPU, OpenMP threads wait on each other
        torch.set_num_threads(a.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if a.device == "auto" else a.device)
    g = torch.Generator().manual_seed(0)
    S, k_s, B = 4 * a.super_clusters, a.k // a.super_clusters, a.batch
    x = torch.randn(B, 3, a.image_size, a.image_size, generator=g)
    s, z = torch.randint(S, (B,), generator=g), torch.randint(k_s, (B,), generator=g)
    y, y_flat = torch.randint(a.k, (B,), generator=g), s * k_s + z  # y_flat: Eq. (5)'s flat label
    s, z, y, y_flat = s.to(device), z.to(device), y.to(device), y_flat.to(device)

    runs = {}
    for amp in (False, True):
        fmt = torch.channels_last if amp else torch.contiguous_format
        xd = x.to(device, memory_format=fmt)
        runs |= contenders(a, device, S, k_s, xd, s, z, y, y_flat, amp)
    t0 = time.perf_counter()
    for fn in runs.values():  # warm-up (allocator, oneDNN kernels)
        fn()
        fn()
    times = {name: [] for name in runs}
    for _ in range(a.reps):  # interleaved: machine load hits every contender alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    t_steps = time.perf_counter() - t0
    ips = {name: B / statistics.median(t) for name, t in times.items()}  # images per second

    def ratio(a_, b_):  # throughput a_ / b_: the median over rounds of the two steps' time ratio
        return {tag: statistics.median(tb / ta for ta, tb in zip(times[f"{a_} {tag}"],
                                                                  times[f"{b_} {tag}"]))
                for tag in ("fp32", "bf16")}

    r_heads, r_flat = ratio("heads", "plain k"), ratio("heads", "plain S*k_s")
    r_step, r_bare = ratio("04 step", "plain k"), ratio("04 step", "bare")
    r_bf16 = statistics.median(a_ / b_ for a_, b_ in zip(times["04 step fp32"],
                                                         times["04 step bf16"]))
    print({"heads/plain k": r_heads, "heads/plain S*k_s": r_flat, "04 step/plain k": r_step,
           "04 step/bare": r_bare, "seconds": round(t_steps, 1)})

    load_line = ""
    if not a.no_data:  # data loading alone: RotationDataset through the demo's DataLoader
        src = data.make_source(a.data, "train", 10000, 0)
        ds = data.RotationDataset(src, a.image_size, 0)
        ds.set_plan(0, torch.randperm(len(src), generator=g).numpy(), None)
        n_batches = min(40, len(ds) // B)
        batches = parallel.rank_batches(len(ds), B, 0, 1)[:n_batches]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=a.workers,
                                             generator=torch.Generator())
        it = iter(loader)
        next(it)  # worker start-up excluded
        t0 = time.perf_counter()
        n = sum(len(batch[0]) for batch in it)
        load_ips = n / (time.perf_counter() - t0)
        r_load = load_ips / ips["04 step fp32"]
        load_line = (f"- data loading ({a.data}, {a.workers} workers, RotationDataset + train "
                     f"transform): {load_ips:.0f} images/s = **{r_load:.2f}x** the 04 step in "
                     f"fp32 (target >= 1.5)\n")

    machine = (f"{platform.machine()} {os.cpu_count()} CPU cores (shared with other jobs), torch "
               f"{torch.__version__} ({torch.get_num_threads()} threads), device {device}")
    cmd = "python bench/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = [f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ips[name]:.0f} |"
            for name in runs]

    def both(r):
        return f"fp32 **{r['fp32']:.2f}**, bf16 **{r['bf16']:.2f}**"

    text = "\n".join([
        f"\n## 04_train: training step, heads vs plain head, data loading, bf16 "
        f"({datetime.datetime.now():%Y-%m-%d %H:%M}, `{cmd.strip()}`)",
        f"Machine: {machine}. Setting: {a.image_size} px, width {a.width}, batch {B}, S = {S}, "
        f"k_s = {k_s}, plain k = {a.k}, train mode, median of {a.reps} interleaved steps "
        f"({t_steps:.0f} s for all steps).",
        "", "| step | ms / step | images / s |", "|---|---|---|", *rows, "",
        f"- heads / plain k (what 02's Heads and Eq. (8) cost, target >= 0.95): {both(r_heads)}",
        f"- heads / plain S*k_s (against Eq. (5)'s flat softmax, same head size): {both(r_flat)}",
        f"- 04 step / plain k (heads, loss, 2 optimizers, logged sums): {both(r_step)}",
        f"- 04 step / bare torchvision (target >= 0.9): {both(r_bare)}",
        f"- 04 step bf16 + channels_last / fp32: **{r_bf16:.2f}x**",
        load_line])
    print(text)
    with open(a.results, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
