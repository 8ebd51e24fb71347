"""What a resumable, interruptible run needs (04_train.py): which settings must match to resume a
checkpoint, where a run starts (its last checkpoint or the initial trunk) and how it restores the
optimizers, the checks that a checkpoint never holds diverged weights, every rank's RNG state, and
the stop flag that Ctrl-C and SIGTERM set. Plumbing a first reader skips. It reads trunks through
support/interop.py, which imports stage 02 (its VGG is the building block interop adapts).
"""
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from support import interop
from support.common import UserError, all_gather_cat, all_reduce_sum, is_main, load_ckpt, log


# ---- checkpoint compatibility: which settings must match for a resume ----
def config_diff(old, cfg, keys):
    """The settings in `keys` where a checkpoint's config dict `old` differs from dataclass `cfg`,
    readable."""
    return [f"--{k} {old.get(k)!r} there vs {getattr(cfg, k)!r} now"
            for k in keys if old.get(k) != getattr(cfg, k)]


def resume_checkpoint(path, stage, cfg, keys, mid_epoch_keys=(), arch=None):
    """The checkpoint at `path` to resume from, or None: absent, --no-resume, or --force over an
    incompatible one. Incompatible = another value of a setting in `keys` (or, when it stopped in
    mid-epoch, in `mid_epoch_keys`), or a trunk architecture other than `arch` (when given): a
    one-line UserError lists every difference, unless cfg.force."""
    if not os.path.exists(path):
        return None
    if not cfg.resume:
        log(f"--no-resume: starting afresh; {path} will be overwritten")
        return None
    ck = load_ckpt(path, stage)
    diff = config_diff(ck["config"], cfg, keys)
    if ck.get("iteration", 0) > 0:  # the saved plan and batches assume these too
        diff += config_diff(ck["config"], cfg, mid_epoch_keys)
    for key in ("width", "sobel", "image_size", "fc_dim") if arch else ():
        if ck["arch"].get(key) != arch.get(key):
            diff.append(f"trunk {key} {ck['arch'].get(key)!r} there vs {arch.get(key)!r} in --init")
    if diff and not cfg.force:
        raise UserError(f"{path} is from an incompatible run ({'; '.join(diff)}): use another "
                        f"--out_dir, or --force to start afresh and overwrite it")
    if diff:
        log(f"--force: ignoring {path} ({'; '.join(diff)}); it will be overwritten")
        return None
    return ck


def load_start(cfg, last, stage, keys, mid_epoch_keys=()):
    """-> (trunk, ck): `last`'s trunk and contents when resuming it (resume_checkpoint, with the
    --init trunk's architecture), else (the --init trunk, None); --init defaults to
    <out_dir>/02_model_init.pt."""
    init = cfg.init or os.path.join(cfg.out_dir, "02_model_init.pt")
    trunk = interop.load_trunk(init)[0] if os.path.exists(init) else None
    ck = resume_checkpoint(last, stage, cfg, keys, mid_epoch_keys, trunk and trunk.arch())
    if ck is not None:
        return interop.load_trunk(ck, name=last)[0], ck
    if trunk is None:
        raise UserError(f"{init} does not exist: run 02_model.py --out_dir {cfg.out_dir} or --init")
    return trunk, None


def notes(ck, recipe, epochs, last):
    """Warn when resuming `last` (checkpoint `ck`) changes its saved recipe (the new values apply
    from here on), or when it has already trained `epochs` epochs: nothing is trained then, and
    its settings stay those it was trained with (a rerun after a change of defaults)."""
    old = ck.get("recipe", {})  # (absent in checkpoints from before it was saved)
    diff = "; ".join(f"{k} {old[k]!r} there vs {v!r} now" for k, v in recipe.items()
                     if k in old and old[k] != v)
    if ck["epoch"] >= epochs:
        log(f"warning: {last} has already trained {ck['epoch']} epochs (--epochs {epochs}): "
            f"nothing to train" + (f", and with other settings ({diff})" if diff else "") +
            ": to train again, --no-resume or another --out_dir")
    elif diff:
        log(f"warning: resuming {last} with other settings than it was trained with ({diff}): "
            f"they apply from epoch {ck['epoch']} on")


