"""scripts/reproduce.py end to end on tiny synthetic data: two jobs at once, the tables rebuilt from the runs' own
05_eval.json files, restart skips finished runs, and a folder refuses runs made with another budget."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--data", "synthetic:96", "--subset", "0", "--epochs", "1", "--k", "8", "--m", "2", "--pca_dim", "8",
        "--width", "0.125", "--eval_train_subset", "0", "--test_subset", "48", "--eval_flags", "--layers 4,13"]


def reproduce(results, *args):
    return subprocess.run([sys.executable, "scripts/reproduce.py", *BASE, "--results", str(results), *args],
                          cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    results = tmp_path_factory.mktemp("reproduce")
    p = reproduce(results, "--methods", "random", "--seeds", "0", "1", "--k_sweep", "--jobs", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    p = reproduce(results, "--methods", "deepercluster", "--seeds", "0", "--k_sweep", "4", "8", "--variants", "m1", "no_sobel",
                  "--variant_seeds", "1",
                  "--jobs", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return results, p.stdout


def test_table_is_the_mean_of_the_runs(sweep):
    results, _ = sweep
    table = json.load(open(results / "table.json"))
    assert {m: len(v) for m, v in table.items()} == {"random": 2, "deepercluster": 1}  # both calls' runs
    for method, rows in table.items():
        runs = [json.load(open(results / "runs" / f"{method}_s{s}" / "05_eval.json"))["rows"][0]
                for s in range(len(rows))]
        assert [r["knn20"] for r in rows] == [r["knn20"] for r in runs]
        knn = [r["knn20"] for r in runs]
        mean = f"{100 * np.mean(knn):.1f} ± {100 * np.std(knn, ddof=1):.1f}" if len(knn) > 1 else f"{100 * knn[0]:.1f}"
        line = next(l for l in open(results / "table.md") if l.startswith(f"| {method} |"))
        assert mean in line
    assert not list((results / "runs").glob("*/*.pt"))  # checkpoints deleted, logs kept
    assert (results / "runs" / "deepercluster_s0" / "stdout.log").exists() and (results / "layers.png").exists()


def test_k_sweep_and_variants_tables(sweep):
    results, _ = sweep
    ks = open(results / "k_sweep.md").read().splitlines()
    assert [l.split("|")[1].strip() for l in ks[2:]] == ["4", "8"]  # k = 8 is the table's seed-0 run itself
    var = open(results / "variants.md").read()
    assert "| baseline |" in var and "| m1 | `--super_clusters 1` |" in var
    cfg = open(results / "runs" / "variant_m1" / "stdout.log").read()
    assert "--super_clusters 1" in cfg
    # a variant that changes the trunk's input gets its own untrained reference, evaluated without training
    assert "| no_sobel, random init | `--no-sobel` |" in var and "| baseline, random init |" in var
    ref = open(results / "runs" / "variant_no_sobel_random" / "stdout.log").read()
    assert "--no-sobel" in ref and "04_train.py" not in ref and "variant_m1_random" not in os.listdir(results / "runs")
    assert "| m1, seed 1 |" in var and "| random init, seed 1 |" in var  # --variant_seeds, beside that seed's runs
    assert "--seed 1" in open(results / "runs" / "variant_m1_s1" / "stdout.log").read()


def test_restart_skips_finished_runs_and_refuses_another_budget(sweep):
    results, _ = sweep
    stamp = os.path.getmtime(results / "runs" / "random_s0" / "05_eval.json")
    p = reproduce(results, "--methods", "random", "--seeds", "0", "--k_sweep")
    assert p.returncode == 0 and os.path.getmtime(results / "runs" / "random_s0" / "05_eval.json") == stamp
    assert "| deepercluster | 1 |" in open(results / "table.md").read()  # a partial call keeps the other rows
    p = subprocess.run([sys.executable, "scripts/reproduce.py", *BASE[:5], "2", *BASE[6:], "--results", str(results),
                        "--methods", "random", "--seeds", "0", "--k_sweep"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "'epochs': (1, 2)" in p.stdout + p.stderr


def test_runs_keep_the_cluster_labels_and_clusters_script_reads_them(sweep):
    """Checkpoints go, each clustering round's labels stay (compact); scripts/clusters.py reads them against the same
    images (synthetic:96, seed 0) and finds a clustering equal to the true classes at NMI 1."""
    results, _ = sweep
    run = results / "runs" / "deepercluster_s0"
    assert not [f for f in os.listdir(run) if f.endswith(".pt")]
    npz = sorted(f for f in os.listdir(run) if f.endswith(".npz"))
    assert npz == ["03_kmeans_ep000_labels.npz"]  # 1 epoch, T = 1: one round
    z = np.load(run / npz[0])
    assert z["super"].shape == z["sub"].shape == (96,) and z["super"].max() < 2  # m = 2
    labels = sys.modules.get("sources") or __import__("importlib").import_module("support.sources")
    truth = np.asarray(labels.make_source("synthetic:96").labels)
    np.savez(results / "truth.npz", super=truth, sub=np.zeros_like(truth))
    p = subprocess.run([sys.executable, "scripts/clusters.py", "--data", "synthetic:96", "--seed", "0", "--size", "16",
                        "--npz", f"run={run / npz[0]}", f"truth={results / 'truth.npz'}", "--out",
                        str(results / "clusters.md")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {l.split("|")[1].strip(): l for l in open(results / "clusters.md").read().splitlines() if l.startswith("| ")}
    assert "| 1.000 (" in rows["truth"] and "| run |" in rows["run"] and "cue: mean colour" in rows
