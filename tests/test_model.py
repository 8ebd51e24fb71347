"""Oracle tests for 02_model.py: the hierarchical loss against a per-sample loop (and its memory at
DeepCluster scale), Sobel against a hand-written convolution, parameter counts against a formula and
torchvision, the script's checkpoint. Weight interop (support/interop.py): tests/test_interop.py."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from support import common, interop

M = importlib.import_module("02_model")  # 02_model.py: trunk, heads, loss


def analytic_params(width, image_size, sobel, fc_dim=None):
    """Trainable parameters of the trunk, counted by hand from configuration D."""
    c_in, total = (2 if sobel else 3), 0
    for v in M.CFG_D:
        if v != "M":
            c = max(1, round(v * width))
            total += c_in * c * 9 + c + 2 * c  # conv weight + bias, BN weight + bias
            c_in = c
    p, d = (image_size + 2) // 32, fc_dim or max(1, round(4096 * width))
    return total + (c_in * p * p * d + d) + (d * d + d)  # fc6 + fc7


# ---- the hierarchical loss, Eq. (8)-(9) ----
def reference_loss(heads, phi, s, z):
    """Eq. (8) sample by sample: pick W_s for the sample's s, two cross-entropies, average."""
    total, ok_s, ok_z, ok_j = 0.0, 0, 0, 0
    for n in range(phi.shape[0]):
        f = torch.relu(phi[n])
        o_super = heads.V.weight @ f + heads.V.bias
        o_sub = heads.W[s[n]] @ f + heads.b[s[n]]
        total = total - torch.log_softmax(o_super, 0)[s[n]] - torch.log_softmax(o_sub, 0)[z[n]]
        a, b = int(o_super.argmax() == s[n]), int(o_sub.argmax() == z[n])
        ok_s, ok_z, ok_j = ok_s + a, ok_z + b, ok_j + a * b
    B = phi.shape[0]
    return total / B, ok_s / B, ok_z / B, ok_j / B


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("S,k_s,present", [(16, 5, None), (16, 5, [0, 3, 7, 12]), (8, 3, [1]),
                                           (4, 1, None), (1, 7, None)])
def test_loss_equals_per_sample_loop(S, k_s, present):
    torch.manual_seed(S * 100 + k_s)
    d, B = 12, 40
    heads = M.Heads(d, S, k_s).double()
    phi = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    pool = torch.tensor(present if present else list(range(S)))
    s = pool[torch.randint(len(pool), (B,))]
    z = torch.randint(k_s, (B,))
    out = M.hierarchical_loss(heads, phi, s, z)
    ref, acc_s, acc_z, acc_j = reference_loss(heads, phi, s, z)
    assert torch.allclose(out["loss"], ref, atol=1e-12)
    assert torch.allclose(out["loss_super"] + out["loss_sub"], ref, atol=1e-12)
    accs = (out["acc_super"], out["acc_sub"], out["acc_joint"])
    assert accs == pytest.approx((acc_s, acc_z, acc_j))
    params = [phi, heads.V.weight, heads.V.bias, heads.W, heads.b]
    for g, g_ref in zip(grads(out["loss"], params), grads(ref, params)):
        assert torch.allclose(g, g_ref, atol=1e-12)
    if present:  # absent super-classes get no gradient at all
        absent = [t for t in range(S) if t not in present]
        gW = grads(M.hierarchical_loss(heads, phi, s, z)["loss"], heads.W)[0]
        assert gW[absent].abs().max() == 0


@pytest.mark.parametrize("sub_grad_scale", [False, True])
def test_host_counts_give_the_same_loss_and_gradients(sub_grad_scale):
    """04 passes B_s counted on the host (no sync on a GPU): the same values and gradients, bit for
    bit, as counting s where it lives; numpy's bincount is the independent count."""
    torch.manual_seed(1)
    d, S, k_s, B = 9, 8, 3, 25
    heads = M.Heads(d, S, k_s).double()
    phi = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0] * 10 + [2] * 9 + [7] * 6)[torch.randperm(B)]  # super-classes absent too
    z = torch.randint(k_s, (B,))
    counts = np.bincount(s.numpy(), minlength=S).tolist()
    params = [phi, heads.V.weight, heads.V.bias, heads.W, heads.b]
    a = M.hierarchical_loss(heads, phi, s, z, sub_grad_scale)
    b = M.hierarchical_loss(heads, phi, s, z, sub_grad_scale, counts=counts)
    assert all(torch.equal(a[key], b[key]) for key in M.TRAIN_KEYS)
    for ga, gb in zip(grads(a["loss"], params), grads(b["loss"], params)):
        assert torch.equal(ga, gb)