def restore(ck, opts, hypers, rank, device):
    """Resume the trunk's optimizer opts[0] from checkpoint `ck` (the layout has loaded the heads'
    one) and this rank's RNG. The flags win over the saved hyper-parameters: hypers (one dict per
    optimizer) update every param group (e.g. a lower --lr after a NaN)."""
    opts[0].load_state_dict(ck["optimizer"])
    for opt, hyper in zip(opts, hypers):
        for group in opt.param_groups:
            group.update(hyper)
    set_rng_states(ck["rng"], rank, device)


def all_finite(modules):
    """True when every parameter and buffer of the modules is finite: a checkpoint never holds
    diverged weights. One host sync for all of them."""
    flags = [torch.isfinite(t).all() for m in modules
             for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def healthy(modules, device, net=None, x=None):
    """Finite parameters and buffers, and (given net and a batch x) a finite forward pass on a few
    samples: weights of 1e37 are finite but have diverged, so a checkpoint of them would be useless.
    Eval mode (no dropout draw, no BN statistics update). Under torchrun: True only if on all
    ranks; the flag lives on `device`, the modules' (nccl reduces CUDA tensors only, and a
    checkpoint may come before any batch x)."""
    ok = all_finite(modules)
    if ok and net is not None and x is not None:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            ok = bool(torch.isfinite(net(x[:8])).all())
        net.train(was_training)
    bad = torch.tensor([float(not ok)], device=device)
    return float(all_reduce_sum(bad)) == 0


# ---- RNG state capture ----
# (dropout masks come from the global torch RNG; everything else has its own generator)
def rng_states(device):
    """Every rank's global RNG state, gathered (a collective under torchrun): torch CPU (+ CUDA) as
    (world, 5056) uint8 rows, NumPy and Python for completeness."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    rows = {k: all_gather_cat(v[None].to(device)).cpu() for k, v in mine.items()}
    return rows | {"numpy": ([np_state[0], torch.from_numpy(np_state[1].astype(np.int64))]
                             + list(np_state[2:])),
                   "python": random.getstate()}


def set_rng_states(rng, rank, device):
    """Restore rank's row (rank 0's when the checkpoint came from fewer ranks)."""
    def row(t):
        # clone: set_rng_state crashes (SIGSEGV) on a row view
        return t[rank if rank < len(t) else 0].clone()
    torch.set_rng_state(row(rng["torch"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(row(rng["cuda"]), device)
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32),
                         *rng["numpy"][2:]))
    random.setstate(rng["python"])


# ---- stopping cleanly: Ctrl-C (SIGINT) and a scheduler's SIGTERM set a flag ----
# (the loop saves and exits)
class StopFlag:
    """Installs SIGINT/SIGTERM handlers that only set a flag, so a signal can never land between
    an SGD step and the bookkeeping of its iteration. poll() is checked between iterations; under
    torchrun it is a collective (MAX over ranks), so every rank stops at the same iteration and the
    checkpoint can gather all of them. poll() also says when `every_s` seconds have passed since
    the last save (decided on rank 0's clock, the same for all ranks)."""

    def __init__(self, every_s=0.0):
        self.signal, self.every_s, self.last_save = 0, every_s, time.time()
        self.old = {sig: signal.signal(sig, self._handler)
                    for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handler(self, signum, frame):
        if self.signal:  # a second Ctrl-C: quit at once, without saving
            raise KeyboardInterrupt
        self.signal = signum
        log(f"\nsignal {signum}: saving at the next iteration boundary "
            f"(again to quit without saving)")

    def close(self):
        """Put the previous handlers back."""
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def poll(self, device):
        """-> (stop, save_due), the same on every rank."""
        due = bool(self.every_s) and time.time() - self.last_save >= self.every_s and is_main()
        flags = torch.tensor([float(self.signal > 0), float(due)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def saved(self):
        self.last_save = time.time()

    def exit(self, path, epoch, it):
        """After the stop's save: say where it saved and how to resume, exit with status 130."""
        log(f"\nstopped by signal {self.signal or 'on another rank'}: saved {path} "
            f"(epoch {epoch}, iteration {it}); re-run to resume")
        sys.exit(130)
