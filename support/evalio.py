"""05_eval.py's plumbing, which a first reader of the paper skips. 05 holds the evaluation protocol
(§9.1 probes, §9.3 kNN / NMI, §9.2 VOC07) and a short main(); this file holds the rest:
- inputs: the flag checks (one-line errors before any work), the VOCdevkit files (labels and
  images of PASCAL VOC 2007), the checkpoints (ours or official, each read once, with the Sobel
  check of §11 pitfall 7), the labelled center crops (05 passes 01's clustering view), and the
  memory budget that splits the probed layers into trunk passes;
- outputs: one summary row per checkpoint (the keys scripts/reproduce.py reads from 05_eval.json),
  the per-layer and summary tables of 05_eval.md, and the figures 05_eval_layers.png and
  05_eval_clusters.png.
Uses:   support.sources.make_source, support.interop (02's trunk from any checkpoint).
"""
import os
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from support import common, interop
from support.sources import make_source


# ---- inputs: flags, VOC07 files, checkpoints (ours or official), the labelled sources ----
# 05's numeric flags: counts >= 1, sizes and rates >= 0, learning rates and tau > 0
AT_LEAST_1 = ("probe_epochs", "probe_batch", "voc_iters", "voc_stepsize_fc68", "voc_stepsize_all",
              "voc_batch", "voc_crops", "batch_size")
AT_LEAST_0 = ("train_subset", "test_subset", "probe_wd", "clusters_grid", "voc_wd_fc68",
              "voc_wd_all", "voc_image_size", "workers", "seed")
POSITIVE = ("probe_lr", "knn_tau", "voc_lr", "feature_gb")


def parse_layers(spec, flag="--layers"):
    named = {"best": "2,4,7,10,13,fc7", "all": "1,2,3,4,5,6,7,8,9,10,11,12,13,fc7", "none": ""}
    layers = [l.strip() for l in named.get(spec, spec).split(",") if l.strip()]
    if not all(l == "fc7" or l.isdigit() and 1 <= int(l) <= 13 for l in layers):
        raise common.UserError(f"{flag} {spec}: use best, all, none or a comma list of 1..13, fc7")
    return [l if l == "fc7" else int(l) for l in layers]


def check_flags(cfg, voc_pairs):
    """Every flag of 05, before any work: a one-line error naming it. voc_pairs: {train split: test
    split} (PAPER.md §9.2). -> (layers, knn layers, ks, VOC root)."""
    common.check_ranges(cfg, AT_LEAST_1, AT_LEAST_0, positive=POSITIVE,
                        choices={"sobel": ("auto", "on", "off"),
                                 "voc_mode": ("fc6-8", "all", "both"),
                                 "voc_train_split": tuple(voc_pairs)})  # (train -> test split)
    if 0 < cfg.voc_image_size < 32:
        raise common.UserError(f"--voc_image_size {cfg.voc_image_size}: use 0 (the checkpoint's) "
                               f"or >= 32, so that conv13 keeps a 2x2 map for pool5")
    if not all(k.strip().isdigit() and int(k) > 0 for k in cfg.knn_k.split(",")):
        raise common.UserError(f"--knn_k {cfg.knn_k}: use positive integers, e.g. 20,200")
    knn_layers = parse_layers(cfg.knn_layer, "--knn_layer")
    if not knn_layers:
        raise common.UserError(f"--knn_layer {cfg.knn_layer}: give fc7 or 1..13, or a comma list")
    root = os.path.expanduser(cfg.voc[8:]) if cfg.voc.startswith("voc2007:") else ""
    if cfg.voc and not os.path.isdir(os.path.join(root, "JPEGImages")):
        raise common.UserError(f"--voc {cfg.voc}: expected voc2007:PATH, PATH/JPEGImages and "
                               f"PATH/ImageSets/Main")
    for split in [cfg.voc_train_split, voc_pairs[cfg.voc_train_split]] if root else []:
        parse_voc(root, split)  # both splits' label files, read now rather than after the probes
    ks = [int(k) for k in cfg.knn_k.split(",")]
    return parse_layers(cfg.layers), knn_layers, ks, root


# PASCAL VOC 2007's files: the VOCdevkit layout (PATH/JPEGImages, PATH/ImageSets/Main)
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor"]


