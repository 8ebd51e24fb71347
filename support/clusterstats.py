"""Numbers about a clustering: the flat cluster id, NMI (Eq. (18)) and ARI, and 03_kmeans.py's
diagnostics of a round (sizes, NMI against the previous round and the labels). Plumbing: 03, 04,
05 and scripts/clusters.py read clusters through these, so there is one id formula and one NMI.

Paper:  PAPER.md §9.3 Eq. (18) (NMI with the geometric mean), §4.4 (empty clusters)
"""
import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def flat_ids(super_, sub, k_s=None):
    """The flat cluster id u * k_s + z (int64 numpy) of every image; k_s default max z + 1 (any
    one-to-one map of the (u, z) pairs gives the same NMI and ARI)."""
    super_, sub = np.asarray(super_, np.int64), np.asarray(sub, np.int64)
    k_s = int(sub.max()) + 1 if k_s is None else int(k_s)
    return super_ * k_s + sub


# Eq. (18)  NMI(A, B) = I(A; B) / √(H(A)·H(B)), the geometric mean (not scikit-learn's default)
def nmi(a, b):
    return float(normalized_mutual_info_score(a, b, average_method="geometric"))


def agreement(flat, labels):
    """NMI and ARI (0 = chance, 1 = the classes) of flat cluster ids against the labels."""
    return {"nmi": nmi(labels, flat), "ari": float(adjusted_rand_score(labels, flat)),
            "n_clusters": len(np.unique(flat))}


# ---- 03_kmeans.py's diagnostics of one round ----
def diagnostics(res, labels=None, prev=None):
    """Sizes of the k = m·k_s clusters, res["stats"], NMI against prev and the labels. res, prev: a
    cluster()/two_level dict or a 03_kmeans.npz (super, sub, k_s)."""
    flat = flat_ids(res["super"], res["sub"], res["k_s"])
    m = len(res["centroids_super"])
    sizes = np.bincount(flat, minlength=m * res["k_s"])
    out = {"n_images": len(flat), "k": len(sizes), "m": m, "k_s": res["k_s"], **res["stats"]}
    out["sizes"] = {"min": int(sizes.min()), "median": float(np.median(sizes)),
                    "max": int(sizes.max()), "n_empty": int((sizes == 0).sum())}
    if prev is not None:  # stability between consecutive rounds; None when N changed
        p = flat_ids(prev["super"], prev["sub"], prev["k_s"])
        out["nmi_prev"] = nmi(p, flat) if len(p) == len(flat) else None
    if labels is not None:  # quality against the true classes
        out |= {"nmi_labels": nmi(labels, flat), "ari_labels": adjusted_rand_score(labels, flat)}
    return out


def summary(dg):
    """03_kmeans.py's one-line summary of a clustering round."""
    nan = float("nan")
    obj = dg["objective"] or dg["objective_sub"] or [nan]
    nmis = [nan if dg.get(key) is None else dg[key] for key in ("nmi_labels", "nmi_prev")]
    return (f"03_kmeans: N {dg['n_images']} | k {dg['k']} = m {dg['m']} x k_s {dg['k_s']} | "
            f"objective {obj[0]:.4f} -> {obj[-1]:.4f} | empty split {dg['n_empty_split']} | "
            f"sizes {dg['sizes']['min']}..{dg['sizes']['max']} | NMI labels {nmis[0]:.3f} | "
            f"NMI prev {nmis[1]:.3f} | {dg['seconds_features'] + dg['seconds_kmeans']:.1f} s")
