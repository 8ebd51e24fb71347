"""Tests for support/interop.py: our trunk against torchvision's VGG (both ways), the official
DeeperCluster checkpoint layouts (DDP's "module." at the start and inside), and the one-line
errors of load_trunk."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import VGG as TorchvisionVGG, make_layers

from support import common
from support import interop

M = importlib.import_module("02_model")  # 02_model.py: trunk, load_trunk


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


# ---- torchvision ----
def torchvision_twin(width, c5_grid, d, fc8=10):
    """torchvision's VGG class, width-scaled config D, its classifier sized like ours (+ fc8)."""
    with torch.device("meta"):  # skip building torchvision's own 25088x4096 classifier
        tv = TorchvisionVGG(nn.Sequential(), init_weights=False)
    cfg = [v if v == "M" else max(1, round(v * width)) for v in M.CFG_D]
    tv.features = make_layers(cfg, batch_norm=True)
    tv.classifier = nn.Sequential(nn.Linear(c5_grid, d), nn.ReLU(True), nn.Dropout(0.5),
                                  nn.Linear(d, d), nn.ReLU(True), nn.Dropout(0.5),
                                  nn.Linear(d, fc8))
    return tv


def test_torchvision_interop_both_ways():
    width, size = 1 / 16, 224
    ours = randomise_bn(M.VGG(width, size, sobel=False)).eval()
    tv = torchvision_twin(width, 32 * 7 * 7, ours.feature_dim).eval()
    missing, unexpected = tv.load_state_dict(interop.torchvision_state_dict(ours), strict=False)
    assert missing == ["classifier.6.weight", "classifier.6.bias"] and unexpected == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # ours pads by 1 before conv1 (226 px, PAPER.md §5.3); torchvision's 7x7 adaptive
        # avgpool is then the identity, so ours(x) == torchvision's fc7 on the padded image
        y = F.pad(x, (1, 1, 1, 1))
        ref = tv.classifier[:4](torch.flatten(tv.avgpool(tv.features(y)), 1))
        assert torch.allclose(ours(x), ref, atol=1e-5)
        back = M.VGG(width, size, sobel=False).eval()
        interop.load_torchvision_state_dict(back, tv.state_dict())  # torchvision's fc8 is dropped
        assert torch.equal(back(x), ours(x))
        via_loader, info = interop.load_trunk(tv.state_dict(), sobel=False)
        assert info["arch"] == ours.arch() and torch.equal(via_loader.eval()(x), ours(x))
    with pytest.raises(ValueError):
        interop.torchvision_state_dict(M.VGG(width, 32, sobel=True))


# ---- official DeeperCluster layout ----
def official_layout(model, prefix="module.", wrap=True, head=8, drop_counter=False, infix=""):
    """A state dict laid out as the official code saves Net(padding, sobel, body, pred_layer):
    prefix "module." when the whole Net is DDP-wrapped, infix "module." when body, sobel and
    pred_layer are each wrapped (body.module.features.0.weight)."""
    sd = {}
    for k, v in model.state_dict().items():
        if drop_counter and k.endswith("num_batches_tracked"):
            continue
        if k.startswith("sobel_layer."):
            k = "sobel." + infix + k[len("sobel_layer."):]
        else:
            k = "body." + infix + k
        sd[prefix + k] = v.clone()
    sd[prefix + "pred_layer." + infix + "weight"] = torch.randn(head, model.feature_dim)
    sd[prefix + "pred_layer." + infix + "bias"] = torch.randn(head)
    return {"epoch": 12, "state_dict": sd} if wrap else sd


@pytest.mark.parametrize("sobel,prefix,wrap,drop,infix", [
    (True, "module.", True, False, ""), (True, "", False, True, ""),
    (False, "module.", True, True, ""), (True, "", True, False, "module."),
    (True, "module.", True, True, "module."), (False, "", False, False, "module.")])
def test_official_layout_loads(tmp_path, sobel, prefix, wrap, drop, infix):
    ours = randomise_bn(M.VGG(1 / 8, 32, sobel=sobel), seed=3).eval()
    path = str(tmp_path / "checkpoint.pth.tar")
    torch.save(official_layout(ours, prefix, wrap, drop_counter=drop, infix=infix), path)
    model, info = interop.load_trunk(path)
    assert info["arch"] == dict(width=0.125, image_size=32, sobel=sobel, fc_dim=512)
    head = [prefix + "pred_layer." + infix + "bias", prefix + "pred_layer." + infix + "weight"]
    assert info["source"] == "official" and sorted(info["ignored"]) == head
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ours(x))
    in_memory = official_layout(ours, prefix, wrap, infix=infix)
    model2, _ = interop.load_official(in_memory, sobel=sobel)  # an in-memory dict works too
    assert torch.equal(model2.eval()(x), ours(x))
    # without the Sobel keys, as the official pretrain.py keeps a checkpoint
    body_only = {k: v for k, v in official_layout(ours, prefix, False, infix=infix).items()
                 if "sobel." not in k}
    model3, _ = interop.load_official(body_only)
    assert torch.equal(model3.eval()(x), ours(x)) and model3.sobel == sobel
    with pytest.raises(common.UserError, match="sobel"):  # §11 pitfall 7: check, never guess
        interop.load_trunk(path, sobel=not sobel)


def test_official_key_strips_every_ddp_level():
    cases = {"module.body.features.0.weight": "features.0.weight",
             "body.module.classifier.3.bias": "classifier.3.bias",
             "module.body.module.features.1.running_var": "features.1.running_var",
             "sobel.module.1.weight": "sobel_layer.1.weight",
             "module.sobel.0.bias": "sobel_layer.0.bias",
             "pred_layer.module.weight": "pred_layer.weight",
             "features.10.weight": "features.10.weight"}  # torchvision's keys pass unchanged
    assert {k: interop.official_key(k) for k in cases} == cases


# ---- one-line errors ----
def test_bad_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    model = M.VGG(1 / 16, 32)
    header = common.ckpt_header("02_model", {"width": 1 / 16})
    common.save_ckpt(header | {"arch": model.arch(), "model": model.state_dict()}, good)
    data = good.read_bytes()
    cases = {"missing.pt": None, "truncated.pt": data[: len(data) // 2],
             "text.pt": b"not a checkpoint\n"}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(common.UserError, match=name):
            interop.load_trunk(str(tmp_path / name))

    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)
    no_model = save("no_model.pt", common.ckpt_header("03_kmeans", {}) | {"super": torch.zeros(3)})
    with pytest.raises(common.UserError, match="no_model.pt.*no trunk weights"):
        interop.load_trunk(no_model)
    with pytest.raises(common.UserError, match="no state dict"):
        interop.load_trunk(save("numbers.pt", {"epoch": 3, "lr": 0.1}))
    with pytest.raises(common.UserError, match="not hold VGG-16"):
        interop.load_trunk(save("resnet.pt", {"conv1.weight": torch.zeros(64, 3, 7, 7)}))
    bad = dict(model.state_dict())
    bad["features.7.weight"] = torch.zeros(9, 4, 3, 3)
    ck = common.ckpt_header("04_train", {}) | {"arch": model.arch(), "model": bad}
    with pytest.raises(common.UserError, match="bad_shape.pt.*features.7.weight"):
        interop.load_trunk(save("bad_shape.pt", ck))
    with pytest.raises(common.UserError, match="version"):
        v9 = common.ckpt_header("02_model", {}) | {"version": 9, "model": {}}
        interop.load_trunk(save("v9.pt", v9))