def parse_voc(root, split):
    """(ids [N], targets (N, 20) int64): the files' 1 / -1 / 0 -> 1 / 0 / -1 (difficult)."""
    ids, cols = None, []
    for c in VOC_CLASSES:
        path = os.path.join(root, "ImageSets", "Main", f"{c}_{split}.txt")
        if not os.path.exists(path):
            raise common.UserError(f"{path} is missing: --voc voc2007:PATH expects PATH/JPEGImages "
                                   f"and PATH/ImageSets/Main/<class>_{split}.txt")
        rows = dict(line.split()[:2] for line in open(path) if line.strip())  # {"000005": "-1"}
        ids = ids or list(rows)
        if set(rows) != set(ids):
            raise common.UserError(f"{path} lists other images than {VOC_CLASSES[0]}_{split}.txt")
        cols.append([int(rows[i]) for i in ids])
    t = np.array(cols, dtype=np.int64).T  # (N, 20) in {1, -1, 0}
    return ids, np.where(t == 1, 1, np.where(t == -1, 0, -1))


class VOCSource(torch.utils.data.Dataset):
    """voc[j] -> (PIL image, targets (20,) in {1, 0, -1}) for one split of a VOCdevkit folder."""
    def __init__(self, root, split, crop_size=0):
        self.root, self.crop_size = root, crop_size
        self.ids, self.targets = parse_voc(root, split)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, j):
        with Image.open(os.path.join(self.root, "JPEGImages", self.ids[j] + ".jpg")) as img:
            if self.crop_size:  # small crops: the JPEG decoder downscales, keeping >= 4x the crop
                img.draft("RGB", (4 * self.crop_size, 4 * self.crop_size))
            return img.convert("RGB"), torch.as_tensor(self.targets[j])


def load_checkpoint(path, sobel):
    """(model, meta). The checkpoint's arch decides Sobel; a --sobel that disagrees is an error."""
    if not os.path.exists(path):
        stage = next((f"{s}.py" for s in ("04_train", "02_model") if s in path), "its stage")
        raise common.UserError(f"{path} does not exist: run {stage} first (or pass --ckpt)")
    ck = interop.read_checkpoint(path)[0]  # read once: unreadable files fail here, named
    model, _ = interop.load_trunk(ck, name=path)  # ours or official
    if sobel != "auto" and (sobel == "on") != bool(model.sobel):
        raise common.UserError(f"--sobel {sobel}, but {path} was built with sobel={model.sobel}: "
                               f"drop --sobel or pass --sobel {'on' if model.sobel else 'off'}")
    ck = ck if ck.get("format") == common.FORMAT else {"stage": "official"}  # ours: config, ...
    cfg, stage = ck.get("config", {}), ck.get("stage", "official")
    method = {"02_model": "random init", "04_train": ck.get("method") or cfg.get("method", "?")}
    epoch = f" (epoch {ck['epoch']})" if stage == "04_train" and "epoch" in ck else ""
    return model, {"stage": stage, "method": method.get(stage, "official") + epoch, "config": cfg,
                   "super": ck.get("super"), "sub": ck.get("sub")}


def load_checkpoints(cfg):
    """(paths, [(model, meta)], labelled spec): --ckpt, else random init and trained from out_dir,
    all loaded and checked before any work; one labelled source for every checkpoint: --data, else
    the data a 04 checkpoint trained on, else fashion-mnist."""
    out = cfg.out_dir
    default = [f"{out}/02_model_init.pt", f"{out}/04_train_last.pt"]  # random init vs trained
    paths = [p for p in cfg.ckpt.split(",") if p] or [p for p in default if os.path.exists(p)]
    if not paths:
        raise common.UserError(f"no checkpoint in {out}: run 02_model.py and 04_train.py "
                               f"--out_dir {out}, or pass --ckpt")
    loaded = [load_checkpoint(path, cfg.sobel) for path in paths]
    specs = [m["config"]["data"] for _, m in loaded if "data" in m["config"]]
    return paths, loaded, cfg.data or (specs + ["fashion-mnist"])[0]


