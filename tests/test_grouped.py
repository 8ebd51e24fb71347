"""The paper's grouped layout (04_train.py --layout grouped, scaleout/grouped.py, PAPER.md §7) with gloo on CPU, 4 processes, tiny model:

- one training step gives the single-process loss and trunk/V gradients on the union of the groups' batches, and
  sub-class head gradients S times the single-process ones (derivation below), for S = 4 (one super-cluster x 4
  rotations, one rank per group) and S = 2 (no rotation, two ranks per group);
- the sharded heads start as the single-process heads, and the checkpoint gathers them (momentum included) into the
  stacked format: loading it back gives every rank its rows, and it loads into one process; above
  grouped.GATHER_MAX_BYTES (forced to 0 here) each training group writes its own shard file instead, which loads back
  the same in the grouped layout and assembles into the gathered checkpoint in one process;
- 04_train.main runs grouped for an epoch, resumes grouped, refuses N = 4 for S = 8, and its checkpoint resumes in
  one process (replicated);
- level 2 of the k-means inside the clustering groups (grouped.level2_in_groups) equals the single-process two_level,
  and each rank receives only its share of its super-cluster's points (no rank gathers all N x D);
- --show_layout prints the N = 16 / S = 16 table and the memory note, no processes (and refuses N = 12).

This file is also the torchrun worker: `torchrun --nproc_per_node=4 tests/test_grouped.py OUT_DIR`."""
import dataclasses
import functools
import importlib
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common  # noqa: E402

t4 = importlib.import_module("04_train")  # 04_train.py
m02 = importlib.import_module("02_model")  # 02_model.py
km = importlib.import_module("03_kmeans")  # 03_kmeans.py
gl = importlib.import_module("scaleout.grouped")  # scaleout/grouped.py: the paper's layout
sh = importlib.import_module("scaleout.shards")  # scaleout/shards.py: its checkpoints
from steps import train_step  # noqa: E402  (04's loop body, tests/steps.py)
WORLD, B, K_S = 4, 16, 8  # processes, global batch, sub-classes per super-class
CASES = {"S4": (4, 1), "S2": (2, 2)}  # name: (S, m); S4 = deepercluster with 1 super-cluster, S2 = deepcluster, m = 2
TRAIN = dict(data="synthetic:64", subset=0, k=8, super_clusters=1, pca_dim=16, batch_size=16, workers=0, niter=4)
PROBLEMS = {"m2": (12, 2), "m4": (12, 4), "m2_dup": (12, 2), "m2_small": (16, 2)}  # level 2: name: (k, m)


# ---- what every rank runs; with world = 1 (no groups) the single-process reference ----
def tiny_net(S):
    trunk = m02.VGG(width=0.0625, image_size=32, sobel=True, generator=torch.Generator().manual_seed(2))
    for mod in trunk.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0  # dropout masks come from each process's own RNG: the one thing N processes cannot match
    return trunk, m02.Heads(trunk.feature_dim, S, K_S, generator=torch.Generator().manual_seed(3))


