"""The small-scale reproduction: random init, RotNet, DeepCluster, DeeperCluster and supervised, same budget, 3 seeds.

Paper:  PAPER.md §8 (the methods as settings of one code), §9 (probes), §10 (published numbers, other scale).
Reads:  nothing; runs the numbered stages as subprocesses, exactly as a user would type them.
Writes: results/<data>/runs/<method>_s<seed>/...   every stage's files (checkpoints deleted at the end, logs kept)
        results/<data>/table.md, table.json         mean ± std over seeds, one row per method
        results/<data>/layers.png                    linear-probe accuracy per layer, one line per method
        results/<data>/k_sweep.md                    DeeperCluster with k = 8, 40, 160, 1000 (the paper's Figure 1 axis; m fixed)
        results/<data>/variants.md                   with --variants: one knob changed at a time (crop, m, V reset, ...)
Run:    python scripts/reproduce.py --data fashion-mnist            (make reproduce)
        python scripts/reproduce.py --data cifar10:/path/to/cifar-10-batches-py --subset 20000
It is restartable: a run whose 05_eval.json exists is not run again, so kill it and start it again at will.
"""
import argparse
import json
import os
import subprocess
import sys
import shlex
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common  # noqa: E402  (atomic writes: a kill leaves the old file or the new one; 05_eval.json marks a run done)
PY = sys.executable

# Each method is a set of flags of the same two scripts (02_model.py, 04_train.py); "random" trains nothing.
METHODS = {
    "random": None,
    "rotnet": ["--method", "rotnet"],
    "deepcluster": ["--method", "deepcluster"],  # PAPER.md §8: S = 1, flat k-means into k, one k-way head
    "deepercluster": ["--method", "deepercluster"],
    "supervised": ["--method", "supervised"],
}

# The settings every run of a results folder shares (settings.json); seeds, methods, variants and --jobs may differ.
BUDGET = ["data", "subset", "test_subset", "eval_train_subset", "image_size", "width", "epochs", "epoch_size",
          "reassign", "batch_size", "lr", "k", "m", "pca_dim", "model_flags", "train_flags", "eval_flags"]

# The methods of the N-scaling study (--n_sweep): the three self-supervised ones, trained at a fixed number of
# images seen (--epochs x --epoch_size) on N distinct images; N = --subset is the main table's own point.
SCALING = ["rotnet", "deepcluster", "deepercluster"]


def what_ran(a, method, flags=()):
    """One line naming exactly what a method row trained: S, m, k, k_s, T, rotation, V reset (PAPER.md §8).
    flags: a run's extra 04_train.py flags (the last one wins, as on the command line)."""
    opt = {"--k": str(a.k), "--super_clusters": str(a.m), "--reassign": str(a.reassign),
           "--reset_super_head": "auto"}
    flags = list(a.train_flags) + list(flags)
    for i, f in enumerate(flags[:-1]):
        if f in opt:
            opt[f] = flags[i + 1]
    k, m, T, reset = int(opt["--k"]), int(opt["--super_clusters"]), opt["--reassign"], opt["--reset_super_head"]
    if method == "random":
        return "no training"
    if method == "rotnet":
        return "S = 4 rotations, no clustering, V kept"
    if method == "supervised":
        return "true labels, 1 head, class-balanced sampling"
    m = 1 if method == "deepcluster" else m
    S = 4 * m if method == "deepercluster" else m
    V = {"auto": "reset" if m > 1 else "kept", "always": "reset", "never": "kept"}[reset]
    rot = "rotation" if method == "deepercluster" else "no rotation"
    return f"S = {S}, m = {m}, k = {k}, k_s = {k // m}, T = {T}, {rot}, V {V}"

