"""Run 04_train.main and send this process a real signal at an exact step (tests only; product code has no hook).

    python tests/kill_runner.py AT SIGNAL WHERE [04_train.py flags]      (also under torchrun)

AT: the global step count (1 = the first step of this process); SIGNAL: SIGKILL (a crash), SIGINT (Ctrl-C) or
SIGTERM (a scheduler's notice); WHERE: "boundary" sends it from 04's on_iteration callback, after the step and its
bookkeeping; "in_step" sends it inside train_step, right after opt.step(), before the loop counts the step: the
moment where an exception instead of a flag would save updated weights with the old position."""
import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

t4 = importlib.import_module("04_train")
at, sig, where = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]
steps = [0]
real_step = t4.train_step


def counted(*args, **kw):
    out = real_step(*args, **kw)
    steps[0] += 1
    if where == "in_step" and steps[0] == at:
        os.kill(os.getpid(), sig)
    return out


def after_iteration(epoch, it):
    if where == "boundary" and steps[0] == at:
        os.kill(os.getpid(), sig)


t4.train_step = counted
common.run(lambda cfg: t4.main(cfg, on_iteration=after_iteration), t4.Config, sys.argv[4:])
