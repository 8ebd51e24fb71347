"""The memory of one rank, on paper: what 04_train.py and 03_kmeans.cluster allocate at a given
scale, row by row, without building anything (PAPER.md §5.3, §4, §7).

plan(...) counts the bytes of each buffer from the code as written (the shapes below name the line
that allocates them) and combines them into the instants that matter: the end of a training
forward pass, the start of its backward pass, and the steps of a clustering round (feature
extraction, PCA sample gather, whitening, k-means level 1 and 2). A rank's peak is the largest
instant; the phases do not overlap because PyTorch's CUDA allocator hands its cached blocks back
and retries when an allocation fails. print_plan(cfg) prints the table for 04_train.py's flags
(`--plan`). The clustering round is counted for two versions of the code:
  today    03_kmeans.cluster and grouped.level2_in_groups as written (sharded clustering): each rank
           extracts only its shard n = N_img/N (fc7 n x d on the host, filled in place), the PCA
           sample P (pca_sample rows) is all-gathered once and fitted on rank 0's device, each
           rank whitens its shard on the device, k-means sums and E-steps go in chunks of rows,
           and the grouped layout moves to each rank only its share of one super-cluster;
  before   the code before sharded clustering, for the record: every rank gathered all N x d
           features, fitted the PCA on all N rows (04 had no --pca_sample), extracted at 04's
           global batch, copied x to float64 in the M-step, and the grouped layout gathered N x D.
Margins on CUDA for what no row counts: the allocator's reserve (RESERVE of every device instant:
the peaks compare with torch.cuda.max_memory_reserved), NCCL's buffers (COMM_BYTES a communicator)
and the CUDA context with the cuBLAS/cuDNN workspaces (overhead). tests/test_memory.py checks the
counts against torch (parameters, saved tensors) and the training step, the extraction forward and
03_kmeans.kmeans against peak memory measured on CPU; bench/gpu_check.sh, on a GPU.

Run:    python 04_train.py --plan ...   (04 calls print_plan(cfg))
        python -m scaleout.memory      (the paper's and DeepCluster's settings)
Uses:   VGG configuration D is repeated here (02_model.CFG_D, tested equal), so that plan() needs
        no torch; print_plan reads 02_model.method_shape, the init checkpoint (common.load_ckpt)
        and, for --subset 0, sources.make_source
"""
import importlib
import math
import os

GB = 1e9  # decimal gigabytes
# VGG configuration D (02_model.CFG_D): output channels of conv1..conv13, "M" a 2x2 max-pool
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
CHUNK = 2 ** 24  # 03_kmeans.CHUNK: values per temporary in its loops over chunks of rows
FAISS_TEMP = 1.5e9  # faiss-gpu's StandardGpuResources scratch memory on a large GPU (approx.)
RESERVE = 0.05  # CUDA caching allocator: reserved above allocated (rounding, split segments; est.)
COMM_BYTES = 0.3e9  # one NCCL communicator's buffers (channels x peers x NCCL_BUFFSIZE; estimate)


def channels(c, width):
    return max(1, round(c * width))  # 02_model.channels


# ---- the trunk (02_model.VGG) ----
def trunk_params(width, image_size, sobel, d):
    """-> (trainable parameters, other floats: BN running statistics + the frozen Sobel layer)."""
    c_in, train, other = 2 if sobel else 3, 0, (3 + 1 + 18 + 2 if sobel else 0)
    for v in CFG_D:
        if v != "M":
            c = channels(v, width)
            train += 9 * c_in * c + c + 2 * c  # conv weight + bias, BN weight + bias
            other += 2 * c  # BN running mean and variance (the batch counter is ignored)
            c_in = c
    p = (image_size + 2) // 32  # the grid after conv13: 224 px -> 7
    train += (c_in * p * p + 1) * d + (d + 1) * d  # fc6, fc7
    return train, other


