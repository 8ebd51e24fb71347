"""Shared plumbing for the numbered stages: config flags, user errors, atomic checkpoint I/O, device
and distributed setup. Nothing from the paper lives here (STYLE.md §1): the method is in 01_data.py
... 05_eval.py.

Every distributed helper is a no-op in a single process, so the stage code calls them
unconditionally.
"""
import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

FORMAT, VERSION = "deepercluster-edu", 1


# ---- user errors: one clear line and exit code 2, no traceback ----
class UserError(Exception):
    """Bad input from the user (a path, a flag value). The message says what is wrong and what to
    do."""


def run(main, config_cls, argv=None):
    """`if __name__ == "__main__": common.run(main, Config)`: parse flags, run, turn UserError
    into exit 2."""
    try:
        main(parse_config(config_cls, argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---- config: a frozen dataclass -> argparse flags ----
# (help text from the field's trailing comment)
def _field_comments(cls):
    comments = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source file (interactive use): flags without help text
        return comments
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).replace("%", "%%")
    return comments


def parse_config(cls, argv=None):
    helps = _field_comments(cls)
    p = argparse.ArgumentParser(
        description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    for f in dataclasses.fields(cls):
        h = f"{helps.get(f.name, '')} [default: {f.default}]"
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                           default=f.default, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=h)
    return cls(**vars(p.parse_args(argv)))


# ---- files: atomic writes (temporary file in the same folder, then os.replace) ----
def _atomic(path, write):
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a result file should read like any other file
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # the bytes reach the disk before the rename makes them the file
        # atomic on POSIX: readers see the old file or the new one, never half of one
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_ckpt(obj, path):
    """Save a flat dict of tensors / numbers / strings / lists / dicts, readable with
    weights_only=True."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def ckpt_header(stage, config):
    return {"format": FORMAT, "version": VERSION, "stage": stage,
            "config": (dataclasses.asdict(config) if dataclasses.is_dataclass(config)
                       else dict(config))}


def load_ckpt(path, stage=None, hint=""):
    """Load one of our checkpoints and check format, version and (when given) stage, with
    actionable errors."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist{': ' + hint if hint else ''}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        raise UserError(f"{path} is not a readable checkpoint "
                        f"({type(e).__name__}: {str(e)[:120]}); "
                        f"delete it and re-run the stage that writes it") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} checkpoint (no 'format' key); "
                        f"02_model.load_trunk also reads official DeeperCluster checkpoints")
    if ck.get("version") != VERSION:
        raise UserError(f"{path} has format version {ck.get('version')}, "
                        f"this code reads version {VERSION}")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and ck.get("stage") not in stages:
        raise UserError(f"{path} was written by stage {ck.get('stage')}, "
                        f"expected {' or '.join(stages)}")
    return ck


def save_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, default=_json_default)
    return _atomic(path, write)


def save_text(text, path):
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    return _atomic(path, write)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def pyplot():
    """matplotlib.pyplot drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **kw):
    """fig.savefig(path), atomically like every other write, then close the figure."""
    _atomic(path, lambda tmp: fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png", **kw))
    pyplot().close(fig)
    return path


def save_npz(path, **arrays):
    def write(tmp):
        # a file handle, so numpy does not append '.npz' to the temp name
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return _atomic(path, write)


def load_npz(path, hint=""):
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist{': ' + hint if hint else ''}")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- device and distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) ----
# A long wait on one rank (rank 0's PCA fit and writes, a slow rank's share of a clustering round)
# must not trip the process group's watchdog (NCCL's default is 10 minutes): a real hang still ends.
DIST_TIMEOUT = datetime.timedelta(hours=2)


def pick_device(name="auto", local_rank=0):
    """--device -> this process's torch.device. auto = CUDA when present, else the CPU; a bare cuda
    (or auto) is GPU LOCAL_RANK, so that the ranks of one machine each get their own GPU; cuda:N
    stays N."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; "
                        f"use --device auto or cpu")
    dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: GPU {dev.index} (LOCAL_RANK {local_rank}) asked for but "
                        f"{torch.cuda.device_count()} visible; one process per GPU")
    return dev


