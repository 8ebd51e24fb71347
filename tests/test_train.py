"""Stage 04: targets, the uniform sampler (Eq. (14)), head reset, checkpoint compatibility, and subprocess runs:
2 short epochs, exact resume after SIGKILL in mid-epoch (labels kept in mid-period), the NaN guard, the refusal
of an incompatible checkpoint. Tiny everything: width 1/16, 32 px, synthetic:160, one thread per process."""
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support import common
from support import interop, parallel, resume

t4 = importlib.import_module("04_train")  # 04_train.py
m02 = importlib.import_module("02_model")  # 02_model.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = ["--data", "synthetic:160", "--subset", "0", "--k", "16", "--super_clusters", "2", "--pca_dim", "16",
        "--batch_size", "32", "--workers", "0", "--epochs", "2", "--reassign", "3", "--deterministic", "--ckpt_every", "2"]


def train(out, *extra, env=None):
    return subprocess.run([sys.executable, "04_train.py", "--out_dir", str(out), *TINY, *extra], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=300)


# ---- targets, Eq. (6)-(7) ----
@pytest.mark.parametrize("rotate", [True, False])
def test_targets_round_trip(rotate):
    g = torch.Generator().manual_seed(0)
    u, z = torch.randint(5, (100,), generator=g), torch.randint(7, (100,), generator=g)
    r = torch.randint(4, (100,), generator=g) if rotate else torch.zeros(100, dtype=torch.long)
    s, z2 = t4.make_targets(u, z, r, rotate)
    u2, r2 = t4.split_super(s, rotate)
    assert torch.equal(u2, u) and torch.equal(r2, r) and torch.equal(z2, z)
    if rotate:
        assert torch.equal(s, 4 * u + r)  # the official numbering


class Src(list):  # len() works, labels / classes attributes
    pass


def source(n=120, labels=True):
    s = Src(range(n))
    s.labels = np.arange(n) % 6 if labels else None
    s.classes = [str(i) for i in range(6)] if labels else None
    return s


@pytest.mark.parametrize("method,S,k_s,rotate", [("deepercluster", 8, 8, True), ("rotnet", 4, 1, True),
                                                 ("deepcluster", 1, 16, False), ("deepcluster-2level", 2, 8, False),
                                                 ("supervised", 1, 6, False)])
def test_methods_and_round_trip(method, S, k_s, rotate):
    cfg = t4.Config(method=method, k=16, super_clusters=2)
    st = t4.method_setup(cfg, source())
    assert (st["S"], st["k_s"], st["rotate"]) == (S, k_s, rotate)
    s = torch.arange(S)
    u, r = t4.split_super(s, rotate)
    assert torch.equal(t4.make_targets(u, torch.zeros_like(u), r, rotate)[0], s)  # every super-class round-trips
    if method == "supervised":
        assert np.array_equal(st["sub"], np.arange(120) % 6) and not st["super"].any()


def test_method_errors():
    with pytest.raises(common.UserError, match="needs labels"):
        t4.method_setup(t4.Config(method="supervised"), source(labels=False))
    with pytest.raises(common.UserError, match="multiple"):
        t4.method_setup(t4.Config(k=10, super_clusters=4), source())
    with pytest.raises(common.UserError, match="--method 'simclr': use deepercluster or rotnet"):
        t4.check_flags(t4.Config(method="simclr"))
    with pytest.raises(common.UserError, match="epoch_size"):
        t4.check_flags(t4.Config(epoch_size=10, batch_size=64))
    with pytest.raises(common.UserError, match="--lr -0.1"):
        t4.check_flags(t4.Config(lr=-0.1))
    with pytest.raises(common.UserError, match="--reassign -1"):
        t4.check_flags(t4.Config(reassign=-1))
    with pytest.raises(common.UserError, match="--keep_seen '1e6'"):
        t4.check_flags(t4.Config(keep_seen="1e6"))
    for bad in (0.0, 1.5):  # RandomResizedCrop's smallest area must be a fraction of the image
        with pytest.raises(common.UserError, match=f"--crop_min {bad} must be in"):
            t4.check_flags(t4.Config(crop_min=bad))


