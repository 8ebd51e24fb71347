#!/usr/bin/env bash
# GPU readiness check (issue 15 item 4), on one CUDA GPU, in under 8 minutes:
#   1. 01 -> 05 on tiny synthetic data, on the GPU (04 with --amp);
#   2. one 224-px full-width training step, bf16 autocast + channels_last: 04_train.train_step on
#      our trunk (Sobel + VGG-16-BN) + Heads (S = 16, k = 1000) + Eq. (8), against a bare
#      torchvision.models.vgg16_bn step (1000-way fc8 + cross-entropy), interleaved; prints the
#      throughput ratio (target >= 0.9) and our step's peak memory against scale.plan's;
#   3. k-means of 1M x 256 points into 10,000 clusters: 03_kmeans.kmeans with the faiss backend on
#      the GPU, and faiss.Kmeans(gpu=True) (needs the CUDA faiss wheel: `make gpu`).
# Usage: bash bench/gpu_check.sh          on a CUDA machine (refuses to run without a GPU)
#        bash bench/gpu_check.sh --dry    CPU only: parts 1-3 at tiny sizes; says what it skipped
# Env:   PY (default .venv/bin/python), OUT (scratch folder, default a temporary one), BATCH (48)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MODE=gpu
case "${1:-}" in
  --dry) MODE=dry ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry]" >&2; exit 2 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
HAS_GPU="import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
if [ "$MODE" = gpu ] && ! "$PY" -c "$HAS_GPU"; then
  echo "error: no CUDA GPU visible to torch; 'bash bench/gpu_check.sh --dry' runs the CPU parts" >&2
  exit 2
fi
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
mkdir -p "$OUT"
"$PY" - "$MODE" <<'EOF'
import platform, sys, torch
try:
    import faiss
    fa = f"faiss {faiss.__version__}, sees {faiss.get_num_gpus()} GPU(s)"
except ImportError:
    fa = "faiss not installed"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"== gpu_check ({sys.argv[1]}): torch {torch.__version__}, CUDA GPU: {gpu}, {fa}, "
      f"{platform.node()}")
if sys.argv[1] == "dry":
    print("   --dry: CPU only, tiny sizes; nothing below ran on a GPU")
EOF

# ---- 1. the five stages on tiny synthetic data ----
if [ "$MODE" = gpu ]; then DEV=cuda; AMP=--amp; else DEV=cpu; AMP=--no-amp; fi
echo "== 1. 01 -> 05 on synthetic:160 (32 px, width 1/16) on $DEV, out $OUT"
T1=$(date +%s)
TINY=(--data synthetic:160 --subset 0 --k 16 --super_clusters 2 --pca_dim 16)
run() { echo "   $*"; "$PY" "$@" > "$OUT/log.txt" 2>&1 || { tail -20 "$OUT/log.txt"; exit 1; }; }
run 01_data.py --out_dir "$OUT" --data synthetic:160 --image_size 32
run 02_model.py --out_dir "$OUT" --width 0.0625 --image_size 32 --super_classes 8 --k 16
run 03_kmeans.py --out_dir "$OUT" "${TINY[@]}" --device "$DEV"
run 04_train.py --out_dir "$OUT" "${TINY[@]}" --image_size 32 --batch_size 32 --epochs 2 \
    --reassign 1 --workers 0 --device "$DEV" "$AMP"
run 05_eval.py --out_dir "$OUT" --data synthetic --train_subset 160 --test_subset 60 \
    --probe_epochs 2 --layers 2,13,fc7 --clusters_grid 0 --device "$DEV"
for f in 01_data.json 02_model_init.pt 03_kmeans.npz 04_train_last.pt 04_train_log.jsonl \
         05_eval.json 05_eval.md; do
  [ -f "$OUT/$f" ] || { echo "error: $f was not written" >&2; exit 1; }
done
grep -h "^| 04_train_last.pt | deepercluster" "$OUT/05_eval.md" | sed 's/^/   /'
echo "   stages 1-5: $(( $(date +%s) - T1 )) s"

