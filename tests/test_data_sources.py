"""Tests for support/sources.py, the image sources behind 01_data.make_source: every source on tiny trees
built in tmp_path (Fashion-MNIST also on the real Debian copy when installed), image modes, the
checks of unreadable files, and bad input: one-line UserErrors (exit 2) naming the file."""
import gzip
import importlib
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from support import common
from support import sources

data = importlib.import_module("01_data")  # 01_data.py: make_source, the datasets


def rgb(seed, size=(20, 14)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3),
                                                               dtype=np.uint8))


def good_jpeg(path, seed=0, size=(24, 18)):
    rgb(seed, size).save(path, format="JPEG")


def truncated_jpeg(path):
    good_jpeg(path, seed=9, size=(64, 64))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def exits_2(capsys, *args):
    """01_data.py's main under common.run: the exit code and the one line it prints."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as e:
        common.run(data.main, data.Config, list(args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


# ---- image modes: everything becomes 8-bit RGB ----
def test_to_rgb_modes(tmp_path):
    a16 = np.array([[0, 257 * 128], [65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    out = np.asarray(sources.load_image(tmp_path / "grey16.png"))
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 128], [255, 10]]  # not clipped
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: white after compositing
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(sources.load_image(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert np.asarray(sources.load_image(tmp_path / "cmyk.jpg"))[4, 4, 0] > 200  # red
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(tmp_path / "pal.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    Image.new("LA", (8, 8), (50, 255)).save(tmp_path / "la.png")
    Image.fromarray(np.full((3, 3), 1000, dtype=np.int32)).save(tmp_path / "i32.tif")
    for name, px in [("pal.png", [0, 0, 255]), ("grey.png", [77] * 3), ("bw.png", [255] * 3),
                     ("la.png", [50] * 3), ("i32.tif", [4] * 3)]:
        im = sources.load_image(tmp_path / name)
        assert im.mode == "RGB" and np.asarray(im)[0, 0].tolist() == px, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "sideways.jpg", exif=exif)
    assert sources.load_image(tmp_path / "sideways.jpg").size == (10, 20)


# ---- folder source ----
def make_tree(root, classes=("cat", "dog"), per=5, start=0):
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for k in range(per):
            good_jpeg(root / c / f"{k}.jpg", seed=start + k)
    return root


def test_folder_labelled_with_seeded_split(tmp_path):
    make_tree(tmp_path / "d", per=10)
    tr = data.make_source(f"folder:{tmp_path}/d")
    te = data.make_source(f"folder:{tmp_path}/d", "test")
    assert (len(tr), len(te)) == (16, 4) and tr.classes == te.classes == ["cat", "dog"]
    assert set(tr.files).isdisjoint(te.files) and np.bincount(te.labels).tolist() == [2, 2]
    img, y = tr[0]
    assert img.mode == "RGB" and img.size == (24, 18) and y == tr.labels[0]
    assert tr.name == "d" and tr.skipped == 0
    again = data.make_source(f"folder:{tmp_path}/d", seed=7)
    assert list(again.files) == list(tr.files)  # the split ignores --seed


def test_folder_explicit_train_test_and_flat(tmp_path):
    make_tree(tmp_path / "s" / "train", classes=("a", "b"), per=3)
    make_tree(tmp_path / "s" / "val", classes=("b", "c"), per=2)
    tr = data.make_source(f"folder:{tmp_path}/s")
    te = data.make_source(f"folder:{tmp_path}/s", "test")
    assert tr.classes == te.classes == ["a", "b", "c"]
    assert (len(tr), len(te)) == (6, 4) and sorted(set(te.labels.tolist())) == [1, 2]
    os.makedirs(tmp_path / "flat")
    for k in range(4):
        good_jpeg(tmp_path / "flat" / f"p{k}.JPG", seed=k)
    flat = data.make_source(f"folder:{tmp_path}/flat")
    assert len(flat) == 4 and flat.labels is None and flat.classes is None and flat[2][1] == -1
    with pytest.raises(common.UserError, match="flat, unlabelled folder without a test split"):
        data.make_source(f"folder:{tmp_path}/flat", "test")


def test_folder_top_level_images_and_a_subfolder_is_refused(tmp_path, capsys):
    """Issue 14 item 9: 5 photos at the top level and 1 in sub/ used to give N = 1, silently."""
    d = tmp_path / "photos"
    os.makedirs(d / "sub")
    for k in range(5):
        good_jpeg(d / f"p{k}.jpg", seed=k)
    good_jpeg(d / "sub" / "q.jpg")
    err = exits_2(capsys, "--data", f"folder:{d}", "--out_dir", str(tmp_path / "o"))
    assert f"{d} has 5 images at its top level and 1 sub-folder(s) of images (sub)" in err
    assert "ambiguous" in err and "move" in err


def test_folder_train_alone_is_the_collection_not_a_class(tmp_path, capsys):
    """Issue 14 item 9: train/ without test/ or val/ used to become one class named "train"."""
    make_tree(tmp_path / "t" / "train", classes=("a", "b"), per=5)
    tr = data.make_source(f"folder:{tmp_path}/t")
    te = data.make_source(f"folder:{tmp_path}/t", "test")
    assert tr.classes == te.classes == ["a", "b"] and (len(tr), len(te)) == (8, 2)
    assert all("/train/" in f for f in tr.files) and set(tr.files).isdisjoint(te.files)
    assert f"reading {tmp_path}/t/train" in capsys.readouterr().out  # says which reading it chose
    os.makedirs(tmp_path / "f" / "train")  # a flat train/: unlabelled
    for k in range(3):
        good_jpeg(tmp_path / "f" / "train" / f"{k}.jpg", seed=k)
    flat = data.make_source(f"folder:{tmp_path}/f")
    assert len(flat) == 3 and flat.classes is None
    make_tree(tmp_path / "v", classes=("bus", "train", "truck"), per=2)  # "train", one class of 3
    assert data.make_source(f"folder:{tmp_path}/v").classes == ["bus", "train", "truck"]


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
    with pytest.raises(common.UserError, match=f"2 of the 2 image files in {tmp_path / 'junk'} "
                                               "are unreadable"):
        data.make_source(f"folder:{tmp_path}/junk")
    with pytest.raises(common.UserError, match="not a folder"):
        data.make_source(f"folder:{tmp_path}/junk/a.jpg")


def test_tilde_is_expanded(tmp_path, monkeypatch):
    make_tree(tmp_path / "home" / "pics", per=5)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    src = data.make_source("folder:~/pics")
    assert len(src) == 8 and src.files[0].startswith(str(tmp_path / "home" / "pics"))


# ---- unreadable files: checked once, up front, whatever the number of files ----
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
    assert len(src) == 3 and src.skipped == 3 and err.count("warning") == 1
    assert "skipped 3 unreadable image file(s) of 6" in err and f"(first: {d}/text.gif" in err
    assert all(src[i][0].mode == "RGB" for i in range(3))


def test_unreadable_among_many_is_left_out_not_replaced(tmp_path, monkeypatch):
    """Issue 14 item 12: past 20,000 files an unreadable image used to be replaced by the next one
    (and N counted it). VALIDATE_MAX was that threshold; there is one mode now."""
    d = three_good_two_corrupt(tmp_path / "mixed")
    for module in (sources, data):  # had a threshold come back under its old name, it is 2 here
        monkeypatch.setattr(module, "VALIDATE_MAX", 2, raising=False)
    src = data.make_source(f"folder:{d}")
    assert len(src) == 3 and src.skipped == 2 and all("good" in f for f in src.files)
    assert [np.asarray(src[k][0]).sum() for k in range(3)] == [
        np.asarray(sources.load_image(d / f"good{k}.jpg")).sum() for k in range(3)]


def test_too_many_unreadable_is_one_error(tmp_path, capsys):
    d = tmp_path / "mostly_bad"
    os.makedirs(d)
    good_jpeg(d / "ok.jpg")
    for k in range(2):
        (d / f"bad{k}.jpg").write_bytes(b"\xff\xd8 nope")
    err = exits_2(capsys, "--data", f"folder:{d}", "--out_dir", str(tmp_path / "o"))
    assert f"2 of the 3 image files in {d} are unreadable (first: {d}/bad0.jpg" in err


def test_a_file_broken_after_the_check_is_an_error_not_a_substitute(tmp_path):
    d = three_good_two_corrupt(tmp_path / "mixed")
    src = data.make_source(f"folder:{d}")
    (d / "good1.jpg").write_bytes(b"")  # broken while the run goes on
    assert src[0][0].mode == "RGB"
    with pytest.raises(common.UserError, match=f"{d}/good1.jpg became unreadable") as e:
        src[1]
    assert "\n" not in str(e.value)


# ---- Tiny-ImageNet-200, the official layout ----
def make_tiny(root, wnids=("n01", "n02", "n03"), per=3, extra=("n99",)):
    """A fake tiny-imagenet-200/: wnids.txt also lists `extra` wnids that have no train/ folder."""
    d = root / "tiny-imagenet-200"
    for k, w in enumerate(wnids):
        os.makedirs(d / "train" / w / "images")
        for i in range(per):
            rgb(10 * k + i, (8, 8)).save(d / "train" / w / "images" / f"{w}_{i}.JPEG", "JPEG")
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
    os.makedirs(d / "val" / "images")
    os.makedirs(d / "test" / "images")
    rgb(0, (8, 8)).save(d / "test" / "images" / "test_0.JPEG", "JPEG")  # unlabelled: not used
    rows = [(f"val_{i}.JPEG", (list(wnids) + list(extra))[i % (len(wnids) + len(extra))])
            for i in range(8)]
    for i, (f, _) in enumerate(rows):
        rgb(50 + i, (8, 8)).save(d / "val" / "images" / f, "JPEG")
    lines = [f"{f}\t{w}\t0\t0\t7\t7\n" for f, w in rows]  # file, wnid, bounding box
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    (d / "wnids.txt").write_text("\n".join(list(wnids) + list(extra)) + "\n")
    words = {"n00": "entity", "n01": "goldfish, Carassius auratus", "n02": "crane", "n03": "crane"}
    (d / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in words.items()))
    return d


def test_tinyimagenet_official_layout(tmp_path):
    d = make_tiny(tmp_path)
    for root in (tmp_path, d):  # the folder itself or its parent
        tr = data.make_source(f"tinyimagenet:{root}")
        te = data.make_source(f"tinyimagenet:{root}", "test")
        assert tr.name == "tiny-imagenet-200" and len(tr) == 9 and tr.skipped == 0
        assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert tr.wnids == ["n01", "n02", "n03"]
        assert tr.classes == te.classes == ["goldfish", "crane (n02)", "crane (n03)"]
        assert tr.files[4] == f"{d}/train/n02/images/n02_1.JPEG"
        # val rows cycle n01, n02, n03, n99; n99 has no training images, so its rows are left out
        names = [os.path.basename(f) for f in te.files]
        assert names == [f"val_{i}.JPEG" for i in (0, 1, 2, 4, 5, 6)]
        assert te.labels.tolist() == [0, 1, 2, 0, 1, 2]
    img, y = te[3]
    assert img.size == (8, 8) and img.mode == "RGB" and y == 0
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(d / "val/images/val_4.JPEG")))
    (d / "words.txt").unlink()  # names are optional: the wnids then name the classes
    assert data.make_source(f"tinyimagenet:{d}").classes == ["n01", "n02", "n03"]


def test_tinyimagenet_counts_unreadable_and_bad_layouts(tmp_path, capsys):
    d = make_tiny(tmp_path)
    (d / "train" / "n02" / "images" / "n02_0.JPEG").write_bytes(b"")
    src = data.make_source(f"tinyimagenet:{d}")
    assert len(src) == 8 and src.skipped == 1 and "skipped 1 unreadable" in capsys.readouterr().err
    (d / "val" / "images" / "val_5.JPEG").unlink()  # listed but missing: unreadable too
    assert len(data.make_source(f"tinyimagenet:{d}", "test")) == 5
    out = str(tmp_path / "o")
    err = exits_2(capsys, "--data", f"tinyimagenet:{tmp_path}/nope", "--out_dir", out)
    assert f"{tmp_path}/nope does not exist" in err
    (d / "val" / "val_annotations.txt").write_text("val_0.JPEG n01\n")  # spaces, not tabs
    with pytest.raises(common.UserError, match="val_annotations.txt is not tab-separated"):
        data.make_source(f"tinyimagenet:{d}", "test")
    (d / "val" / "val_annotations.txt").unlink()
    with pytest.raises(common.UserError, match="lacks val/val_annotations.txt"):
        data.make_source(f"tinyimagenet:{d}", "test")
    assert len(data.make_source(f"tinyimagenet:{d}")) == 8  # the train split does not need it
    (d / "wnids.txt").unlink()
    for root in (tmp_path, d):  # the parent finds tiny-imagenet-200/ and names it
        err = exits_2(capsys, "--data", f"tinyimagenet:{root}", "--out_dir", out)
        assert f"{d} lacks wnids.txt;" in err and "official layout" in err
    (d / "wnids.txt").write_text("n77\n")
    with pytest.raises(common.UserError, match="no images in .*train.* for the 1 wnids of"):
        data.make_source(f"tinyimagenet:{d}")


# ---- YFCC100M zip layout ----
def make_yfcc(root, ids, corrupt=()):
    for i in ids:
        s = f"{i:08d}"
        os.makedirs(root / s[:2], exist_ok=True)
        buf = io.BytesIO()
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
    (root / "ids.txt").write_text("12345678\n99000111\n77777777\n")  # the last one is not there
    listed = data.make_source(f"yfcc100m:{root}")
    assert listed.files.tolist() == [12345678, 99000111] and listed.skipped == 1
    clone = pickle.loads(pickle.dumps(listed))  # spawn-safe: the cached zip handles stay behind
    assert np.array_equal(np.asarray(clone[1][0]), np.asarray(listed[1][0]))
    ds = data.RotationDataset(listed, 16, seed=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2))  # own handles
    assert [int(b[2]) for b in batches] == [0, 1]
    assert all(torch.equal(b[0][0], ds[k][0]) for k, b in enumerate(batches))
    np.save(root / "flickr_unique_ids.npy", np.array([99000111, 5000123]))
    assert data.make_source(f"yfcc100m:{root}").files.tolist() == [99000111, 5000123]
    with pytest.raises(common.UserError, match="no test split"):
        data.make_source(f"yfcc100m:{root}", "test")
    with pytest.raises(common.UserError, match=f"{tmp_path / 'nope'} does not exist"):
        data.make_source(f"yfcc100m:{tmp_path}/nope")
    os.makedirs(tmp_path / "emptyy")
    with pytest.raises(common.UserError, match="no images in"):
        data.make_source(f"yfcc100m:{tmp_path}/emptyy")


# ---- Fashion-MNIST (the real Debian copy, a torchvision-style copy), CIFAR-10, synthetic ----
def write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.skipif(not os.path.exists(sources.FMNIST_DEBIAN),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_copy():
    tr, te = data.make_source("fashion-mnist"), data.make_source("fashion-mnist", "test")
    assert (len(tr), len(te)) == (60000, 10000) and tr.images.shape == (60000, 28, 28)
    assert np.bincount(tr.labels).tolist() == [6000] * 10 and len(tr.classes) == 10
    img, y = tr[0]
    assert img.mode == "RGB" and img.size == (28, 28) and y == 9  # an ankle boot comes first


def fake_fmnist(raw, n=7):
    os.makedirs(raw, exist_ok=True)
    imgs = np.random.default_rng(0).integers(0, 256, (n, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(n))
    write_idx(raw / "t10k-images-idx3-ubyte", imgs[:3])  # uncompressed, as torchvision leaves them
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(3))
    return imgs


def test_fashion_mnist_torchvision_copy_and_missing(tmp_path, monkeypatch):
    imgs = fake_fmnist(tmp_path / "fm" / "FashionMNIST" / "raw")
    tr = data.make_source(f"fashion-mnist:{tmp_path}/fm")
    te = data.make_source(f"fashion-mnist:{tmp_path}/fm", "test")
    assert (len(tr), len(te)) == (7, 3) and np.array_equal(tr.images, imgs)
    assert tr.labels.tolist() == list(range(7))
    assert np.asarray(tr[4][0])[..., 1].tolist() == imgs[4].tolist()

    def offline(root):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(sources, "_download_fmnist", offline)  # never the network in tests
    with pytest.raises(common.UserError) as e:
        data.make_source(f"fashion-mnist:{tmp_path}/none")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert f"{tmp_path}/none/FashionMNIST/raw" in msg
    assert "download" in msg and "Name or service not known" in msg and "\n" not in msg


def cifar_tree(d, rng=np.random.default_rng(0)):
    os.makedirs(d)
    batches = {f"data_batch_{k}": rng.integers(0, 256, (4, 3072), dtype=np.uint8)
               for k in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    for name, arr in batches.items():
        with open(d / name, "wb") as fh:
            pickle.dump({"data": arr, "labels": [k % 10 for k in range(len(arr))]}, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, fh)
    return batches


def test_cifar10_pickle_layout(tmp_path):
    d = tmp_path / "c" / "cifar-10-batches-py"
    batches = cifar_tree(d)
    tr, te = data.make_source(f"cifar10:{tmp_path}/c"), data.make_source(f"cifar10:{d}", "test")
    assert (len(tr), len(te)) == (20, 2) and tr.classes[3] == "c3"
    assert tr.images.shape == (20, 32, 32, 3)
    row = batches["data_batch_2"][1]  # image 5: channel-planar row of 3 x 1024
    assert np.asarray(tr[5][0])[0, 1].tolist() == [row[1], row[1024 + 1], row[2048 + 1]]
    assert tr[5][1] == 1
    with pytest.raises(common.UserError, match="lacks data_batch_1"):
        data.make_source(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("case", ["gz_truncated", "gz_not_gzip", "idx_tiny", "idx_short",
                                  "idx_bad_magic",
                                  "cifar_pickle", "cifar_not_a_batch", "npy"])
def test_corrupt_files_give_one_line_errors(tmp_path, capsys, case):
    """Issue 14 item 10: each of these was a traceback."""
    raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    fake_fmnist(raw)
    spec, bad = f"fashion-mnist:{tmp_path}/fm", raw / "train-images-idx3-ubyte.gz"
    if case == "gz_truncated":
        bad.write_bytes(bad.read_bytes()[:-100])
    elif case == "gz_not_gzip":
        bad.write_bytes(b"this is not gzip data at all")
    elif case in ("idx_tiny", "idx_short"):  # shorter than its own header (3 dims: 16 bytes)
        bad.unlink()
        (raw / "train-labels-idx1-ubyte.gz").unlink()
        bad = raw / "train-images-idx3-ubyte"
        bad.write_bytes(b"\x00\x00" if case == "idx_tiny" else b"\x00\x00\x08\x03\x00\x00")
        write_idx(raw / "train-labels-idx1-ubyte", np.arange(7))
    elif case == "idx_bad_magic":
        bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00"))
    elif case.startswith("cifar"):
        d = tmp_path / "c" / "cifar-10-batches-py"
        cifar_tree(d)
        spec, bad = f"cifar10:{tmp_path}/c", d / "data_batch_3"
        with open(bad, "wb") as fh:
            fh.write(b"\x80\x04garbage") if case == "cifar_pickle" else pickle.dump([1, 2], fh)
    else:
        root = make_yfcc(tmp_path / "y", [12345678])
        spec, bad = f"yfcc100m:{root}", root / "flickr_unique_ids.npy"
        np.save(bad, np.arange(5))
        bad.write_bytes(bad.read_bytes()[:20])
    err = exits_2(capsys, "--data", spec, "--out_dir", str(tmp_path / "o"))
    assert str(bad) in err and ("again" in err or "delete" in err), err


def test_synthetic_is_deterministic_balanced_and_learnable():
    a, b = data.make_source("synthetic:120"), data.make_source("synthetic:120")
    assert np.array_equal(a.images, b.images) and a.images.shape == (120, 32, 32, 3)
    assert len(a.classes) == 6 and np.bincount(a.labels).tolist() == [20] * 6
    assert np.array_equal(data.make_source("synthetic:60").images, a.images[:60])  # a prefix
    te = data.make_source("synthetic:120", "test")
    assert len(te) == 60 and not np.array_equal(te.images[:5], a.images[:5])
    # Learnable: a nearest-class-mean classifier on edge magnitudes (colour and polarity are
    # random, as Sobel would see it) beats chance (1/6) by far, for the classes and the rotations.
    big, test = data.make_source("synthetic:300"), data.make_source("synthetic:600", "test")

    def edges(images):  # (N, 32, 32, 3) uint8 -> (N, 31 * 31) unit-norm gradient magnitudes
        g = torch.tensor(images, dtype=torch.float32).mean(-1)
        f = ((g[:, :, 1:] - g[:, :, :-1]).abs()[:, :-1] + (g[:, 1:] - g[:, :-1]).abs()[:, :, :-1])
        return f.flatten(1) / f.flatten(1).norm(dim=1, keepdim=True)

    def ncm(xtr, ytr, xte):
        means = torch.stack([xtr[ytr == c].mean(0) for c in range(int(ytr.max()) + 1)])
        return torch.cdist(xte, means).argmin(1)
    pred = ncm(edges(big.images), torch.tensor(big.labels), edges(test.images)).numpy()
    assert (pred == test.labels).mean() > 0.5
    rot = lambda imgs: np.concatenate([np.rot90(imgs, r, axes=(1, 2)) for r in range(4)])  # noqa
    r_tr = torch.arange(4).repeat_interleave(len(big))
    r_te = torch.arange(4).repeat_interleave(len(test))
    acc = (ncm(edges(rot(big.images)), r_tr, edges(rot(test.images))) == r_te).float().mean()
    assert acc > 0.5, acc


def test_synthetic_images_are_the_ones_of_before():
    """Pinned: the images the other stages' tests were written against (sha256 of the pixels)."""
    import hashlib
    for split, n, digest in [("train", 30, "4d59d32f23722c71"), ("test", 60, "e5ca2bed6447ed83")]:
        src = data.make_source("synthetic:30", split)
        assert len(src) == n and hashlib.sha256(src.images.tobytes()).hexdigest()[:16] == digest


