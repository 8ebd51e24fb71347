"""Stage 05 refuses bad input before any work: every numeric flag, the VOC07 split pairs (PAPER.md §9.2:
trainval -> test, train -> val), and each VOC mode trains with its own weight decay and step size."""
import importlib

import pytest
import torch

common = importlib.import_module("support.common")
ev = importlib.import_module("05_eval")
report = importlib.import_module("support.evalio")  # support/evalio.py: 05's inputs and outputs
model_lib = importlib.import_module("02_model")
from test_eval import write_voc  # noqa: E402  (the VOCdevkit tree of the stage tests)


def refused(capsys, tmp_path, *argv):
    """Run 05 in-process on an empty out_dir: exit code 2 and a one-line message (no traceback)."""
    with pytest.raises(SystemExit) as e:
        common.run(ev.main, ev.Config, ["--out_dir", str(tmp_path / "empty"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("flag, value", [
    ("--train_subset", "-1"), ("--test_subset", "-5"), ("--probe_epochs", "0"), ("--probe_batch", "0"),
    ("--probe_lr", "0"), ("--probe_lr", "nan"), ("--probe_wd", "-1e-5"), ("--knn_tau", "0"), ("--knn_tau", "inf"),
    ("--clusters_grid", "-1"), ("--voc_iters", "0"), ("--voc_lr", "-0.1"), ("--voc_stepsize_fc68", "0"),
    ("--voc_stepsize_all", "-3"), ("--voc_wd_fc68", "-1"), ("--voc_wd_all", "nan"), ("--voc_batch", "0"),
    ("--voc_image_size", "-1"), ("--voc_image_size", "16"), ("--voc_crops", "0"), ("--batch_size", "0"),
    ("--workers", "-1"), ("--seed", "-1"), ("--knn_k", "abc"), ("--knn_k", "20,0"), ("--knn_k", "20,-5"),
    ("--knn_layer", "14"), ("--knn_layer", "none"), ("--layers", "0"), ("--sobel", "maybe"),
    ("--voc_mode", "fc7"), ("--voc_train_split", "val"), ("--voc_train_split", "test"),
    ("--voc", "voc2007:/nonexistent"), ("--voc", "/no/prefix")])
def test_bad_flag_is_one_line_naming_it(capsys, tmp_path, flag, value):
    # No checkpoint exists in out_dir: an error about the flag shows it was checked before the checkpoints
    err = refused(capsys, tmp_path, f"{flag}={value}")  # (= lets argparse take -1e-5 as a value)
    assert err.startswith(f"error: {flag} "), err  # the flag and its value first, then what to do


def test_flags_of_a_wrong_type_are_argparse_errors(capsys, tmp_path):
    for flag, value in (("--probe_epochs", "abc"), ("--voc_iters", "1.5"), ("--probe_lr", "x")):
        with pytest.raises(SystemExit) as e:
            common.run(ev.main, ev.Config, ["--out_dir", str(tmp_path), flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the old single flags are gone, now per mode
        common.run(ev.main, ev.Config, ["--voc_wd", "1e-4"])
    assert e.value.code == 2 and "--voc_wd_fc68" in capsys.readouterr().err


def test_voc_split_pairs(capsys, tmp_path):
    voc = tmp_path / "VOC2007"
    write_voc(voc, splits=("train", "val", "trainval"), n=2)  # no test split
    # val -> ? would train and test on one split: refused before anything is loaded
    err = refused(capsys, tmp_path, "--voc", f"voc2007:{voc}", "--voc_train_split", "val")
    assert "--voc_train_split 'val'" in err and "trainval or train" in err
    # trainval -> test, but the test split's files are missing: said now, not after the probes
    err = refused(capsys, tmp_path, "--voc", f"voc2007:{voc}")
    assert "aeroplane_test.txt is missing" in err
    # train -> val passes the checks and stops only at the missing checkpoint
    err = refused(capsys, tmp_path, "--voc", f"voc2007:{voc}", "--voc_train_split", "train")
    assert "no checkpoint" in err


def test_each_voc_mode_has_its_own_weight_decay_and_step_size(tmp_path, monkeypatch):
    write_voc(tmp_path, n=4, size=36)
    cfg = ev.Config(voc_iters=4, voc_batch=4, voc_lr=0.1, voc_stepsize_fc68=1, voc_stepsize_all=2,
                    voc_wd_fc68=1e-5, voc_wd_all=1e-4)
    made = []  # the weight decay each optimiser was built with
    sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda *a, **kw: made.append(kw["weight_decay"]) or sgd(*a, **kw))
    fits = {}
    for mode in ("fc6-8", "all"):
        net = ev.VOCNet(model_lib.VGG(width=1 / 16, image_size=32), 32, torch.Generator().manual_seed(0))
        fits[mode] = ev.voc_fit(net, report.VOCSource(str(tmp_path), "trainval"), mode, 32, cfg, "cpu")
    assert made == [1e-5, 1e-4]
    # lr of the 4th iteration (t = 3): 0.1 * 0.5 ** (t // stepsize), stepsize 1 for fc6-8 and 2 for all
    assert fits["fc6-8"]["lr_last"] == pytest.approx(0.1 / 8) and fits["all"]["lr_last"] == pytest.approx(0.1 / 2)
    assert {m: (f["wd"], f["stepsize"]) for m, f in fits.items()} == {"fc6-8": (1e-5, 1), "all": (1e-4, 2)}