def test_image_size_must_be_the_trunks(tmp_path):
    """03 clusters and 05 evaluates at the trunk's size: training crops of another size stop before any work."""
    m02.main(m02.Config(out_dir=str(tmp_path), width=0.0625, image_size=64, fc_dim=32, super_classes=8, k=4))
    flags = ["--out_dir", str(tmp_path), "--data", "synthetic:24", "--subset", "0", "--k", "4", "--super_clusters",
             "2", "--workers", "0", "--batch_size", "8"]
    with pytest.raises(common.UserError, match="--image_size 32, .* built for 64 px: pass --image_size 64"):
        t4.main(common.parse_config(t4.Config, flags))
    assert not os.path.exists(tmp_path / "04_train_last.pt")


def test_each_method_has_its_official_recipe():
    """lr = the official (lr, batch) pair scaled to --batch_size (PAPER.md §6, §8); T, weight decay and
    DeepCluster's top layer (N(0, 0.01), no momentum) per method; any flag given wins."""
    dc = t4.recipe(t4.Config(method="deepcluster", batch_size=64))
    assert dc == dict(lr=pytest.approx(0.05 * 64 / 256), reassign=1, weight_decay=1e-5, crop_min=0.08, w_std=0.01,
                      head_momentum=0.0)
    deeper = t4.recipe(t4.Config(method="deepercluster", batch_size=3072, image_size=224))
    assert deeper == dict(lr=pytest.approx(0.1), reassign=3, weight_decay=1e-5, crop_min=0.08, w_std=None,
                          head_momentum=0.9)
    # DeeperCluster's lr follows the square root of the batch ratio (measured, DEVIATION in RECIPES): 0.1 at 3072,
    # 0.1 * sqrt(64 / 3072) = 0.0144 at 64; deepcluster-2level shares it
    for method in ("deepercluster", "deepcluster-2level"):
        assert t4.recipe(t4.Config(method=method, batch_size=64))["lr"] == pytest.approx(0.1 * (64 / 3072) ** 0.5)
    rot = t4.recipe(t4.Config(method="rotnet", batch_size=64))
    assert rot["lr"] == pytest.approx(0.05) and rot["weight_decay"] == 5e-4 and rot["crop_min"] == 1.0  # whole images
    given = t4.recipe(t4.Config(method="deepcluster", lr=0.3, reassign=5, crop_min=0.5, weight_decay=0.0))
    assert (given["lr"], given["reassign"], given["crop_min"], given["weight_decay"]) == (0.3, 5, 0.5, 0.0)
    assert set(t4.RECIPES) == set(m02.METHODS)
    swapped = t4.recipe(t4.Config(method="deepcluster", top_layer="linear"))  # the knob of the curves study
    assert (swapped["w_std"], swapped["head_momentum"], swapped["lr"]) == (None, 0.9, dc["lr"])


# ---- the uniform sampler, Eq. (14) ----
def labels_with_gaps():
    """3 super-clusters of very different sizes; sub-class ids with gaps (empty sub-classes) and a singleton."""
    u = np.array([0] * 300 + [1] * 40 + [2] * 5)
    z = np.concatenate([np.arange(300) % 3 * 2, np.r_[np.zeros(39, int), 7], np.arange(5) % 2])  # u=0: z in {0,2,4}
    return u.astype(np.int64), z.astype(np.int64)


