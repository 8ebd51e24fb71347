"""Trunk weights in and out of 02_model.VGG: our 02/04 checkpoints, official DeeperCluster
checkpoints, torchvision's vgg16_bn. Not the paper: a first reader can skip this file. It imports
stage 02 because 02's VGG is the building block it adapts (02 imports nothing from here).

load_trunk is how 03, 04 and 05 read a trunk from any of these files.
- torchvision: our trunk without Sobel has the keys of torchvision.models.vgg16_bn (features.*,
  classifier.0/3.*) minus its fc8. torchvision pads inside conv1 only and pools to 7x7; ours pads
  by 1 first, so ours(x) = torchvision's fc7 of F.pad(x, (1, 1, 1, 1)).
- official DeeperCluster: Net(padding, sobel, body, pred_layer), saved under "state_dict", with
  DDP's "module." in front (module.body.features.*) or inside (body.module.features.*).
  The architecture (width, image size, Sobel, d) is read from the tensor shapes.
Paper:  PAPER.md §5.3 (network), §11 pitfall 7 (a Sobel mismatch is an error, never a guess)
Uses:   02_model (build_model), common (UserError, FORMAT, VERSION)
"""
import importlib
import math
import os
import re

import torch

from support import common

m02 = importlib.import_module("02_model")  # 02_model.py: the VGG trunk this file adapts

NO_TV = ("a Sobel model has no torchvision counterpart (conv1 takes 2 channels); "
         "build it with sobel=False")


# ---- torchvision vgg16_bn ----
def torchvision_state_dict(model):
    """Our trunk's weights under torchvision vgg16_bn's keys (all but its fc8)."""
    if model.sobel:
        raise ValueError(NO_TV)
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k.startswith(("features.", "classifier."))}


def load_torchvision_state_dict(model, sd):
    if model.sobel:
        raise ValueError(NO_TV)
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("classifier.6.")})


# ---- reading a file, the architecture from the shapes ----
def read_checkpoint(path_or_sd, name="<state dict>"):
    """-> (contents, name) of a checkpoint file (a dict given is passed through), with a one-line
    error for a missing or unreadable file."""
    if not isinstance(path_or_sd, (str, os.PathLike)):
        return path_or_sd, name
    path = os.fspath(path_or_sd)
    if not os.path.exists(path):
        raise common.UserError(f"{path} does not exist: run 02_model.py or 04_train.py first, "
                               f"or give a checkpoint path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:  # truncated, not a torch file, or pickled objects
        raise common.UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                               f"{str(e)[:120]}); re-create it, or re-save its state dict "
                               f"with torch.save") from None


