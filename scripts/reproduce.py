"""The small-scale reproduction: random init, RotNet, DeepCluster, DeeperCluster, supervised.

Paper:  PAPER.md §8 (the methods as settings of one code), §9 (probes), §10 (published numbers).
Reads:  nothing; runs the numbered stages as subprocesses, exactly as a user would type them.
Writes: results/<data>/runs/<method>_s<seed>/  every stage's files (checkpoints deleted, logs kept)
        results/<data>/table.md, table.json    mean ± std over seeds, one row per method
        results/<data>/layers.png              linear-probe accuracy per layer, and settings.json
        results/<data>/k_sweep.md              --k_sweep: DeeperCluster at other k (Figure 1's axis)
        results/<data>/variants.md             --variants: one knob changed at a time (crop, m, ...)
        results/<data>/n_scaling.md, .png      --n_sweep: accuracy against N distinct images
Run:    python scripts/reproduce.py --data fashion-mnist            (make reproduce)
        python scripts/reproduce.py --data cifar10:/path/to/cifar-10-batches-py --subset 20000
Same budget per method, and by default the same --lr and T (the Fashion-MNIST table's; --lr 0
--reassign 0 gives each method its own recipe); runs what it is asked, no more; restartable.
Curves: scripts/curves.py (each method's recipe).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common  # noqa: E402  (atomic writes: a kill leaves the old file or the new)

# Each method is a set of flags of the same two scripts (02_model.py, 04_train.py) (PAPER.md §8)
METHODS = {"random": None} | {m: ["--method", m] for m in ("rotnet", "deepcluster",
                                                            "deepercluster", "supervised")}
# The settings all runs of a results folder share (settings.json); seeds, methods etc. may differ
BUDGET = ["data", "subset", "test_subset", "eval_train_subset", "image_size", "width", "epochs",
          "epoch_size", "reassign", "batch_size", "lr", "k", "m", "pca_dim", "model_flags",
          "train_flags", "eval_flags"]
# --n_sweep: the self-supervised methods on N distinct images, same images seen (epochs x size)
SCALING = ["rotnet", "deepcluster", "deepercluster"]
# The accuracy columns of the tables: header -> its value in a run's summary() (None: not measured)
ACC = {"kNN@20": lambda x: x["knn20"], "kNN@200": lambda x: x["knn200"],
       "best conv probe": lambda x: x["probe_best"],
       "conv13 probe": lambda x: x["layers"].get("13"), "fc7 probe": lambda x: x["probe_fc7"]}
CLUS = ["NMI vs labels", "ARI vs labels"]  # the columns of scores()


def what_ran(a, method, flags=()):
    """What a method row trained: S, m, k, k_s, T, rotation, V reset (§8); flags: more 04 flags."""
    opt = {"--k": str(a.k), "--super_clusters": str(a.m), "--reassign": str(a.reassign),
           "--reset_super_head": "auto"}
    flags = list(a.train_flags) + list(flags)
    opt |= {f: v for f, v in zip(flags, flags[1:]) if f in opt}  # the last one wins
    k, m, T = int(opt["--k"]), int(opt["--super_clusters"]), opt["--reassign"]
    if method in ("random", "rotnet", "supervised"):
        return {"random": "no training", "rotnet": "S = 4 rotations, no clustering, V kept",
                "supervised": "true labels, 1 head, class-balanced sampling"}[method]
    m = 1 if method == "deepcluster" else m
    S, rot = (4 * m, "rotation") if method == "deepercluster" else (m, "no rotation")
    V = {"auto": "reset" if m > 1 else "kept", "always": "reset", "never": "kept"}
    return f"S = {S}, m = {m}, k = {k}, k_s = {k // m}, T = {T}, {rot}, " \
        f"V {V[opt['--reset_super_head']]}"


# One-seed DeeperCluster variants (--variants): which knob matters (results/<data>/README.md).
# (02 flags, 04 flags), after the main table's own flags so they win; a callable gets the settings.
VARIANTS = {
    "paper_crop": ([], ["--crop_min", "0.08"]),  # the paper's 8% (the default) against a table run with 0.5
    "m1": ([], ["--super_clusters", "1"]),  # super-class = rotation only (S = 4): V never reset
    "keep_V": ([], ["--reset_super_head", "never"]),  # m = 4, V keeps its weights across rounds
    "sub_grad_scale": ([], ["--sub_grad_scale"]),  # the official per-group gradient scale (§7)
    "T1": ([], ["--reassign", "1"]),  # re-cluster every epoch (DeepCluster's T)
    "no_sobel": (["--no-sobel"], []),  # RGB (or grey levels) instead of the fixed grey + Sobel
    "lr_x2": ([], lambda a: ["--lr", f"{2 * a.lr:g}"]),  # twice the learning rate
    "epochs_x2": ([], lambda a: ["--epochs", str(2 * a.epochs)]),  # twice the images seen
    "batch_x2": ([], lambda a: ["--batch_size", str(2 * a.batch_size), "--lr", f"{2 * a.lr:g}"]),
    "size_half": (lambda a: ["--image_size", str(a.image_size // 2)],) * 2,  # also for 05's probes
}


def variant_flags(a, v):  # -> (02 flags, 04 flags) of variant v
    return tuple(f(a) if callable(f) else f for f in VARIANTS[v])


def one_run(a, method, seed, extra=(), name=None, model_extra=()):
    """02 -> 04 -> 05 for one (method, seed); returns 05's json plus wall-clock seconds."""
    def sh(script, *args):  # one stage, its output appended to the log; fail loudly with its tail
        t0, cmd = time.time(), [sys.executable, script, "--out_dir", run_dir, *args]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
        with open(log, "a") as fh:
            print("$ " + " ".join(cmd), file=fh, flush=True)
            rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n"
                             + open(log).read()[-3000:])
        return time.time() - t0
    run_dir = os.path.join(a.results, "runs", name or f"{method}_s{seed}")
    done, log = os.path.join(run_dir, "05_eval.json"), os.path.join(run_dir, "stdout.log")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(run_dir, exist_ok=True)
    size, sd = ["--image_size", str(a.image_size)], ["--seed", str(seed)]
    secs = sh("02_model.py", "--width", str(a.width), *size, *sd, *a.model_flags, *model_extra)
    if METHODS[method] is not None:  # the last flag wins
        secs += sh("04_train.py", "--epochs", str(a.epochs), "--reassign", str(a.reassign),
                   "--batch_size", str(a.batch_size), "--lr", str(a.lr), "--data", a.data,
                   "--subset", str(a.subset), *size, *sd, "--epoch_size", str(a.epoch_size),
                   "--k", str(a.k), "--super_clusters", str(a.m), "--pca_dim", str(a.pca_dim),
                   *METHODS[method], *a.train_flags, *extra)
    ckpt = os.path.join(run_dir, "04_train_last.pt" if METHODS[method] else "02_model_init.pt")
    secs += sh("05_eval.py", "--ckpt", ckpt, "--layers", "all", "--data", a.data, *sd,
               "--train_subset", str(a.eval_train_subset or a.subset),
               "--test_subset", str(a.test_subset), *a.eval_flags)
    res = json.load(open(done)) | {"wall_seconds": secs}
    common.save_text(json.dumps(res, indent=1), done)
    for f in sorted(os.listdir(run_dir)):  # keep logs, json, figures; checkpoints are reproducible
        path, npz = os.path.join(run_dir, f), f.endswith(".npz") and not f.endswith("_labels.npz")
        if npz and f.startswith("03_kmeans_ep"):  # keep its labels (~1%; scripts/clusters.py)
            z, tmp = np.load(path), path[:-4] + "_labels.npz.tmp.npz"
            np.savez_compressed(tmp, **{k: z[k].astype(np.int32) for k in ("super", "sub")})
            os.replace(tmp, tmp[:-len(".tmp.npz")])
        if npz or f.endswith(".pt"):
            os.remove(path)
    return res