def cpu_has_bf16():
    """Whether this CPU computes bf16 convolutions and matmuls natively (oneDNN's own check:
    AVX-512 BF16 / AMX or AVX-512 core). Without it (AVX2 laptops and servers) PyTorch emulates
    bf16 and autocast runs several times *slower* than fp32 (bench/RESULTS.md: 0.14x on an
    AVX2 machine, 1.95x faster on an AVX-512 one)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 either
        return False


def resolve_amp(amp, device):
    """--amp as it will run: on a CPU without native bf16 it falls back to fp32, with a warning
    (the precision actually used is what the checkpoint's config records)."""
    if amp and torch.device(device).type == "cpu" and not cpu_has_bf16():
        log("warning: --amp: this CPU has no native bf16 (oneDNN reports none; e.g. AVX2 only), "
            "where bf16 autocast is emulated and measured 7x slower than fp32 (bench/RESULTS.md); "
            "training in fp32 instead")
        return False
    return amp


def fast_cuda(device):
    """On CUDA: TF32 tensor cores for fp32 matmuls, as cuDNN's convolutions use by default (10-bit
    mantissa products, fp32 sums: --no-amp runs at several times plain fp32 speed), and cuDNN's
    autotuner (batches of one size: it picks the fastest convolution per shape once).
    set_deterministic turns the autotuner off again; full_fp32() keeps plain fp32 where rounding
    matters (k-means distances). One precision API only: torch 2.14 raises an error when the
    per-backend fp32_precision flags and this global setting are mixed."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def full_fp32():
    """Plain fp32 matmuls inside the block, whatever fast_cuda set."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def init_dist(device="auto"):
    """Return (rank, world, device). With WORLD_SIZE unset or 1 this creates no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and faiss work on the current device
        fast_cuda(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return rank, world, dev


# ---- faiss on a GPU (make gpu): does this build run here; one scratch space per round ----
_FAISS_OK, _FAISS_RES = {}, {}
# a tiny exact search on GPU argv[1]; a build without code for this GPU aborts the process
FAISS_PROBE = ("import sys, numpy as np, faiss; x = np.eye(16, dtype='float32'); "
               "d, i = faiss.knn_gpu(faiss.StandardGpuResources(), x, x, 1, "
               "device=int(sys.argv[1])); sys.exit(0 if (i[:, 0] == np.arange(16)).all() else 3)")


def faiss_gpu_ok(faiss, device):
    """Whether `faiss` can search on CUDA `device`: a GPU build that sees it, with kernels for its
    compute capability (a wheel without them aborts the process at the first search, so a child
    process tries first). Once per process and device; a no says so in one line."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda": the current GPU
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev not in _FAISS_OK:
        ok, why = faiss.get_num_gpus() > 0, "a CPU-only build"
        if ok:
            p = subprocess.run([sys.executable, "-c", FAISS_PROBE, str(dev.index or 0)],
                               capture_output=True, text=True, timeout=300)
            why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
            ok = p.returncode == 0
        if not ok:
            cc = "{}.{}".format(*torch.cuda.get_device_capability(dev))
            log(f"faiss {faiss.__version__} cannot run on {dev} (compute capability {cc}: "
                f"{why[:160]}): k-means searches with torch there (auto) or faiss on the CPU; "
                f"'make gpu' installs a faiss-gpu with code for 7.0-9.0")
        _FAISS_OK[dev] = ok
    return _FAISS_OK[dev]


def faiss_knn_gpu(x, c):
    """(squared distances (n,) float32, labels (n,) int64) of each row of x (n, D) to its nearest
    row of c (k, D), searched by faiss on x's GPU straight from torch's memory (no host copy). The
    StandardGpuResources (about 1.5 GB of scratch) is kept until faiss_release(): one per round."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (faiss.knn_gpu then takes CUDA tensors)
    if x.device not in _FAISS_RES:
        _FAISS_RES[x.device] = faiss.StandardGpuResources()
    with torch.cuda.device(x.device):  # faiss searches on the current device, on torch's stream
        d2, a = faiss.knn_gpu(_FAISS_RES[x.device], x.contiguous(), c.contiguous(), 1,
                              device=torch.cuda.current_device())
    return d2[:, 0], a[:, 0]


def faiss_release():
    """Free faiss's GPU scratch memory (the training steps between rounds need it)."""
    _FAISS_RES.clear()


def set_deterministic():
    """torch.use_deterministic_algorithms, and what CUDA needs for it (the cuBLAS workspace)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def world_size(group=None):
    return dist.get_world_size(group) if dist.is_initialized() else 1


def get_rank(group=None):
    """This process's rank in `group` (default: all ranks)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def is_main():
    return get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t, group=None):
    """In-place sum over ranks (of `group`); returns t. No-op in one process."""
    if dist.is_initialized():
        # gloo silently scrambles non-contiguous tensors (e.g. eigh's column-major output)
        c = t.contiguous()
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
        if c.data_ptr() != t.data_ptr():
            t.copy_(c)
    return t


