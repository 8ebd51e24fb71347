"""Oracle tests for 03_kmeans.py: Lloyd vs faiss.Kmeans and a NumPy brute force, the empty-cluster policy (§4.4),
PCA-whitening (Eq. (10)-(11)), two-level consistency, guard rails, diagnostics, and the stage end to end."""
import dataclasses
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from support import common

km = importlib.import_module("03_kmeans")  # 03_kmeans.py
report = importlib.import_module("support.clusterstats")  # support/clusterstats.py: diagnostics
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixture(n=1200, D=16, k=8, sep=8.0, seed=0):
    """A well-separated Gaussian mixture: (x (n, D) float32, true component (n,))."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, D)) * sep
    y = rng.integers(0, k, size=n)
    return (centers[y] + rng.normal(size=(n, D))).astype(np.float32), y


def init_indices(N, k, seed):
    """The initial centroids' rows: kmeans draws k distinct points first from its generator (§4.3)."""
    return np.random.default_rng(seed).choice(N, size=k, replace=False)


def good_seed(y, k):
    """A seed whose init points hit every true component, so that a correct Lloyd loop must recover them."""
    return next(s for s in range(10000) if len(set(y[init_indices(len(y), k, s)])) == k)


def lloyd_np(x, c, niter):
    """Brute-force NumPy reference (float64): niter E+M steps, then a final E-step. Returns (labels, objective)."""
    x, c = x.astype(np.float64), c.astype(np.float64)
    for it in range(niter + 1):
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # (n, k)
        a = d2.argmin(1)
        if it < niter:
            c = np.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(len(c))])
    return a, d2.min(1).mean()


# ---- k-means: oracles ----
@pytest.fixture(scope="module")
def gm():
    x, y = mixture()
    return x, y, good_seed(y, 8)


def test_kmeans_matches_numpy_and_faiss_and_recovers_clusters(gm):
    faiss = pytest.importorskip("faiss")
    x, y, seed = gm
    c, a, st = km.kmeans(x, 8, niter=10, seed=seed, backend="torch")
    assert len(st["objective"]) == 11 and st["n_empty_split"] == 0
    init = x[init_indices(len(x), 8, seed)]
    a_np, obj_np = lloyd_np(x, init, 10)
    assert abs(st["objective"][-1] - obj_np) <= 0.01 * obj_np
    assert (a.numpy() == a_np).all()
    f = faiss.Kmeans(x.shape[1], 8, niter=10, seed=seed, max_points_per_centroid=10 ** 6)
    f.train(x, init_centroids=init)
    obj_faiss = ((x[:, None] - f.centroids[None]) ** 2).sum(-1).min(1).mean()  # faiss's centroids, final E-step
    assert abs(st["objective"][-1] - obj_faiss) <= 0.01 * obj_faiss
    assert normalized_mutual_info_score(y, a.numpy(), average_method="geometric") > 0.95
    assert st["objective"] == sorted(st["objective"], reverse=True)  # Lloyd never increases the objective
    assert torch.allclose(c, torch.from_numpy(f.centroids), atol=1e-4)


def test_torch_and_faiss_backends_agree(gm):
    pytest.importorskip("faiss")
    x, _, _ = gm
    c1, a1, s1 = km.kmeans(x, 12, niter=5, seed=3, backend="torch")  # 12 > 8 components: a non-trivial run
    c2, a2, s2 = km.kmeans(x, 12, niter=5, seed=3, backend="faiss")
    assert torch.equal(a1, a2) and torch.allclose(c1, c2, atol=1e-5)
    assert np.allclose(s1["objective"], s2["objective"], rtol=1e-5)


def test_kmeans_in_small_chunks_matches_numpy(monkeypatch):
    """CHUNK = 40 values: E-step chunks of 40 // max(k, D) = 2 rows, M-step sums over chunks of 2 rows, the
    objective after the empty-cluster fix in chunks: the same Lloyd as the NumPy brute force, and the same as
    one chunk."""
    x, y = mixture(n=301, D=16, k=8, seed=4)
    seed = good_seed(y, 8)
    ref = km.kmeans(x, 8, niter=4, seed=seed, backend="torch")
    monkeypatch.setattr(km, "CHUNK", 40)
    c, a, st = km.kmeans(x, 8, niter=4, seed=seed, backend="torch")
    a_np, obj_np = lloyd_np(x, x[init_indices(len(x), 8, seed)], 4)
    assert (a.numpy() == a_np).all() and torch.equal(a, ref[1])
    assert torch.allclose(c, ref[0], atol=1e-6) and np.allclose(st["objective"], ref[2]["objective"], rtol=1e-6)
    assert abs(st["objective"][-1] - obj_np) <= 1e-5 * obj_np
    dup = np.repeat(np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32), 10, axis=0)
    c, a, st = km.kmeans(dup, 20, niter=4, seed=0, backend="torch")  # empty clusters to the end
    assert st["n_empty_final"] > 0  # the objective was recomputed, in chunks, after moving points
    assert st["objective"][-1] == pytest.approx(((dup - c[a].numpy()) ** 2).sum(1).mean(), abs=1e-6)