def summary(res):
    """One run's numbers for the tables (05_eval.py's keys; wall_seconds None: killed untimed)."""
    row = dict(res["rows"][0])
    if not any(m in str(row.get("method", "")) for m in ("deepcluster", "deepercluster")):
        row["nmi_labels"] = row["ari_labels"] = None  # rotnet / supervised / random: no clusters
    return {k: row.get(k) for k in ("knn20", "knn200", "probe_best", "probe_best_layer",
                                    "probe_fc7", "nmi_labels", "ari_labels")} | \
        {"layers": row.get("probe_layers", {}), "wall_seconds": res.get("wall_seconds")}


def pct(*xs, scale=100, sign=""):
    """A table cell in %: one x, or 'mean ± sample std' of several (None left out; none: '–')."""
    xs = [x for x in xs if x is not None]
    sd = f" ± {scale * np.std(xs, ddof=1):.1f}" if len(xs) > 1 else ""
    return f"{scale * np.mean(xs):{sign}.1f}{sd}" if xs else "–"


def scores(r):
    """'NMI | ARI' of a run's summary for the table cells ('–' where the run has no clusters)."""
    nmi = "–" if r["nmi_labels"] is None else f"{r['nmi_labels']:.3f}"
    return nmi + " | " + ("–" if r["ari_labels"] is None else f"{r['ari_labels']:.4f}")


