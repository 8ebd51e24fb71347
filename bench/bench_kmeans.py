"""k-means seconds at N = 60,000, d = 256, k = 1,000, 10 Lloyd iterations (issue 4): faiss CPU (faiss.Kmeans) vs
scikit-learn KMeans (algorithm="lloyd", n_init=1) vs 03_kmeans.kmeans with the plain torch E-step vs with the faiss
E-step, all in the same process, on the same data and from the same initial centroids (the points 03_kmeans picks).

Data: a mixture of k Gaussians in d dims (centres and noise both N(0, 1) per dimension, so clusters overlap as in real
features and no method converges early), L2-normalised rows (like whitened, normalised features, PAPER.md §4.2).
Work per method: faiss.Kmeans and scikit-learn do 10 E-steps + 10 M-steps (scikit-learn then one more E-step for
labels_); ours does 10 + 1 final E-step and the empty-cluster pass (PAPER.md §4.3). tol=0 so scikit-learn runs every
iteration. faiss.Kmeans gets max_points_per_centroid = N so it trains on all points, as the others do.
Threads: every library gets --threads (default 1). On a small shared machine, 2 threads per process thrash when other
jobs hold the cores (we measured 8x slower matmuls), so 1 thread gives stable numbers that compare fairly.
Run:    python bench/bench_kmeans.py [--n 60000 --d 256 --k 1000 --niter 10 --sklearn_iter 10 --threads 1]
Writes: bench/RESULTS.md (appends a section)
"""
import argparse
import datetime
import importlib
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
km = importlib.import_module("03_kmeans")  # 03_kmeans.py: our Lloyd loop


def objective(x, c):
    """Mean squared distance to the nearest centroid (Eq. (3)), computed the same way for every method."""
    _, d2 = km._assign(torch.from_numpy(x), torch.as_tensor(c, dtype=torch.float32), "torch")
    return d2.mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--sklearn_iter", type=int, default=10, help="cap scikit-learn's iterations if it is too slow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=1.0, help="noise std relative to the spread of the centres")
    p.add_argument("--threads", type=int, default=1, help="threads for torch, faiss, BLAS and OpenMP")
    p.add_argument("--no_write", action="store_true", help="print only, do not append to bench/RESULTS.md")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    centers = rng.normal(size=(a.k, a.d))
    x = (centers[rng.integers(0, a.k, size=a.n)] + a.noise * rng.normal(size=(a.n, a.d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = x[np.random.default_rng(a.seed).choice(a.n, size=a.k, replace=False)]  # our kmeans's first draw
    rows = []

    def timed(name, fn):
        t = time.perf_counter()
        c, iters, note = fn()
        sec = time.perf_counter() - t
        rows.append((name, sec, sec / iters, objective(x, c), note))
        print(f"{name:32s} {sec:8.2f} s  {sec / iters:6.3f} s/iter  objective {rows[-1][3]:.5f}  {note}", flush=True)

    import faiss
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    threadpool_limits(a.threads)  # BLAS and OpenMP pools of numpy / scikit-learn

    def run_faiss():
        f = faiss.Kmeans(a.d, a.k, niter=a.niter, seed=a.seed, max_points_per_centroid=a.n)
        f.train(x, init_centroids=init)
        splits = sum(s["nsplit"] for s in f.iteration_stats)
        return f.centroids, len(f.obj), f"{len(f.obj)} iterations, {splits} empty splits"

    def run_sklearn():
        m = KMeans(a.k, init=init, n_init=1, max_iter=a.sklearn_iter, tol=0, algorithm="lloyd", random_state=a.seed)
        m.fit(x)
        return m.cluster_centers_, m.n_iter_, f"{m.n_iter_} iterations (max_iter {a.sklearn_iter})"

    timed("faiss CPU (faiss.Kmeans)", run_faiss)
    timed("scikit-learn KMeans (lloyd)", run_sklearn)
    for backend in ("torch", "faiss"):
        def ours():
            c, _, st = km.kmeans(x, a.k, a.niter, a.seed, backend=backend)
            return c.numpy(), a.niter, f"{a.niter} iterations + final E-step, {st['n_empty_split']} empty splits"
        timed(f"03_kmeans.kmeans, {backend} E-step", ours)

    machine = (f"{platform.machine()} {os.cpu_count()} CPU cores (shared with other jobs), torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), faiss {faiss.__version__} "
               f"({faiss.omp_get_max_threads()} threads)")
    md = [f"\n## 03_kmeans: k-means, N={a.n}, d={a.d}, k={a.k}, {a.niter} iterations "
          f"({datetime.datetime.now():%Y-%m-%d %H:%M}, `python bench/bench_kmeans.py`, noise {a.noise})",
          f"Machine: {machine}. Same process, same data, same initial centroids; objective = mean squared distance "
          f"to the nearest centroid (the methods differ only in how they re-seed empty clusters, and faiss stops "
          f"early once the objective stops changing, scikit-learn once no label changes).", "",
          "| method | seconds | s / iteration | objective | note |", "|---|---|---|---|---|"]
    md += [f"| {n} | {s:.2f} | {si:.3f} | {o:.5f} | {note} |" for n, s, si, o, note in rows]
    print("\n".join(md))
    if not a.no_write:
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as fh:
            fh.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
