"""Benchmark: one stage-03 clustering round against one training epoch, at the demo settings, measured in one run.

Runs 02_model.py and then 04_train.py for 2 epochs with T = 2 (a clustering round at epoch 0 only) in a temporary
folder, exactly as `make demo` does, and reads the seconds the stages logged themselves: 03_kmeans_ep000.json
(feature extraction + k-means) and 04_train_log.jsonl (epoch 1 has no clustering, so it is one pure training epoch).
Appends the ratio to bench/RESULTS.md.
Run:    python bench/bench_cluster_vs_epoch.py [--subset 20000]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(line, write=True):
    """Print one result line and append it to bench/RESULTS.md (the benchmarks that run whole stages share this)."""
    print(line)
    if write:
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as fh:
            fh.write("\n" + line + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", type=int, default=20000)
    p.add_argument("--no_write", action="store_true")
    a = p.parse_args()
    out = tempfile.mkdtemp(prefix="bench_cve_")
    data = ["--data", "fashion-mnist", "--subset", str(a.subset), "--image_size", "32"]
    subprocess.run([sys.executable, "02_model.py", "--out_dir", out, "--width", "0.25", "--image_size", "32"],
                   cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "04_train.py", "--out_dir", out, *data, "--k", "160", "--super_clusters", "4",
                    "--pca_dim", "64", "--epochs", "2", "--reassign", "2", "--lr", "0.05", "--workers", "2"],
                   cwd=ROOT, check=True, capture_output=True)
    c = json.load(open(os.path.join(out, "03_kmeans_ep000.json")))
    log = [json.loads(l) for l in open(os.path.join(out, "04_train_log.jsonl"))]
    clus = c["seconds_features"] + c["seconds_kmeans"]
    epoch = log[1]["seconds"]
    line = (f"- {time.strftime('%Y-%m-%d %H:%M')} bench_cluster_vs_epoch ({platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, `python bench/bench_cluster_vs_epoch.py "
            f"--subset {a.subset}`): demo settings (Fashion-MNIST {a.subset} images, 32 px, width 1/4, k 160, m 4, PCA 64): "
            f"one clustering round {clus:.1f} s (features {c['seconds_features']:.1f} s + PCA and two-level k-means "
            f"{c['seconds_kmeans']:.1f} s) vs one training epoch {epoch:.1f} s ({log[1]['images_per_s']:.0f} images/s): "
            f"ratio **{clus / epoch:.2f}**; with T = 2 clustering adds {100 * clus / (2 * epoch):.0f}% to training time")
    report(line, not a.no_write)


if __name__ == "__main__":
    main()