def row(*cells, rule=False):
    """[one markdown table row]; rule: a header, with its separator line."""
    return ["| " + " | ".join(map(str, cells)) + " |"] + ["|" + "---|" * len(cells)] * rule


def write_table(a, rows):
    """table.md, table.json, layers.png: one row per method, mean ± std over its seeds."""
    seen = f"{a.epochs} epochs of {a.epoch_size} images" if a.epoch_size else f"{a.epochs} epochs"
    lines = [f"# Small-scale reproduction on `{a.data}` (N = {a.subset or 'all'}, {a.image_size} "
             f"px, width {a.width}, {seen})", ""]
    lines += row("method", "what ran", "seeds", "kNN@20", "kNN@200", "best conv probe (layer)",
                 "conv13 probe", "fc7 probe", *CLUS, "minutes/run", rule=True)
    for method, runs in rows.items():
        s = [summary(r) for r in runs]
        acc = {c: pct(*(get(x) for x in s)) for c, get in ACC.items()}  # in the columns' order
        acc["best conv probe"] += f" ({','.join(sorted({str(x['probe_best_layer']) for x in s}))})"
        clus = {k: [x[k] for x in s if x[k] is not None] for k in ("nmi_labels", "ari_labels")}
        secs = [x["wall_seconds"] for x in s if x["wall_seconds"] is not None]
        lines += row(method, what_ran(a, method), len(s), *acc.values(),
                     scores({k: np.mean(v) if v else None for k, v in clus.items()}),
                     f"{np.mean(secs) / 60:.1f}" if secs else "–")
    lines += ["", "Accuracies in % (mean ± sample standard deviation over seeds); NMI is of the "
              "last clustering against the true classes, geometric normalisation (PAPER.md Eq. "
              "(18)); it is not corrected for chance: two unrelated partitions into hundreds of "
              "groups share information by chance, the more so the fewer images per group "
              "(`scripts/clusters.py` measures that level); ARI (adjusted Rand index) is corrected "
              "for chance (0 = chance, 1 = the classes); minutes/run: wall clock of the three "
              "stages, with the other runs of the sweep sharing the cores (--jobs)."]
    if "random" in rows:  # the seed also draws the probes' subsets: pair each run with its seed's
        base = {r["config"]["seed"]: summary(r) for r in rows["random"]}
        cols = ["kNN@20", "best conv probe", "conv13 probe", "fc7 probe"]
        lines += ["", "Difference to random init of the same seed, in points (mean ± sample "
                  "standard deviation over seeds):", "", *row("method", "seeds", *cols, rule=True)]
        for method, runs in rows.items():
            pairs = [(summary(r), base[r["config"]["seed"]]) for r in runs
                     if method != "random" and r["config"]["seed"] in base]
            diffs = [[100 * (get(x) - get(b)) for x, b in pairs
                      if get(x) is not None and get(b) is not None] for get in map(ACC.get, cols)]
            lines += row(method, len(pairs), *(pct(*d, scale=1, sign="+") for d in diffs)) \
                if pairs else []
    common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "table.md"))
    table = {m: [summary(r) for r in runs] for m, runs in rows.items()}
    common.save_text(json.dumps(table, indent=1), os.path.join(a.results, "table.json"))
    plot_layers(a, rows)
    print("\n".join(lines), flush=True)