def test_kmeans_deterministic_and_distinct_init():
    x, _ = mixture(n=300, seed=1)
    r1, r2 = km.kmeans(x, 10, niter=3, seed=5), km.kmeans(x, 10, niter=3, seed=5)
    assert torch.equal(r1[1], r2[1]) and torch.equal(r1[0], r2[0])
    c, a, _ = km.kmeans(x, 300, niter=0, seed=0)  # k = N, no iteration: every point is its own centroid
    assert len(torch.unique(c, dim=0)) == 300 and torch.equal(c[a], torch.from_numpy(x))


# ---- §4.4 empty clusters ----
def check_partition(a, n, k):
    sizes = np.bincount(a.numpy(), minlength=k)
    assert a.shape == (n,) and a.dtype == torch.int64 and a.min() >= 0 and a.max() < k  # one label per point
    assert sizes.sum() == n and (sizes > 0).all()  # counts conserved, no empty cluster (n >= k)


def test_empty_clusters_duplicated_points():
    # 6 distinct points, each 10 times, and k = 20: the init draws coinciding points, so clusters go empty at
    # every iteration and after the final E-step; the policy must still leave none empty.
    base = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    x = np.repeat(base, 10, axis=0)
    for backend in ("torch", "faiss") if km.faiss is not None else ("torch",):
        c, a, st = km.kmeans(x, 20, niter=4, seed=0, backend=backend)
        check_partition(a, 60, 20)
        assert st["n_empty_split"] > 0 and st["n_empty_final"] > 0
        # every cluster holds copies of one point only: splitting never mixes distinct points
        assert all(len(np.unique(x[a.numpy() == j], axis=0)) == 1 for j in range(20))


def test_split_empty_draws_donors_with_two_or_more_points():
    c = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 1
    counts = torch.tensor([0.0, 1.0, 5.0, 0.0])
    c2 = km._split_empty(c.clone(), counts, np.random.default_rng(0))
    assert counts.tolist() == [0.0, 1.0, 5.0, 0.0]  # the caller's counts are left as they were
    assert torch.equal(c2[1], c[1])  # a single-point cluster is never a donor (p ∝ n_c − 1 = 0)
    for j in (0, 2, 3):  # every re-seeded centroid is a relative ±1/1024 perturbation of cluster 2's
        assert torch.allclose(c2[j], c[2], rtol=2.1 / 1024) and not torch.equal(c2[j], c[2])
    assert len({tuple(r.tolist()) for r in c2}) == 4
    c = torch.tensor([[9.0, 9.0, 9.0], [1.0, 2.0, 3.0]])  # one empty cluster, one donor: Eq. (13) exactly
    c2 = km._split_empty(c.clone(), torch.tensor([0.0, 4.0]), np.random.default_rng(0))
    delta = torch.tensor([1.0, -1.0, 1.0])  # δ = (+1, −1, +1, …), relative ε = 1/1024
    assert torch.equal(c2[0], c[1] * (1 + delta / 1024)) and torch.equal(c2[1], c[1] * (1 - delta / 1024))


def test_fix_empty_moves_points_by_side_and_by_index():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 4)).astype(np.float32))
    a = torch.zeros(40, dtype=torch.long)  # everything in cluster 0, clusters 1 and 2 empty
    c = torch.zeros(3, 4)
    a2, c2, n = km._fix_empty(x, a.clone(), c.clone(), np.random.default_rng(0))
    check_partition(a2, 40, 3)
    assert n == 2
    for j in range(3):  # centroids are the means of their members after the move
        assert torch.allclose(c2[j], x[a2 == j].mean(0), atol=1e-5)
    same = torch.ones(9, 4)  # all members coincide: the last ⌊n_c/2⌋ in index order move
    a3, _, _ = km._fix_empty(same, torch.zeros(9, dtype=torch.long), torch.zeros(2, 4), np.random.default_rng(0))
    assert a3.tolist() == [0] * 5 + [1] * 4


