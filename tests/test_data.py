"""Tests for 01_data.py, the stage: rotations against torch.rot90, the two views against
torchvision's functional ops at independently drawn parameters, per-sample seeding (same seed, same
view; DataLoader workers agree), the two datasets, and one subprocess run of the script. The
sources (support/sources.py) are tested in test_data_sources.py."""
import importlib
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from support import common

data = importlib.import_module("01_data")  # 01_data.py: datasets and rotations
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = pytest.importorskip("torchvision.transforms")
TF = pytest.importorskip("torchvision.transforms.functional")


def rgb(seed, size=(20, 14)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3),
                                                               dtype=np.uint8))


# ---- rotations: the oracle is torch.rot90 ----
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 6), (1, 8, 8)])
def test_rotate_equals_rot90(shape):
    x = torch.randn(shape)
    for r in range(-1, 6):
        assert torch.equal(data.rotate(x, r), torch.rot90(x, r, dims=(-2, -1))), r


def test_rotate_counterclockwise_and_four_turns_give_back_the_input():
    x = torch.tensor([[[1, 2], [3, 4]]])
    assert data.rotate(x, 1).tolist() == [[[2, 4], [1, 3]]]  # a quarter turn counter-clockwise
    y = torch.randn(2, 3, 4, 5)
    z = y
    for _ in range(4):
        z = data.rotate(z, 1)
    assert torch.equal(z, y)
    for r in range(4):
        assert torch.equal(data.rotate(data.rotate(y, r), 4 - r), y)
    out = data.rotate(y, 0)
    out += 1  # r = 0 is a copy, never a view of the input
    assert not torch.equal(out, y)


# ---- the views: torchvision's functional ops at parameters drawn from the sample's generator ----
def test_rng_for_is_deterministic_and_distinct():
    draw = lambda *k: torch.rand(5, generator=data.rng_for(*k))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert torch.equal(draw(0, 1, 2), draw(np.int64(0), torch.tensor(1), 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 1, 3))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 2))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))


