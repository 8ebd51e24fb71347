"""scripts/curves.py end to end on tiny synthetic data: random init and one method, trained to --max_seen with
curve checkpoints on the way, each evaluated once, then the table; a second call extends the same run."""
import json
import os
import importlib.util
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def curves(results, *extra):
    cmd = [sys.executable, "scripts/curves.py", "--data", "synthetic:120", "--results", str(results),
           "--image_size", "32", "--width", "0.0625", "--batch_size", "16", "--epoch_size", "40", "--k", "8",
           "--m", "2", "--pca_dim", "8", "--probe_epochs", "1", "--probe_layers", "4,13,fc7", "--knn_mid", "4",
           "--points", "32,80,112", "--train_flags=--workers 0", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads((results / "curves.json").read_text())


def test_curve_points_are_reached_evaluated_and_extended(tmp_path):
    # an epoch is 40 // 16 = 2 batches = 32 images: 80 images seen need 3 epochs, not ceil(80 / 40) = 2
    pts = curves(tmp_path, "--methods", "random", "deepercluster", "--max_seen", "80")
    assert set(pts["random"]) == {"0"} and set(pts["deepercluster"]) == {"32", "80"}
    p = pts["deepercluster"]["80"]["0"]
    assert 0 <= p["knn20"] <= 1 and 0 <= p["probe13"] <= 1 and set(p["probes"]) == {"4", "13", "fc7"}
    run = tmp_path / "runs" / "deepercluster_s0"
    assert not list(run.glob("04_train_seen*.pt")) and (run / "04_train_last.pt").exists()  # evaluated, deleted
    pts = curves(tmp_path, "--methods", "deepercluster", "--max_seen", "112")  # extends the same run
    assert set(pts["deepercluster"]) == {"32", "80", "112"}
    lines = (run / "04_train_log.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 3 epochs, then one more: resumed, not restarted
    assert "| deepercluster | 112 | 1 |" in (tmp_path / "curves.md").read_text()


def test_paired_differences_to_the_random_init_of_the_same_seed():
    spec = importlib.util.spec_from_file_location("curves", os.path.join(ROOT, "scripts", "curves.py"))
    cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv)
    keys = [key for _, key in cv.COLS]
    pt = lambda v: {k: v + i / 100 for i, k in enumerate(keys)}  # noqa: E731
    pts = {"random": {0: {0: pt(0.02), 1: pt(0.05)}},
           "dc": {500: {0: pt(0.03), 1: pt(0.04), 2: pt(0.09)}}}  # seed 2 has no random init: left out
    pts["dc"][500][1]["probe13"] = None
    d = cv.paired(pts)
    assert set(d) == {"dc"} and set(d["dc"][500]) == {0, 1}
    assert all(d["dc"][500][0][k] == pytest.approx(0.01) for k in keys)
    assert d["dc"][500][1]["knn20"] == pytest.approx(-0.01) and d["dc"][500][1]["probe13"] is None
    assert cv.cell([v["knn20"] for v in d["dc"][500].values()]) == "0.0 ± 1.4"  # +1 and -1 point
