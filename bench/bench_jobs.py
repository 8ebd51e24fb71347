"""Benchmark: two training runs one after the other (all cores each) against the same two runs at once (cores split).

This is the choice `scripts/reproduce.py --jobs N` makes for a sweep of independent runs. At 32 px and width 1/4 the
convolutions are small, so one process does not keep several cores busy; two processes with one thread each may
finish a pair of runs sooner. Measured here, side by side, with the stages exactly as the sweep calls them:
  A: run 1 then run 2, each 04_train.py with OMP_NUM_THREADS = cores        (reproduce.py --jobs 1)
  B: run 1 and run 2 at the same time, each with OMP_NUM_THREADS = cores/2  (reproduce.py --jobs 2)
Each run: 02_model.py (width 1/4, 32 px) then 04_train.py --method deepercluster on a Fashion-MNIST subset (one
clustering round at epoch 0, then training). Reported: wall seconds of A and B and the speed-up A / B.
Run:    python bench/bench_jobs.py [--subset 5000 --epochs 2]
Writes: bench/RESULTS.md (appends one line)
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from bench_cluster_vs_epoch import report  # bench/ is on sys.path when a bench script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(out, seed, threads, a):
    """Launch 02 then 04 for one run in a shell; returns the Popen (output discarded, failures raise in finish)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    py = sys.executable
    cmd = (f"{py} 02_model.py --out_dir {out} --width 0.25 --image_size 32 --seed {seed} && "
           f"{py} 04_train.py --out_dir {out} --data fashion-mnist --subset {a.subset} --epochs {a.epochs} "
           f"--reassign {a.epochs} --seed {seed} --workers 2")
    return subprocess.Popen(cmd, shell=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(procs):
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"a benchmark run failed:\n{err.decode()[-2000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no_write", action="store_true")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    tmp = tempfile.mkdtemp(prefix="bench_jobs_")
    t0 = time.time()
    for seed in (0, 1):  # A: sequential, all cores each
        finish([start(f"{tmp}/a{seed}", seed, cores, a)])
    seq = time.time() - t0
    t0 = time.time()  # B: both at once, cores split
    finish([start(f"{tmp}/b{seed}", seed, max(1, cores // 2), a) for seed in (0, 1)])
    par = time.time() - t0
    line = (f"- {time.strftime('%Y-%m-%d %H:%M')} bench_jobs ({platform.machine()}, {cores} cores, torch "
            f"{torch.__version__}, `python bench/bench_jobs.py --subset {a.subset} --epochs {a.epochs}`): two DeeperCluster "
            f"runs (Fashion-MNIST {a.subset} images, {a.epochs} epochs, 1 clustering round each, 32 px, width 1/4): one after "
            f"the other with {cores} threads each {seq:.1f} s, both at once with {max(1, cores // 2)} thread(s) each "
            f"{par:.1f} s: `--jobs 2` finishes a sweep **{seq / par:.2f}x** sooner")
    report(line, not a.no_write)


if __name__ == "__main__":
    main()
