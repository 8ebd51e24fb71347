"""Stage 2: the network. Sobel input layer, VGG-16-BN trunk up to fc7, the two-level heads and the hierarchical loss.

DeeperCluster trains one convnet to predict, for each image, a super-class s (a rotation r of a super-cluster u) and, inside
it, a sub-class z (a k-means cluster of u). Instead of one (4k)-way softmax (Eq. (5)), an S-way head V and S small k_s-way
heads W_s share the trunk (Eq. (8)), so each sample costs one S-way and one k_s-way softmax. This file builds the trunk
phi (fc7 before its ReLU: the feature 03 clusters), the heads and the loss. RotNet (S = 4, k_s = 1) and DeepCluster
(S = 1) are settings of the same code (PAPER.md §8). It reads official DeeperCluster weights and torchvision's.
Run as a script, it prints the layer table and the parameter counts and saves the initial weights.

Paper:  PAPER.md §1 (notation), §3 Eq. (8)-(9), §5.3 (network), §7 (gradient scale), §8, §11 pitfall 7
Reads:  nothing (load_trunk reads 02/04 checkpoints, official DeeperCluster files and torchvision state dicts)
Writes: <out_dir>/02_model_init.pt {format, version, stage, config, arch, model, heads}
Run:    python 02_model.py --out_dir out/demo
        python 02_model.py --out_dir out/full --width 1 --image_size 224      # paper trunk: 134.3M parameters
        python 02_model.py --out_dir out/rgb --no-sobel --super_classes 4 --k 1  # a RotNet model
Uses:   common (parse_config, run, UserError, ckpt_header, save_ckpt)
"""
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder that receives 02_model_init.pt
    width: float = 0.25  # channel multiplier for every layer, channels = max(1, round(c * width)) (paper: 1)
    image_size: int = 32  # input crop in pixels; fc6's input adapts to it (paper: 224)
    sobel: bool = True  # fixed grayscale + Sobel input layer (paper: on; RotNet models: off)
    fc_dim: int = 0  # d, the width of fc6 and fc7; 0 means round(4096 * width) (paper: 4096)
    super_classes: int = 16  # S = 4m with rotation, S = m without (paper: 16)
    k: int = 160  # sub-classes over all super-clusters, k_s = k / m (paper: 320000, so k_s = 80000)
    rotation: bool = True  # a super-class is a (super-cluster, rotation) pair; off: S = m, DeepCluster style
    seed: int = 0  # initialisation seed (paper: 1993)


CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # VGG configuration D
GX = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]  # Sobel kernels of PAPER.md §5.3 (nn.Conv2d weights: cross-correlation)
GY = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]


def channels(c, width):
    return max(1, round(c * width))


