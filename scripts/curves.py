"""Learning curves: accuracy against images seen, per method, random init as a reference line.

Paper:  PAPER.md §8 ("at small scale it takes time": the one published DeepCluster curve), §9.
Reads:  nothing; runs the numbered stages as subprocesses, exactly as a user would type them.
Writes: <results>/runs/<run>/...     02's init, 04's log, 04_train_last.pt (to extend the run),
                                     eval_seen<N>/05_eval.json (the evaluation at N images seen)
        <results>/curves.md, .json   one row per (run, images seen): mean ± std over seeds
        <results>/curves.png         the curves, images seen on a log axis
Run:    python scripts/curves.py --data folder:data/tiny-imagenet --max_seen 1000000 --seeds 0 1 2
        python scripts/curves.py --data folder:data/tiny-imagenet --max_seen 4000000 --seeds 0
        python scripts/curves.py --methods --knobs deepercluster:lr0.0125=--lr=0.0125
A run trains to --max_seen images (04 resumes from its last checkpoint, so a later call with a
larger --max_seen extends the same run) and keeps 04_train_seen<N>.pt at each --points value on the
way; each kept checkpoint is evaluated once, then deleted. Kill and restart at will; it runs what
it is asked (--methods, --seeds, --knobs) and no more. The evaluation: kNN@20/200 on fc7 and on
--knn_mid over the whole labelled training set; linear probes on --probe_layers over the same
images ("probe mid": the mean over the probed conv layers below conv13).
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from support import common  # noqa: E402  (atomic writes)

PY = sys.executable
METHODS = ("random", "rotnet", "deepcluster", "deepercluster", "supervised")
# The settings every run of a results folder shares (settings.json): one budget, one protocol.
SHARED = ["data", "image_size", "width", "batch_size", "epoch_size", "k", "m", "pca_dim",
          "model_flags", "train_flags", "probe_layers", "knn_mid", "probe_epochs"]


def parse_knob(text):
    """'deepercluster:lr=--lr=0.0125 --crop_min=0.5' -> (method, name, [flags]): a knob run."""
    try:
        method, rest = text.split(":", 1)
        name, flags = rest.split("=", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--knobs {text!r}: use METHOD:NAME=FLAGS, e.g. "
                                         f"deepercluster:lr=--lr=0.0125") from None
    if method not in METHODS[1:] or not name.replace("_", "").replace(".", "").isalnum():
        raise argparse.ArgumentTypeError(f"--knobs {text!r}: METHOD in {METHODS[1:]}, NAME of "
                                         f"letters, digits, '.' and '_'")
    return method, name, [f for x in shlex.split(flags) for f in x.split("=", 1)]


def sh(cmd, log, threads):
    """One stage, its output appended to the run's log; a failure stops with the log's tail."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log} (tail) ---\n"
                         + open(log).read()[-3000:])


def run_name(method, seed, knob=None):
    return f"{method}{'-' + knob if knob else ''}_s{seed}"


