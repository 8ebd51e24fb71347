"""Stage 04 under torchrun, 2 processes on CPU (gloo): the synced BatchNorm equals plain BatchNorm on the concatenated
batch (forward, backward, running statistics); 3 training steps on a global batch split over 2 ranks give the losses
and weights of one process; and `torchrun ... 04_train.py` runs end to end with unchanged flags.

This file is also the torchrun worker: `torchrun --nproc_per_node=2 tests/test_dist_train.py OUT` (see worker())."""
import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common  # noqa: E402
from support import parallel  # noqa: E402

t4 = importlib.import_module("04_train")  # 04_train.py
from steps import train_step  # noqa: E402  (04's loop body, tests/steps.py)
m02 = importlib.import_module("02_model")  # 02_model.py
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
N_GLOBAL, STEPS = 16, 3  # global batch, training steps
BN_KINDS = ("2d", "1d", "mean100_std1", "mean300_std0.1")


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


# ---- what every rank runs (and, with world = 1, the single-process reference) ----
def bn_case(kind):
    """A BatchNorm with non-trivial affine weights and running stats, a global input x and upstream gradient dy."""
    g = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm1d(3) if kind == "1d" else nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g), bn.bias.uniform_(-1, 1, generator=g)
        bn.running_mean.uniform_(-1, 1, generator=g), bn.running_var.uniform_(0.5, 2, generator=g)
    shape = (8, 3) if kind == "1d" else (8, 3, 5, 5)
    mean, std = {"1d": (1, 3), "2d": (1, 3), "mean100_std1": (100, 1), "mean300_std0.1": (300, 0.1)}[kind]
    return bn, std * torch.randn(shape, generator=g) + mean, torch.randn(shape, generator=g)


def sync_bn_worker(kind, rank, world):
    bn, x, dy = bn_case(kind)
    sbn = parallel.convert_sync_bn(nn.Sequential(copy.deepcopy(bn)))[0]
    xs = x[rank::world].clone().requires_grad_()  # this rank's strided share of the global batch
    y = sbn(xs)
    (y * dy[rank::world]).sum().backward()  # d/dx of the GLOBAL sum(y * dy): the all-reduce's backward sums ranks
    return {"y": common.all_gather_cat(y.detach()), "dx": common.all_gather_cat(xs.grad),
            "dw": common.all_reduce_sum(sbn.weight.grad.clone()), "db": common.all_reduce_sum(sbn.bias.grad.clone()),
            "running_mean": sbn.running_mean, "running_var": sbn.running_var, "n": sbn.num_batches_tracked}


def training_steps(rank, world):
    """STEPS SGD steps of 04's loop body (tests/steps.py) on a tiny model; rank r feeds rank_batches' share of each batch."""
    g = torch.Generator().manual_seed(0)
    trunk = m02.VGG(width=0.0625, image_size=32, sobel=True, generator=torch.Generator().manual_seed(2))
    for mod in trunk.modules():
        if isinstance(mod, nn.Dropout):
            # p = 0: a dropout mask is drawn per process from its own global RNG, so 2 ranks cannot draw the masks
            # that 1 process draws for the same samples; everything else is the same computation.
            mod.p = 0.0
    heads = m02.Heads(trunk.feature_dim, 8, 4, generator=torch.Generator().manual_seed(3))
    model = parallel.wrap_ddp(t4.Net(trunk, heads), torch.device("cpu"))
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=1e-5)
    opts = (torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], **sgd),
            torch.optim.SGD(heads.parameters(), **sgd))
    x = torch.randn(STEPS * N_GLOBAL, 3, 32, 32, generator=g)
    s, z = torch.randint(8, (STEPS * N_GLOBAL,), generator=g), torch.randint(4, (STEPS * N_GLOBAL,), generator=g)
    losses = []
    for pos in parallel.rank_batches(STEPS * N_GLOBAL, N_GLOBAL, rank, world):
        sums = train_step(model, opts, x[pos], s[pos], z[pos])
        losses.append((sums[:-1] / sums[-1]).tolist())  # global means of the 6 KEYS
    return {"losses": losses, "trunk": trunk.state_dict(), "heads": heads.state_dict()}


