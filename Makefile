# Two commands for a newcomer:  `make demo`  (all stages on the embedded default data)  and  `make test`.
# Each target sets up what it needs: a .venv with the pinned requirements (reused while the pins match)
# and the default dataset (Debian's dataset-fashion-mnist package).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.requirements.sha
REQ_SHA := $(shell sha256sum requirements.txt | cut -c1-16)
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
OUT     ?= out/demo

.PHONY: venv data demo test bench reproduce clean gpu

# (Re)create the venv only when requirements.txt changed since it was built.
venv:
	@if [ ! -x $(VPY) ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$(REQ_SHA)" ]; then \
	  echo "== setting up $(VENV) (about 2 minutes the first time)"; \
	  $(PY) -m venv $(VENV) && $(VPY) -m pip install -q --upgrade pip && \
	  $(VPY) -m pip install -q -r requirements.txt && echo "$(REQ_SHA)" > $(STAMP); \
	else echo "== $(VENV) is up to date"; fi

# The default data: Debian's Fashion-MNIST package (real idx .gz files). Installed when missing and root.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "== installing dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || exit 1; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
	    "or put a torchvision-style copy under data/FashionMNIST/raw/ (see README)"; fi; fi

test: venv data
	$(VPY) -m pytest

# The demo: every stage in order on Fashion-MNIST (a 20k subset, 32 px, VGG-16-BN at 1/4 width, 16 epochs,
# DeeperCluster with its own recipe: lr 0.1 x sqrt(64/3072), T = 3, smallest crop 8%; 04_train.RECIPES).
# Run again, it resumes $(OUT)'s finished training (04 warns: nothing to train): rm -rf $(OUT) to train anew.
DEMO_DATA  ?= --data fashion-mnist --subset 20000 --image_size 32 --seed 0
DEMO_MODEL ?= --width 0.25 --sobel
DEMO_CLUST ?= --k 160 --super_clusters 4 --pca_dim 64
DEMO_TRAIN ?= --epochs 16 --batch_size 64 --workers 2
demo: venv data
	$(VPY) 01_data.py --out_dir $(OUT) $(DEMO_DATA)
	$(VPY) 02_model.py --out_dir $(OUT) --image_size 32 $(DEMO_MODEL) --super_classes 16 --k 160
	$(VPY) 03_kmeans.py --out_dir $(OUT) $(DEMO_DATA) $(DEMO_CLUST)
	$(VPY) 04_train.py --out_dir $(OUT) $(DEMO_DATA) $(DEMO_CLUST) $(DEMO_TRAIN)
	$(VPY) 05_eval.py --out_dir $(OUT) --ckpt $(OUT)/02_model_init.pt,$(OUT)/04_train_last.pt \
	    --data fashion-mnist --train_subset 10000 --test_subset 0

bench: venv data
	$(VPY) bench/run_all.py

reproduce: venv data
	$(VPY) scripts/reproduce.py --data fashion-mnist --jobs 2

# GPU machines: swap the pinned faiss-cpu for Meta's faiss-gpu wheel of the same version in .venv,
# so that 03_kmeans's E-step (--kmeans_backend auto/faiss) runs on the GPU. faiss-gpu 1.15.1 (PyPI,
# CUDA 12: it pulls nvidia-cuda-runtime-cu12 and nvidia-cublas-cu12 >= 12.6, which live beside the
# pinned torch's CUDA 13 libraries; any driver that runs torch runs it) carries GPU code (SASS) for
# compute capability 7.0, 7.5, 8.0, 8.6, 8.9 and 9.0, and PTX for 9.0 (cuobjdump --list-elf and
# --list-ptx on its libfaiss.so): V100 to H100/H200. faiss-gpu-cu12 1.14.1 stops at 8.9, so every
# faiss call fails on an H100. The wheels are downloaded first (offline that step fails and changes
# nothing), then faiss-cpu is removed (both wheels own the one faiss package folder), and put back
# from the same folder if the install fails. `make venv` puts faiss-cpu back only when
# requirements.txt changes. Then run `bash bench/gpu_check.sh`. FAISS_GPU=... picks another wheel.
FAISS_VERSION := $(shell sed -n 's/^faiss-cpu==//p' requirements.txt)
FAISS_GPU ?= faiss-gpu==$(FAISS_VERSION)
FAISS_WHEELS ?= $(VENV)/wheels
gpu: venv
	@set -e; pip="$(VENV)/bin/pip"; \
	echo "== downloading $(FAISS_GPU) and its CUDA 12 libraries into $(FAISS_WHEELS)"; \
	$$pip download -q -d $(FAISS_WHEELS) "$(FAISS_GPU)" "faiss-cpu==$(FAISS_VERSION)" || \
	  { echo "== download failed (offline?): nothing changed, faiss-cpu stays"; exit 1; }; \
	$$pip uninstall -y -q faiss-cpu; \
	if ! $$pip install -q --no-index --find-links $(FAISS_WHEELS) "$(FAISS_GPU)"; then \
	  echo "== $(FAISS_GPU) did not install: putting faiss-cpu $(FAISS_VERSION) back"; \
	  $$pip install -q --no-index --find-links $(FAISS_WHEELS) "faiss-cpu==$(FAISS_VERSION)"; \
	  exit 1; fi
	$(VPY) -c "import faiss, torch; from support import common; \
	  ok = torch.cuda.is_available() and common.faiss_gpu_ok(faiss, 'cuda:0'); \
	  print('faiss', faiss.__version__, 'sees', faiss.get_num_gpus(), 'GPU(s); runs on cuda:0:', ok)"

clean:
	rm -rf out .pytest_cache