# ---- §4.2 PCA-whitening ----
def test_pca_whitening_identity_covariance_and_unit_norm():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 20)) @ rng.normal(size=(20, 20)) + 3).astype(np.float32)
    mean, proj = km.fit_pca(x, 8)
    assert mean.shape == (20,) and proj.shape == (20, 8)
    h = (torch.from_numpy(x).double() - mean.double()) @ proj.double()
    cov = h.T @ h / len(h)
    assert torch.allclose(cov, torch.eye(8, dtype=torch.float64), atol=1e-3)  # whitened on the kept dims
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1][:8]  # the D largest directions are kept
    assert np.allclose(np.sort(1 / (proj.double() ** 2).sum(0).numpy())[::-1], lam, rtol=1e-3)
    g = km.apply_pca(x, mean, proj)
    assert torch.allclose(g.norm(dim=1), torch.ones(3000), atol=1e-5)
    m0, p0 = km.fit_pca(x, 0)  # pca_dim 0: no PCA, only L2-normalisation
    assert torch.allclose(km.apply_pca(x, m0, p0), torch.nn.functional.normalize(torch.from_numpy(x), dim=1))


def test_pca_rank_deficient():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(500, 3)) @ rng.normal(size=(3, 10))).astype(np.float32)  # rank 3 in 10 dims
    mean, proj = km.fit_pca(x, 6)
    assert torch.isfinite(proj).all() and torch.isfinite(km.apply_pca(x, mean, proj)).all()  # floor 1e-5 max λ


def test_pca_eigenvalue_floor_matches_numpy():
    """Eq. (10)'s floor λ_i <- max(λ_i, 1e-5·max_j λ_j), against a NumPy computation. Variances 1 .. 1e-10 in a
    random basis: the kept directions 4-6 have λ below the floor, so the whitened output depends on its value."""
    rng = np.random.default_rng(0)
    std = np.array([1, 0.7, 0.3, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5])
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    x = ((rng.normal(size=(2000, 8)) * std) @ basis.T + 2).astype(np.float32)
    g = km.apply_pca(x, *km.fit_pca(x, 6)).double().numpy()

    def gram(floor):  # NumPy Eq. (10)-(11), float64; the Gram matrix does not depend on eigenvector signs
        xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
        lam, U = np.linalg.eigh(xc.T @ xc / len(x))
        lam, U = lam[::-1], U[:, ::-1]
        h = xc @ (U[:, :6] / np.sqrt(np.maximum(lam, floor * lam[0])[:6]))
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        return h @ h.T

    assert np.abs(g @ g.T - gram(1e-5)).max() < 1e-3
    for other in (1e-30, 1e-6, 2e-5, 1e-4):  # the test tells these floors apart
        assert np.abs(g @ g.T - gram(other)).max() > 0.1


# ---- guard rails: each names its flag ----
def test_guard_rails(capsys):
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    with pytest.raises(common.UserError, match=r"--pca_dim 9 must be in 0\.\.8 \(feature dimension 8"):
        km.fit_pca(x, 9)  # > d
    with pytest.raises(common.UserError, match=r"--pca_dim 8 must be in 0\.\.5 .* 5 samples"):
        km.fit_pca(x[:5], 8)  # > samples
    km.fit_pca(x, 8)  # 30 samples >= 8·7/2 = 28: no warning
    assert "warning" not in capsys.readouterr().out
    km.check_pca(64, 512, 1000)
    assert "try --pca_dim 45" in capsys.readouterr().out  # 1000 < 64·63/2 = 2016
    with pytest.raises(common.UserError, match="--k 31"):
        km.two_level(x, 31, 1)
    with pytest.raises(common.UserError, match="--super_clusters 31"):
        km.two_level(x, 31, 31)
    with pytest.raises(common.UserError, match="--k 10 is not a multiple of --super_clusters 3"):
        km.two_level(x, 10, 3)
    with pytest.raises(common.UserError, match="--k"):
        km.kmeans(x, 31)
    with pytest.raises(common.UserError, match="--kmeans_backend"):
        km.kmeans(x, 3, backend="sklearn")


