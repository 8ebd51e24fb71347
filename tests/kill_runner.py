"""Run 04_train.main and send this process a real signal at an exact step (tests only; product code has no hook).

    python tests/kill_runner.py AT SIGNAL WHERE [04_train.py flags]      (also under torchrun)

AT: the global step count (1 = the first step of this process); SIGNAL: SIGKILL (a crash), SIGINT (Ctrl-C) or
SIGTERM (a scheduler's notice); WHERE: "boundary" sends it after the step and its bookkeeping, as the loop asks the
stop flag (resume.StopFlag.poll, once per iteration); "in_step" sends it right after the step's last optimizer
update (the heads' SGD.step), before the loop counts the step: the moment where an exception instead of a flag
would save updated weights with the old position. Both by wrapping public functions from outside the loop."""
import importlib
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import common, resume  # noqa: E402

t4 = importlib.import_module("04_train")
at, sig, where = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]
calls = {"step": 0, "poll": 0}
real_step, real_poll = torch.optim.SGD.step, resume.StopFlag.poll


def counted_step(self, *args, **kw):  # two optimizers (trunk, heads) step once per iteration, in that order
    out = real_step(self, *args, **kw)
    calls["step"] += 1
    if where == "in_step" and calls["step"] == 2 * at:
        os.kill(os.getpid(), sig)
    return out


def counted_poll(self, device):  # once per iteration, after the step and its bookkeeping
    calls["poll"] += 1
    if where == "boundary" and calls["poll"] == at:
        os.kill(os.getpid(), sig)
    return real_poll(self, device)


torch.optim.SGD.step, resume.StopFlag.poll = counted_step, counted_poll
common.run(t4.main, t4.Config, sys.argv[4:])
