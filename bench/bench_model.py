"""Forward + backward time of 02_model's trunk against torchvision's VGG-16-BN of the same width
and input size.

Setting (issue 3): 32 px, width 1/4, batch 64, train mode (BN batch statistics, dropout on),
loss = mean of the output. All models are timed in one process, interleaved (warm-up, then one
step of each in turn, repeated), and the medians are compared, so machine load affects them alike.
The torchvision model is its own VGG class and make_layers with the width-scaled configuration D;
its avgpool is AdaptiveAvgPool2d(1) instead of (7, 7) and its classifier is fc6 (C5 -> d), ReLU,
dropout, fc7 (d -> d), so both models have the same layers and classifier shapes (torchvision's
default 7x7 pool would copy conv13's 1x1 map 49 times into a 49x larger fc6 at 32 px). Differences
left: ours pads the 32 px input to 34 px before conv1 (PAPER.md §5.3), so blocks 1-2 see 34/17 px
instead of 32/16; the Sobel variant adds the fixed layer.
Run:    python bench/bench_model.py [--reps 10 --threads 1 --device cpu|cuda|auto]
Writes: bench/RESULTS.md (appends one line)
"""
import argparse
import datetime
import importlib
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torchvision.models.vgg import VGG as TorchvisionVGG, make_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
M = importlib.import_module("02_model")  # 02_model.py: our trunk


def torchvision_model(width, d):
    with torch.device("meta"):  # skip building torchvision's default 25088x4096 classifier
        tv = TorchvisionVGG(nn.Sequential(), init_weights=False)
    cfg = [v if v == "M" else M.channels(v, width) for v in M.CFG_D]
    tv.features = make_layers(cfg, batch_norm=True)
    tv.avgpool = nn.AdaptiveAvgPool2d(1)  # conv13 is already 1x1 at 32 px
    tv.classifier = nn.Sequential(nn.Linear(cfg[-2], d), nn.ReLU(True), nn.Dropout(0.5),
                                  nn.Linear(d, d))
    return tv


def step(model, x, device):
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(x).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads; 0 = torch's default")
    a = p.parse_args(argv)
    if a.threads:  # 1 by default: on a busy shared CPU, OpenMP threads wait on each other
        torch.set_num_threads(a.threads)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(a.device)
    torch.manual_seed(0)
    models = {"ours (Sobel)": M.VGG(a.width, a.image_size, sobel=True),
              "ours (RGB)": M.VGG(a.width, a.image_size, sobel=False)}
    models["torchvision"] = torchvision_model(a.width, models["ours (RGB)"].feature_dim)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    times = {k: [] for k in models}
    for m in models.values():
        m.to(device).train()
    for i in range(a.warmup + a.reps):
        for name, m in models.items():  # interleaved: one step of each model in turn
            t = step(m, x, device)
            if i >= a.warmup:
                times[name].append(t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    params = {k: M.n_params(m) for k, m in models.items()}
    for k in models:
        print(f"{k:14s} {ms[k]:8.1f} ms/step (median of {a.reps})  "
              f"{params[k]:>11,d} trainable parameters")
    r_sobel, r_rgb = ms["ours (Sobel)"] / ms["torchvision"], ms["ours (RGB)"] / ms["torchvision"]
    print(f"ratio ours / torchvision: {r_sobel:.2f} with Sobel, {r_rgb:.2f} without")
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"cpu, threads={torch.get_num_threads()}"
    line = (f"- {datetime.date.today()} bench_model ({dev}, torch {torch.__version__}): "
            f"forward+backward, {a.image_size} px, width {a.width:g}, batch {a.batch}, median of "
            f"{a.reps} interleaved: ours+Sobel {ms['ours (Sobel)']:.1f} ms, ours RGB "
            f"{ms['ours (RGB)']:.1f} ms, torchvision vgg16_bn-style {ms['torchvision']:.1f} ms; "
            f"ratio ours/torchvision {r_sobel:.2f} (Sobel), {r_rgb:.2f} (RGB); params ours "
            f"{params['ours (Sobel)']:,d} (Sobel) / {params['ours (RGB)']:,d} (RGB), "
            f"torchvision {params['torchvision']:,d}\n")
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    new = not os.path.exists(path)
    with open(path, "a") as fh:
        if new:
            fh.write("# Benchmark results\n\nOne line per run, appended by the scripts in bench/ "
                     "(ratios are measured side by side in one process).\n\n")
        fh.write(line)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