# ---- two levels ----
def test_two_level_consistency():
    x, y = mixture(n=800, k=8, seed=2)
    r = km.two_level(x, 12, 3, niter=5, seed=0)
    u, z, k_s = r["super"], r["sub"], r["k_s"]
    assert k_s == 4 and r["centroids_super"].shape == (3, 16) and r["centroids_sub"].shape == (3, 4, 16)
    assert u.min() >= 0 and u.max() < 3 and z.min() >= 0 and z.max() < k_s
    check_partition(u * k_s + z, 800, 12)  # every (u, z) is non-empty and lies in exactly one super-cluster
    for v in range(3):  # level 2 is k-means on the super-cluster's members alone
        _, zv, _ = km.kmeans(x[u.numpy() == v], k_s, niter=5, seed=1 + v)
        assert torch.equal(zv, z[u == v])
    r1 = km.two_level(x, 4, 1, niter=2)  # m = 1: level 1 skipped
    assert (r1["super"] == 0).all() and torch.allclose(r1["centroids_super"][0], torch.from_numpy(x).mean(0), atol=1e-4)
    r2 = km.two_level(x, 3, 3, niter=2)  # k_s = 1: level 2 skipped
    assert (r2["sub"] == 0).all() and r2["stats"]["objective_sub"] == []


def test_two_level_small_super_cluster(capsys):
    # two big blobs and a far-away pair: with m = 3 the pair is a super-cluster with 2 < k_s = 5 points
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 30, rng.normal(size=(2, 4)) - 30])
    y = np.array([0] * 60 + [1] * 60 + [2] * 2)
    seed = good_seed(y, 3)
    r = km.two_level(x.astype(np.float32), 15, 3, niter=3, seed=seed)
    small = [v for v in range(3) if (r["super"] == v).sum() == 2]
    assert len(small) == 1 and r["stats"]["n_small_super"] == 1
    assert sorted(r["sub"][r["super"] == small[0]].tolist()) == [0, 1]  # each point its own sub-class
    assert "have < k_s = 5 points" in capsys.readouterr().out
    flat = (r["super"] * 5 + r["sub"]).numpy()
    assert len(np.unique(flat)) == 5 + 5 + 2  # the small super-cluster's 3 other ids stay empty


# ---- diagnostics ----
def test_diagnostics_nmi_and_sizes():
    x, y = mixture(n=400, k=4, seed=3)
    r = km.two_level(x, 8, 2, niter=3)
    perm = {"super": 1 - r["super"], "sub": r["sub"], "k_s": r["k_s"]}  # the same partition, renamed
    dg = report.diagnostics(r, labels=y, prev=perm)
    assert dg["nmi_prev"] == pytest.approx(1.0)
    flat = (r["super"] * 4 + r["sub"]).numpy()
    assert dg["nmi_labels"] == pytest.approx(normalized_mutual_info_score(y, flat, average_method="geometric"))
    sizes = np.bincount(flat, minlength=8)
    assert dg["sizes"] == {"min": sizes.min(), "median": np.median(sizes), "max": sizes.max(), "n_empty": 0}
    assert dg["nmi_labels"] != pytest.approx(normalized_mutual_info_score(y, flat[::-1]))
    fewer = {"super": r["super"][:3], "sub": r["sub"][:3], "k_s": 4}
    assert report.diagnostics(r, prev=fewer)["nmi_prev"] is None  # N changed


# ---- the stage: cluster() with a tiny stand-in trunk, then save_clustering ----
class TinyTrunk(torch.nn.Module):
    feature_dim, image_size = 24, 16  # cluster() feeds the trunk at its own image_size

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 24))

    def forward(self, x):
        return self.net(torch.nn.functional.adaptive_avg_pool2d(x, 8))


class TinySource(torch.utils.data.Dataset):
    def __init__(self, n=96):
        from PIL import Image
        rng = np.random.default_rng(0)
        self.labels = rng.integers(0, 3, size=n).astype(np.int64)
        noise = rng.integers(0, 60, size=(n, 16, 16, 3))
        self.images = (noise + 90 * self.labels[:, None, None, None]).astype(np.uint8)  # 3 brightness classes
        self.pil = [Image.fromarray(im) for im in self.images]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.pil[i], int(self.labels[i])


class Cfg:
    k, super_clusters, pca_dim, niter, seed = 6, 3, 8, 3, 0
    batch_size, workers, kmeans_backend = 32, 0, "auto"


class CfgSample(Cfg):
    pca_sample = 40  # of N = 96 rows (>= D(D-1)/2 = 28 for pca_dim 8)