# One-seed DeeperCluster variants (--variants): which knob matters at small scale (README, Results). Each is
# (flags for 02_model.py, flags for 04_train.py), added after the main table's own flags, so they override them.
VARIANTS = {
    "paper_crop": ([], ["--crop_min", "0.08"]),  # the paper's minimum crop area (8%) instead of 50%
    "m1": ([], ["--super_clusters", "1"]),  # super-class = rotation only (S = 4), so V is never reset
    "keep_V": ([], ["--reset_super_head", "never"]),  # m = 4, but V keeps its weights across clusterings
    "sub_grad_scale": ([], ["--sub_grad_scale"]),  # W_s gets the official per-group gradient scale (PAPER.md §7)
    "T1": ([], ["--reassign", "1"]),  # re-cluster every epoch (DeepCluster's T)
    "no_sobel": (["--no-sobel"], []),  # RGB input instead of the fixed grey + Sobel layer (grey images: grey levels)
    "lr_x2": ([], lambda a: ["--lr", f"{2 * a.lr:g}"]),  # twice the learning rate
    "epochs_x2": ([], lambda a: ["--epochs", str(2 * a.epochs)]),  # twice the images seen (and clusterings)
    "batch_x2": ([], lambda a: ["--batch_size", str(2 * a.batch_size), "--lr", f"{2 * a.lr:g}"]),  # half the steps
    # half the image side for training and evaluation (05 takes it from the checkpoint): 1/4 of the pixels
    "size_half": (lambda a: ["--image_size", str(a.image_size // 2)],) * 2,
}


def variant_flags(a, v):
    """-> (02 flags, 04 flags) of variant v; a callable entry is given the sweep's settings."""
    return tuple(f(a) if callable(f) else f for f in VARIANTS[v])


def sh(cmd, log, threads=0):
    """Run one stage; its output goes to a log file next to its results; fail loudly with the log's tail."""
    t0 = time.time()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))  # --jobs: share the cores
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = open(log).read()[-3000:]
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return time.time() - t0


def one_run(a, method, seed, extra=(), name=None, model_extra=()):
    """02 -> 04 -> 05 for one (method, seed); returns 05's json plus wall-clock seconds."""
    run_dir = os.path.join(a.results, "runs", name or f"{method}_s{seed}")
    done = os.path.join(run_dir, "05_eval.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "stdout.log")
    data = ["--data", a.data, "--subset", str(a.subset), "--image_size", str(a.image_size), "--seed", str(seed),
            "--epoch_size", str(a.epoch_size)]
    clus = ["--k", str(a.k), "--super_clusters", str(a.m), "--pca_dim", str(a.pca_dim)]
    t = a.threads
    secs = sh([PY, "02_model.py", "--out_dir", run_dir, "--width", str(a.width), "--image_size", str(a.image_size),
               "--seed", str(seed)] + a.model_flags + list(model_extra), log, t)
    ckpt = os.path.join(run_dir, "02_model_init.pt")
    if METHODS[method] is not None:
        secs += sh([PY, "04_train.py", "--out_dir", run_dir, "--epochs", str(a.epochs), "--reassign", str(a.reassign),
                    "--batch_size", str(a.batch_size), "--lr", str(a.lr)] + data + clus + METHODS[method] + a.train_flags + list(extra), log, t)  # last flag wins
        ckpt = os.path.join(run_dir, "04_train_last.pt")
    secs += sh([PY, "05_eval.py", "--out_dir", run_dir, "--ckpt", ckpt, "--layers", "all", "--data", a.data, "--seed", str(seed),
                "--train_subset", str(a.eval_train_subset or a.subset), "--test_subset", str(a.test_subset)] + a.eval_flags, log, t)
    res = json.load(open(done))
    res["wall_seconds"] = secs
    common.save_text(json.dumps(res, indent=1), done)
    keep_labels(run_dir)
    for f in os.listdir(run_dir):  # keep logs, json and figures; checkpoints are large and reproducible
        if (f.endswith(".pt") or f.endswith(".npz")) and not f.endswith("_labels.npz"):
            os.remove(os.path.join(run_dir, f))
    return res


def keep_labels(run_dir):
    """03_kmeans_epNNN.npz -> 03_kmeans_epNNN_labels.npz: only the super- and sub-cluster of every image (compressed,
    ~1% of the file), what scripts/clusters.py reads to ask what the clusters follow."""
    for f in sorted(os.listdir(run_dir)):
        if f.startswith("03_kmeans_ep") and f.endswith(".npz") and not f.endswith("_labels.npz"):
            z = np.load(os.path.join(run_dir, f))
            out = os.path.join(run_dir, f[:-4] + "_labels.npz")
            tmp = out + ".tmp.npz"
            np.savez_compressed(tmp, super=z["super"].astype(np.int32), sub=z["sub"].astype(np.int32))
            os.replace(tmp, out)


def summary(res):
    """The numbers of one run that go in the table (keys written by 05_eval.py)."""
    row = dict(res["rows"][0])
    if not any(m in str(row.get("method", "")) for m in ("deepcluster", "deepercluster")):
        row["nmi_labels"] = row["ari_labels"] = None  # rotnet / supervised / random have no clusters of their own
    keys = ("knn20", "knn200", "probe_best", "probe_best_layer", "probe_fc7", "nmi_labels", "ari_labels")
    return {k: row.get(k) for k in keys} | \
        {"layers": row.get("probe_layers", {}), "wall_seconds": res.get("wall_seconds")}  # None: killed before timing


def minutes(secs):
    secs = [x for x in secs if x is not None]
    return f"{np.mean(secs) / 60:.1f}" if secs else "–"


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def scores(r):
    """'NMI | ARI' of a run's summary for the table cells ('–' where the run has no clusters)."""
    nmi = "–" if r["nmi_labels"] is None else f"{r['nmi_labels']:.3f}"
    return nmi + " | " + ("–" if r["ari_labels"] is None else f"{r['ari_labels']:.4f}")


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs, ddof=1):.1f}" if len(xs) > 1 else f"{100 * xs[0]:.1f}"


