"""04_train.py's log: the progress bar's text, one JSON line per epoch (04_train_log.jsonl), the
curves (04_train_curves.png). Plumbing a first reader skips; the metrics themselves (the losses and
accuracies of Eq. (8)-(9)) are named beside 02_model.hierarchical_loss (TRAIN_KEYS).
"""
import json
import os

from support import common


def clustering_stats(dg, seconds):
    """The numbers of one clustering round (03's diagnostics) that go in the epoch's log line."""
    out = {key: None if dg.get(key) is None else float(dg[key])
           for key in ("nmi_prev", "nmi_labels", "ari_labels")}
    return out | {"n_empty": int(dg["n_empty_split"]), "cluster_min": dg["sizes"]["min"],
                  "cluster_max": dg["sizes"]["max"], "cluster_seconds": seconds}


def progress(means, n, seconds):
    """The progress bar's text: means {TRAIN_KEYS: value} over the n images of `seconds`."""
    return (f"loss {means['loss']:.3f} (super {means['loss_super']:.3f} sub "
            f"{means['loss_sub']:.3f}) acc joint {means['acc_joint']:.1%} "
            f"{n / max(seconds, 1e-9):.0f} img/s")


def epoch_line(epoch, means, n, seconds, round_stats, lr):
    """The epoch's JSON line (printed too): means of the metrics, the round's clustering numbers,
    seconds (training + clustering) and images/s (training alone)."""
    line = {"epoch": epoch, **means}
    for key in ("nmi_prev", "nmi_labels", "ari_labels", "n_empty", "cluster_min", "cluster_max"):
        line[key] = round_stats.get(key)
    line["seconds"] = seconds + round_stats.get("cluster_seconds", 0.0)
    line["images_per_s"] = float(n) / max(seconds, 1e-9)
    line["lr"] = lr
    nmi = "" if line["nmi_labels"] is None else f" | NMI labels {line['nmi_labels']:.3f}"
    common.log(f"epoch {epoch} | loss {line['loss']:.3f} (super {line['loss_super']:.3f} sub "
               f"{line['loss_sub']:.3f}) | acc super {line['acc_super']:.1%} sub "
               f"{line['acc_sub']:.1%} joint {line['acc_joint']:.1%}{nmi} | "
               f"{line['seconds']:.1f} s, {line['images_per_s']:.0f} img/s")
    return line


def write_log(metrics, out_dir):
    """04_train_log.jsonl, rewritten from the checkpoint's metrics (a resume repeats no line)."""
    if not common.is_main():
        return
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    common.save_text(text, os.path.join(out_dir, "04_train_log.jsonl"))
    plot_curves(metrics, os.path.join(out_dir, "04_train_curves.png"))


def plot_curves(metrics, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("loss", "loss_super", "loss_sub"), ("acc_super", "acc_sub", "acc_joint"),
              ("nmi_prev", "nmi_labels", "ari_labels")]
    titles = ("Eq. (8) loss", "training accuracy, Eq. (9)", "clustering")
    for ax, keys, title in zip(axes, panels, titles):
        for key in keys:
            pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:  # rotnet and supervised runs have no clustering panel to label
            ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=80)