def global_batch(S):
    """x (B, 3, 32, 32), plan_s (B,) with B/S samples of each super-class in mixed order, z (B,)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=g)
    return x, torch.randperm(B, generator=g) % S, torch.randint(K_S, (B,), generator=g)


def sgd(trunk, heads):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-5)
    trainable = [p for p in trunk.parameters() if p.requires_grad]  # the Sobel layer is frozen
    return torch.optim.SGD(trainable, **kw), torch.optim.SGD(heads.parameters(), **kw)


def grads(trunk, heads):
    return {"trunk": {n: p.grad.clone() for n, p in trunk.named_parameters() if p.requires_grad},
            "V": heads.V.weight.grad.clone(), "W": heads.W.grad.clone(), "b": heads.b.grad.clone()}


def single_step(S):
    """One process, all heads, the whole mixed batch: the reference."""
    trunk, heads = tiny_net(S)
    opts = sgd(trunk, heads)
    x, s, z = global_batch(S)
    sums = train_step(t4.Net(trunk, heads), opts, x, s, z)
    return {"loss": sums[:-1] / sums[-1], **grads(trunk, heads)}


def grouped_step(rank, S, m, ckpt_path):
    trunk, full = tiny_net(S)
    layout = gl.GroupedLayout(SimpleNamespace(batch_size=B), {"S": S, "m": m, "cluster": True}, rank, WORLD)
    groups = layout.g
    heads = layout.heads(trunk.feature_dim, S, K_S, None)
    heads.reset(torch.Generator().manual_seed(3))  # the same draws as `full`, keeping row t
    init_equal = torch.equal(heads.W[0], full.W[groups.t]) and torch.equal(heads.V.weight, full.V.weight)
    model = layout.wrap(t4.Net(trunk, heads), torch.device("cpu"))
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-5)
    opts = layout.optimizers(trunk, heads, kw, kw)  # the trunk's SGD reduces the gradients first
    x, s, z = global_batch(S)
    pos = layout.batches(s.numpy(), 0)[0]  # this rank's B/N positions, all of super-class t
    assert len(pos) == B // WORLD and (s[pos] == groups.t).all()
    sums = train_step(model, opts, x[pos], s[pos], z[pos])
    out = {"loss": sums[:-1] / sums[-1], "init_equal": torch.tensor(init_equal), **grads(trunk, heads)}
    out["W"], out["b"] = common.all_gather_cat(out["W"]), common.all_gather_cat(out["b"])  # (WORLD, k_s, d): rank rows
    out["W_momentum"] = common.all_gather_cat(opts[1].state[heads.W]["momentum_buffer"])  # (WORLD, k_s, d)
    # checkpoint: gather (rank 0 writes), then every rank loads its rows back into fresh heads and optimizer
    sd, osd = layout.head_states(heads, opts[1], None)  # no path: the gathered format
    if rank == 0:
        common.save_ckpt({"heads": sd, "head_optimizer": osd}, ckpt_path)
    common.barrier()
    ck = torch.load(ckpt_path, weights_only=True)
    out["roundtrip"] = torch.tensor(reloaded_equal(heads, opts[1], ck, groups, ckpt_path))
    # the sharded format, forced by a zero size limit: one file per training group, an index on rank 0
    sharded, limit = ckpt_path.replace(".pt", "_sharded.pt"), sh.GATHER_MAX_BYTES
    sh.GATHER_MAX_BYTES = 0
    try:
        sd, osd = layout.head_states(heads, opts[1], sharded)
    finally:
        sh.GATHER_MAX_BYTES = limit
    if rank == 0:
        common.save_ckpt({"heads": sd, "head_optimizer": osd}, sharded)
    common.barrier()
    ck = torch.load(sharded, weights_only=True)
    out["roundtrip_sharded"] = torch.tensor(reloaded_equal(heads, opts[1], ck, groups, sharded))
    return out


def reloaded_equal(heads, opt, ck, groups, path):
    """Checkpoint ck loaded into fresh sharded heads and optimizer equals heads and opt (momentum included)."""
    heads2 = gl.ShardedHeads(heads.d, heads.S, heads.k_s, groups.t)
    opt2 = torch.optim.SGD(heads2.parameters(), lr=0.05, momentum=0.9)
    sh.load_heads(heads2, opt2, ck, groups, path)
    same = all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), heads2.state_dict().values()))
    return same and all(torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
                        for p, q in zip(heads.parameters(), heads2.parameters()))


def cluster_problems():
    rng = np.random.default_rng(0)
    mix = (rng.normal(size=(6, 8)) * 4)[rng.integers(0, 6, size=301)] + rng.normal(size=(301, 8))
    dup = np.repeat(rng.normal(size=(5, 4)), 9, axis=0)  # 45 points, 5 distinct: empty clusters all along
    small = np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(3, 4)) + 50])  # a super-cluster of 3 < k_s
    data = {"m2": mix, "m4": mix, "m2_dup": dup, "m2_small": small}
    return {name: (data[name].astype(np.float32), k, m) for name, (k, m) in PROBLEMS.items()}


def two_level(x, k, m, grouped):
    rank, world, N = common.get_rank(), common.world_size(), len(x)
    shard = torch.from_numpy(x[rank * N // world:(rank + 1) * N // world])  # contiguous shards, as 03.cluster has them
    exchange, received = gl._exchange, []

    def counted(t, send, recv):  # grouped._exchange, counting the feature rows this rank receives
        out = exchange(t, send, recv)
        if t.is_floating_point():
            received.append(len(out))
        return out

    gl._exchange = counted
    try:
        level2 = functools.partial(gl.level2_in_groups, groups=gl.cluster_groups(m)) if grouped else km.level2
        r = km.two_level(shard, k, m, niter=4, seed=7, level2_fn=level2)
    finally:
        gl._exchange = exchange
    return {"received": common.all_gather_cat(torch.tensor([sum(received)])),  # (world,) feature rows received
            "super": common.all_gather_cat(r["super"]), "sub": common.all_gather_cat(r["sub"]),
            "centroids_sub": r["centroids_sub"], "objective_sub": torch.tensor(r["stats"]["objective_sub"]),
            "n_empty_split": torch.tensor(r["stats"]["n_empty_split"]),
            "n_small_super": torch.tensor(r["stats"]["n_small_super"])}


def worker(out):
    torch.set_num_threads(1)
    rank, world, _ = common.init_dist("cpu")
    assert world == WORLD
    res = {name: grouped_step(rank, S, m, os.path.join(out, f"heads_{name}.pt")) for name, (S, m) in CASES.items()}
    res["kmeans"] = {name: two_level(*p, grouped=True) for name, p in cluster_problems().items()}
    # 04_train.main in these 4 processes: S = 8 is refused; 1 grouped epoch, then a grouped resume to epoch 2; and
    # 2 epochs without a break, from the same init, in another folder
    cfg = t4.Config(out_dir=os.path.join(out, "run"), layout="grouped", epochs=1, **TRAIN)
    try:
        t4.main(dataclasses.replace(cfg, super_clusters=2))
    except common.UserError as e:
        res["refusal"] = str(e)
    t4.main(cfg)
    t4.main(dataclasses.replace(cfg, epochs=2))
    t4.main(dataclasses.replace(cfg, epochs=2, out_dir=os.path.join(out, "fresh"),
                                init=os.path.join(out, "run", "02_model_init.pt")))
    # the same two epochs through 04 with the sharded head format (threshold 0): one file per group
    sh.GATHER_MAX_BYTES = 0
    sharded = dataclasses.replace(cfg, out_dir=os.path.join(out, "sharded"),
                                  init=os.path.join(out, "run", "02_model_init.pt"))
    t4.main(sharded)
    t4.main(dataclasses.replace(sharded, epochs=2))  # resumes from the shards
    sh.GATHER_MAX_BYTES = 10 ** 9
    if rank == 0:
        torch.save(res, os.path.join(out, "res.pt"))
    common.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread left at teardown


# ---- the tests ----
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped")
    m02.main(m02.Config(out_dir=str(out / "run"), width=0.0625, image_size=32, super_classes=4, k=8))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.abspath(__file__), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, torch.load(out / "res.pt", weights_only=True), p.stdout


def max_diff(a, b):
    return float((a - b).abs().max())


def test_sharded_heads_reset_draws_only_its_row(monkeypatch):
    """ShardedHeads.reset (no processes needed) gives row t of the single-process heads for every t, drawing only
    V, b_t and W_t: S x k_s x d numbers would be 1.3 GB per rank at the paper's k_s = 80,000 (issue 15)."""
    d, S, k_s = 16, 4, 32
    full = m02.Heads(d, S, k_s, generator=torch.Generator().manual_seed(11))
    drawn, uniform_ = [], torch.Tensor.uniform_

    def counting(self, *a, **kw):
        drawn.append(self.numel())
        return uniform_(self, *a, **kw)

    for t in range(S):
        heads = gl.ShardedHeads(d, S, k_s, t)
        drawn.clear()
        monkeypatch.setattr(torch.Tensor, "uniform_", counting)
        heads.reset(torch.Generator().manual_seed(11))
        monkeypatch.setattr(torch.Tensor, "uniform_", uniform_)
        assert torch.equal(heads.W[0], full.W[t]) and torch.equal(heads.b[0], full.b[t])
        assert torch.equal(heads.V.weight, full.V.weight) and torch.equal(heads.V.bias, full.V.bias)
        assert sum(drawn) == S * d + S + k_s * d + k_s  # V, then W_t and b_t only


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_single_process(four_ranks, case):
    S, G = CASES[case][0], WORLD // CASES[case][0]
    got, ref = four_ranks[1][case], single_step(S)
    assert bool(got["init_equal"])  # ShardedHeads.reset draws the single-process heads' rows
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], ref["loss"], **close)  # the 6 logged means, over the global batch
    for name, g in ref["trunk"].items():
        torch.testing.assert_close(got["trunk"][name], g, **close, msg=name)
    torch.testing.assert_close(got["V"], ref["V"], **close)
    # Sub-class heads. Single process: the loss is the mean over the mixed batch of B, so
    #   dL/dW_t = (1/B) sum_{n: s_n = t} grad l_n.
    # Grouped: rank r's loss is the mean over its b = B/N samples (all of super-class t) and group t averages its
    # G = N/S ranks, so dW_t = (1/G) sum_r (1/b) sum_{n on r} grad l_n = (1/B_t) sum_{n: s_n = t} grad l_n with
    # B_t = G b = B/S: B/B_t = S times the single-process gradient (the official per-group mean, PAPER.md §7).
    W, b = got["W"].view(S, G, K_S, -1), got["b"].view(S, G, K_S)  # (rank,) -> (group t, rank in the group)
    assert torch.equal(W, W[:, :1].expand_as(W)) and torch.equal(b, b[:, :1].expand_as(b))  # replicas in a group
    torch.testing.assert_close(W[:, 0], S * ref["W"], **close)
    torch.testing.assert_close(b[:, 0], S * ref["b"], **close)
    assert not torch.allclose(W[:, 0], ref["W"])  # the factor is real, not 1
    print(f"\n[grouped {case}: S = {S}, G = {G}] max |diff| vs one process: loss "
          f"{max_diff(got['loss'], ref['loss']):.2e}, trunk grads "
          f"{max(max_diff(got['trunk'][n], g) for n, g in ref['trunk'].items()):.2e}, V grad "
          f"{max_diff(got['V'], ref['V']):.2e}, W grad / S {max_diff(W[:, 0] / S, ref['W']):.2e}; "
          f"max |W grad| {float(ref['W'].abs().max()):.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_gathers_heads_and_momentum(four_ranks, case):
    out, res = four_ranks[0], four_ranks[1][case]
    S, G = CASES[case][0], WORLD // CASES[case][0]
    assert bool(res["roundtrip"])  # every rank got its own W_t, b_t and their momentum back
    ck = torch.load(out / f"heads_{case}.pt", weights_only=True)
    heads = m02.Heads(ck["heads"]["W"].shape[2], S, K_S)
    heads.load_state_dict(ck["heads"])  # the stacked (S, k_s, d) format of one process
    opt = torch.optim.SGD(heads.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(ck["head_optimizer"])
    buf = opt.state[heads.W]["momentum_buffer"]  # (S, k_s, d) after one SGD step, row t from group t
    assert torch.equal(buf, res["W_momentum"].view(S, G, K_S, -1)[:, 0])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_checkpoint_equals_gathered(four_ranks, case, tmp_path):
    out, res = four_ranks[0], four_ranks[1][case]
    S = CASES[case][0]
    assert bool(res["roundtrip_sharded"])  # every rank read its own shard back, momentum included
    gathered = torch.load(out / f"heads_{case}.pt", weights_only=True)
    path = out / f"heads_{case}_sharded.pt"
    ck = torch.load(path, weights_only=True)
    assert "W" not in ck["heads"] and ck["heads"]["sharded"] == S and len(ck["heads"]["files"]) == S
    token = int(ck["heads"]["token"])  # the files are named by the save's token
    assert all((out / f"heads_{case}_sharded.pt.heads_t{t:03d}.{token:x}.pt").exists()
               for t in range(S))
    sd, osd = sh.assemble_heads(ck, str(path))  # the replicated format, from the S shard files
    assert sd.keys() == gathered["heads"].keys()
    assert all(torch.equal(v, gathered["heads"][k]) for k, v in sd.items())
    ref = gathered["head_optimizer"]
    assert osd["param_groups"] == ref["param_groups"] and osd["state"].keys() == ref["state"].keys()
    assert all(torch.equal(st["momentum_buffer"], ref["state"][i]["momentum_buffer"]) for i, st in osd["state"].items())
    # one process loads it (04's Replicated layout), as it loads the gathered one
    heads = m02.Heads(sd["W"].shape[2], S, K_S)
    opt = torch.optim.SGD(heads.parameters(), lr=0.05, momentum=0.9)
    t4.Replicated(SimpleNamespace(batch_size=B), {}, 0, 1).load_heads(heads, opt, ck, str(path))
    assert torch.equal(heads.W, gathered["heads"]["W"])
    assert torch.equal(opt.state[heads.W]["momentum_buffer"], ref["state"][0]["momentum_buffer"])  # W: the first parameter
    # a shard from another save, or a missing one: refused with the file's name
    for t in range(S):
        name = ck["heads"]["files"][t]  # the names the index holds
        shard = torch.load(out / name, weights_only=True)
        if t == 0:
            shard["token"] = shard["token"] + 1
        torch.save(shard, tmp_path / name)
    with pytest.raises(common.UserError, match=r"heads_t000\.\w+\.pt belongs to another checkpoint"):
        sh.assemble_heads(ck, str(tmp_path / path.name))
    with pytest.raises(common.UserError, match=r"heads_t000\.\w+\.pt does not exist"):
        sh.assemble_heads(ck, str(tmp_path / "elsewhere" / path.name))


@pytest.mark.slow
def test_grouped_level2_equals_single_process(four_ranks):
    for name, (x, k, m) in cluster_problems().items():
        got, ref = four_ranks[1]["kmeans"][name], two_level(x, k, m, grouped=False)
        assert torch.equal(got["super"], ref["super"]) and torch.equal(got["sub"], ref["sub"]), name
        torch.testing.assert_close(got["centroids_sub"], ref["centroids_sub"], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(got["objective_sub"], ref["objective_sub"], atol=1e-6, rtol=1e-6, msg=name)
        assert int(got["n_empty_split"]) == int(ref["n_empty_split"]), name
        assert name != "m2_dup" or int(got["n_empty_split"]) > 0  # the empty-cluster paths ran inside the groups
        assert int(got["n_small_super"]) == int(ref["n_small_super"]) == (name == "m2_small"), name
        # the redistribution: rank j of group v received the j-th of C contiguous shares of v's members, nothing more
        C, n_v = WORLD // m, torch.bincount(ref["super"], minlength=m)
        share = [(r % C + 1) * int(n_v[r // C]) // C - (r % C) * int(n_v[r // C]) // C for r in range(WORLD)]
        assert got["received"].tolist() == share and sum(share) == len(x), name
        print(f"\n[level 2 in groups, {name}: k = {k}, m = {m}] labels equal; max |diff| centroids "
              f"{max_diff(got['centroids_sub'], ref['centroids_sub']):.2e}")


@pytest.mark.slow
def test_main_grouped_resumes_and_loads_single_process(four_ranks):
    out, res, stdout = four_ranks
    assert "N must be a multiple of S=8: 8, 16, 24, 32" in res["refusal"]  # 4 processes, 2 super-clusters
    assert "resuming" in stdout and "4 process(es)" in stdout  # the second main() resumed, grouped
    run = out / "run"
    ck = torch.load(run / "04_train_last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["config"]["layout"] == "grouped"
    assert ck["heads"]["W"].shape[:2] == (4, K_S) and ck["rng"]["torch"].shape[0] == WORLD
    # resumed at epoch 1 = trained without a break: the gathered heads and their momentum went back to their groups
    fresh = torch.load(out / "fresh" / "04_train_ep002.pt", weights_only=True)
    for key in ("model", "heads"):
        for name, v in fresh[key].items():
            torch.testing.assert_close(ck[key][name], v, atol=1e-6, rtol=1e-6, msg=name)
    for i, st in fresh["head_optimizer"]["state"].items():
        torch.testing.assert_close(ck["head_optimizer"]["state"][i]["momentum_buffer"], st["momentum_buffer"],
                                   atol=1e-6, rtol=1e-6)
    print(f"\n[grouped resume vs no break, 2 epochs] max |diff| trunk "
          f"{max(max_diff(ck['model'][n].float(), v.float()) for n, v in fresh['model'].items()):.2e}, heads "
          f"{max(max_diff(ck['heads'][n], v) for n, v in fresh['heads'].items()):.2e}")
    # the same checkpoint resumes in one process, replicated (every head in one process), for a third epoch
    t4.main(t4.Config(out_dir=str(run), epochs=3, **TRAIN))
    ck3 = torch.load(run / "04_train_last.pt", weights_only=True)
    assert ck3["epoch"] == 3 and ck3["config"]["layout"] == "replicated" and len(ck3["metrics"]) == 3


def test_show_layout_16(capsys):
    t4.main(t4.Config(out_dir="/nonexistent", layout="grouped", show_layout=True, world_size=16))
    text = capsys.readouterr().out
    assert "16 training groups of N/S = 1 rank(s); 4 clustering group(s) of N/m = 4 rank(s)" in text
    rows = [line.split("|") for line in text.splitlines() if line[:4].strip().isdigit()]
    assert [[int(c) for c in r] for r in rows] == [[n, n, n, n // 4, n % 4, n // 4] for n in range(16)]  # Eq. (6)
    assert "5,244,225,552 = 20.98 GB (x3: 62.93 GB)" in text and "327,825,552 = 1.31 GB (x3: 3.93 GB)" in text


def test_show_layout_refuses_wrong_n(capsys):
    with pytest.raises(SystemExit) as e:
        common.run(t4.main, t4.Config, ["--layout", "grouped", "--show_layout", "--world_size", "12"])
    assert e.value.code == 2
    assert "N must be a multiple of S=16: 16, 32, 48, 64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.run(t4.main, t4.Config, ["--layout", "sharded", "--out_dir", "/nonexistent"])
    assert e.value.code == 2 and "use replicated or grouped" in capsys.readouterr().err


if __name__ == "__main__":
    worker(sys.argv[1])


@pytest.mark.slow
def test_main_sharded_heads_resume_like_gathered(four_ranks):
    """04_train.py with the sharded format end to end: a resume from the per-group files ends with the
    heads of the uninterrupted (gathered) run, and each save deletes the shards of the previous one."""
    out = four_ranks[0]
    last = out / "sharded" / "04_train_last.pt"
    ck = torch.load(last, weights_only=True)
    assert ck["epoch"] == 2 and "sharded" in ck["heads"]
    shards = sorted(p.name for p in last.parent.glob("04_train_last.pt.heads_t*.pt"))
    assert shards == sorted(ck["heads"]["files"])  # the earlier saves' shards are gone
    sd, _ = sh.assemble_heads(ck, str(last))
    fresh = torch.load(out / "fresh" / "04_train_ep002.pt", weights_only=True)
    for name, v in fresh["heads"].items():
        torch.testing.assert_close(sd[name], v, atol=1e-6, rtol=1e-6, msg=name)
