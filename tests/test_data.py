"""Tests for 01_data.py: oracle tests (rotations vs torch.rot90, transforms vs torchvision), every source on tiny trees
built in tmp_path (Fashion-MNIST also on the real Debian copy), bad inputs and their messages, image modes, the two
datasets, and one subprocess run of the script. About 10 s on 2 CPU cores."""
import gzip
import importlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import common

data = importlib.import_module("01_data")  # 01_data.py: datasets and rotations
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rgb(seed, size=(20, 14)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def good_jpeg(path, seed=0, size=(24, 18)):
    rgb(seed, size).save(path, format="JPEG")


def truncated_jpeg(path):
    good_jpeg(path, seed=9, size=(64, 64))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


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


# ---- transforms: pixel-exact against torchvision, deterministic from the generator ----
def test_rng_for_is_deterministic_and_distinct():
    draw = lambda *k: torch.rand(5, generator=data.rng_for(*k))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 1, 3))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 2))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))


def test_crop_params_match_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    for k, (h, w, scale) in enumerate([(28, 28, (0.08, 1.0)), (40, 90, (0.08, 1.0)), (200, 30, (0.5, 1.0)),
                                       (300, 12, (0.9, 1.0))] * 5):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            ref = T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), list(scale), [3 / 4, 4 / 3])
        assert data.crop_params(h, w, scale, torch.Generator().manual_seed(k)) == tuple(ref)


def test_train_transform_matches_torchvision_pipeline():
    TF = pytest.importorskip("torchvision.transforms.functional")
    for k, img in enumerate([rgb(1, (30, 22)), rgb(2, (28, 28)).convert("L").convert("RGB"), rgb(3, (64, 40))] * 3):
        x = data.train_transform(img, 16, torch.Generator().manual_seed(k))
        g = torch.Generator().manual_seed(k)
        i, j, h, w = data.crop_params(img.height, img.width, (0.08, 1.0), g)
        ref = TF.resized_crop(img, i, j, h, w, [16, 16])
        ref = TF.hflip(ref) if torch.rand(1, generator=g).item() < 0.5 else ref
        ref = TF.normalize(TF.to_tensor(ref), data.MEAN, data.STD)
        assert x.shape == (3, 16, 16) and torch.allclose(x, ref, atol=1e-6)


def test_cluster_transform_matches_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    for S, size in [(32, (28, 28)), (32, (50, 37)), (24, (21, 90)), (224, (300, 250))]:
        ref_t = T.Compose([T.Resize(round(S * 256 / 224)), T.CenterCrop(S), T.ToTensor(),
                           T.Normalize(data.MEAN, data.STD)])
        img = rgb(S, size)
        x = data.cluster_transform(S)(img)
        assert x.shape == (3, S, S) and torch.allclose(x, ref_t(img), atol=1e-6)


def test_transforms_ranges_determinism_and_grey_expansion():
    img = rgb(5, (28, 28)).convert("L")  # grayscale: expanded to 3 equal channels
    denorm = lambda x: x * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)  # noqa: E731
    xs = [data.train_transform(img, 32, data.rng_for(0, 0, k)) for k in range(6)]
    for x in xs + [data.cluster_transform(32)(img)]:
        v = denorm(x)
        assert x.shape == (3, 32, 32) and v.min() >= -1e-5 and v.max() <= 1 + 1e-5
        assert torch.allclose(v[0], v[1], atol=1e-5) and torch.allclose(v[1], v[2], atol=1e-5)
    assert torch.equal(xs[0], data.train_transform(img, 32, data.rng_for(0, 0, 0)))  # same generator seed, same view
    assert len({x.sum().item() for x in xs}) == 6  # different seeds, different views
    assert torch.equal(data.cluster_transform(32)(img), data.cluster_transform(32)(img))
    full = data.train_transform(img, 32, torch.Generator().manual_seed(0), crop_scale=(1.0, 1.0))
    assert full.shape == (3, 32, 32)