def test_check_finite_raises_on_a_nan_loss():
    out = {key: torch.tensor(0.5) for key in M.TRAIN_KEYS}
    sums = M.batch_sums(out, 4)
    assert M.check_finite(sums) is sums and float(sums[-1]) == 4
    out["loss"] = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        M.check_finite(M.batch_sums(out, 4))


def test_sub_grad_scale_gives_group_mean_for_W_and_leaves_the_rest():
    torch.manual_seed(0)
    d, S, k_s, B = 10, 8, 4, 30
    heads = M.Heads(d, S, k_s).double()
    phi = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0] * 20 + [3] * 7 + [5] * 3)  # unbalanced, some super-classes absent
    z = torch.randint(k_s, (B,))
    params = [phi, heads.V.weight, heads.V.bias, heads.W, heads.b]
    plain = M.hierarchical_loss(heads, phi, s, z)
    scaled = M.hierarchical_loss(heads, phi, s, z, sub_grad_scale=True)
    assert torch.equal(plain["loss"], scaled["loss"])
    g_plain, g_scaled = grads(plain["loss"], params), grads(scaled["loss"], params)
    for a, b in zip(g_plain[:3], g_scaled[:3]):  # trunk (through phi) and V: unchanged
        assert torch.allclose(a, b, atol=1e-12)
    for t in range(S):  # W_t, b_t: gradient of the mean sub-class loss over group t only
        idx = (s == t).nonzero().flatten()
        if len(idx) == 0:
            assert g_scaled[3][t].abs().max() == 0
            continue
        f = torch.relu(phi[idx])
        group_mean = F.cross_entropy(f @ heads.W[t].T + heads.b[t], z[idx])
        gW, gb = grads(group_mean, [heads.W, heads.b])
        assert torch.allclose(g_scaled[3][t], gW[t], atol=1e-12)
        assert torch.allclose(g_scaled[4][t], gb[t], atol=1e-12)
        # = B/B_s times the plain gradient
        assert torch.allclose(g_plain[3][t] * B / len(idx), gW[t], atol=1e-12)


def test_rotnet_and_deepcluster_reduce_to_cross_entropy():
    torch.manual_seed(1)
    d, B = 16, 24
    phi = torch.randn(B, d, requires_grad=True)
    rot = M.Heads(d, 4, 1)  # RotNet: S = 4 rotations, k_s = 1
    r = torch.randint(4, (B,))
    out = M.hierarchical_loss(rot, phi, r, torch.zeros(B, dtype=torch.long))
    ce = F.cross_entropy(rot.V(torch.relu(phi)), r)
    assert out["loss_sub"].item() == 0 and out["acc_sub"] == 1.0
    assert torch.allclose(out["loss"], ce, atol=1e-6)
    assert torch.allclose(grads(out["loss"], phi)[0], grads(ce, phi)[0], atol=1e-6)
    k = 9
    dc = M.Heads(d, 1, k)  # DeepCluster: S = 1, a flat k-way head W_0
    z = torch.randint(k, (B,))
    out = M.hierarchical_loss(dc, phi, torch.zeros(B, dtype=torch.long), z)
    ce = F.cross_entropy(torch.relu(phi) @ dc.W[0].T + dc.b[0], z)
    assert out["loss_super"].item() == 0 and out["acc_super"] == 1.0
    assert torch.allclose(out["loss"], ce, atol=1e-6)
    assert torch.allclose(grads(out["loss"], phi)[0], grads(ce, phi)[0], atol=1e-6)