def plot_layers(a, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [str(i) for i in range(1, 14)] + ["fc7"]
    for method, runs in rows.items():
        acc = np.array([[summary(r)["layers"].get(i, np.nan) for i in layers] for r in runs], float)
        if not np.all(np.isnan(acc)):
            m, s = np.nanmean(acc, 0) * 100, np.nanstd(acc, 0) * 100
            ax.plot(layers, m, marker="o", label=method)
            ax.fill_between(layers, m - s, m + s, alpha=0.15)
    ax.set(xlabel="layer (conv1..conv13, fc7)", ylabel="linear probe top-1 (%)", title=f"{a.data}: "
           f"linear probe per layer (mean ± std over {max(len(r) for r in rows.values())} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "layers.png"), dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    for name, default, text in [  # strings and numbers, of the default's type
            ("data", "fashion-mnist", None), ("subset", 20000, None),
            ("test_subset", 2000, "test images for probes and kNN"), ("image_size", 32, None),
            ("width", 0.25, None), ("epochs", 10, None),
            ("epoch_size", 0, "images per epoch (0 = N); fix it for --n_sweep"),
            ("reassign", 2, "T for every method (the Fashion-MNIST table's); 0 = each method's"),
            ("batch_size", 64, None), ("k", 160, None),
            ("lr", 0.05, "lr for every method (the Fashion-MNIST table's); 0 = each method's recipe"),
            ("m", 4, "super-clusters (S = 4m for DeeperCluster)"), ("pca_dim", 64, None),
            ("eval_train_subset", 10000, "labelled images for probes and kNN bank (0 = --subset)"),
            ("jobs", 1, "runs at once; each gets cores/jobs threads"), ("results", "", None)]:
        add(f"--{name}", type=type(default), default=default, help=text)
    add("--n_sweep", type=int, nargs="*", default=[], help="other N (distinct training images) for "
        "rotnet/deepcluster/deepercluster, seed 0, same images seen; needs --epoch_size")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add("--k_sweep", type=int, nargs="*", default=[], help="DeeperCluster at other k, e.g. 8 1000")
    add("--variants", nargs="*", default=[], choices=list(VARIANTS), help="one-seed DeeperCluster "
        "variants to run as well (e.g. all of: " + " ".join(VARIANTS) + ")")
    add("--variant_seeds", type=int, nargs="*", default=[], help="more seeds of the --variants, "
        "each beside the main table's deepercluster of that seed (runs variant_NAME_sSEED)")
    # One string each: --train_flags "--crop_min 0.08 --reassign 3", --train_flags=--sub_grad_scale
    for stage, script in (("model", "02_model"), ("train", "04_train"), ("eval", "05_eval")):
        add(f"--{stage}_flags", type=shlex.split, default=[],
            help=f"extra flags for every run's {script}.py")
    add("--table_only", action="store_true", help="only rebuild the tables and figures from runs")
    a = p.parse_args()
    if a.n_sweep and not a.epoch_size:
        p.error("--n_sweep needs --epoch_size, so that every N trains on the same number of images")
    a.threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0  # 0: torch's default
    kind, _, path = a.data.partition(":")  # folder:data/tiny-imagenet -> results/tiny-imagenet
    kind = os.path.basename(path) if kind == "folder" else kind
    a.results = a.results or f"{ROOT}/results/{kind}"
    os.makedirs(a.results, exist_ok=True)
    settings = os.path.join(a.results, "settings.json")
    if os.path.exists(settings):  # one folder, one budget, or the table would compare unlike runs
        old = json.load(open(settings))
        if diff := {k: (old.get(k), getattr(a, k)) for k in BUDGET if old.get(k) != getattr(a, k)}:
            raise SystemExit(f"{a.results} holds runs made with other settings (old, new): {diff}; "
                             "pass the same flags, another --results folder, or delete the folder "
                             "to start over")
    elif not a.table_only:
        common.save_text(json.dumps({k: getattr(a, k) for k in BUDGET}, indent=1), settings)
    if not a.table_only:
        # One seed of every method (a complete 1-seed table), N-scaling, other seeds, k, variants;
        # --jobs N: N at once, cores/N threads each (small convs scale poorly: bench/RESULTS.md)
        s0, vf, dc = a.seeds[0], {v: variant_flags(a, v) for v in a.variants}, "deepercluster"
        tasks = [(m, s0, [], f"{m}_s{s0}") for m in a.methods]
        tasks += [(m, s0, ["--subset", str(n)], f"nsweep_{m}_n{n}") for n in a.n_sweep
                  for m in SCALING if n != a.subset]
        tasks += [(m, s, [], f"{m}_s{s}") for s in a.seeds[1:] for m in a.methods]
        tasks += [(dc, s0, ["--k", str(k)], f"ksweep_k{k}") for k in a.k_sweep if k != a.k]
        tasks += [(dc, s0, f04, f"variant_{v}", f02) for v, (f02, f04) in vf.items()]
        # a variant with 02 flags (trunk or input) gets its own untrained reference
        tasks += [("random", s0, [], f"variant_{v}_random", f) for v, (f, _) in vf.items() if f]
        tasks += [(dc, s, f04, f"variant_{v}_s{s}", f02) for s in a.variant_seeds if s != s0
                  for v, (f02, f04) in vf.items()]
        tasks = list({t[3]: t for t in tasks}.values())  # one task per run folder (--seeds 0 0)
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(one_run, a, *t): t for t in tasks}
            try:
                for f in as_completed(futures):
                    f.result()  # a failed run stops the sweep with its log's tail (finished stay)
                    print(f"== done: {futures[f][3]}", flush=True)
                    collect(a)
            except BaseException:  # also Ctrl-C: do not start the queued runs (running ones finish)
                pool.shutdown(wait=True, cancel_futures=True)
                collect(a)
                raise
    collect(a)