def write_table(a, rows):
    seen = f"{a.epochs} epochs of {a.epoch_size or a.subset} images" if a.epoch_size else f"{a.epochs} epochs"
    lines = [f"# Small-scale reproduction on `{a.data}` (N = {a.subset or 'all'}, {a.image_size} px, width "
             f"{a.width}, {seen})", "",
             "| method | what ran | seeds | kNN@20 | kNN@200 | best conv probe (layer) | conv13 probe | fc7 probe "
             "| NMI vs labels | ARI vs labels | minutes/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, runs in rows.items():
        s = [summary(r) for r in runs]
        best_layers = sorted({str(x["probe_best_layer"]) for x in s})
        nmi = [x["nmi_labels"] for x in s if x["nmi_labels"] is not None]
        ari = [x["ari_labels"] for x in s if x["ari_labels"] is not None]
        lines.append(f"| {method} | {what_ran(a, method)} | {len(s)} | {mean_std([x['knn20'] for x in s])} | "
                     f"{mean_std([x['knn200'] for x in s])} | "
                     f"{mean_std([x['probe_best'] for x in s])} ({','.join(best_layers)}) | "
                     f"{mean_std([x['layers'].get('13') for x in s])} | "
                     f"{mean_std([x['probe_fc7'] for x in s])} | "
                     f"{(f'{np.mean(nmi):.3f}') if nmi else '–'} | {(f'{np.mean(ari):.4f}') if ari else '–'} | "
                     f"{minutes([x['wall_seconds'] for x in s])} |")
    lines += ["", "Accuracies in % (mean ± sample standard deviation over seeds); NMI is of the last clustering against "
              "the true classes, geometric normalisation (PAPER.md Eq. (18)); it is not corrected for chance: two "
              "unrelated partitions into hundreds of groups share information by chance, the more so the fewer images "
              "per group (`scripts/clusters.py` measures that level); ARI (adjusted Rand index) is corrected for "
              "chance (0 = chance, 1 = the classes); minutes/run: wall clock of the three stages, with the other runs "
              "of the sweep sharing the cores (--jobs)."]
    lines += paired_table(rows)
    common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "table.md"))
    common.save_text(json.dumps({m: [summary(r) for r in runs] for m, runs in rows.items()}, indent=1),
                     os.path.join(a.results, "table.json"))
    plot_layers(a, rows)
    print("\n".join(lines), flush=True)