def test_heads_reset_is_seeded_and_in_linear_bounds():
    h = M.Heads(64, 4, 3, generator=torch.Generator().manual_seed(5))
    W0 = h.W.detach().clone()
    h.reset(torch.Generator().manual_seed(6))
    assert not torch.equal(W0, h.W)
    h.reset(torch.Generator().manual_seed(5))
    assert torch.equal(W0, h.W)
    for t in (h.V.weight, h.V.bias, h.W, h.b):
        assert t.abs().max() <= 1 / 8 and t.abs().max() > 0.1  # U(-1/sqrt(d), 1/sqrt(d)), d = 64


def test_heads_reset_draws_V_then_one_seed_per_sub_head():
    """The draws of the stacked heads, spelled out: V.weight, V.bias from the generator, then S
    seeds from it, then W_s, b_s from a generator seeded with seed s (so a rank holding only W_t
    can draw it alone; grouped.ShardedHeads, tests/test_grouped.py)."""
    d, S, k_s = 6, 3, 4
    h = M.Heads(d, S, k_s, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    U = lambda shape, gen: torch.empty(shape).uniform_(-d ** -0.5, d ** -0.5, generator=gen)  # noqa: E731
    V_w, V_b = U((S, d), g), U((S,), g)
    seeds = torch.randint(0, 2**62, (S,), generator=g).tolist()
    rows = []
    for x in seeds:
        gs = torch.Generator().manual_seed(x)
        rows.append((U((k_s, d), gs), U((k_s,), gs)))
    assert torch.equal(h.V.weight, V_w) and torch.equal(h.V.bias, V_b)
    for s in range(S):
        assert torch.equal(h.W[s], rows[s][0]) and torch.equal(h.b[s], rows[s][1])
    assert len(set(seeds)) == S and not torch.equal(h.W[0], h.W[1])  # independent rows
    (W_1, b_1), = h.sub_heads([1])
    assert torch.equal(W_1, h.W[1]) and torch.equal(b_1, h.b[1])


class OneRowHeads(nn.Module):
    """What the grouped layout holds on the ranks of group t: V, S and only W_t (no stacked W)."""

    def __init__(self, heads, t):
        super().__init__()
        self.S, self.t, self.V = heads.S, t, heads.V
        self.W_t = nn.Parameter(heads.W[t].detach().clone())
        self.b_t = nn.Parameter(heads.b[t].detach().clone())

    def sub_heads(self, ts):
        assert list(ts) == [self.t], f"asked for W_{ts}, this rank holds W_{self.t} only"
        return [(self.W_t, self.b_t)]


@pytest.mark.parametrize("sub_grad_scale", [False, True])
def test_loss_needs_only_V_S_and_sub_heads(sub_grad_scale):
    torch.manual_seed(3)
    d, S, k_s, B, t = 10, 8, 6, 12, 5
    heads = M.Heads(d, S, k_s).double()
    one = OneRowHeads(heads, t)
    phi = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    s, z = torch.full((B,), t), torch.randint(k_s, (B,))
    ref = M.hierarchical_loss(heads, phi, s, z, sub_grad_scale)
    out = M.hierarchical_loss(one, phi, s, z, sub_grad_scale)
    for k in ("loss", "loss_super", "loss_sub", "acc_super", "acc_sub", "acc_joint"):
        assert torch.equal(torch.as_tensor(out[k]), torch.as_tensor(ref[k]))
    g_ref = grads(ref["loss"], [phi, heads.V.weight, heads.W, heads.b])
    g_out = grads(out["loss"], [phi, heads.V.weight, one.W_t, one.b_t])
    assert torch.equal(g_out[0], g_ref[0]) and torch.equal(g_out[1], g_ref[1])
    assert torch.equal(g_out[2], g_ref[2][t]) and torch.equal(g_out[3], g_ref[3][t])


def test_heads_backward_writes_W_gradient_once():
    """With every super-class present, forward + backward allocates a few times W's size, not S
    times: through W[t] one row at a time, each row's backward would zero-fill a gradient as big as W."""
    from torch.profiler import profile
    S, k_s, d, B = 16, 32, 256, 64
    g = torch.Generator().manual_seed(0)
    heads = M.Heads(d, S, k_s, generator=g)
    phi = torch.randn(B, d, generator=g, requires_grad=True)
    s, z = torch.arange(B) % S, torch.randint(k_s, (B,), generator=g)
    with profile(profile_memory=True) as prof:
        M.hierarchical_loss(heads, phi, s, z)["loss"].backward()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    W_bytes = heads.W.numel() * 4
    assert W_bytes <= allocated < 6 * W_bytes, f"{allocated / W_bytes:.1f} x W"


def peak_rss_added(fn):
    """Bytes of resident memory that fn() adds at its peak: Linux's VmHWM (the high-water mark
    of the resident set), reset to the current size just before (clear_refs 5), minus the size
    before."""
    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def test_heads_forward_backward_at_deepcluster_scale_fit_in_2_gb():
    """S = 1, k_s = 10,000, d = 4,096, B = 256 (DeepCluster, PAPER.md §8): a per-sample copy of
    W_{s_n} would be B * k_s * d * 4 bytes = 42 GB; one GEMM per super-class needs W, its gradient
    and the (B, k_s) logits. The measured peak includes W and W.grad themselves (2 x 164 MB)."""
    S, k_s, d, B = 1, 10_000, 4096, 256
    g = torch.Generator().manual_seed(0)

    def step():
        heads = M.Heads(d, S, k_s, generator=g)
        phi = torch.randn(B, d, generator=g, requires_grad=True)
        s, z = torch.zeros(B, dtype=torch.long), torch.randint(k_s, (B,), generator=g)
        M.hierarchical_loss(heads, phi, s, z)["loss"].backward()
        assert heads.W.grad.shape == (S, k_s, d) and phi.grad.shape == (B, d)

    peak = peak_rss_added(step)
    W_bytes = S * k_s * d * 4
    assert 2 * W_bytes <= peak < 2 * 2 ** 30, f"peak {peak / 2 ** 20:.0f} MiB"


# ---- Sobel input layer ----
def test_sobel_matches_hand_convolution_and_stays_frozen():
    model = M.VGG(width=1 / 16, image_size=32, sobel=True)
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    img[:, :, 16:] += 2.0  # a vertical step edge at column 16
    out = model.input_layer(img[None])[0].detach().numpy()  # (2, 34, 34)
    gray = np.pad(img.numpy().mean(0), 2)  # grayscale of the zero-padded input, (36, 36)
    for c, K in enumerate((M.GX, M.GY)):
        ref = np.zeros((34, 34))
        for i in range(34):
            for j in range(34):
                ref[i, j] = sum(K[a][b] * gray[i + a, j + b] for a in range(3) for b in range(3))
        assert np.allclose(out[c], ref, atol=1e-5)
    flat = torch.zeros(1, 3, 32, 32)
    flat[..., 16:] = 1.0  # a pure step: Gx = (left - right) * (1 + 2 + 1) = -4 on the edge, Gy = 0
    g = model.input_layer(flat)[0]
    assert torch.allclose(g[0, 10, 16], torch.tensor(-4.0))
    assert torch.allclose(g[1, 10, 16], torch.tensor(0.0))
    # frozen: not trainable, not touched by .train() or by an optimiser step over all parameters
    before = [p.clone() for p in model.sobel_layer.parameters()]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    opt.step()
    for p, q in zip(model.sobel_layer.parameters(), before):
        assert not p.requires_grad and p.grad is None and torch.equal(p, q)
    assert M.n_params(model, trainable=False) == 24


# ---- shapes and parameter counts ----
@pytest.mark.parametrize("width", [1, 1 / 8])
@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("sobel", [True, False])
def test_parameter_counts(width, size, sobel):
    with torch.device("meta"):  # no memory, no init cost, even at width 1
        model = M.VGG(width, size, sobel)
    assert M.n_params(model) == analytic_params(width, size, sobel)
    total = M.n_params(model) + M.n_params(model, False)
    assert sum(p for _, _, p in M.layer_table(model.arch())) == total


def test_full_width_matches_torchvision_vgg16_bn_count():
    import torchvision
    with torch.device("meta"):
        ours, tv = M.VGG(1, 224, sobel=False), torchvision.models.vgg16_bn()
    fc8 = sum(p.numel() for p in tv.classifier[6].parameters())
    assert M.n_params(ours) == sum(p.numel() for p in tv.parameters()) - fc8 == 134_268_992


@pytest.mark.parametrize("width,size,device", [(1 / 8, 32, "cpu"), (1 / 8, 224, "cpu"),
                                               (1, 224, "meta"), (1, 32, "meta")])
def test_output_shapes(width, size, device):
    with torch.device(device):
        model = M.VGG(width, size, sobel=True).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            phi, convs = model(x), model.conv_outputs(x, range(1, 14))
    c = [max(1, round(v * width)) for v in M.CFG_D if v != "M"]
    # the side before the pool of each block
    sides = [(size + 2) // 2 ** b for b in (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)]
    assert phi.shape == (2, max(1, round(4096 * width)))
    shapes = [tuple(convs[i + 1].shape) for i in range(13)]
    assert shapes == [(2, c[i], sides[i], sides[i]) for i in range(13)]


def test_conv_outputs_stops_early_and_checks_its_input():
    model = M.VGG(1 / 16, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.conv_outputs(x, [2, 4])
    assert sorted(out) == [2, 4] and (out[4] >= 0).all()
    # conv4's ReLU is features[12]
    full = nn.Sequential(*list(model.features)[:13])(model.input_layer(x))
    assert torch.equal(out[4], full)
    with pytest.raises(ValueError):
        model.conv_outputs(x, [14])
    with pytest.raises(ValueError, match="built for 32 px"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(common.UserError):
        M.VGG(1 / 8, 16)


# ---- checkpoints ----
def test_script_checkpoint_round_trip(tmp_path, capsys):
    cfg = M.Config(out_dir=str(tmp_path), width=1 / 16, super_classes=8, k=20)
    rng = torch.get_rng_state()
    model, heads = M.main(cfg)
    assert torch.equal(rng, torch.get_rng_state())  # seeded init, global RNG untouched
    assert "02_model_init.pt" in capsys.readouterr().out
    path = tmp_path / "02_model_init.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert {"format", "version", "stage", "config", "arch", "model", "heads"} <= set(ck)
    assert ck["stage"] == "02_model" and ck["arch"] == model.arch() and ck["config"]["k"] == 20
    assert ck["heads"]["W"].shape == (8, 10, 256)
    assert common.load_ckpt(str(path), "02_model")["stage"] == "02_model"
    loaded, info = interop.load_trunk(str(path), sobel=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert info["source"] == "02_model"
    again, _ = M.main(cfg)  # same seed, same weights
    pairs = zip(model.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    other, _ = M.main(M.Config(out_dir=str(tmp_path), width=1 / 16, super_classes=8, k=20, seed=1))
    assert not torch.equal(other.features[0].weight, model.features[0].weight)
    with pytest.raises(common.UserError, match="super_classes"):
        M.main(M.Config(out_dir=str(tmp_path), super_classes=6))


@pytest.mark.slow
def test_cli_writes_checkpoint(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "02_model.py", "--out_dir", str(tmp_path), "--width", "0.0625",
           "--no-sobel"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "conv13" in r.stdout and "fc7" in r.stdout
    assert interop.load_trunk(str(tmp_path / "02_model_init.pt"))[1]["arch"]["sobel"] is False


def test_cli_refuses_a_negative_fc_dim(tmp_path, capsys):
    """A one-line error naming the flag, exit 2 (it was a RuntimeError traceback from nn.Linear)."""
    with pytest.raises(SystemExit) as e:
        common.run(M.main, M.Config, ["--out_dir", str(tmp_path), "--fc_dim", "-1"])
    assert e.value.code == 2 and "--fc_dim -1" in capsys.readouterr().err


def test_deepcluster_top_layer_init():
    """w_std = 0.01: W_s ~ N(0, 0.01^2) and b_s = 0 (DeepCluster's top layer, PAPER.md §8); V keeps nn.Linear's init;
    the default stays nn.Linear's U(-1/sqrt(d), 1/sqrt(d))."""
    d = 256
    h = M.Heads(d, 1, 400, generator=torch.Generator().manual_seed(0), w_std=0.01)
    assert abs(h.W.std().item() - 0.01) < 5e-4 and abs(h.W.mean().item()) < 5e-4 and not h.b.any()
    plain = M.Heads(d, 1, 400, generator=torch.Generator().manual_seed(0))
    assert plain.W.abs().max() <= 1 / d ** 0.5 and plain.b.abs().max() > 0
    assert torch.equal(h.V.weight, plain.V.weight)  # the same draws for V either way
