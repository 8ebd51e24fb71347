"""The CUDA, NCCL and faiss-GPU paths, checked on the CPU where a CPU can show them, then on a GPU.

On the CPU: --device and LOCAL_RANK -> each rank's own GPU (torch.cuda faked); init_dist's device
and process-group timeout; --kmeans_backend auto when faiss cannot run on the GPU it sees (the
probe's child process faked); `make gpu` downloads before it uninstalls; every tensor that enters a
collective lives on the model's device (a recording stand-in for torch.distributed, on the "meta"
device: NCCL refuses tensors that are not on the process's GPU); the suite itself runs on the CPU.
Marked gpu (skipped without CUDA): the same helpers over a real one-rank NCCL group, the faiss-GPU
E-step against torch's, the PCA fit and kNN on the GPU against the CPU.
"""
import importlib
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from support import common, resume

m02 = importlib.import_module("02_model")
m03 = importlib.import_module("03_kmeans")
ev = importlib.import_module("05_eval")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()  # at collection: conftest hides the GPUs from the CPU tests only


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


# ---- the test suite runs on the CPU ----
def test_tests_see_no_gpu():
    """Outside the gpu tests neither this process nor its children (torchrun ranks) see a GPU."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert common.pick_device("auto", local_rank=3) == torch.device("cpu")


# ---- devices: --device x LOCAL_RANK ----
@pytest.mark.parametrize("rank", [0, 1, 3])
def test_pick_device_gives_each_rank_its_gpu(monkeypatch, rank):
    fake_gpus(monkeypatch, 4)
    assert common.pick_device("auto", rank) == torch.device(f"cuda:{rank}")
    assert common.pick_device("cuda", rank) == torch.device(f"cuda:{rank}")  # not all on GPU 0
    assert common.pick_device("cuda:2", rank) == torch.device("cuda:2")  # explicit: kept
    assert common.pick_device("cpu", rank) == torch.device("cpu")
    with pytest.raises(common.UserError, match="GPU 7 .*4 visible"):
        common.pick_device("cuda:7", rank)


def test_pick_device_refuses_missing_gpus(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(common.UserError, match="LOCAL_RANK 2"):  # 3 ranks on a 2-GPU machine
        common.pick_device("cuda", 2)
    fake_gpus(monkeypatch, 0)
    assert common.pick_device("auto", 1) == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(common.UserError, match="no CUDA GPU is visible"):
            common.pick_device(name, 0)


class FakeGroupDist:
    """torch.distributed before init_process_group: records the call."""
    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init_process_group(self, backend, **kw):
        self.calls.append((backend, kw))


def test_init_dist_binds_local_rank_and_waits_long(monkeypatch):
    fake_gpus(monkeypatch, 4)
    fake, bound = FakeGroupDist(), []
    monkeypatch.setattr(common, "dist", fake)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setattr(common, "fast_cuda", lambda device: None)
    for key, value in dict(WORLD_SIZE="4", RANK="2", LOCAL_RANK="2").items():
        monkeypatch.setenv(key, value)
    assert common.init_dist("cuda") == (2, 4, torch.device("cuda:2"))
    assert bound == [torch.device("cuda:2")]
    (backend, kw), = fake.calls
    assert backend == "nccl" and kw["timeout"].total_seconds() >= 3600  # a clustering round


def test_fast_cuda_sets_tf32_and_autotuner_on_cuda_only():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        common.fast_cuda("cpu")
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.benchmark
        common.fast_cuda("cuda:0")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        with common.full_fp32():  # k-means distances: plain fp32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


# ---- faiss on the GPU: auto falls back to torch when faiss cannot run there ----
def fake_faiss(n_gpus):
    return types.SimpleNamespace(__version__="9.9", get_num_gpus=lambda: n_gpus)


def test_auto_backend_falls_back_when_faiss_cannot_run_on_the_gpu(monkeypatch, capsys):
    """faiss-gpu-cu12 1.14.1 on an H100: the GPU is seen, but the first search aborts (no code for
    compute capability 9.0). The probe's child process says so; auto picks torch, in one line."""
    monkeypatch.setattr(common, "_FAISS_OK", {})
    monkeypatch.setattr(m03, "faiss", fake_faiss(1))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    runs = []

    def child(cmd, **kw):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, -6, "", "Faiss assertion 'err == cudaSuccess' "
                                           "failed: CUDA error 209 no kernel image is available")
    monkeypatch.setattr(common.subprocess, "run", child)
    assert m03._backend("auto", "cuda:0") == "torch"
    assert m03._backend("auto", torch.device("cuda:0")) == "torch"  # asked once per device
    assert m03._backend("auto", "cpu") == "faiss"
    lines = [line for line in capsys.readouterr().out.splitlines() if "cannot run" in line]
    assert len(runs) == 1 and len(lines) == 1
    assert "cuda:0" in lines[0] and "9.0" in lines[0] and "no kernel image" in lines[0]


