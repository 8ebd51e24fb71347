"""Oracle tests for 02_model.py: the hierarchical loss against a per-sample loop, Sobel against a hand-written
convolution, parameter counts against a formula and torchvision, weight interop, checkpoints and their errors."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import VGG as TorchvisionVGG, make_layers

import common

M = importlib.import_module("02_model")  # 02_model.py: trunk, heads, loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a busy 2-core machine, 2 OpenMP threads wait on each other (up to 50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomise_bn(model, seed=0):
    """Non-trivial BN running statistics, so that eval-mode comparisons test them too."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


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


@pytest.mark.parametrize("S,k_s,present", [(16, 5, None), (16, 5, [0, 3, 7, 12]), (8, 3, [1]), (4, 1, None), (1, 7, None)])
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
    assert (out["acc_super"], out["acc_sub"], out["acc_joint"]) == pytest.approx((acc_s, acc_z, acc_j))
    params = [phi, heads.V.weight, heads.V.bias, heads.W, heads.b]
    for g, g_ref in zip(grads(out["loss"], params), grads(ref, params)):
        assert torch.allclose(g, g_ref, atol=1e-12)
    if present:  # absent super-classes get no gradient at all
        absent = [t for t in range(S) if t not in present]
        assert grads(M.hierarchical_loss(heads, phi, s, z)["loss"], heads.W)[0][absent].abs().max() == 0


def test_sub_grad_scale_gives_group_mean_for_W_and_leaves_the_rest():
    torch.manual_seed(0)
    d, S, k_s, B = 10, 8, 4, 30
    heads = M.Heads(d, S, k_s).double()
    phi = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0] * 20 + [3] * 7 + [5] * 3)  # unbalanced, some super-classes absent
    z = torch.randint(k_s, (B,))
    params = [phi, heads.V.weight, heads.V.bias, heads.W, heads.b]
    plain, scaled = M.hierarchical_loss(heads, phi, s, z), M.hierarchical_loss(heads, phi, s, z, sub_grad_scale=True)
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
        assert torch.allclose(g_scaled[3][t], gW[t], atol=1e-12) and torch.allclose(g_scaled[4][t], gb[t], atol=1e-12)
        assert torch.allclose(g_plain[3][t] * B / len(idx), gW[t], atol=1e-12)  # = B/B_s times the plain gradient


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
    flat[..., 16:] = 1.0  # a pure step: Gx = (left - right) * (1 + 2 + 1) = -4 on the edge, Gy = 0 inside
    g = model.input_layer(flat)[0]
    assert torch.allclose(g[0, 10, 16], torch.tensor(-4.0)) and torch.allclose(g[1, 10, 16], torch.tensor(0.0))
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
    assert sum(p for _, _, p in M.layer_table(model.arch())) == M.n_params(model) + M.n_params(model, False)


def test_full_width_matches_torchvision_vgg16_bn_count():
    import torchvision
    with torch.device("meta"):
        ours, tv = M.VGG(1, 224, sobel=False), torchvision.models.vgg16_bn()
    fc8 = sum(p.numel() for p in tv.classifier[6].parameters())
    assert M.n_params(ours) == sum(p.numel() for p in tv.parameters()) - fc8 == 134_268_992