def _linear_init_(weight, bias, generator=None):
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, from an optional generator."""
    bound = 1 / math.sqrt(weight.shape[-1])
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)


# ---- §5.3 Sobel input layer (fixed) ----
def make_sobel():
    """grayscale 1x1 conv (weights 1/3, bias 0), then the two 3x3 Sobel filters with no padding; never trained."""
    gray = nn.Conv2d(3, 1, kernel_size=1)  # (B, 3, H, W) -> (B, 1, H, W), the mean of the 3 channels
    grad = nn.Conv2d(1, 2, kernel_size=3)  # (B, 1, H, W) -> (B, 2, H-2, W-2): Gx, Gy
    with torch.no_grad():
        gray.weight.fill_(1 / 3)
        gray.bias.zero_()
        grad.weight.copy_(torch.tensor([[GX], [GY]], dtype=grad.weight.dtype))  # (2, 1, 3, 3)
        grad.bias.zero_()
    return nn.Sequential(gray, grad).requires_grad_(False)  # .train() never touches requires_grad


# ---- §5.3 VGG-16-BN trunk: conv1..conv13, fc6, fc7 ----
def make_features(width, in_channels):
    """Same module indices as torchvision's vgg16_bn.features: [conv, bn, relu] per conv, a max-pool per 'M'."""
    layers = []
    for v in CFG_D:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        c = channels(v, width)
        layers += [nn.Conv2d(in_channels, c, kernel_size=3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        in_channels = c
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """phi = fc7(dropout(relu(fc6(flatten(features(input_layer(x))))))), fc7 before its ReLU (PAPER.md §1, §4.1)."""

    def __init__(self, width=1.0, image_size=224, sobel=True, fc_dim=None, generator=None):
        super().__init__()
        self.width, self.image_size, self.sobel = float(width), int(image_size), bool(sobel)
        # both input paths give S + 2 pixels to conv1; 5 pools then leave p x p: 224 -> 226 -> 7, 32 -> 34 -> 1
        self.grid = (self.image_size + 2) // 32
        if self.width <= 0 or self.grid < 1:
            raise common.UserError(f"--width {width} / --image_size {image_size}: need width > 0 and image_size >= 30")
        self.feature_dim = int(fc_dim) if fc_dim else channels(4096, self.width)  # d
        self.sobel_layer = make_sobel() if self.sobel else nn.Identity()
        self.features = make_features(self.width, 2 if self.sobel else 3)
        c5 = channels(512, self.width)
        d = self.feature_dim
        self.classifier = nn.Sequential(
            nn.Linear(c5 * self.grid * self.grid, d),  # fc6: (B, C5*p*p) -> (B, d); 25088 -> 4096 in the paper
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(d, d),  # fc7, no ReLU after it: its output is phi
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator=None):
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (9 C_out)), bias 0, as in the official code
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (9 * m.out_channels)), generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, running statistics reset
        for m in (self.classifier[0], self.classifier[3]):
            _linear_init_(m.weight, m.bias, generator)  # the official code leaves fc6/fc7 at nn.Linear's default

    def input_layer(self, x):
        """(B, 3, S, S) normalised image -> (B, 2 or 3, S+2, S+2), what conv1 sees (PAPER.md §5.3)."""
        if self.sobel:
            return self.sobel_layer(F.pad(x, (2, 2, 2, 2)))  # (B,3,S+4,S+4) -> gray (B,1,S+4,S+4) -> (B,2,S+2,S+2)
        return F.pad(x, (1, 1, 1, 1))  # (B, 3, S+2, S+2)

    def forward(self, x):
        h = self.features(self.input_layer(x))  # (B, C5, p, p)
        if h.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"this VGG was built for {self.image_size} px ({self.grid}x{self.grid} after conv13); "
                             f"input {tuple(x.shape)} gives {tuple(h.shape[-2:])}")
        return self.classifier(h.flatten(1))  # (B, C5*p*p) -> phi (B, d)

    def conv_outputs(self, x, layers):
        """{i: output of the ReLU after conv i (before pooling)} for i in layers (1..13); stops after the last one."""
        want = sorted({int(i) for i in layers})
        if not want or want[0] < 1 or want[-1] > 13:
            raise ValueError(f"conv layers are numbered 1..13, got {list(layers)}")
        out, i, h = {}, 0, self.input_layer(x)
        for m in self.features:
            h = m(h)
            if isinstance(m, nn.ReLU):  # the next module (conv or pool) is not in-place, so h stays intact
                i += 1
                if i in want:
                    out[i] = h  # (B, C_i, H_i, H_i)
                if i == want[-1]:
                    break
        return out

    def arch(self):
        return dict(width=self.width, image_size=self.image_size, sobel=self.sobel, fc_dim=self.feature_dim)


def build_model(arch, generator=None):
    return VGG(arch["width"], arch["image_size"], arch["sobel"], arch.get("fc_dim"), generator=generator)