def paired_table(rows):
    """Each method minus random init *of the same seed*: the seed also draws the probes' labelled subsets, so a paired
    difference removes the evaluation's own seed-to-seed spread from the comparison."""
    if "random" not in rows:
        return []
    base = {r["config"]["seed"]: summary(r) for r in rows["random"]}
    cols = [("kNN@20", lambda x: x["knn20"]), ("best conv probe", lambda x: x["probe_best"]),
            ("conv13 probe", lambda x: x["layers"].get("13")), ("fc7 probe", lambda x: x["probe_fc7"])]
    out = ["", "Difference to random init of the same seed, in points (mean ± sample standard deviation over seeds):", "",
           "| method | seeds | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, runs in rows.items():
        pairs = [(summary(r), base[r["config"]["seed"]]) for r in runs if method != "random" and r["config"]["seed"] in base]
        if not pairs:
            continue
        cells = []
        for _, get in cols:
            d = [100 * (get(x) - get(b)) for x, b in pairs if get(x) is not None and get(b) is not None]
            cells.append("–" if not d else f"{np.mean(d):+.1f} ± {np.std(d, ddof=1):.1f}" if len(d) > 1 else f"{d[0]:+.1f}")
        out.append(f"| {method} | {len(pairs)} | " + " | ".join(cells) + " |")
    return out


def plot_layers(a, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in rows.items():
        layers = [str(i) for i in range(1, 14)] + ["fc7"]
        acc = np.array([[summary(r)["layers"].get(l, np.nan) for l in layers] for r in runs], dtype=float)
        if np.all(np.isnan(acc)):
            continue
        m, s = np.nanmean(acc, 0) * 100, np.nanstd(acc, 0) * 100
        ax.plot(layers, m, marker="o", label=method)
        ax.fill_between(layers, m - s, m + s, alpha=0.15)
    ax.set_xlabel("layer (conv1..conv13, fc7)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title(f"{a.data}: linear probe per layer (mean ± std over {max(len(r) for r in rows.values())} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "layers.png"), dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--subset", type=int, default=20000)
    p.add_argument("--test_subset", type=int, default=2000, help="test images for probes and kNN")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--epoch_size", type=int, default=0, help="images per epoch (0 = N); fix it for --n_sweep")
    p.add_argument("--n_sweep", type=int, nargs="*", default=[],
                   help="other N (distinct training images) for rotnet/deepcluster/deepercluster, seed 0, "
                        "same images seen; needs --epoch_size")
    p.add_argument("--reassign", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--k", type=int, default=160)
    p.add_argument("--m", type=int, default=4, help="super-clusters (S = 4m for DeeperCluster)")
    p.add_argument("--pca_dim", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--k_sweep", type=int, nargs="*", default=[8, 40, 160, 1000])
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                   help="one-seed DeeperCluster variants to run as well (e.g. all of: " + " ".join(VARIANTS) + ")")
    p.add_argument("--variant_seeds", type=int, nargs="*", default=[],
                   help="more seeds of the --variants (runs variant_NAME_sSEED; the table compares each with the main "
                        "table's deepercluster of that seed)")
    # One quoted string each: --train_flags "--crop_min 0.08 --reassign 3"; a single flag needs the = form, because
    # argparse reads a lone "--x" as an option of its own: --train_flags=--sub_grad_scale
    for stage in ("model", "train", "eval"):
        p.add_argument(f"--{stage}_flags", type=shlex.split, default=[],
                       help=f"extra flags for every run's {dict(model='02_model', train='04_train', eval='05_eval')[stage]}.py")
    p.add_argument("--eval_train_subset", type=int, default=10000, help="labelled images for probes and kNN bank (0 = --subset)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once; each gets cores/jobs threads")
    p.add_argument("--results", default="")
    p.add_argument("--table_only", action="store_true", help="only rebuild table.md / layers.png / k_sweep.md from finished runs")
    a = p.parse_args()
    if a.n_sweep and not a.epoch_size:
        p.error("--n_sweep needs --epoch_size, so that every N trains on the same number of images")
    a.threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0  # 0: torch's own default
    a.results = a.results or os.path.join(ROOT, "results", a.data.split(":")[0])
    os.makedirs(a.results, exist_ok=True)
    settings = os.path.join(a.results, "settings.json")
    if os.path.exists(settings):  # runs of one folder share one budget, or the table would compare unlike runs
        old = json.load(open(settings))
        diff = {k: (old.get(k), getattr(a, k)) for k in BUDGET if old.get(k) != getattr(a, k)}
        if diff:
            raise SystemExit(f"{a.results} holds runs made with other settings (old, new): {diff}; pass the same "
                             f"flags, another --results folder, or delete the folder to start over")
    elif not a.table_only:
        common.save_text(json.dumps({k: getattr(a, k) for k in BUDGET}, indent=1), settings)
    if not a.table_only:
        # Every run is independent: seeds outermost (after the first pass a complete 1-seed table exists), then the k
        # sweep. --jobs N runs N at once with cores/N threads each (small 32-px convs use several threads poorly, so
        # parallel runs finish a sweep sooner; bench/RESULTS.md has the measured ratio).
        # Order: one seed of every method, then the N-scaling runs, then the other seeds, then one-knob runs.
        first = [(m, a.seeds[0], [], f"{m}_s{a.seeds[0]}") for m in a.methods]
        scaling = [(m, a.seeds[0], ["--subset", str(n)], f"nsweep_{m}_n{n}") for n in a.n_sweep
                   for m in SCALING if n != a.subset]
        tasks = first + scaling + [(m, s, [], f"{m}_s{s}") for s in a.seeds[1:] for m in a.methods]
        tasks += [("deepercluster", a.seeds[0], ["--k", str(k)], f"ksweep_k{k}") for k in a.k_sweep if k != a.k]
        tasks += [("deepercluster", a.seeds[0], variant_flags(a, v)[1], f"variant_{v}", variant_flags(a, v)[0])
                  for v in a.variants]
        # A variant that changes the trunk or its input (02 flags) gets its own untrained reference: the random init
        # it starts from is not the main table's
        tasks += [("random", a.seeds[0], [], f"variant_{v}_random", variant_flags(a, v)[0])
                  for v in a.variants if variant_flags(a, v)[0]]
        tasks += [("deepercluster", s, variant_flags(a, v)[1], f"variant_{v}_s{s}", variant_flags(a, v)[0])
                  for s in a.variant_seeds if s != a.seeds[0] for v in a.variants]
        tasks = list({t[3]: t for t in tasks}.values())  # one task per run folder (--seeds 0 0 would share one)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(one_run, a, *t): t for t in tasks}
            try:
                for f in as_completed(futures):
                    f.result()  # a failed run stops the sweep with its log's tail (the finished runs stay)
                    print(f"== done: {futures[f][3]}", flush=True)
                    collect(a)
            except BaseException:  # also Ctrl-C: do not start the queued runs (the running ones finish)
                pool.shutdown(wait=True, cancel_futures=True)
                collect(a)
                raise
    collect(a)


def scaling_table(a, load, names):
    """n_scaling.md / n_scaling.png: probe and kNN accuracy against N at a fixed number of images seen (the paper's
    question: does DeeperCluster keep gaining from more distinct images where RotNet and DeepCluster saturate?)."""
    seed = a.seeds[0]
    pts = {}  # method -> [(N, summary)]
    for m in SCALING:
        for n in names:
            if n.startswith(f"nsweep_{m}_n"):
                res = load(n)
                if res:
                    pts.setdefault(m, []).append((int(n.rsplit("_n", 1)[1]), summary(res)))
        main = load(f"{m}_s{seed}")
        if main and m in pts and a.subset:
            pts[m].append((a.subset, summary(main)))
    if not pts:
        return
    cols = [("best conv probe", lambda x: x["probe_best"]), ("conv13 probe", lambda x: x["layers"].get("13")),
            ("fc7 probe", lambda x: x["probe_fc7"]), ("kNN@20", lambda x: x["knn20"])]
    lines = [f"# Accuracy against N distinct training images, {a.epochs} x {a.epoch_size} images seen, seed {seed}",
             "", "| method | N | " + " | ".join(c for c, _ in cols) + " | NMI vs labels | ARI vs labels |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for m, rows in pts.items():
        for n, r in sorted(rows, key=lambda t: t[0]):
            lines.append(f"| {m} | {n} | " + " | ".join(pct(get(r)) for _, get in cols) + f" | {scores(r)} |")
    common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "n_scaling.md"))
    print("\n".join(lines), flush=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4))
    for ax, (title, get) in zip(axes, cols):
        for m, rows in pts.items():
            xy = sorted((n, get(r)) for n, r in rows if get(r) is not None)
            if xy:
                ax.plot([n for n, _ in xy], [100 * v for _, v in xy], "o-", label=m)
        base = load(f"random_s{seed}")
        if base is not None and get(summary(base)) is not None:  # the untrained trunk, for reference
            ax.axhline(100 * get(summary(base)), color="gray", ls="--", label="random init")
        ax.set_xscale("log")
        ax.set_xlabel("N distinct training images")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{a.data}: same images seen ({a.epochs} x {a.epoch_size}), more distinct images", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "n_scaling.png"), dpi=110)
    plt.close(fig)


def collect(a):
    """table.md / layers.png / k_sweep.md from the runs finished so far (each run's 05_eval.json)."""
    def load(name):
        f = os.path.join(a.results, "runs", name, "05_eval.json")
        return json.load(open(f)) if os.path.exists(f) else None
    runs = os.path.join(a.results, "runs")  # every finished run of the folder, whatever this call was asked to run
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
    rows = {m: [r for r in (load(n) for n in names if n.rsplit("_s", 1)[0] == m) if r] for m in METHODS}
    if any(rows.values()):
        write_table(a, {m: r for m, r in rows.items() if r})
    scaling_table(a, load, names)
    # One-seed tables: the k sweep and the variants, next to the main table's DeeperCluster run of the same seed (the
    # seed a sweep run was made with is in its 05_eval.json, so a later call with other --seeds cannot mix them up).
    sweep = [load(n) for n in names if n.startswith(("ksweep_", "variant_"))]
    seed = next((r["config"]["seed"] for r in sweep if r), a.seeds[0])
    lines = [f"| k (total, seed {seed}) | k_s = k/m | kNN@20 | best conv probe | fc7 probe | NMI vs labels "
             "| ARI vs labels |", "|---|---|---|---|---|---|---|"]
    for k in a.k_sweep:  # the paper's Figure 1 varies k
        res = load(f"deepercluster_s{seed}" if k == a.k else f"ksweep_k{k}")
        if res is not None and res["config"]["seed"] != seed:
            raise SystemExit(f"runs/ksweep_k{k} was made with seed {res['config']['seed']}, the others with {seed}")
        if res is None:
            continue
        r = summary(res)
        lines.append(f"| {k} | {k // a.m} | {pct(r['knn20'])} | {pct(r['probe_best'])} | {pct(r['probe_fc7'])} | "
                     f"{scores(r)} |")
    if len(lines) > 2:
        common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "k_sweep.md"))
        print("\n".join(lines), flush=True)
    lines = [f"| variant (seed {seed}) | flags | kNN@20 | best conv probe (layer) | conv13 probe | fc7 probe "
             "| NMI vs labels | ARI vs labels |", "|---|---|---|---|---|---|---|---|"]
    for v, run in [("baseline", f"deepercluster_s{seed}"), ("baseline, random init", f"random_s{seed}")] + \
            [x for v in VARIANTS for x in ((v, f"variant_{v}"), (f"{v}, random init", f"variant_{v}_random"))]:
        res = load(run)
        if res is None:
            continue
        if res["config"]["seed"] != seed:
            raise SystemExit(f"runs/{run} was made with seed {res['config']['seed']}, the others with {seed}")
        r = summary(res)
        name = v.split(",")[0]
        f02, f04 = variant_flags(a, name) if name != "baseline" else ([], [])
        flags = " ".join(["(the main table's run)"] if name == "baseline" else f02 if "random" in v
                         else f04 if f02 == f04 else f02 + f04)
        lines.append(f"| {v} | `{flags}` | {pct(r['knn20'])} | {pct(r['probe_best'])} ({r['probe_best_layer']}) | "
                     f"{pct(r['layers'].get('13'))} | {pct(r['probe_fc7'])} | {scores(r)} |")
    # More seeds of a variant (--variant_seeds): each next to the main table's runs of its own seed
    for n in names:
        if n.startswith("variant_") and n.rsplit("_", 1)[-1][1:].isdigit() and n.rsplit("_", 1)[-1][0] == "s":
            v, s = n[len("variant_"):].rsplit("_s", 1)
            res, ref, rnd = load(n), load(f"deepercluster_s{s}"), load(f"random_s{s}")
            for label, r in ((f"{v}, seed {s}", res), (f"baseline, seed {s}", ref), (f"random init, seed {s}", rnd)):
                if r is not None and v in VARIANTS and res is not None:
                    r = summary(r)
                    lines.append(f"| {label} | | {pct(r['knn20'])} | {pct(r['probe_best'])} ({r['probe_best_layer']}) "
                                 f"| {pct(r['layers'].get('13'))} | {pct(r['probe_fc7'])} | {scores(r)} |")
    base = [summary(r) for r in rows.get("deepercluster", [])]
    if len(base) > 1:  # the yardstick for a one-seed variant: how much the baseline itself moves between seeds
        sd = lambda get: pct(float(np.std([get(r) for r in base], ddof=1)))  # noqa: E731
        lines += ["", f"Seed-to-seed spread of the baseline ({len(base)} seeds of the main table's deepercluster, "
                  f"sample std, points): kNN@20 {sd(lambda r: r['knn20'])}, best conv probe "
                  f"{sd(lambda r: r['probe_best'])}, conv13 probe {sd(lambda r: r['layers'].get('13') or 0)}, fc7 "
                  f"probe {sd(lambda r: r['probe_fc7'])}. A one-seed variant that differs from the baseline by less "
                  f"than about twice that is within noise."]
    if any(line.startswith("| ") and not line.startswith(("| baseline", "| variant")) for line in lines):
        common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "variants.md"))
        print("\n".join(lines), flush=True)

if __name__ == "__main__":
    main()