def test_cluster_and_save(tmp_path):
    torch.manual_seed(0)
    model, src = TinyTrunk(), TinySource()
    model.train()
    res = km.cluster(model, src, Cfg, torch.device("cpu"))
    assert model.training  # the caller's mode is restored
    assert res["super"].shape == (96,) and res["sub"].shape == (96,) and res["k_s"] == 2
    assert res["pca_mean"].shape == (24,) and res["pca_proj"].shape == (24, 8)
    dg = res["diagnostics"]
    assert {"sizes", "n_empty_split", "objective", "nmi_labels", "ari_labels"} <= set(dg)
    assert dg["sizes"]["n_empty"] == 0
    feats = km.extract_features(model, importlib.import_module("01_data").ClusterDataset(src, 16), 7, "cpu")
    model.eval()
    ref = torch.cat([model(torch.stack([importlib.import_module("01_data").ClusterDataset(src, 16)[i][0]]))
                     for i in range(96)]).detach()
    assert torch.allclose(feats, ref, atol=1e-5)  # index order, batched == one by one
    npz, js = km.save_clustering(res, str(tmp_path))
    z = common.load_npz(npz)
    assert set(z) == {"super", "sub", "centroids_super", "centroids_sub", "pca_mean", "pca_proj", "k_s"}
    assert z["super"].dtype == np.int64 and os.path.exists(js)
    res2 = km.cluster(model, src, Cfg, torch.device("cpu"), prev=z, epoch=1)
    assert 0 <= res2["diagnostics"]["nmi_prev"] <= 1


def test_cluster_pca_sample(capsys):
    """pca_sample < N: the PCA is fitted on the seeded sample P of the rows alone (the rows chosen as
    np.random.default_rng(seed).choice(N, |P|, replace=False), sorted: the same rows on any number of ranks)."""
    torch.manual_seed(0)
    model, src = TinyTrunk(), TinySource()
    res = km.cluster(model, src, CfgSample, torch.device("cpu"))
    feats = km.extract_features(model, importlib.import_module("01_data").ClusterDataset(src, 16), 32, "cpu")
    rows = np.sort(np.random.default_rng(CfgSample.seed).choice(96, 40, replace=False))
    mean, proj = km.fit_pca(feats[rows], CfgSample.pca_dim)
    assert torch.equal(res["pca_mean"], mean) and torch.equal(res["pca_proj"], proj)
    assert not torch.allclose(res["pca_mean"], feats.mean(0), atol=1e-4)  # not all 96 rows
    assert "feature shard: 96 x 24 float32" in capsys.readouterr().out


def test_main_script(tmp_path, capsys):
    """The script end to end on 48 synthetic images with a 1/16-width trunk from 02_model.py."""
    m02 = importlib.import_module("02_model")
    out = str(tmp_path)
    with pytest.raises(common.UserError, match="run 02_model.py"):
        km.main(km.Config(out_dir=out, data="synthetic:48", subset=0))
    m02.main(m02.Config(out_dir=out, width=0.0625, image_size=32, fc_dim=32, super_classes=8, k=4))
    cfg = km.Config(out_dir=out, data="synthetic:48", subset=0, k=4, super_clusters=2, pca_dim=8, niter=2)
    km.main(cfg)
    z = common.load_npz(os.path.join(out, "03_kmeans.npz"))
    assert z["super"].shape == (48,) and int(z["k_s"]) == 2 and z["pca_proj"].shape == (32, 8)
    km.main(cfg)  # a second run reads the first as the previous clustering: same seed, same result
    assert "NMI prev 1.000" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="--niter -1"):
        km.main(dataclasses.replace(cfg, niter=-1))


@pytest.mark.slow
def test_image_size_comes_from_the_trunk(tmp_path):
    """Issue 14 item 8: a 64-px trunk with no --image_size clusters at 64 px; a different --image_size is one
    line, exit 2, naming both sizes (it used to warn, then die in the trunk with a ValueError traceback)."""
    m02 = importlib.import_module("02_model")
    out = str(tmp_path)
    m02.main(m02.Config(out_dir=out, width=0.0625, image_size=64, fc_dim=32, super_classes=8, k=4))
    flags = ["--out_dir", out, "--data", "synthetic:24", "--subset", "0", "--k", "4", "--super_clusters", "2",
             "--pca_dim", "4", "--niter", "1"]
    km.main(common.parse_config(km.Config, flags))  # --image_size 0: the trunk's 64 px
    assert common.load_npz(os.path.join(out, "03_kmeans.npz"))["super"].shape == (24,)
    p = subprocess.run([sys.executable, "03_kmeans.py", *flags, "--image_size", "32"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "--image_size 32" in p.stderr and "64 px" in p.stderr
