"""The body of 04_train.train's inner loop as a function, for the tests that compare one SGD step across layouts
and process counts (tests/test_dist_train.py, tests/test_grouped.py) and for bench/bench_train.py. It repeats the
loop's lines (forward, the metric sums, backward, both optimizers' steps); test_train.py's subprocess runs check the
loop itself."""
import importlib

import torch

m02 = importlib.import_module("02_model")


def train_step(model, opts, x, s, z, amp=False):
    """One SGD step of Eq. (8) on this rank's part of the global batch -> (7,) sums over the global batch (the
    TRAIN_KEYS times b, then b), on CPU."""
    S = getattr(model, "module", model).heads.S
    B_s = torch.bincount(s.cpu(), minlength=S).tolist()  # 04 counts the loader's CPU labels
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x, s, z, B_s)
    sums = m02.batch_sums(out, len(s))
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    m02.check_finite(sums)
    for opt in opts:
        opt.step()
    return sums.cpu()