def worker(out):
    rank, world, _ = common.init_dist("cpu")
    torch.set_num_threads(1)
    res = {f"bn{kind}": sync_bn_worker(kind, rank, world) for kind in BN_KINDS}
    res["train"] = training_steps(rank, world)
    if rank == 0:
        torch.save(res, out)
    common.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left at teardown


# ---- the tests ----
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "res.pt"
    p = torchrun("tests/test_dist_train.py", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", BN_KINDS)
def test_sync_bn_equals_bn_on_concatenated_batch(two_ranks, kind):
    """Also far from zero (|mean| / std = 100 and 3000): per-rank centred statistics keep every digit where a
    one-pass E[x^2] - mean^2 in float32 is off by 1e-2, or clamps the variance to 0."""
    got = two_ranks[f"bn{kind}"]
    bn, x, dy = bn_case(kind)
    x = x.clone().requires_grad_()
    y = bn(x)
    (y * dy).sum().backward()
    order = torch.cat([torch.arange(8)[r::2] for r in range(2)])  # rank 0's rows, then rank 1's
    mean, std = float(x.detach().mean()), float(x.detach().std())
    # float32 holds x itself only to eps * |mean|, so y = (x - mean) / std can be no closer than eps * |mean| / std
    close = dict(atol=1e-5 + 8 * torch.finfo(torch.float32).eps * abs(mean) / std, rtol=1e-5)
    torch.testing.assert_close(got["y"], y.detach()[order], **close)
    torch.testing.assert_close(got["dx"], x.grad[order], **close)
    torch.testing.assert_close(got["dw"], bn.weight.grad, **close)
    torch.testing.assert_close(got["db"], bn.bias.grad, **close)
    torch.testing.assert_close(got["running_mean"], bn.running_mean, **close)  # momentum 0.1
    torch.testing.assert_close(got["running_var"], bn.running_var, **close)  # unbiased variance
    assert int(got["n"]) == int(bn.num_batches_tracked) == 1


@pytest.mark.slow
def test_two_ranks_train_like_one(two_ranks):
    ref = training_steps(0, 1)  # one process, plain BatchNorm, the whole global batch
    got = two_ranks["train"]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=1e-5)
    assert ref["losses"][-1][0] != ref["losses"][0][0]  # the steps did change the model
    for key in ("trunk", "heads"):
        for name, v in ref[key].items():
            torch.testing.assert_close(got[key][name].float(), v.float(), atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "02_model.py", "--out_dir", str(tmp_path), "--width", "0.0625",
                        "--image_size", "32"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = torchrun("04_train.py", "--out_dir", str(tmp_path), "--data", "synthetic:160", "--subset", "0", "--k", "16",
                 "--super_clusters", "2", "--pca_dim", "16", "--batch_size", "32", "--workers", "0", "--epochs", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout
    lines = (tmp_path / "04_train_log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 0  # rank 0 alone wrote it
    ck = torch.load(tmp_path / "04_train_last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["rng"]["torch"].shape[0] == 2  # both ranks' dropout RNG states
    assert (tmp_path / "03_kmeans_ep000.npz").exists()
    # Ctrl-C under torchrun (tests/kill_runner.py: each rank gets SIGINT after its 2nd step): every rank stops
    # at the same iteration, and the checkpoint holds every rank's own dropout RNG (not rank 0's twice).
    run2 = tmp_path / "ctrl_c"
    p = torchrun("tests/kill_runner.py", "2", "SIGINT", "boundary", "--out_dir", str(run2), "--init",
                 str(tmp_path / "02_model_init.pt"), "--data", "synthetic:160", "--subset", "0", "--k", "16",
                 "--super_clusters", "2", "--pca_dim", "16", "--batch_size", "32", "--workers", "0",
                 "--epochs", "1")
    assert p.returncode != 0 and "stopped by signal 2: saved" in p.stdout, p.stderr[-3000:]
    ck = torch.load(run2 / "04_train_last.pt", weights_only=True)
    assert (ck["epoch"], ck["iteration"]) == (0, 2)
    rows = ck["rng"]["torch"]
    assert rows.shape[0] == 2 and not torch.equal(rows[0], rows[1])


if __name__ == "__main__":
    worker(sys.argv[1])
