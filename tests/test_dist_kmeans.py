"""2 processes (torchrun, gloo on CPU) give the single-process result: kmeans, two_level and cluster() (PAPER.md §7, §11
pitfall 2). The test launches this file under torchrun; each rank holds a contiguous shard (uneven sizes, empty
clusters, a small super-cluster absent from rank 0), and rank 0 saves the gathered result for the comparison.
cluster() runs end to end (features -> PCA -> two_level) on each rank's shard of the images, with the PCA fitted on
all rows and on a sample P of 40 of the 96 rows (pca_sample < N: P is gathered from both ranks' shards)."""
import importlib
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from support import common

km = importlib.import_module("03_kmeans")  # 03_kmeans.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems():
    """Tiny problems, identical in every process: {name: (x (N, D) float32, k, m)}; m = None means flat kmeans."""
    rng = np.random.default_rng(0)
    mix = (rng.normal(size=(6, 8)) * 4)[rng.integers(0, 6, size=301)] + rng.normal(size=(301, 8))
    dup = np.repeat(rng.normal(size=(5, 4)), 9, axis=0)  # 45 points, 5 distinct: empty clusters all along
    small = np.concatenate([rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 30, rng.normal(size=(2, 4)) - 30])
    f = lambda a: a.astype(np.float32)  # noqa: E731
    return {"mix_kmeans": (f(mix), 10, None), "dup_kmeans": (f(dup), 12, None), "mix_two_level": (f(mix), 12, 3),
            "dup_two_level": (f(dup), 12, 2), "small_two_level": (f(small), 15, 3)}


def run_all(x, k, m):
    """The sharded computation on this process's rows, gathered: dict of numpy arrays."""
    rank, world, N = common.get_rank(), common.world_size(), len(x)
    shard = torch.from_numpy(x[rank * N // world:(rank + 1) * N // world])  # contiguous shard, as cluster() does
    if m is None:
        c, a, st = km.kmeans(shard, k, niter=4, seed=7)
        return {"labels": common.all_gather_cat(a).numpy(), "centroids": c.numpy(),
                "objective": np.array(st["objective"]), "n_empty_split": np.array(st["n_empty_split"])}
    r = km.two_level(shard, k, m, niter=4, seed=7)
    return {"super": common.all_gather_cat(r["super"]).numpy(), "sub": common.all_gather_cat(r["sub"]).numpy(),
            "centroids_super": r["centroids_super"].numpy(), "centroids_sub": r["centroids_sub"].numpy(),
            "objective": np.array(r["stats"]["objective"] + r["stats"]["objective_sub"]),
            "n_empty_split": np.array(r["stats"]["n_empty_split"])}


def run_cluster():
    from test_kmeans import Cfg, CfgSample, TinySource, TinyTrunk  # the stand-in trunk and source of the unit tests
    out = {}
    for name, cfg in (("cluster", Cfg), ("cluster_sample", CfgSample)):
        torch.manual_seed(0)
        r = km.cluster(TinyTrunk(), TinySource(), cfg, torch.device("cpu"))
        out |= {f"{name}/{key}": torch.as_tensor(r[key]).numpy()
                for key in ("super", "sub", "centroids_super", "centroids_sub", "pca_mean", "pca_proj")}
    return out


def shard_rows():
    """Rows of fc7 that extract_features returns on this rank: its shard only, never all N."""
    from test_kmeans import TinySource, TinyTrunk
    views = importlib.import_module("01_data").ClusterDataset(TinySource(), 16)
    return len(km.extract_features(TinyTrunk(), views, 32, "cpu"))


def worker(out):
    torch.set_num_threads(1)
    rank, world, _ = common.init_dist("cpu")
    assert world == 2
    res = {f"{name}/{key}": v for name, (x, k, m) in problems().items() for key, v in run_all(x, k, m).items()}
    res |= run_cluster()
    rows = common.all_gather_cat(torch.tensor([shard_rows()]))  # (2,) one count per rank
    if rank == 0:
        np.savez(out, **res, shard_rows=rows.numpy())
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "dist.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__), out]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = dict(np.load(out))
    assert got.pop("shard_rows").tolist() == [48, 48]  # each rank extracted its half of the 96 images
    ref = {f"{name}/{key}": v for name, (x, k, m) in problems().items() for key, v in run_all(x, k, m).items()}
    ref |= run_cluster()
    assert set(got) == set(ref)
    for key in ref:
        if ref[key].dtype == np.int64:  # labels and counts: exactly equal
            assert np.array_equal(got[key], ref[key]), key
        else:  # centroids, objectives, PCA: equal up to float summation order
            assert np.allclose(got[key], ref[key], rtol=1e-4, atol=1e-5), key
    assert got["dup_kmeans/n_empty_split"] > 0  # the empty-cluster policy ran on the shards
    assert not np.allclose(got["cluster/pca_mean"], got["cluster_sample/pca_mean"])  # P is not all rows
    sizes = np.bincount(got["dup_kmeans/labels"], minlength=12)
    assert sizes.sum() == 45 and (sizes > 0).all()


if __name__ == "__main__":
    worker(sys.argv[1])