def labelled_inputs(spec, image_size, cfg, view, device="cpu"):
    """Center crops (view: 01's clustering view, a Dataset class), batched, and labels of seeded
    train/test subsets; None without a labelled test split. Crops kept in memory when small
    (reused by every checkpoint); for a CUDA `device` in pinned memory (copies overlap compute)."""
    tr = make_source(spec, "train", subset=cfg.train_subset or None, seed=cfg.seed)
    try:
        te = make_source(spec, "test", subset=cfg.test_subset or None, seed=cfg.seed)
    except common.UserError as e:  # e.g. an unlabelled folder or yfcc100m
        common.log(f"{spec}: no test split ({e}): no probes, no kNN")
        return None
    if tr.labels is None or te.labels is None:
        common.log(f"{spec} has no labels: no probes, no kNN")
        return None
    ins = {"source": tr, "y_tr": torch.as_tensor(tr.labels), "y_te": torch.as_tensor(te.labels)}
    small = (len(tr) + len(te)) * 3 * image_size ** 2 * 4 < 1.5e9  # bytes of the crops
    for key, src in (("b_tr", tr), ("b_te", te)):
        crops = torch.utils.data.DataLoader(view(src, image_size), cfg.batch_size,
                                            num_workers=cfg.workers,
                                            pin_memory=torch.device(device).type == "cuda")
        ins[key] = list(crops) if small else crops
    return ins


def clustered_source(meta, spec):
    """The images a 04 checkpoint's last clusters were made on (its data, subset and seed)."""
    c = meta["config"]
    return make_source(c.get("data", spec), "train", c.get("subset") or None, c.get("seed", 0))


def layer_chunks(dims, n, budget=1.5e9):
    """The layers, split into trunk passes whose cached features (n x D float32 each) fit in
    `budget` bytes: one pass for most runs (the demo's 6 layers on 20k images need 2)."""
    chunks = [[]]
    for l, d in dims.items():
        if chunks[-1] and 4 * n * (d + sum(dims[m] for m in chunks[-1])) > budget:
            chunks.append([])
        chunks[-1].append(l)
    return chunks


# ---- outputs: one row per checkpoint, the two tables, the figures ----
def summary_row(r):
    """The headline numbers of one checkpoint (fractions in [0, 1]; None when not measured)."""
    probe, knn, cl = r.get("probe", {}), r.get("knn", {}), r.get("clusters", {})
    convs = {l: v["acc"] for l, v in probe.items() if l != "fc7"}
    best = max(convs, key=convs.get) if convs else None
    return {"checkpoint": r["name"], "method": r["method"], "knn20": knn.get("20"),
            "knn200": knn.get("200"), "probe_best": convs.get(best), "probe_best_layer": best,
            "probe_fc7": probe.get("fc7", {}).get("acc"), "nmi_labels": cl.get("nmi"),
            "probe_layers": {l: v["acc"] for l, v in probe.items()}, "ari_labels": cl.get("ari"),
            "voc_map": {m: v["map"] for m, v in r.get("voc", {}).items()}}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def layer_name(l):
    return "fc7" if l == "fc7" else f"conv{l}"


def layer_keys(probe_layers):
    """Probed layers shallow to deep ("2", ..., "13", "fc7") and their names (conv2, ..., fc7)."""
    keys = sorted(probe_layers, key=lambda l: 99 if l == "fc7" else int(l))
    return keys, [layer_name(k) for k in keys]