# ---- §3 the heads: V (S-way) and W_0..W_{S-1} (k_s-way each), stacked ----
class Heads(nn.Module):
    def __init__(self, d, S, k_s, generator=None):
        super().__init__()
        self.d, self.S, self.k_s = int(d), int(S), int(k_s)
        self.V = nn.Linear(self.d, self.S)
        self.W = nn.Parameter(torch.empty(self.S, self.k_s, self.d))  # W_s = W[s], (k_s, d)
        self.b = nn.Parameter(torch.empty(self.S, self.k_s))  # bias of W_s = b[s]
        self.reset(generator)

    def reset(self, generator=None):
        """Fresh heads after a re-clustering (PAPER.md §5.1): nn.Linear's default init for V and every W_s."""
        _linear_init_(self.V.weight, self.V.bias, generator)
        _linear_init_(self.W, self.b, generator)

    def forward(self, f, s, grad_scale=None):
        """f = ReLU(phi) (B, d), s (B,) -> (logits_super (B, S), logits_sub (B, k_s)), logits_sub[n] = W[s_n] f_n + b[s_n].

        grad_scale (B,), optional: multiplies the gradient that sample n sends to W[s_n], b[s_n] (values unchanged).
        """
        logits_super = self.V(f)  # (B, S)
        W, b = self.W[s], self.b[s]  # each sample's head: (B, k_s, d), (B, k_s); B*k_s*d numbers (see hierarchical_loss)
        if grad_scale is not None and W.requires_grad:
            W.register_hook(lambda g: g * grad_scale.view(-1, 1, 1))
            b.register_hook(lambda g: g * grad_scale.view(-1, 1))
        # (B, k_s, d) @ (B, d, 1) + (B, k_s, 1) -> (B, k_s)
        logits_sub = torch.baddbmm(b.unsqueeze(2), W, f.unsqueeze(2)).squeeze(2)
        return logits_super, logits_sub


# ---- §3 the hierarchical loss, Eq. (8), and the accuracies of Eq. (9) ----
# Eq. (8)  L = (1/N) sum_n [ l(V f(x~_n), s_n) + sum_s y_ns * l(W_s f(x~_n), z_n) ],  f = ReLU(phi),  l: Eq. (1)
# The one-hot y_n keeps one term of the inner sum: Heads gathers W_{s_n}, so a sample costs an S-way and a k_s-way softmax.
# Eq. (9)  acc_joint = (1/B) sum_n 1[argmax V f = s_n] * 1[argmax W_{s_n} f = z_n]
# DEVIATION(paper): by default W_s gets the mixed-batch gradient, B_s/B (about 1/S) of the official per-group mean
# (PAPER.md §7), because one loss over one mixed batch is the plain single-process reading; sub_grad_scale=True restores it.
def hierarchical_loss(heads, phi, s, z, sub_grad_scale=False):
    """phi (B, d) fc7 before ReLU, s (B,) super-class, z (B,) sub-class local to s -> dict of losses and accuracies.

    RotNet (S = 4, k_s = 1): the k_s-way term is a 1-way softmax, always 0, so L = CE(V f, r). DeepCluster (S = 1):
    the S-way term is 0, so L = CE(W_0 f, z), Eq. (4). Both are this function, not copies (PAPER.md §8).
    sub_grad_scale=False (default, the single-process scheme of PAPER.md §7): one loss averaged over the mixed batch of B,
    so W_s receives (1/B) sum_{n in s} grad l_n, i.e. B_s/B of the group mean. sub_grad_scale=True reproduces the
    official sharded layout, where W_s's gradient is averaged over its own group only: the gradient that sample n sends
    to W_{s_n} and b_{s_n} is multiplied by B/B_{s_n}, so W_s.grad = (1/B_s) sum_{n in s} grad l_sub_n exactly. Only the
    heads' sub-class gradient changes: loss values, V's gradient and the trunk's gradient stay those of the plain batch
    mean, as in the official code, where the trunk and V are averaged over all ranks. B_s counts this process's batch.
    Cost: the gather W[s] holds B*k_s*d numbers (10 MB at B=64, k_s=40, d=1024; 1.3 GB per sample at the paper's
    k_s=80000, d=4096, which is why the official code gives each GPU a single super-class, PAPER.md §7).
    """
    f = F.relu(phi)  # (B, d): the heads see ReLU(fc7)
    scale = None
    if sub_grad_scale:
        B_s = torch.bincount(s, minlength=heads.S)  # (S,) samples of each super-class in this batch
        scale = s.numel() / B_s[s].to(phi.dtype)  # (B,) B / B_{s_n}
    logits_super, logits_sub = heads(f, s, grad_scale=scale)
    loss_super = F.cross_entropy(logits_super, s)  # (1/B) sum_n l(V f_n, s_n)
    loss_sub = F.cross_entropy(logits_sub, z)  # (1/B) sum_n l(W_{s_n} f_n, z_n)
    loss = loss_super + loss_sub  # Eq. (8)
    with torch.no_grad():
        ok_super = logits_super.argmax(1) == s
        ok_sub = logits_sub.argmax(1) == z  # with the true super-class's head W_{s_n}
        ok_joint = ok_super & ok_sub  # Eq. (9)
        acc_super, acc_sub, acc_joint = torch.stack([ok_super, ok_sub, ok_joint]).float().mean(1).tolist()  # one sync
    return dict(loss=loss, loss_super=loss_super, loss_sub=loss_sub, acc_super=acc_super, acc_sub=acc_sub,
                acc_joint=acc_joint)