def scaling_table(a, load, names):
    """n_scaling.md / .png: does DeeperCluster keep gaining from more distinct images?"""
    seed, pts = a.seeds[0], {}  # pts: method -> [(N, summary)]
    for m in SCALING:
        for n in names:
            if n.startswith(f"nsweep_{m}_n") and (res := load(n)):
                pts.setdefault(m, []).append((int(n.rsplit("_n", 1)[1]), summary(res)))
        if (main := load(f"{m}_s{seed}")) and m in pts and a.subset:
            pts[m].append((a.subset, summary(main)))
    if not pts:
        return
    cols = ["best conv probe", "conv13 probe", "fc7 probe", "kNN@20"]
    lines = [f"# Accuracy against N distinct training images, {a.epochs} x {a.epoch_size} images "
             f"seen, seed {seed}", "", *row("method", "N", *cols, *CLUS, rule=True)]
    for m, rows in pts.items():
        for n, r in sorted(rows, key=lambda t: t[0]):
            lines += row(m, n, *(pct(ACC[c](r)) for c in cols), scores(r))
    common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "n_scaling.md"))
    print("\n".join(lines), flush=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4))
    base = load(f"random_s{seed}")  # the untrained trunk, for reference
    for ax, (title, get) in zip(axes, [(c, ACC[c]) for c in cols]):
        for m, rows in pts.items():
            if xy := sorted((n, get(r)) for n, r in rows if get(r) is not None):
                ax.plot([n for n, _ in xy], [100 * v for _, v in xy], "o-", label=m)
        if base is not None and get(summary(base)) is not None:
            ax.axhline(100 * get(summary(base)), color="gray", ls="--", label="random init")
        ax.set(xscale="log", xlabel="N distinct training images", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{a.data}: same images seen ({a.epochs} x {a.epoch_size}), more distinct images",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "n_scaling.png"), dpi=110)
    plt.close(fig)


def one_seed_tables(a, load, names, rows):
    """k_sweep.md and variants.md: one-seed runs beside the main table's runs of the same seed."""
    def checked(run):  # run's summary, None if unfinished; a run of another seed is an error
        r = load(run)
        if r is not None and r["config"]["seed"] != seed:
            raise SystemExit(f"runs/{run} was made with seed {r['config']['seed']}, the others "
                             f"with {seed}")
        return r and summary(r)

    def cells(r):
        return [pct(r["knn20"]), f"{pct(r['probe_best'])} ({r['probe_best_layer']})",
                pct(r["layers"].get("13")), pct(r["probe_fc7"]), scores(r)]
    sweep = [load(n) for n in names if n.startswith(("ksweep_", "variant_"))]
    seed = next((r["config"]["seed"] for r in sweep if r), a.seeds[0])  # as made, not --seeds
    lines = row(f"k (total, seed {seed})", "k_s = k/m", "kNN@20", "best conv probe", "fc7 probe",
                *CLUS, rule=True)
    for k in a.k_sweep:  # the paper's Figure 1 varies k
        r = checked(f"deepercluster_s{seed}" if k == a.k else f"ksweep_k{k}")
        lines += row(k, k // a.m, pct(r["knn20"]), pct(r["probe_best"]), pct(r["probe_fc7"]),
                     scores(r)) if r else []
    if len(lines) > 2:
        common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "k_sweep.md"))
        print("\n".join(lines), flush=True)
    lines = row(f"variant (seed {seed})", "flags", "kNN@20", "best conv probe (layer)",
                "conv13 probe", "fc7 probe", *CLUS, rule=True)
    main = (["(the main table's run)"],) * 2
    runs = [("baseline", f"deepercluster_s{seed}", f"random_s{seed}", main)]
    runs += [(v, f"variant_{v}", f"variant_{v}_random", variant_flags(a, v)) for v in VARIANTS]
    for v, run, rnd, (f02, f04) in runs:  # each variant and its own untrained reference, if any
        r = checked(run)
        lines += row(v, f"`{' '.join(f04 if f02 == f04 else f02 + f04)}`", *cells(r)) if r else []
        r = checked(rnd)
        lines += row(f"{v}, random init", f"`{' '.join(f02)}`", *cells(r)) if r else []
    # More seeds of a variant (--variant_seeds): each next to the main table's runs of its own seed
    for n in names:
        if n.startswith("variant_") and (t := n.rsplit("_", 1)[-1])[1:].isdigit() and t[0] == "s":
            v, s = n[len("variant_"):].rsplit("_s", 1)
            res, ref, rnd = load(n), load(f"deepercluster_s{s}"), load(f"random_s{s}")
            for label, r in ((f"{v}, seed {s}", res), (f"baseline, seed {s}", ref),
                             (f"random init, seed {s}", rnd)):
                if r is not None and v in VARIANTS and res is not None:
                    lines.append(f"| {label} | | " + " | ".join(cells(summary(r))) + " |")
    base = [summary(r) for r in rows.get("deepercluster", [])]
    if len(base) > 1:  # the yardstick for a one-seed variant: how much the baseline moves by seed
        get = dict(ACC, **{"conv13 probe": lambda r: r["layers"].get("13") or 0})
        sd = ", ".join(f"{c} {pct(float(np.std([get[c](r) for r in base], ddof=1)))}"
                       for c in ("kNN@20", "best conv probe", "conv13 probe", "fc7 probe"))
        lines += ["", f"Seed-to-seed spread of the baseline ({len(base)} seeds of the main table's "
                  f"deepercluster, sample std, points): {sd}. A one-seed variant that differs from "
                  "the baseline by less than about twice that is within noise."]
    if any(x.startswith("| ") and not x.startswith(("| baseline", "| variant")) for x in lines):
        common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "variants.md"))
        print("\n".join(lines), flush=True)


def collect(a):
    """All tables and figures from the runs finished so far (each run's 05_eval.json)."""
    def load(name):
        f = os.path.join(a.results, "runs", name, "05_eval.json")
        return json.load(open(f)) if os.path.exists(f) else None
    runs = os.path.join(a.results, "runs")  # every finished run, whatever this call was asked for
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
    rows = {m: [r for r in (load(n) for n in names if n.rsplit("_s", 1)[0] == m) if r]
            for m in METHODS}
    if any(rows.values()):
        write_table(a, {m: r for m, r in rows.items() if r})
    scaling_table(a, load, names)
    one_seed_tables(a, load, names, rows)


if __name__ == "__main__":
    main()