def test_auto_backend_uses_faiss_gpu_when_its_probe_passes(monkeypatch):
    monkeypatch.setattr(common, "_FAISS_OK", {})
    monkeypatch.setattr(m03, "faiss", fake_faiss(1))
    monkeypatch.setattr(common.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    assert m03._backend("auto", "cuda:0") == "faiss"


def test_faiss_cpu_build_is_not_probed(monkeypatch):
    monkeypatch.setattr(common, "_FAISS_OK", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **kw: pytest.fail("probed"))
    assert not common.faiss_gpu_ok(fake_faiss(0), "cuda:0")


def test_probe_script_runs():
    """The probe's own code, for real: with faiss-cpu it fails on the missing GPU functions (a
    SyntaxError or NameError would look the same to faiss_gpu_ok, so check the reason)."""
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("a faiss GPU build: the gpu tests run the probe")
    p = subprocess.run([sys.executable, "-c", common.FAISS_PROBE, "0"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and "AttributeError" in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_downloads_before_it_uninstalls():
    """The faiss-gpu wheel of faiss-cpu's pinned version, downloaded (with faiss-cpu, to put it
    back) before faiss-cpu is removed: offline, nothing changes."""
    pin = re.search(r"^faiss-cpu==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(), re.M)
    text = subprocess.run(["make", "-n", "gpu"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    text = text[text.index("faiss"):]  # the gpu recipe (after the venv target's)
    assert f"faiss-gpu=={pin.group(1)}" in text
    assert text.index("download -") < text.index("uninstall -") < text.index("--no-index")
    assert text.rindex(f"faiss-cpu=={pin.group(1)}") > text.index("uninstall")  # put back


# ---- collectives: every tensor on the model's device ----
class Stop(Exception):
    """Raised by the stand-in at a collective: the helper has shown its tensors."""


class RecordingDist:
    """torch.distributed, initialised with 2 ranks, whose collectives record the devices of the
    tensors they get, then stop the helper."""
    ReduceOp = torch.distributed.ReduceOp

    def __init__(self):
        self.devices = []

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def get_rank(self, group=None):
        return 0

    def _record(self, *tensors):
        for t in tensors:
            self.devices += [u.device for u in (t if isinstance(t, list) else [t])]
        raise Stop

    def all_reduce(self, t, op=None, group=None):
        self._record(t)

    def broadcast(self, t, src=0, group=None):
        self._record(t)

    def all_gather(self, parts, t, group=None):
        self._record(parts, t)


def _poll(device):
    stop = resume.StopFlag()
    try:
        stop.poll(device)
    finally:
        stop.close()


def _batch_sums(device):
    out = {k: torch.zeros((), device=device) for k in m02.TRAIN_KEYS}
    m02.batch_sums(out, 4)


COLLECTIVES = {  # helper -> a call on the model's device
    # 04's checkpoint right after a clustering round: no batch x yet
    "resume.healthy": lambda dev: resume.healthy([nn.Linear(3, 2, device=dev)], dev),
    "resume.StopFlag.poll": _poll,
    "resume.rng_states": resume.rng_states,
    "02_model.batch_sums": _batch_sums,  # the loss sums
    "common.all_reduce_sum": lambda dev: common.all_reduce_sum(torch.zeros(3, device=dev)),
    "common.broadcast": lambda dev: common.broadcast(torch.zeros(3, device=dev)),
    "common.all_gather_cat": lambda dev: common.all_gather_cat(torch.zeros(2, 3, device=dev)),
    "03_kmeans._offset": lambda dev: m03._offset(torch.zeros(5, 3, device=dev)),
    "03_kmeans._sums_counts": lambda dev: m03._sums_counts(
        torch.zeros(5, 3, device=dev), torch.zeros(5, dtype=torch.long, device=dev), 4),
    "03_kmeans.kmeans": lambda dev: m03.kmeans(torch.zeros(5, 3, device=dev), 2, backend="torch"),
}


@pytest.mark.parametrize("helper", sorted(COLLECTIVES))
def test_collectives_get_tensors_on_the_models_device(monkeypatch, helper):
    """torch has no CUDA here, so the model lives on "meta": a tensor made on the CPU by default
    (what NCCL refuses) shows up as cpu."""
    dev = nn.Linear(3, 2, device="meta").weight.device
    fake = RecordingDist()
    monkeypatch.setattr(common, "dist", fake)
    monkeypatch.setattr(resume, "dist", fake)
    monkeypatch.setattr(resume, "all_finite", lambda modules: True)  # meta holds no values
    monkeypatch.setattr(torch, "bincount",  # no meta kernel; the counts' device is what matters
                        lambda a, minlength=0: a.new_zeros(minlength))
    with pytest.raises(Stop):
        COLLECTIVES[helper](dev)
    assert fake.devices and set(fake.devices) == {dev}, fake.devices


# ---- on a GPU ----
@pytest.fixture
def nccl_one_rank(tmp_path):
    """A real NCCL process group of one rank on cuda:0: CPU tensors in a collective fail."""
    dev = common.pick_device("cuda", 0)
    torch.cuda.set_device(dev)
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("nccl", store=store, rank=0, world_size=1,
                                         device_id=dev)
    yield dev
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("helper", sorted(set(COLLECTIVES) - {"03_kmeans._sums_counts"}))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_collectives_over_nccl(nccl_one_rank, helper):
    dev = nccl_one_rank
    if helper == "resume.healthy":
        assert resume.healthy([nn.Linear(3, 2, device=dev)], dev)
    elif helper == "03_kmeans.kmeans":
        x = torch.randn(200, 8, device=dev)
        c, a, _ = m03.kmeans(x, 4, niter=3, backend="torch")
        assert c.device == a.device == dev
    elif helper in ("03_kmeans._offset",):
        assert m03._offset(torch.zeros(5, 3, device=dev)) == (5, 0)
    else:
        COLLECTIVES[helper](dev)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_faiss_gpu_estep_matches_torch():
    faiss = pytest.importorskip("faiss")
    if not common.faiss_gpu_ok(faiss, "cuda:0"):
        pytest.skip("no faiss build that runs on this GPU (make gpu)")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(20000, 64, device="cuda", generator=g)
    c = torch.randn(500, 64, device="cuda", generator=g)
    a_f, d_f = m03._assign(x, c, "faiss")
    a_t, d_t = m03._assign(x, c, "torch")
    assert a_f.device == x.device and d_f.dtype == torch.float64
    assert (a_f == a_t).float().mean() > 0.999  # ties and rounding only
    assert torch.allclose(d_f, d_t, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_pca_fit_and_knn_on_the_gpu_match_the_cpu():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.normal(size=(3000, 32)) @ rng.normal(size=(32, 32))).astype("f4"))
    g_cpu = m03.apply_pca(x, *m03.fit_pca(x, 8))
    mean, proj = m03.fit_pca(x.cuda(), 8)
    assert mean.is_cuda and proj.is_cuda
    g_gpu = m03.apply_pca(x.cuda(), mean, proj).cpu()
    assert torch.allclose(g_gpu @ g_gpu.T, g_cpu @ g_cpu.T, atol=1e-3)  # signs may differ
    y = torch.from_numpy(rng.integers(0, 5, 3000))
    p_cpu = ev.knn_predict(x[:2000], y[:2000], x[2000:], 5, ks=(20,))[20]
    p_gpu = ev.knn_predict(x[:2000].cuda(), y[:2000].cuda(), x[2000:].cuda(), 5, ks=(20,))[20]
    assert (p_gpu.cpu() == p_cpu).float().mean() > 0.99