def test_bad_specs():
    for spec, pat in [("mnist", "unknown source"), ("folder:", "unknown source"),
                      ("tinyimagenet", "unknown source"), ("synthetic:abc", "N > 0"),
                      ("synthetic:0", "N > 0")]:
        with pytest.raises(common.UserError, match=pat):
            data.make_source(spec)
    with pytest.raises(common.UserError, match="--subset"):
        data.make_source("synthetic:10", subset=-1)


def test_subset_is_fixed_and_labels_follow(tmp_path):
    full = data.make_source("synthetic:100")
    s1, s2, s3 = (data.make_source("synthetic:100", subset=30, seed=s) for s in (0, 0, 1))
    assert len(s1) == 30 and np.array_equal(s1.indices, s2.indices)
    assert not np.array_equal(s1.indices, s3.indices) and np.all(np.diff(s1.indices) > 0)
    assert np.array_equal(s1.labels, full.labels[s1.indices])
    assert np.array_equal(s1.images, full.images[s1.indices])
    assert len(data.make_source("synthetic:100", subset=500)) == 100
    make_tree(tmp_path / "d", per=10)
    fs = data.make_source(f"folder:{tmp_path}/d", subset=5, seed=3)
    whole = data.make_source(f"folder:{tmp_path}/d")
    assert list(fs.files) == [whole.files[i] for i in fs.indices]
    assert np.array_equal(fs.labels, whole.labels[fs.indices])