def results_tables(rows, cfg, spec, sizes):
    """Probe top-1 % per layer, with each later checkpoint minus the first (in the demo: trained
    minus random init, at every depth); then kNN, clusters and VOC07 in a short summary."""
    text = f"Top-1 % on the {spec} test split ({sizes[1]} images).\n\n"
    probed = [w for w in rows if w["probe_layers"]]
    if probed:
        keys, names = layer_keys(probed[0]["probe_layers"])
        accs = lambda w: [w["probe_layers"].get(k) for k in keys] + [w["probe_best"]]
        lines = [[w["checkpoint"], w["method"]] + [pct(a) for a in accs(w)] for w in probed]
        for line, w in zip(lines, probed):
            line[-1] += f" ({layer_name(w['probe_best_layer'])})" if w["probe_best_layer"] else ""
        for w in probed[1:]:
            diff = [f"{100 * (a - b):+.1f}" if None not in (a, b) else "-"
                    for a, b in zip(accs(w), accs(probed[0]))]
            lines.append([f"{w['checkpoint']} minus {probed[0]['checkpoint']}", "-"] + diff)
        header = ["checkpoint", "method"] + names + ["best conv"]
        text += "Linear probe per layer (§9.1):\n\n" + markdown(header, lines) + "\n\n"
    voc = [m for m in ("fc6-8", "all") if any(m in w["voc_map"] for w in rows)]
    lines = [[w["checkpoint"], w["method"], pct(w["knn20"]), pct(w["knn200"])]
             + ["-" if w[k] is None else f"{w[k]:.3f}" for k in ("nmi_labels", "ari_labels")]
             + [pct(w["voc_map"].get(m)) for m in voc] for w in rows]
    header = ["checkpoint", "method", "kNN@20", "kNN@200", "NMI vs labels", "ARI"]
    header += [f"VOC07 mAP {m}" for m in voc]
    text += "Summary (§9.3, §9.2):\n\n" + markdown(header, lines)
    return text + (f"\n\nProbes: {cfg.probe_epochs} epochs, lr0 {cfg.probe_lr}, {sizes[0]} train "
                   f"images, {'random' if cfg.probe_aug else 'cached center'} crops. kNN on "
                   f"{cfg.knn_layer}, tau {cfg.knn_tau}. NMI (Eq. (18)) and ARI: the last clusters "
                   f"u*k_s+z vs the classes.\n")


def plot_layers(rows, path):
    """Probe top-1 per layer, one line per checkpoint: the paper's per-layer view, small scale."""
    fig, ax = common.pyplot().subplots(figsize=(7, 3.5))
    for w in (w for w in rows if w["probe_layers"]):
        keys, names = layer_keys(w["probe_layers"])
        ax.plot(names, [100 * w["probe_layers"][k] for k in keys], "o-",
                label=f"{w['checkpoint']} ({w['method']})")
    ax.set(ylabel="linear probe top-1 (%)", title="linear probe per layer (PAPER.md §9.1)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=100)


@torch.no_grad()
def cluster_grid(source, ds, flat, path, n_clusters, phi, per_row=8, seed=0):
    """The n largest clusters, one per row: the members whose phi (the features phi(x) of a batch
    x of center crops ds[n][0], (n, d)) is nearest (cosine) the mean."""
    ids, sizes = np.unique(flat, return_counts=True)
    top = ids[np.argsort(-sizes, kind="stable")[:n_clusters]]
    rng = np.random.default_rng(seed)
    fig, axes = common.pyplot().subplots(len(top), per_row,
                                         figsize=(per_row * 1.1, len(top) * 1.25), squeeze=False)
    for row, c in zip(axes, top):
        members = np.flatnonzero(flat == c)
        title = f"cluster {c}, n={len(members)}"
        if source.labels is not None and source.classes:
            maj = np.bincount(source.labels[members]).argmax()
            title += f": {(source.labels[members] == maj).mean():.0%} {source.classes[maj]}"
        members = np.sort(rng.choice(members, min(len(members), 256), replace=False))  # seeded
        x = torch.stack([ds[int(n)][0] for n in members])  # (n, 3, S, S)
        f = F.normalize(phi(x), dim=1)  # (n, d)
        near = members[(f @ F.normalize(f.mean(0), dim=0)).argsort(descending=True)[:per_row]]
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(near):
                ax.imshow(source[int(near[j])][0])
        row[0].set_title(title, fontsize=7, loc="left")
    fig.suptitle(f"the {len(top)} largest clusters: members nearest the mean fc7", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)
    common.log(f"wrote {path}")


def write_outputs(results, inputs, cfg, spec):
    """05_eval.json (every number and its settings), 05_eval.md (the two tables) and the layers
    plot in cfg.out_dir. -> (paths written, the tables' text)."""
    out = cfg.out_dir
    rows = [summary_row(r) for r in results]
    ins = next((i for i in inputs.values() if i), None)
    sizes = (len(ins["y_tr"]), len(ins["y_te"])) if ins else ("-", "-")  # (train, test) images
    table = results_tables(rows, cfg, spec, sizes)
    result = {"config": asdict(cfg), "rows": rows, "results": results}
    written = [common.save_json(result, f"{out}/05_eval.json")]
    written.append(common.save_text(table, f"{out}/05_eval.md"))
    if any(w["probe_layers"] for w in rows):
        plot_layers(rows, f"{out}/05_eval_layers.png")
        written.append(f"{out}/05_eval_layers.png")
    return written, table