# ---- image modes: everything becomes 8-bit RGB ----
def test_to_rgb_modes(tmp_path):
    a16 = np.array([[0, 257 * 128], [65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "grey16.png")
    im16 = Image.open(tmp_path / "grey16.png")
    assert im16.mode.startswith("I")
    out = np.asarray(data.load_image(tmp_path / "grey16.png"))
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 128], [255, 10]]  # scaled by 255/65535, not clipped
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: white after compositing
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(data.load_image(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert np.asarray(data.load_image(tmp_path / "cmyk.jpg"))[4, 4, 0] > 200  # red
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(tmp_path / "pal.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    Image.new("LA", (8, 8), (50, 255)).save(tmp_path / "la.png")
    Image.fromarray(np.full((3, 3), 1000, dtype=np.int32)).save(tmp_path / "i32.tif")
    for name, px in [("pal.png", [0, 0, 255]), ("grey.png", [77] * 3), ("bw.png", [255] * 3), ("la.png", [50] * 3),
                     ("i32.tif", [4] * 3)]:
        im = data.load_image(tmp_path / name)
        assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == px, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "sideways.jpg", exif=exif)
    assert data.load_image(tmp_path / "sideways.jpg").size == (10, 20)


# ---- folder source ----
def make_tree(root, classes=("cat", "dog"), per=5, start=0):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for k in range(per):
            good_jpeg(root / c / f"{k}.jpg", seed=start + k)
    return root


def test_folder_labelled_with_seeded_split(tmp_path):
    make_tree(tmp_path / "d", per=10)
    tr, te = data.make_source(f"folder:{tmp_path}/d"), data.make_source(f"folder:{tmp_path}/d", "test")
    assert (len(tr), len(te)) == (16, 4) and tr.classes == te.classes == ["cat", "dog"]
    assert set(tr.files).isdisjoint(te.files) and np.bincount(te.labels).tolist() == [2, 2]
    img, y = tr[0]
    assert img.mode == "RGB" and img.size == (24, 18) and y == tr.labels[0] and tr.name == "d" and tr.skipped == 0
    assert list(data.make_source(f"folder:{tmp_path}/d", seed=7).files) == list(tr.files)  # split ignores --seed


def test_folder_explicit_train_test_and_flat(tmp_path):
    make_tree(tmp_path / "s" / "train", classes=("a", "b"), per=3)
    make_tree(tmp_path / "s" / "val", classes=("b", "c"), per=2)
    tr, te = data.make_source(f"folder:{tmp_path}/s"), data.make_source(f"folder:{tmp_path}/s", "test")
    assert tr.classes == te.classes == ["a", "b", "c"]
    assert (len(tr), len(te)) == (6, 4) and sorted(set(te.labels.tolist())) == [1, 2]
    os.makedirs(tmp_path / "flat")
    for k in range(4):
        good_jpeg(tmp_path / "flat" / f"p{k}.JPG", seed=k)
    flat = data.make_source(f"folder:{tmp_path}/flat")
    assert len(flat) == 4 and flat.labels is None and flat.classes is None and flat[2][1] == -1
    with pytest.raises(common.UserError, match="unlabelled.*no test split|without a test split"):
        data.make_source(f"folder:{tmp_path}/flat", "test")


def test_folder_bad_inputs(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(common.UserError, match=f"{missing} does not exist"):
        data.make_source(f"folder:{missing}")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(common.UserError, match=f"no image files .* in {tmp_path / 'empty'}"):
        data.make_source(f"folder:{tmp_path}/empty")
    os.makedirs(tmp_path / "junk")
    (tmp_path / "junk" / "a.jpg").write_bytes(b"")
    (tmp_path / "junk" / "b.png").write_text("not a png")
    with pytest.raises(common.UserError, match=f"none of the 2 image files in {tmp_path / 'junk'} is readable"):
        data.make_source(f"folder:{tmp_path}/junk")
    with pytest.raises(common.UserError, match="not a folder"):
        data.make_source(f"folder:{tmp_path}/junk/a.jpg")


def three_good_two_corrupt(d):
    os.makedirs(d)
    for k in range(3):
        good_jpeg(d / f"good{k}.jpg", seed=k)
    truncated_jpeg(d / "truncated.jpg")
    (d / "zero.png").write_bytes(b"")
    return d


def test_folder_skips_unreadable_files_with_one_counted_warning(tmp_path, capsys):
    d = three_good_two_corrupt(tmp_path / "mixed")
    (d / "text.gif").write_text("GIF? no")  # a non-image with an image extension
    src = data.make_source(f"folder:{d}")
    err = capsys.readouterr().err
    assert len(src) == 3 and src.skipped == 3 and err.count("warning") == 1 and "skipped 3 unreadable" in err
    assert all(src[i][0].mode == "RGB" for i in range(3))


def test_folder_lazy_validation_substitutes_and_counts(tmp_path, monkeypatch, capsys):
    d = three_good_two_corrupt(tmp_path / "mixed")
    monkeypatch.setattr(data, "VALIDATE_MAX", 2)  # too many files to check up front: checked at read time
    src = data.make_source(f"folder:{d}")
    assert len(src) == 5 and src.skipped == 0
    bad = [k for k, f in enumerate(src.files) if "good" not in f]
    for _ in range(2):  # a file is counted once, however often it is read
        for k in bad:
            img, _ = src[k]
            assert img.mode == "RGB"
    assert src.skipped == 2 and capsys.readouterr().err.count("warning") == 1


# ---- YFCC100M zip layout ----
def make_yfcc(root, ids, corrupt=()):
    for i in ids:
        s = f"{i:08d}"
        os.makedirs(root / s[:2], exist_ok=True)
        buf = __import__("io").BytesIO()
        rgb(i % 97, (16, 12)).save(buf, format="JPEG")
        with zipfile.ZipFile(root / s[:2] / f"{s[2:5]}.zip", "a") as z:
            z.writestr(s[5:] + ".jpg", b"garbage" if i in corrupt else buf.getvalue())
    return root


def test_yfcc_scan_ids_file_and_workers(tmp_path, capsys):
    ids = [12345678, 12345001, 12346002, 99000111, 5000123]
    root = make_yfcc(tmp_path / "y", ids, corrupt={12346002})
    src = data.make_source(f"yfcc100m:{root}")
    assert sorted(src.files.tolist()) == sorted(set(ids) - {12346002}) and src.skipped == 1
    assert "skipped 1 unreadable" in capsys.readouterr().err
    assert src.labels is None and src.classes is None and src.name == "yfcc100m"
    img, y = src[0]
    assert img.size == (16, 12) and img.mode == "RGB" and y == -1
    (root / "ids.txt").write_text("12345678\n99000111\n77777777\n")  # the last one is not in the tree
    listed = data.make_source(f"yfcc100m:{root}")
    assert listed.files.tolist() == [12345678, 99000111] and listed.skipped == 1
    clone = pickle.loads(pickle.dumps(listed))  # spawn-safe: the cached zip handles are not pickled
    assert np.array_equal(np.asarray(clone[1][0]), np.asarray(listed[1][0]))
    ds = data.RotationDataset(listed, 16, seed=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2))  # forked workers, own zip handles
    assert [int(b[2]) for b in batches] == [0, 1] and all(torch.equal(b[0][0], ds[k][0]) for k, b in enumerate(batches))
    with pytest.raises(common.UserError, match="no test split"):
        data.make_source(f"yfcc100m:{root}", "test")
    with pytest.raises(common.UserError, match=f"{tmp_path / 'nope'} does not exist"):
        data.make_source(f"yfcc100m:{tmp_path}/nope")
    os.makedirs(tmp_path / "emptyy")
    with pytest.raises(common.UserError, match="no images in"):
        data.make_source(f"yfcc100m:{tmp_path}/emptyy")


# ---- Fashion-MNIST (real Debian copy, and a torchvision-style copy), CIFAR-10, synthetic ----
def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.skipif(not os.path.exists(data.FMNIST_DEBIAN), reason="needs apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_copy():
    tr, te = data.make_source("fashion-mnist"), data.make_source("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000) and tr.images.shape == (60000, 28, 28) and tr.images.dtype == np.uint8
    assert np.bincount(tr.labels).tolist() == [6000] * 10 and len(tr.classes) == 10
    img, y = tr[0]
    assert img.mode == "RGB" and img.size == (28, 28) and y == 9  # the first training image is an ankle boot


def test_fashion_mnist_torchvision_copy_and_missing(tmp_path, monkeypatch):
    raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    os.makedirs(raw)
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(7))
    write_idx(raw / "t10k-images-idx3-ubyte", imgs[:3])  # uncompressed, as torchvision leaves them
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(3))
    tr, te = data.make_source(f"fashion-mnist:{tmp_path}/fm"), data.make_source(f"fashion-mnist:{tmp_path}/fm", "test")
    assert (len(tr), len(te)) == (7, 3) and np.array_equal(tr.images, imgs) and tr.labels.tolist() == list(range(7))
    assert np.asarray(tr[4][0])[..., 1].tolist() == imgs[4].tolist()

    def offline(root):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(data, "_download_fmnist", offline)  # never touch the network in tests
    with pytest.raises(common.UserError) as e:
        data.make_source(f"fashion-mnist:{tmp_path}/none")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and f"{tmp_path}/none/FashionMNIST/raw" in msg
    assert "download" in msg and "Name or service not known" in msg and "\n" not in msg


def test_cifar10_pickle_layout(tmp_path):
    d = tmp_path / "c" / "cifar-10-batches-py"
    os.makedirs(d)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{k}": rng.integers(0, 256, (4, 3072), dtype=np.uint8) for k in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    for name, arr in batches.items():
        pickle.dump({"data": arr, "labels": [k % 10 for k in range(len(arr))]}, open(d / name, "wb"))
    pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, open(d / "batches.meta", "wb"))
    tr, te = data.make_source(f"cifar10:{tmp_path}/c"), data.make_source(f"cifar10:{d}", "test")
    assert (len(tr), len(te)) == (20, 2) and tr.classes[3] == "c3" and tr.images.shape == (20, 32, 32, 3)
    row = batches["data_batch_2"][1]  # image 5: channel-planar row of 3 x 1024
    assert np.asarray(tr[5][0])[0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]] and tr[5][1] == 1
    with pytest.raises(common.UserError, match="lacks data_batch_1"):
        data.make_source(f"cifar10:{tmp_path}")