# ---- interop: torchvision vgg16_bn keys, official DeeperCluster checkpoints, our 02/04 checkpoints ----
def torchvision_state_dict(model):
    """Keys of torchvision.models.vgg16_bn (features.*, classifier.0/3.*): our trunk without Sobel, minus its fc8.
    torchvision pads inside conv1 only and pools to 7x7; ours pads by 1 first, so ours(x) = tv(F.pad(x, (1,1,1,1)))."""
    if model.sobel:
        raise ValueError("a Sobel model has no torchvision counterpart (conv1 takes 2 channels); build it with sobel=False")
    return {k: v for k, v in model.state_dict().items() if k.startswith(("features.", "classifier."))}


def load_torchvision_state_dict(model, sd):
    if model.sobel:
        raise ValueError("a Sobel model has no torchvision counterpart (conv1 takes 2 channels); build it with sobel=False")
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("classifier.6.")})  # drop torchvision's fc8


def _read(path_or_sd):
    if not isinstance(path_or_sd, (str, os.PathLike)):
        return path_or_sd, "<state dict>"
    path = os.fspath(path_or_sd)
    if not os.path.exists(path):
        raise common.UserError(f"{path} does not exist: run 02_model.py or 04_train.py first, or give a checkpoint path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:  # truncated, not a torch file, or pickled objects
        raise common.UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                               f"re-create it, or re-save its state dict with torch.save") from None