def crop_and_flip_from(g, height, width, scale, ratio=(3 / 4, 4 / 3)):
    """The oracle's draws: RandomResizedCrop's documented recipe written out with an explicit
    generator (up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio, else
    a central crop), then the flip's coin."""
    lo, hi = torch.log(torch.tensor(ratio)).tolist()  # float32, as torchvision computes them
    for _ in range(10):
        target = height * width * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = math.exp(torch.empty(1).uniform_(lo, hi, generator=g).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            break
    else:  # the whole image, its aspect ratio clamped into `ratio`
        w, h = width, height
        if width / height < ratio[0]:
            h = round(w / ratio[0])
        elif width / height > ratio[1]:
            w = round(h * ratio[1])
        i, j = (height - h) // 2, (width - w) // 2
    return (i, j, h, w), torch.rand(1, generator=g).item() < 0.5


def test_train_transform_is_torchvision_crop_and_flip_at_the_generators_draws():
    images = [rgb(1, (30, 22)), rgb(2, (28, 28)).convert("L").convert("RGB"), rgb(3, (64, 40)),
              rgb(4, (200, 12)), rgb(5, (12, 300))]
    flips = set()
    for k, img in enumerate(images * 4):
        scale = [(0.08, 1.0), (0.5, 1.0), (0.9, 1.0)][k % 3]
        g, g_ref = data.rng_for(7, 0, k), data.rng_for(7, 0, k)
        before = torch.get_rng_state()
        x = data.train_transform(img, 16, g, scale)
        assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
        (i, j, h, w), flip = crop_and_flip_from(g_ref, img.height, img.width, scale)
        ref = TF.resized_crop(img, i, j, h, w, [16, 16])  # PIL crop + bilinear resize
        ref = TF.normalize(TF.to_tensor(TF.hflip(ref) if flip else ref), data.MEAN, data.STD)
        assert type(x) is torch.Tensor and x.shape == (3, 16, 16)
        assert torch.allclose(x, ref, atol=1e-6), k
        assert torch.equal(g.get_state(), g_ref.get_state())  # g moved on by exactly these draws
        flips.add(flip)
    assert flips == {True, False}


def test_cluster_transform_matches_torchvision():
    for S, size in [(32, (28, 28)), (32, (50, 37)), (24, (21, 90)), (224, (300, 250))]:
        ref_t = T.Compose([T.Resize(round(S * 256 / 224)), T.CenterCrop(S), T.ToTensor(),
                           T.Normalize(data.MEAN, data.STD)])  # torchvision v1
        img = rgb(S, size)
        x = data.cluster_transform(S)(img)
        assert type(x) is torch.Tensor and x.shape == (3, S, S)
        assert torch.allclose(x, ref_t(img), atol=1e-6)


def test_transforms_ranges_determinism_and_grey_expansion():
    img = rgb(5, (28, 28)).convert("L")  # grayscale: expanded to 3 equal channels
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
    xs = [data.train_transform(img.convert("RGB"), 32, data.rng_for(0, 0, k)) for k in range(6)]
    for x in xs + [data.cluster_transform(32)(img.convert("RGB"))]:
        v = x * std + mean
        assert x.shape == (3, 32, 32) and v.min() >= -1e-5 and v.max() <= 1 + 1e-5
        assert torch.allclose(v[0], v[1], atol=1e-5) and torch.allclose(v[1], v[2], atol=1e-5)
    same = data.train_transform(img.convert("RGB"), 32, data.rng_for(0, 0, 0))
    assert torch.equal(xs[0], same)  # same (seed, epoch, index): the same view
    assert len({x.sum().item() for x in xs}) == 6  # different indices: different views
    full = data.train_transform(img.convert("RGB"), 32, data.rng_for(0, 0, 0), crop_scale=(1, 1))
    assert full.shape == (3, 32, 32)


# ---- the two datasets ----
def test_rotation_dataset():
    src = data.make_source("synthetic:40")
    ds = data.RotationDataset(src, 24, seed=3)
    assert len(ds) == 40
    x, r, n = ds[5]
    assert x.shape == (3, 24, 24) and r in range(4) and n == 5
    assert torch.equal(ds[5][0], x) and ds[5][1] == r  # deterministic
    assert not torch.equal(ds[6][0], x)
    assert set(ds[j][1] for j in range(40)) == {0, 1, 2, 3}
    ds.set_plan(1, np.arange(40), None)  # a new epoch: new views
    assert any(not torch.equal(ds[j][0], data.RotationDataset(src, 24, seed=3)[j][0])
               for j in range(5))
    plan, given = np.array([7, 7, 7, 7, 2]), np.array([0, 1, 2, 3, 3])
    ds.set_plan(2, plan, given)
    items = [ds[j] for j in range(5)]
    assert len(ds) == 5 and [it[1] for it in items] == given.tolist()
    assert [it[2] for it in items] == plan.tolist()
    for j, (x, r, n) in enumerate(items):  # a given rotation: the same crop and flip as a drawn one
        g = data.rng_for(3, 2, j)
        torch.randint(4, (1,), generator=g)
        assert torch.equal(x, data.rotate(data.train_transform(src[n][0], 24, g), r))
    with pytest.raises(ValueError):
        ds.set_plan(0, np.array([0, 40]))
    with pytest.raises(ValueError):
        ds.set_plan(0, np.array([0, 1]), np.array([0, 4]))
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers (spawn) must be able to rebuild it
    assert torch.equal(clone[4][0], items[4][0])


def test_rotation_dataset_workers_see_the_same_views():
    """Exact resume rests on this: a view depends on (seed, epoch, j) only, not on the process,
    the worker count or what was drawn before."""
    ds = data.RotationDataset(data.make_source("synthetic:12"), 16, seed=1)
    ds.set_plan(4, np.arange(12)[::-1], None)
    torch.manual_seed(123)  # whatever the global generator holds
    ref = [ds[j] for j in range(12)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    x, r, n = (torch.cat(t) for t in zip(*loader))
    assert torch.equal(x, torch.stack([it[0] for it in ref]))
    assert r.tolist() == [it[1] for it in ref] and n.tolist() == list(range(12))[::-1]


def test_cluster_dataset():
    src = data.make_source("synthetic:12")
    ds = data.ClusterDataset(src, 32)
    x, n = ds[3]
    assert len(ds) == 12 and n == 3 and torch.equal(x, data.cluster_transform(32)(src[3][0]))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=12)))
    assert batch[0].shape == (12, 3, 32, 32) and batch[1].tolist() == list(range(12))
    assert torch.equal(pickle.loads(pickle.dumps(ds))[3][0], x)


# ---- the script ----
def test_main_counts_skipped_and_bad_path_exits_2(tmp_path, capsys, monkeypatch):
    d = tmp_path / "mixed"
    os.makedirs(d)
    for k in range(3):
        rgb(k, (24, 18)).save(d / f"good{k}.jpg")
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("not a jpeg")
    monkeypatch.setattr(data, "plot_rotations", lambda *a: None)  # the subprocess test draws it
    data.main(data.Config(data=f"folder:{d}", out_dir=str(tmp_path / "out")))
    info = json.load(open(tmp_path / "out" / "01_data.json"))
    assert info["N"] == 3 and info["skipped"] == 2 and info["labelled"] is False
    assert info["N_test"] is None and "skipped 2 unreadable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.run(data.main, data.Config,
                   ["--data", "folder:/does/not/exist", "--out_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "/does/not/exist does not exist" in err
    assert not (tmp_path / "x").exists()


def test_script_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "01_data.py", "--data", "synthetic:48", "--out_dir",
                        str(out), "--subset", "30", "--image_size", "24"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.load(open(out / "01_data.json"))
    assert info["spec"] == "synthetic:48" and info["N"] == 30 and info["image_size"] == 24
    assert info["skipped"] == 0 and info["N_test"] == 60 and len(info["classes"]) == 6
    assert sum(info["per_class_counts"].values()) == 30
    with Image.open(out / "01_data_rotations.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert f"wrote {out / '01_data.json'}" in p.stdout
    assert f"wrote {out / '01_data_rotations.png'}" in p.stdout