def test_synthetic_is_deterministic_balanced_and_learnable():
    a, b = data.make_source("synthetic:120"), data.make_source("synthetic:120")
    assert np.array_equal(a.images, b.images) and a.images.shape == (120, 32, 32, 3)
    assert 4 <= len(a.classes) <= 10 and np.bincount(a.labels).tolist() == [20] * len(a.classes)
    assert np.array_equal(data.make_source("synthetic:60").images, a.images[:60])  # a prefix of a longer set
    te = data.make_source("synthetic:120", "test")
    assert len(te) == 60 and not np.array_equal(te.images[:5], a.images[:5])
    # Learnable: a nearest-class-mean classifier on edge magnitudes (colour and polarity are random, as Sobel would
    # see it) beats chance (1/6) by far, for the classes and for the 4 rotations.
    big, test = data.make_source("synthetic:300"), data.make_source("synthetic:600", "test")

    def edges(images):  # (N, 32, 32, 3) uint8 -> (N, 31 * 31) unit-norm gradient magnitudes
        g = torch.tensor(images, dtype=torch.float32).mean(-1)
        f = ((g[:, :, 1:] - g[:, :, :-1]).abs()[:, :-1] + (g[:, 1:] - g[:, :-1]).abs()[:, :, :-1]).flatten(1)
        return f / f.norm(dim=1, keepdim=True)

    def ncm(xtr, ytr, xte):
        means = torch.stack([xtr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
        return torch.cdist(xte, means).argmin(1)
    acc = (ncm(edges(big.images), torch.tensor(big.labels), edges(test.images)).numpy() == test.labels).mean()
    assert acc > 0.5, acc
    rot = lambda imgs: np.concatenate([np.rot90(imgs, r, axes=(1, 2)) for r in range(4)])  # noqa: E731
    r_tr, r_te = torch.arange(4).repeat_interleave(len(big)), torch.arange(4).repeat_interleave(len(test))
    acc = (ncm(edges(rot(big.images)), r_tr, edges(rot(test.images))) == r_te).float().mean()
    assert acc > 0.5, acc


def test_bad_specs():
    for spec, pat in [("mnist", "unknown source"), ("folder:", "unknown source"), ("synthetic:abc", "positive integer"),
                      ("synthetic:0", "positive integer")]:
        with pytest.raises(common.UserError, match=pat):
            data.make_source(spec)
    with pytest.raises(common.UserError, match="--subset"):
        data.make_source("synthetic:10", subset=-1)


# ---- subsets and the two datasets ----
def test_subset_is_fixed_and_labels_follow(tmp_path):
    full = data.make_source("synthetic:100")
    s1, s2, s3 = (data.make_source("synthetic:100", subset=30, seed=s) for s in (0, 0, 1))
    assert len(s1) == 30 and np.array_equal(s1.indices, s2.indices) and not np.array_equal(s1.indices, s3.indices)
    assert np.all(np.diff(s1.indices) > 0) and np.array_equal(s1.labels, full.labels[s1.indices])
    assert np.array_equal(s1.images, full.images[s1.indices])
    assert len(data.make_source("synthetic:100", subset=500)) == 100
    make_tree(tmp_path / "d", per=10)
    fs = data.make_source(f"folder:{tmp_path}/d", subset=5, seed=3)
    whole = data.make_source(f"folder:{tmp_path}/d")
    assert list(fs.files) == [whole.files[i] for i in fs.indices]
    assert np.array_equal(fs.labels, whole.labels[fs.indices])


def test_rotation_dataset():
    src = data.make_source("synthetic:40")
    ds = data.RotationDataset(src, 24, seed=3)
    assert len(ds) == 40
    x, r, n = ds[5]
    assert x.shape == (3, 24, 24) and r in range(4) and n == 5
    assert torch.equal(ds[5][0], x) and ds[5][1] == r  # deterministic
    rs = [ds[j][1] for j in range(40)]
    assert set(rs) == {0, 1, 2, 3}
    ds.set_plan(1, np.arange(40), None)
    assert any(not torch.equal(ds[j][0], data.RotationDataset(src, 24, seed=3)[j][0]) for j in range(5))  # new epoch
    plan = np.array([7, 7, 7, 7, 2])
    given = np.array([0, 1, 2, 3, 3])
    ds.set_plan(2, plan, given)
    items = [ds[j] for j in range(5)]
    assert len(ds) == 5 and [it[1] for it in items] == given.tolist() and [it[2] for it in items] == plan.tolist()
    for j, (x, r, n) in enumerate(items):  # the given rotation on top of the same augmented view as a drawn one
        g = data.rng_for(3, 2, j)
        torch.randint(4, (1,), generator=g)
        assert torch.equal(x, data.rotate(data.train_transform(src[n][0], 24, g), r))
    with pytest.raises(ValueError):
        ds.set_plan(0, np.array([0, 40]))
    with pytest.raises(ValueError):
        ds.set_plan(0, np.array([0, 1]), np.array([0, 4]))
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers (spawn) must be able to rebuild it
    assert torch.equal(clone[4][0], items[4][0])


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
    d = three_good_two_corrupt(tmp_path / "mixed")
    monkeypatch.setattr(data, "plot_rotations", lambda *a: None)  # the figure is checked by the subprocess test
    data.main(data.Config(data=f"folder:{d}", out_dir=str(tmp_path / "out")))
    info = json.load(open(tmp_path / "out" / "01_data.json"))
    assert info["N"] == 3 and info["skipped"] == 2 and info["labelled"] is False and info["N_test"] is None
    assert "skipped 2 unreadable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.run(data.main, data.Config, ["--data", "folder:/does/not/exist", "--out_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "/does/not/exist does not exist" in err
    assert not (tmp_path / "x").exists()


def test_script_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "01_data.py", "--data", "synthetic:48", "--out_dir", str(out), "--subset", "30",
                        "--image_size", "24"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.load(open(out / "01_data.json"))
    assert info["spec"] == "synthetic:48" and info["N"] == 30 and info["image_size"] == 24 and info["skipped"] == 0
    assert info["N_test"] == 60 and len(info["classes"]) == 6 and sum(info["per_class_counts"].values()) == 30
    with Image.open(out / "01_data_rotations.png") as im:
        assert im.format == "PNG" and im.width > 300
    assert f"wrote {out / '01_data.json'}" in p.stdout and f"wrote {out / '01_data_rotations.png'}" in p.stdout