@pytest.mark.parametrize("width,size,device", [(1 / 8, 32, "cpu"), (1 / 8, 224, "cpu"), (1, 224, "meta"), (1, 32, "meta")])
def test_output_shapes(width, size, device):
    with torch.device(device):
        model = M.VGG(width, size, sobel=True).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            phi, convs = model(x), model.conv_outputs(x, range(1, 14))
    c = [max(1, round(v * width)) for v in M.CFG_D if v != "M"]
    sides = [(size + 2) // 2 ** b for b in (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)]  # before the pool of each block
    assert phi.shape == (2, max(1, round(4096 * width)))
    assert [tuple(convs[i + 1].shape) for i in range(13)] == [(2, c[i], sides[i], sides[i]) for i in range(13)]


def test_conv_outputs_stops_early_and_checks_its_input():
    model = M.VGG(1 / 16, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.conv_outputs(x, [2, 4])
    assert sorted(out) == [2, 4] and (out[4] >= 0).all()
    full = nn.Sequential(*list(model.features)[:13])(model.input_layer(x))  # conv4's ReLU is features[12]
    assert torch.equal(out[4], full)
    with pytest.raises(ValueError):
        model.conv_outputs(x, [14])
    with pytest.raises(ValueError, match="built for 32 px"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(common.UserError):
        M.VGG(1 / 8, 16)


# ---- interop ----
def torchvision_twin(width, c5_grid, d, fc8=10):
    """torchvision's VGG class with a width-scaled config D and its classifier sized like ours (+ an fc8)."""
    with torch.device("meta"):  # skip building torchvision's own 25088x4096 classifier
        tv = TorchvisionVGG(nn.Sequential(), init_weights=False)
    tv.features = make_layers([v if v == "M" else max(1, round(v * width)) for v in M.CFG_D], batch_norm=True)
    tv.classifier = nn.Sequential(nn.Linear(c5_grid, d), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(d, d),
                                  nn.ReLU(True), nn.Dropout(0.5), nn.Linear(d, fc8))
    return tv


def test_torchvision_interop_both_ways():
    width, size = 1 / 16, 224
    ours = randomise_bn(M.VGG(width, size, sobel=False)).eval()
    tv = torchvision_twin(width, 32 * 7 * 7, ours.feature_dim).eval()
    missing, unexpected = tv.load_state_dict(M.torchvision_state_dict(ours), strict=False)
    assert missing == ["classifier.6.weight", "classifier.6.bias"] and unexpected == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # ours pads by 1 before conv1 (226 px, PAPER.md §5.3); torchvision's AdaptiveAvgPool2d((7, 7)) is then the
        # identity on its 7x7 map, so ours(x) == torchvision's fc7 (classifier[:4]) on the padded image, exactly
        y = F.pad(x, (1, 1, 1, 1))
        ref = tv.classifier[:4](torch.flatten(tv.avgpool(tv.features(y)), 1))
        assert torch.allclose(ours(x), ref, atol=1e-5)
        back = M.VGG(width, size, sobel=False).eval()
        M.load_torchvision_state_dict(back, tv.state_dict())  # torchvision's fc8 is dropped
        assert torch.equal(back(x), ours(x))
        via_loader, info = M.load_trunk(tv.state_dict(), sobel=False)
        assert info["arch"] == ours.arch() and torch.equal(via_loader.eval()(x), ours(x))
    with pytest.raises(ValueError):
        M.torchvision_state_dict(M.VGG(width, 32, sobel=True))


def official_layout(model, prefix="module.", wrap=True, head=8, drop_counter=False):
    """A state dict laid out as the official DeeperCluster code saves it (Net(padding, sobel, body, pred_layer))."""
    sd = {}
    for k, v in model.state_dict().items():
        if drop_counter and k.endswith("num_batches_tracked"):
            continue
        k = k.replace("sobel_layer.", "sobel.") if k.startswith("sobel_layer.") else "body." + k
        sd[prefix + k] = v.clone()
    sd[prefix + "pred_layer.weight"] = torch.randn(head, model.feature_dim)
    sd[prefix + "pred_layer.bias"] = torch.randn(head)
    return {"epoch": 12, "state_dict": sd} if wrap else sd


@pytest.mark.parametrize("sobel,prefix,wrap,drop", [(True, "module.", True, False), (True, "", False, True),
                                                    (False, "module.", True, True)])
def test_official_layout_loads(tmp_path, sobel, prefix, wrap, drop):
    ours = randomise_bn(M.VGG(1 / 8, 32, sobel=sobel), seed=3).eval()
    path = str(tmp_path / "checkpoint.pth.tar")
    torch.save(official_layout(ours, prefix, wrap, drop_counter=drop), path)
    model, info = M.load_trunk(path)
    assert info["arch"] == dict(width=0.125, image_size=32, sobel=sobel, fc_dim=512)
    assert info["source"] == "official" and sorted(info["ignored"]) == [prefix + "pred_layer.bias", prefix + "pred_layer.weight"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ours(x))
    model2, _ = M.load_official(official_layout(ours, prefix, wrap), sobel=sobel)  # an in-memory dict works too
    assert torch.equal(model2.eval()(x), ours(x))
    body_only = {k: v for k, v in official_layout(ours, prefix, False).items() if "sobel." not in k}  # as pretrain.py keeps
    model3, _ = M.load_official(body_only)
    assert torch.equal(model3.eval()(x), ours(x)) and model3.sobel == sobel
    with pytest.raises(common.UserError, match="pitfall|sobel"):  # PAPER.md §11 pitfall 7: check, never guess
        M.load_trunk(path, sobel=not sobel)


# ---- checkpoints ----
def test_script_checkpoint_round_trip(tmp_path, capsys):
    cfg = M.Config(out_dir=str(tmp_path), width=1 / 16, super_classes=8, k=20)
    rng = torch.get_rng_state()
    model, heads = M.main(cfg)
    assert torch.equal(rng, torch.get_rng_state())  # seeded init, global RNG untouched
    assert "02_model_init.pt" in capsys.readouterr().out
    path = tmp_path / "02_model_init.pt"
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert {"format", "version", "stage", "config", "arch", "model", "heads"} <= set(ck) and ck["stage"] == "02_model"
    assert ck["arch"] == model.arch() and ck["config"]["k"] == 20 and ck["heads"]["W"].shape == (8, 10, 256)
    assert common.load_ckpt(str(path), "02_model")["stage"] == "02_model"
    loaded, info = M.load_trunk(str(path), sobel=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    assert info["source"] == "02_model"
    again, _ = M.main(cfg)  # same seed, same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = M.main(M.Config(out_dir=str(tmp_path), width=1 / 16, super_classes=8, k=20, seed=1))
    assert not torch.equal(other.features[0].weight, model.features[0].weight)
    with pytest.raises(common.UserError, match="super_classes"):
        M.main(M.Config(out_dir=str(tmp_path), super_classes=6))


@pytest.mark.slow
def test_cli_writes_checkpoint(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "02_model.py", "--out_dir", str(tmp_path), "--width", "0.0625", "--no-sobel"],
                       cwd=root, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "conv13" in r.stdout and "fc7" in r.stdout
    assert M.load_trunk(str(tmp_path / "02_model_init.pt"))[1]["arch"]["sobel"] is False


def test_bad_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    model = M.VGG(1 / 16, 32)
    common.save_ckpt(common.ckpt_header("02_model", {"width": 1 / 16}) | {"arch": model.arch(), "model": model.state_dict()}, good)
    data = good.read_bytes()
    cases = {"missing.pt": None, "truncated.pt": data[: len(data) // 2], "text.pt": b"not a checkpoint\n"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(common.UserError, match=name):
            M.load_trunk(str(tmp_path / name))

    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)
    no_model = save("no_model.pt", common.ckpt_header("03_kmeans", {}) | {"super": torch.zeros(3)})
    with pytest.raises(common.UserError, match="no_model.pt.*no trunk weights"):
        M.load_trunk(no_model)
    with pytest.raises(common.UserError, match="no state dict"):
        M.load_trunk(save("numbers.pt", {"epoch": 3, "lr": 0.1}))
    with pytest.raises(common.UserError, match="not hold VGG-16"):
        M.load_trunk(save("resnet.pt", {"conv1.weight": torch.zeros(64, 3, 7, 7)}))
    bad = dict(model.state_dict())
    bad["features.7.weight"] = torch.zeros(9, 4, 3, 3)
    with pytest.raises(common.UserError, match="bad_shape.pt.*features.7.weight"):
        M.load_trunk(save("bad_shape.pt", common.ckpt_header("04_train", {}) | {"arch": model.arch(), "model": bad}))
    with pytest.raises(common.UserError, match="version"):
        M.load_trunk(save("v9.pt", common.ckpt_header("02_model", {}) | {"version": 9, "model": {}}))