def activations(width, image_size, sobel, B, d, act, mask):
    """Bytes that autograd saves for backward in one forward pass of the trunk at batch B; act: 4
    (fp32) or 2 (bf16 autocast), mask: bytes per dropout-mask element.
    Counted from the ops: conv saves its input; BN saves its input (the conv output) and two
    per-channel fp32 statistics; the in-place ReLU saves its output (BN's output, the next conv's
    or pool's input); a pool saves int64 indices, and its output is the next layer's saved input;
    fc6 saves pool5's output; ReLU(fc6) and dropout (mask + output, fc7's input) save B x d each.
    The Sobel layer is frozen and its input needs no gradient: it saves nothing."""
    H, c_in = image_size + 2, 2 if sobel else 3
    total = B * c_in * H * H * act  # conv1's input (B, 2 or 3, S+2, S+2)
    for v in CFG_D:
        if v == "M":
            H //= 2
            total += B * c_in * H * H * (8 + act)  # pool: indices + output
        else:
            c = channels(v, width)
            total += 2 * B * c * H * H * act + 2 * c * 4  # conv out, BN/ReLU out, BN statistics
            c_in = c
    return total + B * d * (2 * act + mask)  # ReLU(fc6), dropout output and mask


def eval_forward(width, image_size, sobel, B, device="cuda"):
    """Largest device memory of one no-grad fp32 forward (03_kmeans.extract_features): the batch x
    plus the largest input + output pair alive at once (conv -> BN at full resolution). On CPU a
    conv also writes its output once more (oneDNN's blocked layout, then a reorder: measured)."""
    conv_out = 2 if device == "cpu" else 1
    P, H = image_size, image_size + 2
    x = B * 3 * P * P * 4
    # Sobel: the padded image (3 channels) and its gray channel; RGB: the padded image
    pairs = [B * 4 * (P + 4) ** 2 * 4 if sobel else B * 3 * H * H * 4]
    c_in = 2 if sobel else 3
    for v in CFG_D:
        if v == "M":
            pairs.append(B * c_in * (H * H + (H // 2) ** 2) * 4)
            H //= 2
        else:
            c = channels(v, width)
            pairs.append(B * (c_in + conv_out * c) * H * H * 4)  # conv: in + out
            pairs.append(2 * B * c * H * H * 4)  # BN: in + out (the ReLU is in place)
            c_in = c
    return x + max(pairs)


# ---- the k-means of 03_kmeans.kmeans on n points of dimension D into k clusters ----
def kmeans_bytes(n, D, k, backend, chunked=True):
    """-> (E-step bytes, M-step bytes) of one kmeans() call beyond its input x (n, D) fp32.
    E-step, torch: a chunk of b = 2^24/max(k, D) rows gives the (b, k) distances, then (freed) the
    (b, D) square x*x; the labels and distances of all n (int64 + float64), twice while
    concatenated. E-step, faiss-gpu: faiss's scratch memory (outside torch's allocator; x and c are
    searched where they are) and its (n, 1) distances and labels, the distances then in float64
    (20 bytes a row). M-step: x.double() of a chunk of 2^24/D rows in _sums_counts, beside
    the (k, D+1) float64 sums; the update c[full] = (sums[full] / counts).float() makes two (k, D)
    float64 temporaries and a float32 one. Both steps keep the centroids c (k, D) and the last
    E-step's labels and distances. The init (_rows, at most all k rows held locally): the gathered
    rows (fp32 and float64), the all-reduced (k, D) float64 and its fp32 copy, 24 bytes a value;
    it is counted with the M-step. The empty-cluster fixes are smaller and not counted.
    chunked=False: the code before issue 15 (E-step chunks of 2^24/k rows, x.double() of all n
    rows)."""
    b = min(n, max(1, CHUNK // k), max(1, CHUNK // D) if chunked else n)
    keep = k * D * 4 + n * 16  # centroids, labels + distances
    if backend == "faiss":
        e_step = FAISS_TEMP + n * 20
    else:
        e_step = max(b * k, b * D) * 4 + 2 * n * 16  # the two chunks are not alive together
    x64 = min(n, max(1, CHUNK // D)) * D * 8 if chunked else n * D * 8
    m_step = max(k * (D + 1) * 8 + max(x64, k * D * 20), k * D * 24 + k * 9)  # or the init
    return keep + e_step, keep + m_step


# ---- the plan ----
def plan(image_size=224, width=1.0, fc_dim=0, sobel=True, batch=48, S=16, m=4, k=320000,
         layout="grouped", world=64, n_images=95_900_000, pca_dim=4096, amp=True,
         clustering="today", extract_batch=0, pca_sample=0, backend="torch", device="cuda",
         overhead=None, reserve=None):
    """Bytes per rank -> dict(settings, rows [dict(key, label, where, phase, bytes)], bytes
    {key: bytes}, instants {name: bytes}, train_peak, cluster_peak, device_peak, host_peak).
    batch: B per rank; k_s = k/m; pca_dim 0 = no PCA (D = d); clustering: "today" or "before"
    (the module docstring); extract_batch: 03's feature batch per rank (0: batch, 04's global
    --batch_size / N; before: batch * world); pca_sample: rows of the PCA fit (0: 100,000, the
    default of 03's and 04's --pca_sample; before: all N); device "cpu": the CPU run the test
    measures (every row then lives in host memory); overhead: the CUDA context and cuBLAS/cuDNN
    workspaces (not tensors; default 1 GB on cuda, a rough figure, not measured here); reserve:
    the allocator's margin on every device instant (default RESERVE on cuda, 0 on cpu)."""
    if layout not in ("replicated", "grouped") or clustering not in ("today", "before"):
        raise ValueError(f"layout {layout!r} / clustering {clustering!r}")
    if k % m or (layout == "grouped" and world % S):
        raise ValueError(f"k = {k} must be a multiple of m = {m}; grouped: N = {world} of S = {S}")
    d = int(fc_dim) or channels(4096, width)
    k_s, D, N = k // m, pca_dim or d, n_images
    n = math.ceil(N / world)  # the largest shard (03_kmeans: rank*N//world .. (rank+1)*N//world)
    act = 2 if amp else 4  # bf16 autocast stores conv/linear outputs in 2 bytes
    mask = 1 if device == "cuda" else act  # dropout: bool mask on CUDA, a float noise on CPU
    today = clustering == "today"
    # 03_kmeans.cluster extracts at 04's global batch / N per rank (before: the global batch)
    Bx = extract_batch or (batch if today else batch * world)
    # the PCA sample P: --pca_sample rows (before: 04 had no --pca_sample, so all N)
    n_fit = min(N, pca_sample or (100_000 if today else N))
    overhead = (1e9 if device == "cuda" else 0) if overhead is None else overhead
    reserve = (RESERVE if device == "cuda" else 0) if reserve is None else reserve
    rows = []

    def row(key, label, where, phase, nbytes):
        rows.append(dict(key=key, label=label, where=where, phase=phase, bytes=int(nbytes)))

    # -- resident all the time: weights, gradients (zero_grad(set_to_none) frees them only right
    #    before backward), SGD momentum. Heads: replicated = V + all W_s; grouped = V + W_t only.
    train, other = trunk_params(width, image_size, sobel, d)
    S_local = S if layout == "replicated" else 1  # rows of W held by this rank
    head = S * d + S + S_local * k_s * (d + 1)
    row("trunk", "trunk params (fp32) + BN statistics", "device", "resident", 4 * (train + other))
    row("trunk_grad", "trunk gradients (fp32)", "device", "resident", 4 * train)
    row("trunk_mom", "trunk SGD momentum (fp32)", "device", "resident", 4 * train)
    heads = f"V + {'all W_s' if layout == 'replicated' else 'W_t'} ({S_local} x {k_s:,d} x {d})"
    row("heads", f"heads params: {heads}", "device", "resident", 4 * head)
    row("heads_grad", "heads gradients", "device", "resident", 4 * head)
    row("heads_mom", "heads SGD momentum", "device", "resident", 4 * head)
    ddp = 4 * (train + head) if layout == "replicated" and world > 1 else 0
    row("ddp", "DDP gradient buckets (a flat copy of the grads)", "device", "resident", ddp)
    row("overhead", "CUDA context, cuBLAS/cuDNN workspaces (estimate)", "device", "resident",
        overhead)
    # NCCL's buffers, per communicator this rank joins: all ranks (DDP, k-means, SyncBN); grouped:
    # also its training group, its clustering group and the group leaders (shards.py)
    n_comm = (4 if layout == "grouped" else 1) if world > 1 and device == "cuda" else 0
    row("comm", f"NCCL communicator buffers ({n_comm} x estimate)", "device", "resident",
        n_comm * COMM_BYTES)
    # -- training step (04_train.train_step, m02.hierarchical_loss) at B per rank
    rows_b = min(S_local, batch)  # W_t blocks present in a batch (B_t > 0)
    row("batch", "the input batch (B, 3, S, S) fp32", "device", "train",
        batch * 3 * image_size ** 2 * 4)
    row("act", f"trunk activations saved for backward, B = {batch}", "device", "train",
        activations(width, image_size, sobel, batch, d, act, mask))
    # autocast keeps bf16 copies of the weights it casts: the trunk and V for the whole step
    # (cached), each W_t present (a view, cast per call and saved by its F.linear)
    casts = 2 * (train + S * d + S + rows_b * k_s * (d + 1)) if amp else 0
    row("casts", "bf16 weight copies (autocast)", "device", "train", casts)
    # phi, f = ReLU(phi), f sorted by s (B, d); V's logits + log-softmax (B, S); the (B, k_s)
    # sub-class logits (cat of the blocks) + fp32 log-softmax (+ its fp32 input under autocast)
    logits = batch * (3 * d * act + S * (act + 4) + k_s * (act + 4 + (4 if amp else 0)) + 32)
    row("logits", "head activations: phi, f, logits (B x k_s)", "device", "train", logits)
    # backward start: the (B, k_s) gradients of the log-softmax and logits; each W_t's gradient
    # (k_s, d) is kept until unbind's (replicated) or select's (grouped) backward stacks them
    # into W.grad, which zero_grad freed just before: both exist at once
    row("grad_rows", "backward: W_t gradients before stacking, logit grads", "device",
        "train", rows_b * k_s * (d + 1) * 4 + 2 * batch * k_s * 4)
    flat = 4 * (train + S * d + S + k_s * (d + 1)) if layout == "grouped" and world > 1 else 0
    row("flat", "grouped.reduce_grads: flat gradient copies", "device", "train", flat)
    # -- clustering round (03_kmeans.cluster), device = the trunk's device
    row("extract", "feature extraction: one no-grad fp32 forward", "device", "cluster",
        eval_forward(width, image_size, sobel, Bx, device))
    # all_gather_cat: the parts of all ranks and their concatenation, (., d) fp32 at once; today
    # the PCA sample P (|P| rows), before all N rows (+ the shard moved to the device, padded)
    row("gather", "all-gather of the PCA sample P (2 x |P| x d; before N)", "device", "cluster",
        2 * n_fit * d * 4 if today else (2 * N * d + 2 * n * d) * 4)
    row("phi_host", "fc7 feature shard on the host (n x d; before N x d)", "host", "cluster",
        (n if today else N) * d * 4)
    row("batches_host", "extraction: the list of batch outputs (before only)", "host", "cluster",
        0 if today else n * d * 4)
    # fit_pca on rank 0. Today on the device, beside the gathered P: a chunk of 2^24/d rows in
    # float64 twice (.double(), minus mu), then ~5 d x d float64 (cov, eigh's U and workspace, the
    # flips). Before on the host: P (a sampled copy when |P| < N), .double(), two (x - mu) float64
    b_fit = min(n_fit, max(1, CHUNK // d))
    pca = (n_fit * d * 4 + 2 * b_fit * d * 8 + 5 * d * d * 8) if pca_dim and today else 0
    row("pca_fit", "PCA fit on rank 0: P + float64 chunk + d x d", "device", "cluster", pca)
    pca = n_fit * d * ((4 if n_fit < N else 0) + 24) + 5 * d * d * 8 if pca_dim else 0
    row("pca_host", "PCA fit on rank 0 on the host (before only)", "host", "cluster",
        0 if today else pca)
    # whitening, Eq. (11): today on the device in chunks of 2^24/d rows (the chunk, minus the
    # mean, h, and h/|h|); before on the host, whole shard at once
    b = min(n, max(1, CHUNK // d))
    row("whiten", "whitening in chunks of rows (2 x b x d + 2 x b x D)", "device", "cluster",
        b * (2 * d + 2 * D) * 4 if today else 0)
    row("whiten_host", "whitening on the host (before only: n x d, 2 x n x D)", "host",
        "cluster", 0 if today else (n * d + 2 * n * D) * 4)
    row("shard", "whitened feature shard x (n x D)", "device", "cluster", n * D * 4)
    e1, m1 = kmeans_bytes(n, D, m, backend, chunked=today)
    row("km1", f"k-means level 1 (k = {m}): max(E-step, M-step)", "device", "cluster",
        max(e1, m1))
    # level 2: super-cluster v's members, balanced super-clusters assumed. Replicated or one
    # process: x[mem], the local members (n/m rows), in a loop over v. Grouped: the share of v
    # that this rank receives (N/m over C = N/m ranks: n rows); the exchange sends one
    # super-cluster's local members per round (n/m rows). Before: an all_gather of x and u (N x D,
    # N int64, twice each), alive through level 2.
    grouped = layout == "grouped" and world > 1
    n_v = n if grouped else math.ceil(n / m)
    row("l2_share", "level 2: v's members (grouped: my share of v)", "device", "cluster",
        n_v * D * 4)
    send = math.ceil(n / m) * D * 4 if today else (2 * N * D + n * D) * 4 + 2 * N * 8 * 2
    row("l2_send", "grouped exchange: one u's local rows (before: N x D)", "device", "cluster",
        send if grouped else 0)
    e2, m2 = kmeans_bytes(n_v, D, k_s, backend, chunked=today)
    row("km2", f"k-means level 2 (k_s = {k_s:,d}) + centroids (k x D)", "device", "cluster",
        k * D * 4 + max(e2, m2) + n * 8)  # c_sub (m, k_s, D), k-means, z
    # cluster() gathers the labels while it still holds x and the centroids
    row("labels", "all-gather of the N labels (int64) + centroids", "device", "cluster",
        (2 * N + n) * 8 + k * D * 4)
    rows_by = {r["key"]: r["bytes"] for r in rows}

    def at(*keys):
        return sum(rows_by[key] for key in keys)

    resident = ("trunk", "trunk_grad", "trunk_mom", "heads", "heads_grad", "heads_mom", "ddp",
                "overhead", "comm")
    no_grads = tuple(key for key in resident if not key.endswith("_grad"))
    instants = {
        "train: forward end": at(*resident, "batch", "act", "casts", "logits"),
        "train: backward start": at(*no_grads, "heads_grad", "batch", "act", "casts", "logits",
                                    "grad_rows"),
        "train: after backward": at(*resident, "batch", "flat"),
        "cluster: extraction": at(*resident, "extract"),
        "cluster: PCA sample gather": at(*resident, "gather"),
        "cluster: PCA fit (rank 0)": at(*resident, "pca_fit"),
        "cluster: whitening": at(*resident, "whiten", "shard"),
        "cluster: k-means level 1": at(*resident, "shard", "km1"),
        "cluster: level-2 exchange": at(*resident, "shard", "l2_share", "l2_send"),
        # before: the gathered N x D stayed alive through level 2
        "cluster: k-means level 2": at(*resident, "shard", "l2_share", "km2")
        + (0 if today else rows_by["l2_send"]),
        "cluster: label gather": at(*resident, "shard", "labels"),
    }
    # the allocator's reserve on every device instant (overhead and comm are not torch's: a
    # margin on them too keeps the arithmetic simple and errs high)
    instants = {name: int(v * (1 + reserve)) for name, v in instants.items()}
    host = at("phi_host") + max(at("batches_host"), at("pca_host"), at("whiten_host"))
    train_peak = max(v for name, v in instants.items() if name.startswith("train"))
    cluster_peak = max(v for name, v in instants.items() if name.startswith("cluster"))
    settings = dict(design=clustering, image_size=image_size, width=width, d=d, sobel=sobel,
                    batch=batch, S=S, m=m, k=k, k_s=k_s, layout=layout, world=world, n_images=N,
                    shard=n, pca_dim=D, amp=amp, clustering=clustering, extract_batch=Bx,
                    pca_sample=n_fit, backend=backend, device=device, reserve=reserve)
    return dict(settings=settings, rows=rows, bytes=rows_by, instants=instants,
                train_peak=train_peak, cluster_peak=cluster_peak,
                device_peak=max(train_peak, cluster_peak), host_peak=host)


def designs(**kw):
    """[today, before]: plan() of today's code and of the code before issue 15 item 1."""
    return [plan(**kw, clustering=c) for c in ("today", "before")]


# ---- the table ----
def format_plan(plans, budget=80 * GB):
    """The rows of one or more plans (same settings, e.g. today / before) as a text table."""
    p0 = plans[0]
    s = p0["settings"]
    lines = [f"per-rank memory (GB = 1e9 bytes): {s['world']} ranks, {s['layout']} layout, "
             f"{s['image_size']} px, width {s['width']:g} (d = {s['d']}), "
             f"{'Sobel' if s['sobel'] else 'RGB'},",
             f"B = {s['batch']} per rank, S = {s['S']}, m = {s['m']}, k = {s['k']:,d} "
             f"(k_s = {s['k_s']:,d}), D = {s['pca_dim']}, "
             f"{'bf16 autocast' if s['amp'] else 'fp32'}, E-step {s['backend']},",
             f"N = {s['n_images']:,d} images (shard n = {s['shard']:,d} per rank)",
             "feature batch / PCA rows: " + "; ".join(
                 f"{p['settings']['design']} {p['settings']['extract_batch']:,d} / "
                 f"{p['settings']['pca_sample']:,d}" for p in plans)]
    head = "".join(f"{p['settings']['design']:>10s}" for p in plans)
    lines.append(f"{'row':54s} {'where':6s} {'phase':8s}{head}")
    for i, r in enumerate(p0["rows"]):
        vals = "".join(f"{p['rows'][i]['bytes'] / GB:10.2f}" for p in plans)
        lines.append(f"{r['label'][:54]:54s} {r['where']:6s} {r['phase']:8s}{vals}")
    lines.append("device memory at each instant (resident rows + the rows alive then):")
    for name in p0["instants"]:
        vals = "".join(f"{p['instants'][name] / GB:10.2f}" for p in plans)
        lines.append(f"  {name:67s}{vals}")
    for key, label in (("train_peak", "training peak"), ("cluster_peak", "clustering peak"),
                       ("device_peak", f"device peak per rank (budget {budget / GB:g} GB)"),
                       ("host_peak", "host peak (rank 0)")):
        vals = "".join(f"{p[key] / GB:10.2f}" for p in plans)
        lines.append(f"{label:69s} {vals}")
    verdict = [f"{p['settings']['design']}: "
               f"{'fits' if p['device_peak'] <= budget else 'DOES NOT FIT'}" for p in plans]
    lines.append("verdict (device): " + ", ".join(verdict))
    return "\n".join(lines)


def print_plan(cfg, budget=80 * GB):
    """04_train.py --plan: the table of today's code for 04's flags.
    cfg: 04_train.Config (method, layout, world_size, batch_size (global), k, super_clusters,
    pca_dim, amp, subset, data, init, out_dir, kmeans_backend, device). The trunk's width,
    Sobel setting and fc dim come from the init checkpoint, as in grouped.show_layout."""
    # the flag errors and the method's S, m, k_s; imported here so that the model needs nothing
    from support import common
    method = cfg.method
    if method not in ("deepercluster", "deepcluster", "deepcluster-2level", "rotnet"):
        raise common.UserError(f"--plan knows deepercluster, deepcluster(-2level) and rotnet "
                               f"(--method {method}: supervised's k_s needs the data)")
    shape = importlib.import_module("02_model").method_shape(method, cfg.k, cfg.super_clusters)
    m, S, k = shape["m"], shape["S"], shape["m"] * shape["k_s"]
    if m < 1 or cfg.k % m:
        raise common.UserError(f"--k {k} must be a positive multiple of --super_clusters {m}")
    world = cfg.world_size or (S if cfg.layout == "grouped" else 1)
    if cfg.batch_size % world or (cfg.layout == "grouped" and world % S):
        raise common.UserError(f"--batch_size {cfg.batch_size} must be a multiple of "
                               f"--world_size {world}, and under --layout grouped N a multiple "
                               f"of S = {S}")
    init = cfg.init or os.path.join(cfg.out_dir, "02_model_init.pt")
    arch, note = dict(width=1.0, sobel=True, fc_dim=4096), f"no {init}: the paper's trunk"
    if os.path.exists(init):
        arch, note = common.load_ckpt(init)["arch"], f"trunk from {init}"
    n_images = getattr(cfg, "n_images", 0) or cfg.subset
    if not n_images:
        from support import sources  # the number of images of --data (its index, not the images)
        n_images = len(sources.make_source(cfg.data, "train"))
    device = "cpu" if cfg.device == "cpu" else "cuda"
    backend = "faiss" if cfg.kmeans_backend == "faiss" else "torch"
    if cfg.kmeans_backend == "auto":  # 03_kmeans._backend on a GPU: faiss only if it sees one
        try:
            import faiss
            backend = "faiss" if device == "cpu" or faiss.get_num_gpus() > 0 else "torch"
        except ImportError:
            pass
    kw = dict(image_size=cfg.image_size, width=arch["width"], fc_dim=arch["fc_dim"],
              sobel=arch["sobel"], batch=cfg.batch_size // world, S=S, m=m, k=k,
              layout=cfg.layout, world=world, n_images=n_images, pca_dim=cfg.pca_dim,
              amp=cfg.amp, pca_sample=getattr(cfg, "pca_sample", 0), backend=backend,
              device=device)
    plans = [plan(**kw)]
    print(f"({note})\n{format_plan(plans, budget)}")
    return plans


# ---- the two settings of the issue ----
def paper_setting(**kw):
    """PAPER.md §5.3, §7: 64 ranks, 224 px, VGG-16-BN + Sobel, k = 320,000, m = 4 (S = 16),
    B = 48 per rank (3072), 95.9M YFCC100M images, PCA 4,096, grouped layout, bf16."""
    return dict(image_size=224, width=1.0, sobel=True, batch=48, S=16, m=4, k=320000,
                layout="grouped", world=64, n_images=95_900_000, pca_dim=4096, amp=True) | kw


def deepcluster_setting(**kw):
    """DeepCluster (PAPER.md §8): 8 ranks, k = 10,000 flat (m = 1, S = 1), B = 256 global (32
    per rank), 1.28M ImageNet images, PCA 256, replicated layout."""
    return dict(image_size=224, width=1.0, sobel=True, batch=32, S=1, m=1, k=10000,
                layout="replicated", world=8, n_images=1_281_167, pca_dim=256, amp=True) | kw


if __name__ == "__main__":
    for setting in (paper_setting(), deepcluster_setting()):
        print(format_plan(designs(**setting)), "\n")