# ---- 2. one training step: ours against torchvision's vgg16_bn ----
echo "== 2. training step, ours (04_train.train_step) vs torchvision.models.vgg16_bn"
"$PY" - "$MODE" "${BATCH:-48}" <<'EOF'
import importlib, statistics, sys, time
import torch
import torch.nn.functional as F
import torchvision
import scale
m02 = importlib.import_module("02_model")  # 02_model.py: VGG, Heads
m04 = importlib.import_module("04_train")  # 04_train.py: Net, train_step
dry = sys.argv[1] == "dry"
# GPU: the paper's input and crop, bf16; dry: a tiny CPU run of the same code path
size, B, amp = (32, 2, False) if dry else (224, int(sys.argv[2]), True)
reps = 2 if dry else 12
device = torch.device("cpu" if dry else "cuda")
fmt = torch.channels_last if amp else torch.contiguous_format
S, m, k = 16, 4, 1000  # k_s = 250: 1000 sub-classes over all heads, as torchvision's 1000 classes
g = torch.Generator().manual_seed(0)
x = torch.randn(B, 3, size, size, generator=g).to(device, memory_format=fmt)
s = torch.randint(S, (B,), generator=g).to(device)
z = torch.randint(k // m, (B,), generator=g).to(device)
y = torch.randint(1000, (B,), generator=g).to(device)
sgd = dict(lr=0.01, momentum=0.9, weight_decay=1e-5)

trunk = m02.VGG(1.0, size, sobel=True)
net = m04.Net(trunk, m02.Heads(trunk.feature_dim, S, k // m)).to(device, memory_format=fmt)
opts = (torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], **sgd),
        torch.optim.SGD(net.heads.parameters(), **sgd))
ours = lambda: m04.train_step(net, opts, x, s, z, amp)  # noqa: E731 (its host syncs included)

bare = torchvision.models.vgg16_bn(weights=None).to(device, memory_format=fmt)
opt_bare = torch.optim.SGD(bare.parameters(), **sgd)

def bare_step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(bare(x), y)
    opt_bare.zero_grad(set_to_none=True)
    loss.backward()
    opt_bare.step()
    return float(loss.detach())  # one host sync, as 04's step has

def timed(fn):
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0

if not dry:  # our step's peak memory against the model (one rank, replicated, no DDP)
    bare.cpu()
    for _ in range(3):
        ours()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ours()
    ours()
    peak = torch.cuda.max_memory_allocated()
    p = scale.plan(image_size=size, batch=B, S=S, m=m, k=k, layout="replicated", world=1,
                   n_images=10 ** 6, pca_dim=256, amp=True, overhead=0)
    print(f"   memory of our step, B = {B}: torch.cuda.max_memory_allocated {peak / 1e9:.2f} GB, "
          f"scale.plan training peak {p['train_peak'] / 1e9:.2f} GB "
          f"({100 * (p['train_peak'] / peak - 1):+.1f}%)")
    bare.to(device, memory_format=fmt)
for fn in (ours, bare_step, ours, bare_step):  # warm-up: cuDNN autotuning, allocator
    fn()
times = {"ours": [], "bare": []}
for _ in range(reps):  # interleaved: clock and load changes hit both alike
    times["ours"].append(timed(ours))
    times["bare"].append(timed(bare_step))
ratio = statistics.median(tb / to for to, tb in zip(times["ours"], times["bare"]))
ips = {name: B / statistics.median(t) for name, t in times.items()}
print(f"   {size} px, batch {B}, {'bf16 autocast' if amp else 'fp32'}, {reps} interleaved steps: "
      f"ours {ips['ours']:.1f} img/s, torchvision vgg16_bn {ips['bare']:.1f} img/s")
if dry:
    print(f"   (CPU, tiny: only the code path ran; ratio {ratio:.2f} means nothing here)")
    print("   SKIPPED (no GPU): the 224-px bf16 ratio (target >= 0.9) and the memory check")
else:
    print(f"   ratio ours / torchvision = {ratio:.3f} (target >= 0.9: "
          f"{'met' if ratio >= 0.9 else 'NOT met'})")
EOF

# ---- 3. k-means: 1M x 256 into 10,000 clusters ----
echo "== 3. k-means"
"$PY" - "$MODE" <<'EOF'
import importlib, sys, time
import numpy as np
import torch
m03 = importlib.import_module("03_kmeans")  # 03_kmeans.py: kmeans (Lloyd, faiss or torch E-step)
dry = sys.argv[1] == "dry"
n, D, k, niter = (20000, 32, 100, 10) if dry else (10 ** 6, 256, 10000, 10)
device = torch.device("cpu" if dry else "cuda")
torch.cuda.empty_cache() if not dry else None  # torch's cached blocks back before faiss allocates
g = torch.Generator(device).manual_seed(0)
x = torch.nn.functional.normalize(torch.randn(n, D, device=device, generator=g), dim=1)
faiss = m03.faiss
n_gpu = faiss.get_num_gpus() if faiss is not None else 0

def run(label, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    obj = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"   {label}: {time.perf_counter() - t0:.1f} s, objective {obj:.4f}")

print(f"   {n:,d} x {D} -> {k:,d} clusters, {niter} iterations, on {device}")
if dry or n_gpu > 0:
    backends = ["faiss"] if faiss is not None else []
    for b in backends + ["torch"]:
        run(f"03_kmeans.kmeans, backend {b}",
            lambda: m03.kmeans(x, k, niter, seed=0, backend=b)[2]["objective"][-1])
    if faiss is not None:
        def faiss_kmeans():
            km = faiss.Kmeans(D, k, niter=niter, seed=0, gpu=not dry, verbose=False)
            km.train(np.ascontiguousarray(x.cpu().numpy()))
            return float(km.obj[-1]) / n
        run(f"faiss.Kmeans(gpu={not dry})", faiss_kmeans)
    if dry:
        print("   SKIPPED (no GPU): faiss-GPU k-means of 1,000,000 x 256 into 10,000 clusters")
else:
    print("   faiss sees no GPU (faiss-cpu or none): run 'make gpu' for the CUDA faiss wheel;")
    print("   timing 03_kmeans.kmeans with the torch E-step on the GPU instead")
    run("03_kmeans.kmeans, backend torch (GPU)",
        lambda: m03.kmeans(x, k, niter, seed=0, backend="torch")[2]["objective"][-1])
EOF
echo "== done in $(( $(date +%s) - T0 )) s ($MODE)"