def broadcast(t, src=0):
    """Rank src's value of t on every rank, in place (contiguous copy first, as for
    all_reduce_sum)."""
    if dist.is_initialized():
        c = t.contiguous()
        dist.broadcast(c, src)
        if c.data_ptr() != t.data_ptr():
            t.copy_(c)
    return t


def all_gather_cat(t, group=None):
    """Concatenate along dim 0 the tensors of all ranks (of `group`, in rank order); shapes may
    differ in dim 0."""
    if not dist.is_initialized():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size(group))]
    dist.all_gather(sizes, n, group=group)
    mx = int(max(s.item() for s in sizes))
    pad = torch.zeros((mx - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    parts = [torch.empty((mx,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
             for _ in sizes]
    dist.all_gather(parts, torch.cat([t, pad]), group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def log(*args, **kw):
    """print on rank 0 only, flushed (logs interleave with tqdm bars and subprocess pipes)."""
    if is_main():
        print(*args, **kw, flush=True)


def bar(iterable=None, **kw):
    """A tqdm progress bar on rank 0: live on a terminal; into a file (a run's stdout.log) one
    refresh a minute, not ten a second, which would fill the log with megabytes of redraws."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not is_main(), mininterval=0.1 if sys.stderr.isatty() else 60,
                **kw)


# ---- flag checks: one line naming every bad value ----
def check_ranges(cfg, at_least_1=(), at_least_0=(), choices=None, positive=()):
    """One UserError listing every numeric flag out of range (NaN and infinity included), or naming
    a value that is not among its choices ({flag: allowed values}), before any work."""
    for flag, allowed in (choices or {}).items():
        if getattr(cfg, flag) not in allowed:
            raise UserError(f"--{flag} {getattr(cfg, flag)!r}: use {' or '.join(allowed)}")
    ok = lambda v, low: math.isfinite(v) and v >= low  # noqa: E731
    bad = [f for f in at_least_1 if not ok(getattr(cfg, f), 1)]
    bad += [f for f in at_least_0 if not ok(getattr(cfg, f), 0)]
    bad += [f for f in positive if not (ok(getattr(cfg, f), 0) and getattr(cfg, f) > 0)]
    if bad:
        raise UserError(f"{', '.join(f'--{f} {getattr(cfg, f)}' for f in bad)}: counts must be "
                        f">= 1, sizes and rates >= 0 (0 = off or all), learning rates and "
                        f"temperatures > 0")


def parse_counts(text, flag):
    """'250000,1000000' -> [250000, 1000000] (sorted, distinct, >= 1); a one-line error naming the
    flag otherwise."""
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"{flag} {text!r}: give a comma list of counts, e.g. 250000,1000000"
                        ) from None
    if counts and counts[0] < 1:
        raise UserError(f"{flag} {text!r}: counts must be >= 1")
    return counts
