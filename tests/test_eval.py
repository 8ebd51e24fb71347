"""Stage 05 tests (05_eval.py and its support/evalio.py): oracle checks of AP (scikit-learn), kNN (NumPy
brute force), Bottou's lr and the probe pooling table (by hand / PAPER.md §9.1), the linear probe on
separable and random labels, VOC parsing on a tree written here, loading the official layout, the
summary rows and tables by hand, and a subprocess run of the whole stage on tiny synthetic data.
Bad flags: tests/test_eval_flags.py."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, normalized_mutual_info_score

common = importlib.import_module("support.common")
ev = importlib.import_module("05_eval")
clusterstats = importlib.import_module("support.clusterstats")  # one flat id, one NMI
report = importlib.import_module("support.evalio")  # support/evalio.py: 05's inputs and outputs
model_lib = importlib.import_module("02_model")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- §9.2 AP, Eq. (17) ----
def test_average_precision_by_hand():
    # ranking 1, 0, 1: precision 1 at recall 1/2, 2/3 at recall 1 -> AP = 1/2 + 1/3
    assert ev.average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.5 + 1 / 3)
    # a positive tied with a negative ranks after it (o - 1e-5 t): 0, 1 -> AP = 1/2
    assert ev.average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    # difficult (-1) images are ignored; no positive at all -> nan
    assert ev.average_precision(np.array([0.9, 0.1, 0.5]), np.array([-1, 1, 0])) == pytest.approx(0.5)
    assert np.isnan(ev.average_precision(np.array([0.3, 0.2]), np.array([0, -1])))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_with_ties_and_difficult(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(300, 20)), 1)  # coarse rounding: many ties, within and across labels
    targets = rng.choice([1, 0, -1], size=(300, 20), p=[0.3, 0.6, 0.1])
    refs = []
    for c in range(20):
        keep = targets[:, c] >= 0
        t, o = targets[keep, c], scores[keep, c]
        refs.append(average_precision_score(t, o - 1e-5 * t))  # the official evaluation line
        assert ev.average_precision(scores[:, c], targets[:, c]) == pytest.approx(refs[-1], abs=1e-12)
    targets[:, 3] = np.minimum(targets[:, 3], 0)  # class 3 without positives: AP undefined, left out of the mAP
    m_ap, aps = ev.mean_ap(scores, targets)
    assert np.isnan(aps[3]) and m_ap == pytest.approx(np.mean(refs[:3] + refs[4:]))


# ---- §9.2 VOC parsing on a VOCdevkit tree ----
def write_voc(root, splits=("trainval", "test"), n=6, size=40):
    """VOCdevkit tree: JPEGImages/<id>.jpg and ImageSets/Main/<class>_<split>.txt with 1 / -1 / 0 (difficult)."""
    from PIL import Image
    os.makedirs(root / "JPEGImages"), os.makedirs(root / "ImageSets" / "Main")
    rng = np.random.default_rng(0)
    truth = {}
    for s, split in enumerate(splits):
        ids = [f"{s:02d}{i:04d}" for i in range(n)]
        t = rng.choice([1, -1, 0], size=(n, 20), p=[0.4, 0.5, 0.1])
        t[0], t[1] = 1, -1  # every class has a positive and a negative image
        for i in ids:
            Image.fromarray(rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        for c, name in enumerate(report.VOC_CLASSES):
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {t[j, c]:2d}\n" for j, i in enumerate(ids)))
        truth[split] = (ids, t)
    return truth


def test_parse_voc(tmp_path):
    truth = write_voc(tmp_path)
    ids, targets = report.parse_voc(str(tmp_path), "trainval")
    assert ids == truth["trainval"][0] and targets.shape == (6, 20) and targets.dtype == np.int64
    t = truth["trainval"][1]
    assert ((targets == 1) == (t == 1)).all() and ((targets == 0) == (t == -1)).all() and ((targets == -1) == (t == 0)).all()
    assert (targets == -1).any()  # some difficult labels were written
    with pytest.raises(common.UserError, match="ImageSets/Main/aeroplane_val.txt"):
        report.parse_voc(str(tmp_path), "val")


# ---- §9.1 pooling table, Bottou's lr, the probe ----
def test_probe_pool_reproduces_paper_table_at_224():
    # full width, 224 crop: conv1 sees 226 px (pad + Sobel), each block ends with a 2x2 max-pool
    C = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    H = [226, 226, 113, 113, 56, 56, 56, 28, 28, 28, 14, 14, 14]
    paper = [(18, 12)] * 2 + [(14, 8)] * 2 + [(9, 6)] * 3 + [(6, 4)] * 3 + [(3, 4)] * 3  # PAPER.md §9.1
    for c, h, (k, g) in zip(C, H, paper):
        kernel, shape = ev.probe_pool(c, h)
        assert (kernel, shape) == (k, (c, g, g)) and c * g * g < 10000
        ev_rule = dict(ev.POOL_OFFICIAL)
        try:  # the general rule alone picks the same grid (kernel 7 instead of 6 at conv8-10)
            ev.POOL_OFFICIAL.clear()
            assert ev.probe_pool(c, h)[1] == shape
        finally:
            ev.POOL_OFFICIAL.update(ev_rule)
    assert [c * ev.probe_pool(c, h)[1][1] ** 2 for c, h in zip(C, H)] == [9216] * 2 + [8192] * 2 + [9216] * 3 + [8192] * 6


def test_probe_pool_small_images():
    # width 1/4, 32 px: 34, 17, 8, 4, 2 px; every pooled feature stays under 10,000 and is the largest such grid
    for c, h in [(16, 34), (32, 17), (64, 8), (128, 4), (128, 2), (512, 2), (5000, 3)]:
        k, (_, g, _) = ev.probe_pool(c, h)
        assert g == h // k and (c * g * g < 10000 or g == 1)
        assert all(c * (h // kk) ** 2 >= 10000 for kk in range(1, h + 1) if h // kk > g)


def test_bottou_lr_by_hand():
    assert ev.bottou_lr(0.01, 1e-5, 0) == 0.01
    assert ev.bottou_lr(0.01, 1e-5, 10 ** 7) == pytest.approx(0.01 / 2 ** 0.5)  # 1 + 0.01 * 1e-5 * 1e7 = 2
    assert ev.bottou_lr(0.1, 0.1, 300) == pytest.approx(0.1 / 2)  # 1 + 0.1 * 0.1 * 300 = 4


def probe(x, y, x_te, y_te, epochs=5, lr=0.05, wd=1e-5):
    def batches(e):  # epoch e: a seeded shuffle, batches of 64
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(e)).split(64):
            yield x[idx], y[idx]
    return ev.train_probe(batches, x.shape[1], int(y.max()) + 1, x_te, y_te, epochs, lr, wd)


def test_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (1200,), generator=g)
    x = 5 + 10 * (torch.randn(4, 50, generator=g)[y] + 0.3 * torch.randn(1200, 50, generator=g))  # 4 separated blobs,
    # shifted and scaled: the standardisation takes care of that
    r = probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert r["acc"] > 0.95 and len(r["acc_per_epoch"]) == 5
    assert r["iterations"] == 5 * 16  # ceil(1000 / 64) = 16 per epoch, counted across epochs
    # the lr of the last step is Eq. (15) at t = iterations - 1
    assert r["lr_last"] == pytest.approx(ev.bottou_lr(0.05, 1e-5, r["iterations"] - 1))
    y_rand = torch.randint(0, 4, (1200,), generator=g)
    r = probe(x[:1000], y_rand[:1000], x[1000:], y_rand[1000:])
    assert abs(r["acc"] - 0.25) < 0.1


# ---- §9.3 kNN vs brute force, NMI ----
def test_knn_matches_numpy_brute_force():
    g = torch.Generator().manual_seed(1)
    bank, query = torch.randn(500, 16, generator=g), torch.randn(60, 16, generator=g)
    bank_y = torch.randint(0, 5, (500,), generator=g)
    preds = ev.knn_predict(bank, bank_y, query, 5, ks=(1, 20, 200), tau=0.07, chunk=25)
    b = bank.double().numpy() / np.linalg.norm(bank.double().numpy(), axis=1, keepdims=True)
    for i, q in enumerate(query.double().numpy()):
        sim = b @ (q / np.linalg.norm(q))
        order = np.argsort(-sim)
        for k in (1, 20, 200):
            votes = np.zeros(5)
            for j in order[:k]:
                votes[bank_y[j]] += np.exp(sim[j] / 0.07)
            assert preds[k][i].item() == votes.argmax()


def test_nmi_geometric_by_hand():
    super_, sub = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 0, 0, 1])
    flat = clusterstats.flat_ids(super_, sub)
    assert len(np.unique(flat)) == 4
    labels = np.array([0, 0, 1, 1, 1, 1])
    p = np.histogram2d(labels, flat, bins=[2, 4])[0] / 6  # joint distribution
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()
    r = clusterstats.agreement(flat, labels)
    assert r["nmi"] == pytest.approx(mi / np.sqrt(h(pa) * h(pb)))  # Eq. (18)
    assert r["nmi"] == pytest.approx(normalized_mutual_info_score(labels, flat, average_method="geometric"))


def test_which_methods_have_clusters_of_their_own():
    """05 reports NMI/ARI and draws the cluster grid for every clustering method, deepcluster-2level included (it
    was left out once); rotnet's and supervised's fixed labels are no clusters."""
    assert all(ev.has_clusters(f"{m} (epoch 3)") for m in ("deepercluster", "deepcluster", "deepcluster-2level"))
    assert not any(ev.has_clusters(m) for m in ("rotnet (epoch 3)", "supervised", "random init", "official"))


# ---- checkpoints: official layout, the Sobel check ----
def test_load_official_layout_and_sobel_check(tmp_path):
    m = model_lib.VGG(width=1 / 16, image_size=32, sobel=True)
    sd = {"module.body." + k: v for k, v in m.state_dict().items() if not k.startswith("sobel_layer.")}
    sd |= {"module.sobel." + k.split(".", 1)[1]: v for k, v in m.state_dict().items() if k.startswith("sobel_layer.")}
    sd |= {"module.pred_layer.weight": torch.zeros(10, m.feature_dim)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "official.pth")
    loaded, meta = report.load_checkpoint(str(tmp_path / "official.pth"), "auto")
    assert meta["method"] == "official" and loaded.sobel and meta["super"] is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), m.eval()(x))
    assert report.load_checkpoint(str(tmp_path / "official.pth"), "on")[0].sobel
    with pytest.raises(common.UserError, match="sobel"):  # PAPER.md §11 pitfall 7: the checkpoint's arch decides
        report.load_checkpoint(str(tmp_path / "official.pth"), "off")
    with pytest.raises(common.UserError, match="run 04_train.py first"):
        report.load_checkpoint(str(tmp_path / "04_train_last.pt"), "auto")


def test_parse_layers():
    assert report.parse_layers("best") == [2, 4, 7, 10, 13, "fc7"]
    assert report.parse_layers("all") == list(range(1, 14)) + ["fc7"]
    assert report.parse_layers("3, fc7") == [3, "fc7"] and report.parse_layers("none") == []
    with pytest.raises(common.UserError, match="--layers"):
        report.parse_layers("14")


# ---- support/evalio.py: the rows scripts/reproduce.py reads, the two tables ----
def test_summary_rows_and_tables_by_hand():
    accs = lambda d: {layer: {"acc": a} for layer, a in d.items()}
    results = [{"name": "a.pt", "method": "random init", "knn": {"20": 0.3, "200": 0.1},
                "probe": accs({"2": 0.5, "13": 0.25, "fc7": 0.2})},
               {"name": "b.pt", "method": "deepercluster", "knn": {"20": 0.4},
                "probe": accs({"2": 0.6, "13": 0.75, "fc7": 0.7}),
                "clusters": {"nmi": 0.5, "ari": 0.25}, "voc": {"all": {"map": 0.125}}}]
    rows = [report.summary_row(r) for r in results]
    read_by_reproduce = {"method", "knn20", "knn200", "probe_best", "probe_best_layer", "probe_fc7",
                         "nmi_labels", "probe_layers"}
    assert all(read_by_reproduce <= set(w) for w in rows)
    assert (rows[0]["probe_best"], rows[0]["probe_best_layer"], rows[0]["probe_fc7"]) == (0.5, "2", 0.2)
    assert (rows[1]["probe_best"], rows[1]["probe_best_layer"]) == (0.75, "13")  # convs only
    assert rows[1]["knn200"] is None and rows[1]["voc_map"] == {"all": 0.125}
    text = report.results_tables(rows, ev.Config(), "synthetic", (100, 50))
    assert "| checkpoint | method | conv2 | conv13 | fc7 | best conv |" in text
    assert "| a.pt | random init | 50.0 | 25.0 | 20.0 | 50.0 (conv2) |" in text
    assert "| b.pt minus a.pt | - | +10.0 | +50.0 | +50.0 | +25.0 |" in text  # b - a, per column
    assert "| a.pt | random init | 30.0 | 10.0 | - | - | - |" in text  # no clusters, no VOC
    assert "| b.pt | deepercluster | 40.0 | - | 0.500 | 0.250 | 12.5 |" in text
    assert "VOC07 mAP all |" in text and "VOC07 mAP fc6-8" not in text


# ---- the whole stage, as a subprocess ----
def test_stage_subprocess(tmp_path):
    out = tmp_path / "out"
    # one thread per process: the test machines are small and shared
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path), OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    p = run("02_model.py", "--out_dir", str(out), "--width", "0.0625", "--image_size", "32", "--k", "8", "--super_classes", "4")
    assert p.returncode == 0, p.stderr
    # A stage-04-like checkpoint: the same trunk plus assignments of the first 120 synthetic images (04's layout).
    ck = torch.load(out / "02_model_init.pt", weights_only=True)
    n = 120
    ck |= {"stage": "04_train", "method": "deepercluster", "epoch": 1, "super": torch.arange(n) % 2,
           "sub": (torch.arange(n) // 2) % 4, "config": dict(ck["config"], data="synthetic", subset=n, seed=0)}
    common.save_ckpt(ck, out / "04_train_last.pt")
    voc = tmp_path / "VOC2007"
    write_voc(voc, n=4, size=36)
    p = run("05_eval.py", "--out_dir", str(out), "--data", "synthetic", "--layers", "2,13,fc7", "--train_subset", "160",
            "--test_subset", "60", "--probe_epochs", "2", "--clusters_grid", "2", "--voc", f"voc2007:{voc}",
            "--voc_mode", "both", "--voc_iters", "3", "--voc_batch", "4", "--voc_crops", "2", "--knn_k", "5,20",
            "--voc_stepsize_all", "2", "--knn_layer", "fc7,3")
    assert p.returncode == 0, p.stderr
    for f in ("05_eval.json", "05_eval.md", "05_eval_layers.png", "05_eval_clusters.png"):
        assert (out / f).exists(), f
    res = json.loads((out / "05_eval.json").read_text())["results"]
    assert [r["method"] for r in res] == ["random init", "deepercluster (epoch 1)"]
    for r in res:
        assert set(r["probe"]) == {"2", "13", "fc7"} and all(0 <= v["acc"] <= 1 for v in r["probe"].values())
        assert set(r["knn"]) >= {"5", "20"} and set(r["voc"]) == {"fc6-8", "all"}
        assert set(r["knn_layers"]) == {"fc7", "3"} and r["knn"] == r["knn_layers"]["fc7"]  # the first: headline
        assert all(0 <= r["voc"][m]["map"] <= 1 for m in r["voc"])
        # --voc_mode both: each mode with its own settings (PAPER.md §9.2: wd 1e-5 / 1e-4)
        assert (r["voc"]["fc6-8"]["wd"], r["voc"]["fc6-8"]["stepsize"]) == (1e-5, 40)
        assert (r["voc"]["all"]["wd"], r["voc"]["all"]["stepsize"]) == (1e-4, 2)
    assert "nmi" in res[1]["clusters"] and "clusters" not in res[0]
    table = (out / "05_eval.md").read_text()
    assert "| 02_model_init.pt | random init |" in table and "VOC07 mAP all" in table and table in p.stdout
    # the per-layer table: one row per checkpoint and the trained-minus-first row, recomputed from the json
    rows = json.loads((out / "05_eval.json").read_text())["rows"]
    assert "| checkpoint | method | conv2 | conv13 | fc7 | best conv |" in table
    best = rows[0]["probe_best_layer"]  # the last column: the best probed conv and its layer
    assert f"| {100 * rows[0]['probe_layers'][best]:.1f} (conv{best}) |" in table
    diff = [100 * (rows[1]["probe_layers"][k] - rows[0]["probe_layers"][k]) for k in ("2", "13", "fc7")]
    diff.append(100 * (rows[1]["probe_best"] - rows[0]["probe_best"]))
    assert "minus 02_model_init.pt | - | " + " | ".join(f"{d:+.1f}" for d in diff) + " |" in table
    # the summary: kNN, clusters, VOC; the probes only in the per-layer table
    assert "| checkpoint | method | kNN@20 | kNN@200 | NMI vs labels | ARI | VOC07 mAP fc6-8 | VOC07 mAP all |" \
        in table
    # a --sobel that disagrees with the checkpoint is refused with exit code 2 (in-process: no second torch start-up)
    with pytest.raises(SystemExit) as e:
        common.run(ev.main, ev.Config, ["--out_dir", str(out), "--sobel", "off", "--layers", "none"])
    assert e.value.code == 2


def test_pooled_single_pass_matches_model():
    m = model_lib.VGG(width=1 / 16, image_size=32, sobel=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = ev.pooled(m, x, [2, 7, "fc7"])
        torch.testing.assert_close(f["fc7"], m(x))  # fc7 continued from conv13 = the model's phi
        c7 = m.conv_outputs(x, [7])[7]  # (3, 16, 8, 8): kernel 1, the whole map fits
        assert f[7].shape == (3, c7[0].numel()) and f[2].shape[1] < 10000
    dims = {l: v.shape[1] for l, v in f.items()}
    assert report.layer_chunks(dims, n=1000, budget=4 * 1000 * (dims[2] + dims[7])) == [[2, 7], ["fc7"]]
    assert report.layer_chunks(dims, n=1000) == [[2, 7, "fc7"]] and report.layer_chunks(dims, 10 ** 9) == [[2], [7], ["fc7"]]


def test_voc_fit_freezes_convs_and_keeps_bn_statistics(tmp_path):
    write_voc(tmp_path, n=4, size=36)
    cfg = ev.Config(voc_iters=2, voc_batch=4, voc_lr=0.1, voc_stepsize_fc68=1, voc_stepsize_all=1)
    for mode in ("fc6-8", "all"):
        trunk = model_lib.VGG(width=1 / 16, image_size=32, sobel=True)
        net = ev.VOCNet(trunk, 32, torch.Generator().manual_seed(0))
        before = {k: v.clone() for k, v in net.state_dict().items()}
        ev.voc_fit(net, report.VOCSource(str(tmp_path), "trainval"), mode, 32, cfg, "cpu")
        after = net.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert not any("running_" in k or "sobel" in k for k in changed)  # BN in eval mode, Sobel fixed, in both modes
        assert any(k.startswith("head.") for k in changed)  # fc6-8 re-initialised and trained in both
        assert any(k.startswith("trunk.features.") for k in changed) == (mode == "all")
    assert (net.head[0].bias == 0.1).sum() < net.head[0].bias.numel()  # trained away from the bias-0.1 init


def test_probe_aug_recomputes_features(tmp_path):
    data = importlib.import_module("01_data")
    src = data.make_source("synthetic:64")
    m = model_lib.VGG(width=1 / 16, image_size=32, sobel=True).eval()
    cfg = ev.Config(probe_aug=True, probe_epochs=2, probe_batch=32)
    x_te = ev.extract(m, torch.utils.data.DataLoader(data.ClusterDataset(src, 32), 32), [4], "cpu")[4]
    y = torch.as_tensor(src.labels)
    r = ev.run_probe(m, 4, None, None, x_te, y, 6, cfg, "cpu", src)
    assert r["iterations"] == 4 and len(r["acc_per_epoch"]) == 2 and r["dim"] == x_te.shape[1]


def test_feature_budget_changes_passes_not_results(monkeypatch):
    """--feature_gb only decides how many trunk passes cache the features: one per layer or one in
    all, the probes and kNN come out the same."""
    torch.manual_seed(0)
    m = model_lib.VGG(width=1 / 16, image_size=32, sobel=False).eval()
    x, y = torch.randn(48, 3, 32, 32), torch.arange(48) % 3
    ins = {"y_tr": y[:32], "y_te": y[32:], "b_tr": [(x[:32], y[:32])], "b_te": [(x[32:], y[32:])],
           "source": None}
    runs, calls, extract = [], [], ev.extract
    monkeypatch.setattr(ev, "extract", lambda *a: calls.append(a[2]) or extract(*a))
    for gb in (1e-9, 1.5):  # every layer alone / all layers in one pass
        torch.manual_seed(1)
        cfg = ev.Config(probe_epochs=2, probe_batch=16, feature_gb=gb)
        runs.append(ev.feature_evals(m, ins, [4, 7, "fc7"], ["fc7", 7], [5], cfg, "cpu"))
    (p1, k1), (p2, k2) = runs
    assert calls == [[4], [4], [7], [7], ["fc7"], ["fc7"], [4, 7, "fc7"], [4, 7, "fc7"]]  # train, test
    assert k1 == k2 and set(p1) == {"4", "7", "fc7"}
    assert all(p1[l]["acc"] == p2[l]["acc"] for l in p1)