def one_run(a, method, seed, knob=None, flags=()):
    """02 (once) -> 04 up to --max_seen -> 05 on every kept checkpoint not yet evaluated."""
    d = os.path.join(a.results, "runs", run_name(method, seed, knob))
    os.makedirs(d, exist_ok=True)
    log, t = os.path.join(d, "stdout.log"), a.threads
    init = os.path.join(d, "02_model_init.pt")
    if not os.path.exists(init) and not os.path.exists(f"{d}/eval_seen0/05_eval.json"):
        sh([PY, "02_model.py", "--out_dir", d, "--width", str(a.width), "--image_size",
            str(a.image_size), "--seed", str(seed)] + a.model_flags, log, t)
    points = [p for p in a.points if p <= a.max_seen]
    if method == "random":
        todo = [(0, init)]
    else:
        # an epoch is E // B whole batches (04 drops the last partial one): 99,968 of 100,000
        epochs = math.ceil(a.max_seen / (a.epoch_size // a.batch_size * a.batch_size))
        done = os.path.join(d, "04_train_log.jsonl")
        trained = len(open(done).read().splitlines()) if os.path.exists(done) else 0
        if trained < epochs:  # 04 resumes from 04_train_last.pt; --epochs only says where to stop
            sh([PY, "04_train.py", "--out_dir", d, "--method", method, "--data", a.data,
                "--subset", "0", "--image_size", str(a.image_size), "--seed", str(seed),
                "--epochs", str(epochs), "--epoch_size", str(a.epoch_size), "--batch_size",
                str(a.batch_size), "--k", str(a.k), "--super_clusters", str(a.m), "--pca_dim",
                str(a.pca_dim), "--keep_every", "0", "--keep_seen", ",".join(map(str, points))]
               + a.train_flags + list(flags), log, t)
        todo = [(p, os.path.join(d, f"04_train_seen{p}.pt")) for p in points]
    for seen, ckpt in todo:
        out = os.path.join(d, f"eval_seen{seen}")
        if os.path.exists(os.path.join(out, "05_eval.json")) or not os.path.exists(ckpt):
            continue
        layers = ",".join(map(str, a.probe_layers))
        sh([PY, "05_eval.py", "--out_dir", out, "--ckpt", ckpt, "--data", a.data, "--seed",
            str(seed), "--layers", layers, "--knn_layer", f"fc7,{a.knn_mid}", "--train_subset", "0",
            "--test_subset", "0", "--probe_epochs", str(a.probe_epochs), "--clusters_grid", "0"]
           + a.eval_flags, log, t)
        if seen:  # the curve's point is evaluated; 04_train_last.pt stays to extend the run
            os.remove(ckpt)
    return d


# ---- the curves: read every eval_seen<N>/05_eval.json ----
def point(res):
    """The numbers of one evaluated checkpoint (fractions)."""
    r = res["results"][0]
    probe = {k: v["acc"] for k, v in r.get("probe", {}).items()}
    knn = r.get("knn_layers", {})
    mid = [probe[l] for l in probe if l not in ("fc7", "13")]
    loss = {k: v.get("loss_last") for k, v in r.get("probe", {}).items()}  # the probe's last batch
    return {"knn20": knn.get("fc7", {}).get("20"), "knn200": knn.get("fc7", {}).get("200"),
            "knn20_mid": next((v.get("20") for k, v in knn.items() if k != "fc7"), None),
            "probe_mid": float(np.mean(mid)) if mid else None, "probe13": probe.get("13"),
            "probe_fc7": probe.get("fc7"), "probes": probe, "loss": loss}


COLS = [("kNN@20 fc7", "knn20"), ("kNN@200 fc7", "knn200"), ("kNN@20 mid", "knn20_mid"),
        ("probe mid (mean)", "probe_mid"), ("probe conv13", "probe13"), ("probe fc7", "probe_fc7")]


def collect(a):
    """curves.json / curves.md / curves.png from every evaluated point so far."""
    runs = os.path.join(a.results, "runs")
    pts = {}  # kind (method or method-knob) -> {seen: {seed: point}}
    speed = {}  # kind -> [images/s of each epoch]
    for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        kind, seed = name.rsplit("_s", 1)
        for e in sorted(os.listdir(os.path.join(runs, name))):
            f = os.path.join(runs, name, e, "05_eval.json")
            if e.startswith("eval_seen") and os.path.exists(f):
                p = point(json.load(open(f)))
                pts.setdefault(kind, {}).setdefault(int(e[9:]), {})[int(seed)] = p
        log = os.path.join(runs, name, "04_train_log.jsonl")
        if os.path.exists(log):
            speed.setdefault(kind, []).extend(json.loads(x)["images_per_s"] for x in open(log))
    if not pts:
        return
    as_json = {k: {str(s): v for s, v in p.items()} for k, p in pts.items()}
    common.save_text(json.dumps(as_json, indent=1), os.path.join(a.results, "curves.json"))
    write_table(a, pts, speed)
    plot(a, pts)


def cell(vals):
    vals = [100 * v for v in vals if v is not None]
    if not vals:
        return "–"
    r = lambda x: round(float(x), 1) + 0.0  # noqa: E731  (+ 0.0: a difference of 0 prints 0.0, not -0.0)
    if len(vals) == 1:
        return f"{r(vals[0]):.1f}"
    return f"{r(np.mean(vals)):.1f} ± {r(np.std(vals, ddof=1)):.1f}"


def paired(pts):
    """{kind: {seen: {seed: {key: point - random init's point of the same seed}}}} for every trained
    run whose seed has a random-init point; a key missing on either side is None."""
    rnd = pts.get("random", {}).get(0, {})
    out = {}
    for kind, by_seen in pts.items():
        if kind == "random":
            continue
        for seen, seeds in by_seen.items():
            for seed, p in seeds.items():
                if seed in rnd:
                    out.setdefault(kind, {}).setdefault(seen, {})[seed] = {
                        key: (None if p.get(key) is None or rnd[seed].get(key) is None
                              else p[key] - rnd[seed][key]) for _, key in COLS}
    return out


def write_table(a, pts, speed):
    mid = ",".join(str(l) for l in a.probe_layers if str(l) not in ("13", "fc7"))
    lines = [f"# Learning curves on `{a.data}` ({a.image_size} px, width {a.width}, batch "
             f"{a.batch_size}, k = {a.k}, m = {a.m})", "",
             f"Top-1 % on the labelled test split, mean ± sample std over seeds. kNN: weighted "
             f"vote over the whole training set (τ = 0.07), on fc7 and on conv{a.knn_mid} "
             f"(\"mid\"); probes: one linear layer on frozen features, {a.probe_epochs} epochs "
             f"over "
             f"every labelled training image; \"probe mid\" is the mean over conv{mid}. Random "
             f"init is the untrained trunk (0 images seen).", "",
             "| run | images seen | seeds | " + " | ".join(c for c, _ in COLS)
             + " | train images/s |", "|---|---|---|" + "---|" * (len(COLS) + 1)]
    rank = lambda k: METHODS.index(k.split("-")[0]) if k.split("-")[0] in METHODS else 9  # noqa
    order = sorted(pts, key=lambda k: (rank(k), k))
    for kind in order:
        ips = f"{np.mean(speed[kind]):.0f}" if speed.get(kind) else "–"
        for seen in sorted(pts[kind]):
            seeds = pts[kind][seen]
            cells = [cell([p[key] for p in seeds.values()]) for _, key in COLS]
            lines.append(f"| {kind} | {seen:,} | {len(seeds)} | " + " | ".join(cells)
                         + f" | {ips} |")
    diff = paired(pts)
    if diff:
        lines += ["", "Difference to random init of the same seed, in points (each run starts from the "
                  "random trunk of its own seed: the paired gain; mean ± sample std over the seeds that "
                  "have both):", "", "| run | images seen | seeds | "
                  + " | ".join(c for c, _ in COLS) + " |", "|---|---|---|" + "---|" * len(COLS)]
        for kind in order:
            for seen in sorted(diff.get(kind, {})):
                d = diff[kind][seen]
                lines.append(f"| {kind} | {seen:,} | {len(d)} | "
                             + " | ".join(cell([v[key] for v in d.values()]) for _, key in COLS) + " |")
    layers = [str(x) for x in a.probe_layers]  # the probes' own training loss: a collapsed layer
    lines += ["", "Linear probes' training loss (last batch, mean over seeds; lower = the probe "
              "fits its training images better, by separating the classes or by memorising them):",
              "",
              "| run | images seen | " + " | ".join(f"conv{x}" if x != "fc7" else x for x in layers)
              + " |", "|---|---|" + "---|" * len(layers)]
    for kind in order:
        for seen in sorted(pts[kind]):
            loss = [[p["loss"].get(x) for p in pts[kind][seen].values()] for x in layers]
            loss = [f"{np.mean([v for v in ls if v is not None]):.2f}" if any(ls) else "–"
                    for ls in loss]
            lines.append(f"| {kind} | {seen:,} | " + " | ".join(loss) + " |")
    common.save_text("\n".join(lines) + "\n", os.path.join(a.results, "curves.md"))
    print("\n".join(lines), flush=True)


def plot(a, pts):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    shown = [c for c in COLS if c[1] in ("knn20", "knn20_mid", "probe_mid", "probe13", "probe_fc7")]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.5))
    for ax, (title, key) in zip(axes, shown):
        for kind in sorted(pts):
            if kind == "random":
                vals = [100 * p[key] for p in pts[kind].get(0, {}).values() if p[key] is not None]
                if vals:
                    ax.axhline(np.mean(vals), color="gray", ls="--", label="random init")
                continue
            xs, m, s = [], [], []
            for seen in sorted(pts[kind]):
                vals = [100 * p[key] for p in pts[kind][seen].values() if p[key] is not None]
                if vals:
                    xs.append(seen)
                    m.append(np.mean(vals))
                    s.append(np.std(vals) if len(vals) > 1 else 0.0)
            if xs:
                line = ax.plot(xs, m, "o-", ms=3, label=kind, lw=2 if "-" not in kind else 1)[0]
                ax.fill_between(xs, np.subtract(m, s), np.add(m, s), color=line.get_color(),
                                alpha=0.15)
        ax.set_xscale("log")  # ticks at the measured points: 250k, 500k, 1M, ...
        seen = sorted({n for kind in pts for n in pts[kind] if n > 0})
        ax.set_xticks(seen, [f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" for n in seen],
                      fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log")  # self-supervised runs at 1-10%, supervised far above: both readable
        lo, hi = ax.get_ylim()
        ticks = (0.5, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100)
        ax.set_yticks([v for v in ticks if lo <= v <= hi])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("images seen")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%, log scale)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels
    fig.suptitle(f"{a.data}: learning curves ({a.image_size} px, width {a.width}); band = ± std "
                 f"over seeds", fontsize=10)
    fig.tight_layout()
    tmp = os.path.join(a.results, "curves.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, os.path.join(a.results, "curves.png"))
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="folder:data/tiny-imagenet")
    p.add_argument("--results", default="", help="default results/<data name>-<image_size>")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max_seen", type=int, default=1_000_000, help="train each run this far")
    p.add_argument("--points", type=lambda s: [int(x) for x in s.split(",")],
                   default=[250_000, 500_000, 1_000_000, 2_000_000, 4_000_000],
                   help="curve points, images seen")
    p.add_argument("--knobs", type=parse_knob, nargs="*", default=[],
                   help="one-knob runs METHOD:NAME=FLAGS (seed: the first of --seeds), e.g. "
                        "deepercluster:lr0.0125=--lr=0.0125")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--epoch_size", type=int, default=100_000,
                   help="images per epoch (Tiny-ImageNet: N = 100,000)")
    p.add_argument("--k", type=int, default=1000, help="clusters over all super-clusters")
    p.add_argument("--m", type=int, default=4, help="super-clusters of DeeperCluster (S = 4m)")
    p.add_argument("--pca_dim", type=int, default=256)
    p.add_argument("--probe_layers", type=lambda s: s.split(","),
                   default=["4", "7", "10", "13", "fc7"])
    p.add_argument("--knn_mid", default="7", help="the mid conv layer of the second kNN")
    p.add_argument("--probe_epochs", type=int, default=10)
    for stage in ("model", "train", "eval"):
        p.add_argument(f"--{stage}_flags", type=shlex.split, default=[],
                       help=f"extra flags for every {stage} stage")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs threads")
    p.add_argument("--table_only", action="store_true")
    a = p.parse_args()
    a.threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0
    name = a.data.split(":")[-1].rstrip("/").split("/")[-1]  # folder:data/tiny-imagenet -> ...
    a.results = a.results or os.path.join(ROOT, "results", f"{name}-{a.image_size}")
    os.makedirs(a.results, exist_ok=True)
    settings = os.path.join(a.results, "settings.json")
    if os.path.exists(settings):
        old = json.load(open(settings))
        diff = {k: (old.get(k), getattr(a, k)) for k in SHARED if old.get(k) != getattr(a, k)}
        if diff:
            raise SystemExit(f"{a.results} holds runs made with other settings (old, new): {diff}")
    else:
        common.save_text(json.dumps({k: getattr(a, k) for k in SHARED}, indent=1), settings)
    if not a.table_only:
        tasks = [(m, s, None, ()) for s in a.seeds for m in a.methods]
        tasks += [(m, a.seeds[0], name, flags) for m, name, flags in a.knobs]
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(one_run, a, *t): t for t in tasks}
            try:
                for f in as_completed(futures):
                    print(f"== done: {f.result()} ({(time.time() - t0) / 60:.0f} min)", flush=True)
                    collect(a)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                collect(a)
                raise
    collect(a)


if __name__ == "__main__":
    main()