def infer_arch(sd, name="<state dict>"):
    """width, image_size, sobel, fc_dim from the shapes of a trunk state dict (features.*,
    classifier.*)."""
    convs = [k for k in sd if re.fullmatch(r"features\.\d+\.weight", k) and sd[k].dim() == 4]
    convs.sort(key=lambda k: int(k.split(".")[1]))
    fc = ["classifier.0.weight", "classifier.3.weight"]
    if len(convs) != 13 or any(k not in sd for k in fc):
        found = "found" if all(k in sd for k in fc) else "missing"
        raise common.UserError(f"{name} does not hold VGG-16 trunk weights: {len(convs)} of 13 "
                               f"conv layers, fc6/fc7 {found} (first keys: {list(sd)[:4]})")
    c_in, c5 = sd[convs[0]].shape[1], sd[convs[-1]].shape[0]
    fc6 = sd["classifier.0.weight"]  # (d, C5 * p * p)
    p = math.isqrt(fc6.shape[1] // c5)
    if c_in not in (2, 3) or c5 * p * p != fc6.shape[1]:
        raise common.UserError(f"{name}: conv1 takes {c_in} channels and fc6 {tuple(fc6.shape)} "
                               f"does not fit conv13's {c5}")
    # every S with (S+2)//32 == p builds the same weights; 32p is the canonical one (224 for p = 7)
    return dict(width=c5 / 512, image_size=32 * p, sobel=c_in == 2, fc_dim=fc6.shape[0])


def _build(sd, name, arch, sobel, info):
    inferred = infer_arch(sd, name)
    arch = dict(arch or inferred)
    if arch["sobel"] != inferred["sobel"]:
        raise common.UserError(f"{name}: its arch says sobel={arch['sobel']}, but conv1 takes "
                               f"{2 if inferred['sobel'] else 3} channels")
    if sobel is not None and bool(sobel) != arch["sobel"]:  # §11 pitfall 7: say it, never guess
        kind = "Sobel" if arch["sobel"] else "RGB (no Sobel)"
        flag = "--sobel" if arch["sobel"] else "--no-sobel"
        raise common.UserError(f"{name} is a {kind} trunk but sobel={sobel} was asked for: "
                               f"pass {flag}")
    model = m02.build_model(arch)
    for k, v in model.state_dict().items():
        # no BN step counter before PyTorch 0.4.1; the Sobel layer is fixed and may be left out
        if k.endswith("num_batches_tracked") or k.startswith("sobel_layer."):
            sd.setdefault(k, v)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise common.UserError(f"{name} does not fit arch {arch}: {msg}") from None
    return model, dict(info, name=name, arch=model.arch())


# ---- official DeeperCluster checkpoints ----
def official_key(key):
    """An official key -> ours: DDP's "module." removed wherever it is, "body." dropped, "sobel."
    renamed. module.body.features.0.weight, body.module.features.0.weight -> features.0.weight;
    module.sobel.0.weight, sobel.module.0.weight -> sobel_layer.0.weight."""
    k = re.sub(r"(^|\.)module\.", r"\1", key)  # every DDP wrapper level, at the start or inside
    k = re.sub(r"^body\.", "", k)
    return re.sub(r"^sobel\.", "sobel_layer.", k)


def load_official(path_or_sd, sobel=None):
    """Trunk from the official DeeperCluster layout (body.*, sobel.*, pred_layer.*, maybe under
    "state_dict", maybe with DDP's "module.") or torchvision vgg16_bn weights -> (VGG, info)."""
    return _official(*read_checkpoint(path_or_sd), sobel)


def _official(ck, name, sobel):
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        what = f"keys {list(ck)[:6]}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise common.UserError(f"{name} holds no state dict of tensors ({what}): "
                               f"give a trunk checkpoint")
    clean, ignored = {}, []
    for key, v in sd.items():
        k = official_key(key)
        if k.startswith(("pred_layer.", "classifier.6.")):  # official head, torchvision's fc8
            ignored.append(key)
        else:
            clean[k] = v
    return _build(clean, name, None, sobel, dict(source="official", ignored=ignored))


# ---- any of the above, or our own 02/04 checkpoints ----
def load_trunk(path_or_sd, sobel=None, name="<state dict>"):
    """-> (VGG on CPU, in train mode like any new module; info: source, arch, name, ignored keys).

    Reads our 02/04 checkpoints ("arch" + "model"), official DeeperCluster files and torchvision
    weights, from a path or an in-memory dict (named `name` in errors). sobel: the setting the
    caller expects; a mismatch is an error (PAPER.md §11 pitfall 7)."""
    ck, name = read_checkpoint(path_or_sd, name)
    if not isinstance(ck, dict):
        raise common.UserError(f"{name} holds a {type(ck).__name__}, not a checkpoint dict")
    if ck.get("format") != common.FORMAT:
        return _official(ck, name, sobel)
    if ck.get("version") != common.VERSION:
        raise common.UserError(f"{name} has format version {ck.get('version')}, "
                               f"this code reads version {common.VERSION}")
    if not isinstance(ck.get("model"), dict):
        raise common.UserError(f"{name} (stage {ck.get('stage')}) holds no trunk weights "
                               f"('model'): give a 02_model_init.pt or 04_train_*.pt checkpoint")
    info = dict(source=ck.get("stage"), ignored=[], epoch=ck.get("epoch"))
    sd = {re.sub(r"^module\.", "", k): v for k, v in ck["model"].items()}  # a DDP wrapper saved
    return _build(sd, name, ck.get("arch"), sobel, info)
