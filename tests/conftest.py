"""pytest set-up shared by every test file: tiny tensors are fastest (and least noisy) on one
thread, and every test runs on the CPU unless it is marked `gpu` (and skipped without CUDA): on a
machine with one GPU, device auto would otherwise send the multi-process tests' ranks to cuda:1..3.
"""
import os

import pytest
import torch

torch.set_num_threads(1)
# Read before the GPUs are hidden (the CUDA driver reads CUDA_VISIBLE_DEVICES once, at its first
# call): the `gpu` tests of this process still see them.
HAS_CUDA = torch.cuda.is_available()
VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")  # the `gpu` tests' children get it back
# Every child process (stage runs, torchrun ranks) sees no GPU, also those whose environment a test
# module copied from os.environ at import.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA GPU (skip it without one); every other "
                                       "test runs on the CPU")


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request, monkeypatch):
    """In this process too, torch sees no GPU outside the `gpu` tests."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    elif VISIBLE is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", VISIBLE)