@pytest.mark.parametrize("rotate", [True, False])
def test_sampler_balanced(rotate):
    u, z = labels_with_gaps()
    S, E = (12, 1200) if rotate else (3, 1200)
    idx, rot = t4.uniform_plan(u, z, S, rotate, E, np.random.default_rng(0))
    assert len(idx) == len(rot) == E and idx.dtype == rot.dtype == np.int64
    s = t4.make_targets(u[idx], z[idx], rot, rotate)[0]
    assert np.array_equal(np.bincount(s, minlength=S), np.full(S, E // S))  # super-classes exactly balanced
    if not rotate:
        assert not rot.any()
    for sc in range(S):
        uu = sc // 4 if rotate else sc
        counts = np.bincount(z[idx[s == sc]])
        nonempty = np.unique(z[u == uu])
        assert set(np.flatnonzero(counts)) == set(nonempty)  # every non-empty sub-class, and only those
        assert counts[nonempty].max() - counts[nonempty].min() <= 1  # balanced within 1
        if rotate:
            assert (rot[s == sc] == sc % 4).all()
    # the singleton sub-class (u=1, z=7, one image) is drawn with replacement; big ones without
    single = np.flatnonzero((u == 1) & (z == 7))[0]
    assert (idx == single).sum() == (4 if rotate else 1) * (E // S) // 2 and (idx == single).sum() > 1
    if rotate:
        big = idx[s == 0]  # 100 draws over 3 sub-classes of 100 images: no replacement needed, none used
        assert len(np.unique(big)) == len(big)


def test_sampler_deterministic_and_remainder():
    u, z = labels_with_gaps()
    a = t4.uniform_plan(u, z, 12, True, 1001, np.random.default_rng([0, 3]))
    b = t4.uniform_plan(u, z, 12, True, 1001, np.random.default_rng([0, 3]))
    c = t4.uniform_plan(u, z, 12, True, 1001, np.random.default_rng([0, 4]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])
    s = t4.make_targets(u[a[0]], z[a[0]], a[1], True)[0]
    assert len(s) == 1001 and set(np.bincount(s, minlength=12)) <= {83, 84}


def test_sampler_empty_super_cluster_and_rotnet():
    u = np.r_[np.zeros(50, int), np.full(50, 2)]  # super-cluster 1 is empty: its super-classes get nothing
    idx, rot = t4.uniform_plan(u, np.zeros(100, int), 12, True, 400, np.random.default_rng(0))
    s = t4.make_targets(u[idx], 0, rot, True)[0]
    assert len(idx) == 400 and np.array_equal(np.bincount(s, minlength=12), [50] * 4 + [0] * 4 + [50] * 4)
    zeros = np.zeros(100, np.int64)  # RotNet: uniform over images, each rotation E/4 times
    idx, rot = t4.uniform_plan(zeros, zeros, 4, True, 100, np.random.default_rng(0))
    assert np.array_equal(np.bincount(rot), [25] * 4)


# ---- head reset after a clustering round ----
@pytest.mark.parametrize("reset_V", [True, False])
def test_head_reset(reset_V):
    heads = m02.Heads(8, 4, 3)
    opt = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    f, s, z = torch.rand(6, 8), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    m02.hierarchical_loss(heads, f, s, z)["loss"].backward()
    opt.step()
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    t4.reset_heads(heads, opt, torch.Generator().manual_seed(1), reset_V)
    after = heads.state_dict()
    assert not torch.equal(before["W"], after["W"]) and not torch.equal(before["b"], after["b"])
    assert torch.equal(before["V.weight"], after["V.weight"]) != reset_V
    assert heads.W not in opt.state and heads.b not in opt.state  # fresh momentum for the new heads
    assert (heads.V.weight in opt.state) != reset_V
    other = m02.Heads(8, 4, 3)
    t4.reset_heads(other, torch.optim.SGD(other.parameters(), lr=0.1), torch.Generator().manual_seed(1), True)
    if reset_V:  # the same generator seed gives the same heads (on every rank, and after a resume)
        assert all(torch.equal(after[k], other.state_dict()[k]) for k in after)


# ---- the distributed helpers, single-process checks (2-process ones in test_dist_train.py) ----
def test_rank_batches_union_is_global_batch():
    one = parallel.rank_batches(100, 8, 0, 1)
    two = [parallel.rank_batches(100, 8, r, 2, start=3) for r in range(2)]
    assert len(one) == 12 and one[0] == list(range(8))  # the incomplete last batch is dropped
    for b, (a0, a1) in enumerate(zip(*two), start=3):
        assert sorted(a0 + a1) == one[b] and len(a0) == len(a1) == 4
    with pytest.raises(common.UserError, match="multiple"):
        parallel.rank_batches(100, 9, 0, 2)


def test_convert_sync_bn_keeps_weights():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    net(torch.randn(6, 3, 3, 3))  # training step: running statistics move
    params = [id(p) for p in net.parameters()]
    x = torch.randn(6, 3, 3, 3)
    ref = net.eval()(x)
    parallel.convert_sync_bn(net)
    assert isinstance(net[1], parallel.SyncBatchNorm) and isinstance(net[4], parallel.SyncBatchNorm)
    assert [id(p) for p in net.parameters()] == params  # the optimizer's parameters are still the model's
    assert torch.equal(net(x), ref)  # eval mode: running statistics, nothing to synchronise


# ---- --amp: bf16 only where the hardware computes it ----
def test_amp_falls_back_to_fp32_where_the_cpu_emulates_bf16(monkeypatch, capsys):
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    assert common.resolve_amp(True, "cpu") is False
    assert "no native bf16" in capsys.readouterr().out  # said, not silent
    assert common.resolve_amp(False, "cpu") is False and common.resolve_amp(True, "cuda") is True
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    assert common.resolve_amp(True, torch.device("cpu")) is True and capsys.readouterr().out == ""


def test_cpu_has_bf16_agrees_with_the_cpu_flags():
    """oneDNN's check against the kernel's list of the CPU's instruction sets: no AVX-512 at all means
    no native bf16; AVX-512 BF16 or AMX BF16 means native bf16."""
    try:
        flags = set(" ".join(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if not flags or not {"avx2", "sse2"} & flags:
        pytest.skip("not an x86 CPU")
    if not any(f.startswith("avx512") for f in flags):
        assert common.cpu_has_bf16() is False
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert common.cpu_has_bf16() is True


def test_progress_bar_into_a_file_refreshes_rarely(tmp_path, monkeypatch):
    """A run's stdout.log is a file: tqdm's default 10 redraws a second filled 2.5 MB per run."""
    from tqdm import tqdm
    counts = []
    for make in (lambda it: tqdm(it), lambda it: common.bar(it)):  # reference first, then ours
        with open(tmp_path / "log", "w") as fh:
            monkeypatch.setattr(sys, "stderr", fh)  # not a terminal
            for _ in make(range(60)):
                time.sleep(0.01)  # >= 0.6 s: tqdm's default redraws at least 5 times
        counts.append(open(tmp_path / "log", newline="").read().count("\r"))
    assert counts[0] >= 5 and counts[1] <= 3, counts  # start and close only


def test_incompatible_lists_differences():
    cfg = t4.Config(k=16, super_clusters=2, data="synthetic:160")
    old = dataclasses.asdict(cfg)
    assert resume.config_diff(old, cfg, t4.COMPAT + t4.COMPAT_MID_EPOCH) == []
    old.update(k=32, method="rotnet", batch_size=32, seed=5)
    diff = "; ".join(resume.config_diff(old, cfg, t4.COMPAT))
    assert "--k 32 there vs 16 now" in diff and "'rotnet' there vs 'deepercluster' now" in diff
    mid = "; ".join(resume.config_diff(old, cfg, t4.COMPAT_MID_EPOCH))  # checked on a mid-epoch resume only
    assert mid == "--batch_size 32 there vs 64 now; --seed 5 there vs 0 now"


# ---- subprocess runs ----
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Init checkpoint, then run A: 2 uninterrupted epochs (deterministic, a checkpoint every 2 iterations)."""
    base = tmp_path_factory.mktemp("train")
    init = base / "02_model_init.pt"
    p = subprocess.run([sys.executable, "02_model.py", "--out_dir", str(base), "--width", "0.0625", "--image_size",
                        "32"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    a = base / "a"
    p = train(a, "--init", str(init), "--keep_seen", "64,100,320")
    assert p.returncode == 0, p.stderr
    return SimpleNamespace(base=base, init=init, a=a, out_a=p.stdout + p.stderr)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_epochs_outputs(runs):
    a = runs.a
    for f in ("03_kmeans_ep000.npz", "03_kmeans_ep000.json", "04_train_last.pt", "04_train_ep002.pt",
              "04_train_log.jsonl", "04_train_curves.png"):
        assert (a / f).exists(), f
    assert not (a / "03_kmeans_ep001.npz").exists()  # T = 3: one clustering in 2 epochs
    lines = [json.loads(s) for s in (a / "04_train_log.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    assert set(lines[0]) >= {"epoch", "loss", "loss_super", "loss_sub", "acc_super", "acc_sub", "acc_joint",
                             "nmi_prev", "nmi_labels", "ari_labels", "n_empty", "cluster_min", "cluster_max",
                             "seconds", "images_per_s", "lr"}
    assert lines[0]["nmi_labels"] is not None and lines[1]["nmi_labels"] is None  # no clustering at epoch 1
    ck = load(a / "04_train_last.pt")
    assert ck["stage"] == "04_train" and ck["epoch"] == 2 and ck["method"] == "deepercluster"
    assert ck["super"].shape == ck["sub"].shape == (160,) and ck["super"].dtype == torch.long
    assert ck["pca_proj"].shape == (256, 16) and ck["centroids_sub"].shape == (2, 8, 16)
    interop.load_trunk(str(a / "04_train_last.pt"))  # 05 reads it through the same loader


def test_learning_curve_checkpoints(runs):
    """--keep_seen 64,100,320 at batch 32 (5 steps an epoch): kept after 64, 128 (the first step at or past 100) and
    320 images seen; the last one is the final trunk, the earlier ones differ from it."""
    a = runs.a
    assert sorted(f.name for f in a.glob("04_train_seen*.pt")) == [
        "04_train_seen100.pt", "04_train_seen320.pt", "04_train_seen64.pt"]
    at = {n: load(a / f"04_train_seen{n}.pt") for n in (64, 100, 320)}
    assert (at[64]["epoch"], at[64]["iteration"]) == (0, 2) and (at[100]["epoch"], at[100]["iteration"]) == (0, 4)
    last = load(a / "04_train_last.pt")["model"]
    assert all(torch.equal(at[320]["model"][k], v) for k, v in last.items())
    assert not torch.equal(at[64]["model"]["features.0.weight"], last["features.0.weight"])


def killed(out, at, sig, where="boundary", *extra):
    """04_train.py with a real signal after this process's step `at` (tests/kill_runner.py)."""
    return subprocess.run([sys.executable, "tests/kill_runner.py", str(at), sig, where, "--out_dir", str(out),
                           *TINY, "--init", str(RUNS_INIT[0]), *extra], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


RUNS_INIT = []


def position(path):
    ck = load(path)
    return ck["epoch"], ck["iteration"]


def assert_same_as_uninterrupted(runs, b):
    ca, cb = load(runs.a / "04_train_last.pt"), load(b / "04_train_last.pt")
    assert torch.equal(ca["super"], cb["super"]) and torch.equal(ca["sub"], cb["sub"])  # same clustering
    for key in ("model", "heads"):  # ...and the very same weights as the uninterrupted run
        assert all(torch.equal(ca[key][n], cb[key][n]) for n in ca[key]), key
    clock = ("seconds", "images_per_s")  # the log matches too, except wall-clock times
    assert [{k: v for k, v in m.items() if k not in clock} for m in ca["metrics"]] == \
        [{k: v for k, v in m.items() if k not in clock} for m in cb["metrics"]]


def test_kill_sigterm_and_resume_is_exact_and_keeps_labels(runs):
    RUNS_INIT[:] = [runs.init]
    b = runs.base / "b"
    # 5 iterations per epoch, a checkpoint every 2. SIGKILL after global iteration 8 (epoch 1, iteration 3): the last checkpoint
    # is at epoch 1 iteration 2, so the resume redoes iteration 3. SIGTERM after iteration 9 then saves iteration 4
    # at once, not a periodic one. The final weights must equal the uninterrupted run's.
    p = killed(b, 8, "SIGKILL")
    assert p.returncode == -9, p.stderr
    assert position(b / "04_train_last.pt") == (1, 2)
    p = train(b, "--init", str(runs.init), "--batch_size", "16", "--crop_min", "0.5")  # mid-epoch: refused
    assert p.returncode == 2 and "--batch_size 32 there vs 16 now" in p.stderr, p.stderr
    assert "--crop_min 0.08 there vs 0.5 now" in p.stderr  # the crop used, not the flag (-1: the method's)
    p = killed(b, 2, "SIGTERM")  # the resume redoes global step 8, then step 9 is its 2nd
    assert p.returncode == 130 and "resuming" in p.stdout and "stopped by signal 15: saved" in p.stdout, p.stderr
    assert position(b / "04_train_last.pt") == (1, 4)
    p = train(b, "--init", str(runs.init), "--crop_min", "0.08")  # the method's crop, given: the same run
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stdout
    assert not (b / "03_kmeans_ep001.npz").exists()  # epoch 1 of a T = 3 period: no new clustering...
    npz = common.load_npz(b / "03_kmeans_ep000.npz")  # ...the labels of epoch 0 were kept through both resumes
    cb = load(b / "04_train_last.pt")
    assert np.array_equal(cb["super"].numpy(), npz["super"]) and np.array_equal(cb["sub"].numpy(), npz["sub"])
    assert_same_as_uninterrupted(runs, b)


def test_ctrl_c_inside_a_step_never_replays_it(runs):
    """SIGINT right after opt.step() of global step 3, before the loop counts it: the checkpoint must say
    iteration 3 (its weights include step 3), or the resume would apply step 3 twice."""
    RUNS_INIT[:] = [runs.init]
    c = runs.base / "ctrl_c"
    p = killed(c, 3, "SIGINT", where="in_step")
    assert p.returncode == 130 and "stopped by signal 2: saved" in p.stdout, p.stderr
    assert position(c / "04_train_last.pt") == (0, 3)
    p = train(c, "--init", str(runs.init))
    assert p.returncode == 0, p.stderr
    assert_same_as_uninterrupted(runs, c)


def test_checkpoint_by_wall_clock(runs):
    """--ckpt_minutes: a kill loses at most that much training (here a few ms: every iteration is due)."""
    RUNS_INIT[:] = [runs.init]
    d = runs.base / "clock"
    p = killed(d, 3, "SIGKILL", "boundary", "--ckpt_every", "0", "--ckpt_minutes", "1e-6")
    assert p.returncode == -9, p.stderr
    assert position(d / "04_train_last.pt") == (0, 2)  # saved after step 2 by the clock, killed after step 3


def test_nan_guard_never_saves_diverged_weights(runs):
    c = runs.base / "c"
    shutil.copytree(runs.a, c)
    digest = hashlib.sha256((c / "04_train_last.pt").read_bytes()).hexdigest()
    # lr 1e38: the loss of step 1 is finite, its update is not; a checkpoint is due after every step
    p = train(c, "--init", str(runs.init), "--epochs", "3", "--lr", "1e38", "--ckpt_every", "1")
    assert p.returncode == 1, p.stderr
    assert "non-finite" in p.stderr and "at epoch 2 iteration 1" in p.stderr and "last good state" in p.stderr
    assert hashlib.sha256((c / "04_train_last.pt").read_bytes()).hexdigest() == digest
    ck = load(c / "04_train_last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_incompatible_checkpoint_refused(runs):
    last = str(runs.a / "04_train_last.pt")
    cfg = t4.Config(out_dir=str(runs.a), init=str(runs.init), data="synthetic:160", subset=0, k=24, super_clusters=2,
                    method="deepcluster")

    def start(c):  # what 04_train.main does: resume 04_train_last.pt, or start from --init
        return resume.load_start(c, last, "04_train", t4.COMPAT, t4.COMPAT_MID_EPOCH)
    with pytest.raises(common.UserError, match="incompatible") as err:
        start(cfg)
    assert "--k 16 there vs 24 now" in str(err.value) and "'deepcluster' now" in str(err.value)
    trunk, ck = start(dataclasses.replace(cfg, force=True))
    assert ck is None  # --force: start afresh from the init checkpoint
    trunk, ck = start(dataclasses.replace(cfg, k=16, method="deepercluster"))
    assert ck["epoch"] == 2  # the compatible one resumes


def test_resume_warns_of_changed_recipe_and_finished_run(runs, capsys):
    """A checkpoint keeps the recipe it was trained with; a resume at an epoch boundary with another one says so,
    and a finished run (the pitfall: `make demo` after a change of defaults reuses it) says it trains nothing."""
    ck = load(runs.a / "04_train_last.pt")
    assert ck["config"]["crop_min"] == ck["recipe"]["crop_min"] == 0.08  # saved: the crop used, not the flag -1
    setup = dict(ck["recipe"])
    last = "out/04_train_last.pt"
    resume.notes(ck, setup, 3, last)  # same recipe, more epochs: nothing to say
    assert capsys.readouterr().out == ""
    resume.notes(ck, setup | {"crop_min": 0.2, "lr": 0.5}, 3, last)
    out = capsys.readouterr().out
    assert out.startswith("warning: resuming out/04_train_last.pt with other settings") and "from epoch 2 on" in out
    assert f"lr {setup['lr']!r} there vs 0.5 now" in out and "crop_min 0.08 there vs 0.2 now" in out
    resume.notes(ck, setup | {"crop_min": 0.2}, 2, last)
    out = capsys.readouterr().out
    assert "already trained 2 epochs (--epochs 2): nothing to train" in out and "0.08 there vs 0.2 now" in out
    assert "--no-resume or another --out_dir" in out


def test_deepcluster_is_flat_kmeans_and_one_k_way_head(runs):
    """--method deepcluster is DeepCluster (PAPER.md §8): S = 1 (one 1-way V), one k-way head W_0, no rotation, and
    its labels are flat k-means into k clusters, whatever --super_clusters says."""
    m03 = importlib.import_module("03_kmeans")
    out = runs.base / "dc"
    p = train(out, "--init", str(runs.init), "--method", "deepcluster", "--epochs", "1")  # --super_clusters 2 ignored
    assert p.returncode == 0, p.stderr
    ck = load(out / "04_train_last.pt")
    assert ck["heads"]["W"].shape[:2] == (1, 16) and ck["heads"]["V.weight"].shape[0] == 1
    assert not ck["super"].any() and int(ck["sub"].max()) < 16  # one super-cluster, k = 16 clusters
    line = json.loads((out / "04_train_log.jsonl").read_text().splitlines()[0])
    assert line["loss_super"] == 0 and line["acc_super"] == 1  # a 1-way V: Eq. (8) reduces to Eq. (4)
    assert np.load(out / "03_kmeans_ep000.npz")["centroids_sub"].shape == (1, 16, 16)  # (m, k_s, D)
    # two_level with m = 1 is one flat k-means (seed + 1: 03's seed for super-cluster 0), no level 1.
    flat = torch.randn(200, 8)
    ref = m03.kmeans(flat, 16, 10, seed=4, backend="torch")[1]
    two = m03.two_level(flat, 16, 1, 10, seed=3, backend="torch")
    assert torch.equal(two["sub"], ref) and not two["super"].any()