def infer_arch(sd, name="<state dict>"):
    """width, image_size, sobel, fc_dim from the tensor shapes of a trunk state dict (keys features.*, classifier.*)."""
    convs = sorted((k for k in sd if re.fullmatch(r"features\.\d+\.weight", k) and sd[k].dim() == 4),
                   key=lambda k: int(k.split(".")[1]))
    if len(convs) != 13 or "classifier.0.weight" not in sd or "classifier.3.weight" not in sd:
        raise common.UserError(f"{name} does not hold VGG-16 trunk weights: {len(convs)} of 13 conv layers, fc6/fc7 "
                               f"{'found' if 'classifier.0.weight' in sd else 'missing'} (first keys: {list(sd)[:4]})")
    c_in, c5 = sd[convs[0]].shape[1], sd[convs[-1]].shape[0]
    fc6 = sd["classifier.0.weight"]  # (d, C5 * p * p)
    p = math.isqrt(fc6.shape[1] // c5)
    if c_in not in (2, 3) or c5 * p * p != fc6.shape[1]:
        raise common.UserError(f"{name}: conv1 takes {c_in} channels and fc6 {tuple(fc6.shape)} does not fit conv13's {c5}")
    # every S with (S+2)//32 == p builds the same weights; 32p is the canonical one (224 for p = 7)
    return dict(width=c5 / 512, image_size=32 * p, sobel=c_in == 2, fc_dim=fc6.shape[0])


def load_official(path_or_sd, sobel=None):
    """Trunk from the official DeeperCluster layout (body.features.*, body.classifier.*, sobel.*, pred_layer.*, maybe
    under "state_dict", maybe with "module.") or a torchvision vgg16_bn state dict. -> (VGG, info)."""
    return _official(*_read(path_or_sd), sobel)


def _official(ck, name, sobel):
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else ck
    if not isinstance(sd, dict) or not any(torch.is_tensor(v) for v in sd.values()):
        what = f"top-level keys {list(ck)[:6]}" if isinstance(ck, dict) else f"a {type(ck).__name__}"
        raise common.UserError(f"{name} holds no state dict of tensors ({what}): give a trunk checkpoint")
    clean, ignored = {}, []
    for key, v in sd.items():
        k = re.sub(r"^(module\.)?(body\.)?(module\.)?", "", key)  # module.body.features.0.weight -> features.0.weight
        k = re.sub(r"^sobel\.", "sobel_layer.", k)
        if k.startswith(("pred_layer.", "classifier.6.")):  # official training head / torchvision fc8: not the trunk
            ignored.append(key)
        else:
            clean[k] = v
    return _build(clean, name, None, sobel, dict(source="official", ignored=ignored))


def _build(sd, name, arch, sobel, info):
    inferred = infer_arch(sd, name)
    arch = dict(arch or inferred)
    if arch["sobel"] != inferred["sobel"]:
        raise common.UserError(f"{name}: its arch says sobel={arch['sobel']}, but conv1 takes "
                               f"{2 if inferred['sobel'] else 3} channels")
    if sobel is not None and bool(sobel) != arch["sobel"]:  # PAPER.md §11 pitfall 7: say it, never guess silently
        raise common.UserError(f"{name} is a {'Sobel' if arch['sobel'] else 'RGB (no Sobel)'} trunk but sobel={sobel} "
                               f"was asked for: pass --{'' if arch['sobel'] else 'no-'}sobel")
    model = build_model(arch)
    for k, v in model.state_dict().items():  # no BN step counter before PyTorch 0.4.1; Sobel is fixed, may be left out
        if k.endswith("num_batches_tracked") or k.startswith("sobel_layer."):
            sd.setdefault(k, v)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise common.UserError(f"{name} does not fit arch {arch}: {' '.join(str(e).split())[:300]}") from None
    return model, dict(info, name=name, arch=model.arch())


def load_trunk(path_or_sd, sobel=None):
    """-> (VGG on CPU, in train mode like any new module; info dict with source, arch, name, ignored keys).

    Reads our 02/04 checkpoints ("arch" + "model"), official DeeperCluster files and torchvision state dicts, from a
    path or an in-memory dict. sobel: the setting the caller expects; a mismatch is an error (PAPER.md §11 pitfall 7)."""
    ck, name = _read(path_or_sd)
    if not isinstance(ck, dict):
        raise common.UserError(f"{name} holds a {type(ck).__name__}, not a checkpoint dict")
    if ck.get("format") != common.FORMAT:
        return _official(ck, name, sobel)
    if ck.get("version") != common.VERSION:
        raise common.UserError(f"{name} has format version {ck.get('version')}, this code reads version {common.VERSION}")
    if not isinstance(ck.get("model"), dict):
        raise common.UserError(f"{name} (stage {ck.get('stage')}) holds no trunk weights ('model'): "
                               f"give a 02_model_init.pt or 04_train_*.pt checkpoint")
    info = dict(source=ck.get("stage"), ignored=[], epoch=ck.get("epoch"))
    sd = {re.sub(r"^module\.", "", k): v for k, v in ck["model"].items()}  # in case a DDP wrapper was saved
    return _build(sd, name, ck.get("arch"), sobel, info)


# ---- the script: layer table, parameter counts, initial weights ----
def n_params(module, trainable=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def layer_table(arch, S=None, k_s=None):
    """[(layer, output shape, parameters)] for one image, from a copy on the meta device: no memory, no compute."""
    with torch.device("meta"):
        m = build_model(arch).eval()
        h = torch.zeros(1, 3, m.image_size, m.image_size)
        rows = [("input (normalised)", h.shape, 0)]
        h = m.input_layer(h)
        rows.append(("pad 2 + gray + Sobel (frozen)" if m.sobel else "pad 1", h.shape, n_params(m.sobel_layer, False)))
        conv, block, params = 0, 1, 0
        for layer in m.features:
            h = layer(h)
            params += sum(p.numel() for p in layer.parameters())
            if isinstance(layer, nn.ReLU):
                conv += 1
                rows.append((f"conv{conv} 3x3 + BN + ReLU", h.shape, params))
                params = 0
            elif isinstance(layer, nn.MaxPool2d):
                rows.append((f"pool{block}", h.shape, 0))
                block += 1
        h = m.classifier[0](h.flatten(1))
        rows.append(("fc6 + ReLU + dropout", h.shape, n_params(m.classifier[0])))
        rows.append(("fc7 = phi (no ReLU)", m.classifier[3](h).shape, n_params(m.classifier[3])))
        if S:
            rows.append((f"head V ({S}-way)", (1, S), m.feature_dim * S + S))
            rows.append((f"heads W_s ({S} x {k_s}-way)", (1, k_s), S * k_s * (m.feature_dim + 1)))
    return [(name, tuple(shape), p) for name, shape, p in rows]


def main(cfg):
    S = cfg.super_classes
    m = S // 4 if cfg.rotation else S  # number of super-clusters
    if S < 1 or (cfg.rotation and S % 4) or cfg.k < 1 or cfg.k % m:
        raise common.UserError(f"--super_classes {S} --k {cfg.k}: S must be 4m with rotation (m without, --no-rotation) "
                               f"and k a multiple of the number of super-clusters m")
    k_s = cfg.k // m  # Eq. (7)
    print(f"config: {cfg}")
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's global RNG untouched
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        model = VGG(cfg.width, cfg.image_size, cfg.sobel, cfg.fc_dim or None, generator=g)
        heads = Heads(model.feature_dim, S, k_s, generator=g)
    rows = layer_table(model.arch(), S, k_s)
    print(f"{'layer':34s} {'output shape':>22s} {'parameters':>14s}")
    for name, shape, p in rows:
        print(f"{name:34s} {str(shape):>22s} {p:>14,d}")
    trunk, frozen, head = n_params(model), n_params(model, False), n_params(heads)
    assert trunk + frozen + head == sum(p for _, _, p in rows)
    print(f"trunk {trunk:,d} trainable (+{frozen} frozen Sobel) | heads {head:,d} (S={S}, k_s={k_s}, d={model.feature_dim}) "
          f"| total {trunk + head:,d}")
    print("reference: torchvision vgg16_bn has 138,365,992 parameters = our width-1, 224 px RGB trunk (134,268,992) "
          "+ its 1000-way fc8 (4,097,000)")
    ck = common.ckpt_header("02_model", cfg) | {"arch": model.arch(), "model": model.state_dict(),
                                                "heads": heads.state_dict()}
    print(f"wrote {common.save_ckpt(ck, os.path.join(cfg.out_dir, '02_model_init.pt'))}")
    return model, heads


if __name__ == "__main__":
    common.run(main, Config)
