"""Stage 2: the network. Sobel input layer, VGG-16-BN trunk up to fc7, the two-level heads, the
hierarchical loss.

DeeperCluster trains one convnet to predict, for each image, a super-class s (a rotation r of a
super-cluster u) and, inside it, a sub-class z (a k-means cluster of u). Instead of one (4k)-way
softmax (Eq. (5)), an S-way head V and S small k_s-way heads W_s share the trunk (Eq. (8)), so each
sample costs one S-way and one k_s-way softmax. This file builds the trunk phi (fc7 before its ReLU:
the feature 03 clusters), the heads and the loss. RotNet (S = 4, k_s = 1) and DeepCluster (S = 1)
are settings of the same code (PAPER.md §8, method_shape). Run as a script, it prints the layer
table and the parameter counts and saves the initial weights. Reading trunk weights from files (our
checkpoints, official DeeperCluster ones, torchvision's) is support/interop.py's job.

Paper:  PAPER.md §1 (notation), §3 Eq. (8)-(9), §5.3 (network), §7 (gradient scale), §8
Reads:  nothing
Writes: <out_dir>/02_model_init.pt {format, version, stage, config, arch, model, heads}
Run:    python 02_model.py --out_dir out/demo
        python 02_model.py --out_dir out/full --width 1 --image_size 224  # paper trunk: 134.3M
        python 02_model.py --out_dir out/rgb --no-sobel --super_classes 4 --k 1  # a RotNet model
Uses:   support.common (run, UserError, ckpt_header, save_ckpt, all_reduce_sum)
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import common


@dataclass(frozen=True)
class Config:
    out_dir: str = "out"  # folder that receives 02_model_init.pt
    width: float = 0.25  # channel multiplier, channels = max(1, round(c * width)) (paper: 1)
    image_size: int = 32  # input crop in pixels; fc6's input adapts to it (paper: 224)
    sobel: bool = True  # fixed grayscale + Sobel input layer (paper: on; RotNet models: off)
    fc_dim: int = 0  # d, the width of fc6 and fc7; 0 means round(4096 * width) (paper: 4096)
    super_classes: int = 16  # S = 4m with rotation, S = m without (paper: 16)
    k: int = 160  # sub-classes over all super-clusters, k_s = k / m (paper: 320000, so k_s = 80000)
    rotation: bool = True  # a super-class is a (super-cluster, rotation) pair; off: S = m
    seed: int = 0  # initialisation seed (paper: 1993)


# VGG configuration D: output channels of conv1..conv13, "M" a 2x2 max-pool
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Sobel kernels of PAPER.md §5.3 (nn.Conv2d computes a cross-correlation)
GX = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
GY = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]


def channels(c, width):
    return max(1, round(c * width))


def _linear_init_(weight, bias, generator=None, std=None):
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias; with
    `std`, DeepCluster's top layer instead: weight N(0, std^2), bias 0 (PAPER.md §8)."""
    bound = 1 / math.sqrt(weight.shape[-1])
    with torch.no_grad():
        if std is not None:
            weight.normal_(0.0, std, generator=generator)
            bias.zero_()
            return
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)


# ---- §5.3 Sobel input layer (fixed) ----
def make_sobel():
    """grayscale 1x1 conv (weights 1/3, bias 0), then the two 3x3 Sobel filters, no padding.
    Never trained."""
    gray = nn.Conv2d(3, 1, kernel_size=1)  # (B, 3, H, W) -> (B, 1, H, W), the channel mean
    grad = nn.Conv2d(1, 2, kernel_size=3)  # (B, 1, H, W) -> (B, 2, H-2, W-2): Gx, Gy
    with torch.no_grad():
        gray.weight.fill_(1 / 3)
        gray.bias.zero_()
        grad.weight.copy_(torch.tensor([[GX], [GY]], dtype=grad.weight.dtype))  # (2, 1, 3, 3)
        grad.bias.zero_()
    return nn.Sequential(gray, grad).requires_grad_(False)  # .train() never touches requires_grad


# ---- §5.3 VGG-16-BN trunk: conv1..conv13, fc6, fc7 ----
def make_features(width, in_channels):
    """torchvision vgg16_bn.features' indices: [conv, bn, relu] per conv, a pool per 'M'."""
    layers = []
    for v in CFG_D:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        c = channels(v, width)
        layers.append(nn.Conv2d(in_channels, c, kernel_size=3, padding=1))
        layers.append(nn.BatchNorm2d(c))
        layers.append(nn.ReLU(inplace=True))
        in_channels = c
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """phi = fc7(dropout(relu(fc6(flatten(features(input_layer(x))))))), fc7 before its ReLU
    (PAPER.md §1, §4.1)."""

    def __init__(self, width=1.0, image_size=224, sobel=True, fc_dim=None, generator=None):
        super().__init__()
        self.width = float(width)
        self.image_size = int(image_size)
        self.sobel = bool(sobel)
        # both input paths give S + 2 pixels to conv1; 5 pools leave p x p:
        # 224 -> 226 -> 7, 32 -> 34 -> 1
        self.grid = (self.image_size + 2) // 32
        if self.width <= 0 or self.grid < 1:
            raise common.UserError(f"--width {width} / --image_size {image_size}: "
                                   f"need width > 0 and image_size >= 30")
        self.feature_dim = int(fc_dim) if fc_dim else channels(4096, self.width)  # d
        self.sobel_layer = make_sobel() if self.sobel else nn.Identity()
        self.features = make_features(self.width, 2 if self.sobel else 3)
        c5 = channels(512, self.width)
        d = self.feature_dim
        self.classifier = nn.Sequential(
            nn.Linear(c5 * self.grid * self.grid, d),  # fc6: (B, C5*p*p) -> (B, d); 25088 -> 4096
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(d, d),  # fc7, no ReLU after it: its output is phi
        )
        self.reset_parameters(generator)

    def reset_parameters(self, generator=None):
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (9 C_out)), bias 0, as in the official code
                std = math.sqrt(2.0 / (9 * m.out_channels))
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, running statistics reset
        for m in (self.classifier[0], self.classifier[3]):  # official: nn.Linear's default
            _linear_init_(m.weight, m.bias, generator)

    def input_layer(self, x):
        """(B, 3, S, S) normalised image -> (B, 2 or 3, S+2, S+2), what conv1 sees (§5.3)."""
        if self.sobel:
            # (B, 3, S+4, S+4) -> gray (B, 1, S+4, S+4) -> Gx, Gy (B, 2, S+2, S+2)
            return self.sobel_layer(F.pad(x, (2, 2, 2, 2)))
        return F.pad(x, (1, 1, 1, 1))  # (B, 3, S+2, S+2)

    def forward(self, x):
        h = self.features(self.input_layer(x))  # (B, C5, p, p)
        if h.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"this VGG was built for {self.image_size} px ({self.grid}x"
                             f"{self.grid} after conv13); input {tuple(x.shape)} gives "
                             f"{tuple(h.shape[-2:])}")
        return self.classifier(h.flatten(1))  # (B, C5*p*p) -> phi (B, d)

    def conv_outputs(self, x, layers):
        """{i: output of the ReLU after conv i (before pooling)} for i in layers (1..13)."""
        want = sorted({int(i) for i in layers})
        if not want or want[0] < 1 or want[-1] > 13:
            raise ValueError(f"conv layers are numbered 1..13, got {list(layers)}")
        out = {}
        i = 0
        h = self.input_layer(x)
        for m in self.features:
            h = m(h)
            if isinstance(m, nn.ReLU):  # the next module (conv or pool) is not in-place
                i += 1
                if i in want:
                    out[i] = h  # (B, C_i, H_i, H_i)
                if i == want[-1]:
                    break  # stop after the last layer asked for
        return out

    def arch(self):
        return dict(width=self.width, image_size=self.image_size, sobel=self.sobel,
                    fc_dim=self.feature_dim)


def build_model(arch, generator=None):
    return VGG(arch["width"], arch["image_size"], arch["sobel"], arch.get("fc_dim"),
               generator=generator)


# ---- §8 the methods as settings of one network: S super-classes, k_s sub-classes each ----
METHODS = ("deepercluster", "rotnet", "deepcluster", "deepcluster-2level", "supervised")


def method_shape(method, k, m, n_classes=None):
    """-> dict(S, m, k_s, rotate, cluster) of a method (PAPER.md §8). deepercluster: S = 4m
    (super-cluster, rotation) pairs, k_s = k/m. deepcluster: one super-cluster, so S = 1 and V is a
    1-way head (loss 0), W_0 the k-way head of Eq. (4), no rotation. deepcluster-2level: S = m,
    no rotation. rotnet: S = 4 rotations, k_s = 1 (a loss of 0), no clustering. supervised: S = 1,
    k_s = n_classes, the true labels as z."""
    if method == "rotnet":
        return dict(S=4, m=1, k_s=1, rotate=True, cluster=False)
    if method == "supervised":
        return dict(S=1, m=1, k_s=n_classes, rotate=False, cluster=False)
    m = 1 if method == "deepcluster" else m
    rotate = method == "deepercluster"
    return dict(S=4 * m if rotate else m, m=m, k_s=k // m, rotate=rotate, cluster=True)


# ---- §3 the heads: V (S-way) and W_0..W_{S-1} (k_s-way each), stacked ----
def row_generators(S, generator=None):
    """-> S generators, the s-th seeded by the s-th of S seeds drawn from `generator`: one per
    sub-class head W_s (Heads.reset)."""
    device = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (S,), generator=generator, device=device).tolist()
    return [torch.Generator(device).manual_seed(int(x)) for x in seeds]


class Heads(nn.Module):
    """V = nn.Linear(d, S); W (S, k_s, d) and b (S, k_s) hold W_s and its bias as row s.
    w_std: None = nn.Linear's default init for W_s (DeeperCluster); 0.01 = DeepCluster's top layer,
    N(0, 0.01^2) weights and zero bias (PAPER.md §8)."""

    def __init__(self, d, S, k_s, generator=None, w_std=None):
        super().__init__()
        self.d, self.S, self.k_s, self.w_std = int(d), int(S), int(k_s), w_std
        self.V = nn.Linear(self.d, self.S)
        self.W = nn.Parameter(torch.empty(self.S, self.k_s, self.d))
        self.b = nn.Parameter(torch.empty(self.S, self.k_s))
        self.reset(generator)

    def reset(self, generator=None):
        """Fresh heads after a re-clustering (PAPER.md §5.1): nn.Linear's default init (W_s:
        w_std's normal init when given). V draws from `generator`, then S seeds, one per
        super-class; W_s, b_s draw from a generator of their own seeded with seed s, so any W_s
        can be drawn alone and equals its row here (the paper's layout shards the heads)."""
        _linear_init_(self.V.weight, self.V.bias, generator)
        for s, g in enumerate(row_generators(self.S, generator)):
            _linear_init_(self.W[s], self.b[s], g, self.w_std)

    def sub_heads(self, ts):
        """[(W_t (k_s, d), b_t (k_s,)) for t in ts], the sub-class heads of super-classes ts, views
        of rows of W and b from one unbind of each: backward then writes W's gradient once, where
        each W[t] would zero-fill an (S, k_s, d) gradient of its own."""
        W, b = self.W.unbind(0), self.b.unbind(0)
        return [(W[t], b[t]) for t in ts]


def scale_grad(x, c):
    """x in the forward pass, c times its gradient in the backward pass.

    x - x.detach() is exactly 0: the value is x bit for bit, and only that term carries a gradient.
    Chosen over backward hooks (state hidden on tensors) and over scaling .grad after backward
    (which would have to know B_t after DDP's all-reduce): the loss stays a plain function."""
    return x.detach() + c * (x - x.detach())


# ---- §3 the hierarchical loss, Eq. (8), and the accuracies of Eq. (9) ----
# hierarchical_loss's outputs that 04 logs (sums over the batch, per epoch): 04_train_log.jsonl
TRAIN_KEYS = ("loss", "loss_super", "loss_sub", "acc_super", "acc_sub", "acc_joint")
# Eq. (8)  L = (1/N) sum_n [ l(V f(x~_n), s_n) + sum_s y_ns * l(W_s f(x~_n), z_n) ],  f = ReLU(phi)
# The one-hot y_n keeps one term of the inner sum. Sorted by s, the batch is one block per
# super-class t, so the sub-class term is one GEMM per super-class present: (B_t, d) @ (d, k_s).
# Eq. (9)  acc_joint = (1/B) sum_n 1[argmax V f = s_n] * 1[argmax W_{s_n} f = z_n]
# DEVIATION(paper): by default W_s gets the mixed-batch gradient, B_s/B (about 1/S) of the official
# per-group mean (PAPER.md §7), because one loss over one mixed batch is the plain single-process
# reading; sub_grad_scale=True restores the official scale.
def hierarchical_loss(heads, phi, s, z, sub_grad_scale=False, counts=None):
    """phi (B, d) fc7 before ReLU, s (B,) super-class, z (B,) sub-class local to s -> {TRAIN_KEYS:
    0-dim tensors}: the losses (with gradient) and the accuracies (no host sync).

    heads: V (d -> S), S and sub_heads([t, ...]) -> [(W_t, b_t), ...] (Heads, or the paper's
    sharded layout whose heads hold only their own W_t). RotNet (S = 4, k_s = 1): the k_s-way
    term is a 1-way softmax, always 0, so L = CE(V f, r). DeepCluster (S = 1): the S-way term is
    0, so L = CE(W_0 f, z), Eq. (4).
    sub_grad_scale=True: the gradient that reaches W_t, b_t is multiplied by B/B_t, so W_t.grad is
    the mean over group t only, as in the official layout (PAPER.md §7); loss values and the
    gradients of V and of the trunk stay those of the batch mean. B_t counts this process's batch.
    counts: [B_0 .. B_{S-1}] when the caller has s on the host (04 does): on a GPU, counting s
    there would stop the host in mid-forward until the trunk is done (an H200's step went from 0.80
    to 0.83 of a plain VGG step without it, bench/RESULTS.md); None counts s where it is (a sync).
    Memory: W, its gradient and (B, k_s) logits; never a per-sample copy of W_{s_n} (B, k_s, d).
    """
    B = len(s)
    f = F.relu(phi)  # (B, d): the heads see ReLU(fc7)
    logits_super = heads.V(f)  # (B, S)
    order = torch.argsort(s, stable=True)  # (B,) the batch grouped by super-class
    B_s = counts or torch.bincount(s, minlength=heads.S).tolist()  # [B_0 .. B_{S-1}]
    present = [t for t in range(heads.S) if B_s[t] > 0]
    f_blocks = f[order].split([B_s[t] for t in present])  # one (B_t, d) block per t present
    logits_sub = []
    for t, f_t, (W_t, b_t) in zip(present, f_blocks, heads.sub_heads(present)):  # (k_s, d), (k_s,)
        if sub_grad_scale and B_s[t] < B:  # B/B_t = 1 when the batch is one group (grouped layout)
            W_t = scale_grad(W_t, B / B_s[t])
            b_t = scale_grad(b_t, B / B_s[t])
        logits_sub.append(F.linear(f_t, W_t, b_t))  # (B_t, k_s) = f_t W_t^T + b_t
    logits_sub = torch.cat(logits_sub)  # (B, k_s), rows in the order of `order`
    z_sorted = z[order]
    loss_super = F.cross_entropy(logits_super, s)  # (1/B) sum_n l(V f_n, s_n)
    loss_sub = F.cross_entropy(logits_sub, z_sorted)  # (1/B) sum_n l(W_{s_n} f_n, z_n)
    loss = loss_super + loss_sub  # Eq. (8)
    with torch.no_grad():
        ok_super = (logits_super.argmax(1) == s)[order]
        ok_sub = logits_sub.argmax(1) == z_sorted  # with the true super-class's head W_{s_n}
        ok_joint = ok_super & ok_sub  # Eq. (9)
        acc = torch.stack([ok_super, ok_sub, ok_joint]).float().mean(1)  # (3,) on the device
    return dict(loss=loss, loss_super=loss_super, loss_sub=loss_sub,
                acc_super=acc[0], acc_sub=acc[1], acc_joint=acc[2])


def batch_sums(out, b):
    """(7,) float64 on the device: hierarchical_loss's TRAIN_KEYS times b, then b, summed over the
    ranks' parts of the global batch (DIST: one all-reduce). No host sync: check_finite does it."""
    vals = torch.stack([out[k].detach().double() for k in TRAIN_KEYS]) * b
    return common.all_reduce_sum(torch.cat([vals, vals.new_tensor([b])]))


def check_finite(sums):
    """Raise FloatingPointError when batch_sums' loss is not finite: the step's one host sync,
    which 04 places after backward is queued and before any update, so the GPU never waits."""
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"non-finite loss ({float(sums[0] / sums[-1]):.4g})")
    return sums


# ---- the script: layer table, parameter counts, initial weights ----
def n_params(module, trainable=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def layer_table(arch, S=None, k_s=None):
    """[(layer, output shape, parameters)] for one image, from a copy on the meta device."""
    with torch.device("meta"):
        m = build_model(arch).eval()
        h = torch.zeros(1, 3, m.image_size, m.image_size)
        rows = [("input (normalised)", h.shape, 0)]
        h = m.input_layer(h)
        name = "pad 2 + gray + Sobel (frozen)" if m.sobel else "pad 1"
        rows.append((name, h.shape, n_params(m.sobel_layer, False)))
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
    common.check_ranges(cfg, at_least_0=("fc_dim",))  # 0 = round(4096 * width)
    S = cfg.super_classes
    m = S // 4 if cfg.rotation else S  # number of super-clusters
    if S < 1 or (cfg.rotation and S % 4) or cfg.k < 1 or cfg.k % m:
        raise common.UserError(f"--super_classes {S} --k {cfg.k}: S must be 4m with rotation "
                               f"(m with --no-rotation) and k a multiple of the number of "
                               f"super-clusters m")
    k_s = cfg.k // m  # Eq. (7)
    print(f"config: {cfg}")
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's global RNG is untouched
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
    print(f"trunk {trunk:,d} trainable (+{frozen} frozen Sobel) | heads {head:,d} "
          f"(S={S}, k_s={k_s}, d={model.feature_dim}) | total {trunk + head:,d}")
    print("reference: torchvision vgg16_bn has 138,365,992 parameters = our width-1, 224 px RGB "
          "trunk (134,268,992) + its 1000-way fc8 (4,097,000)")
    ck = common.ckpt_header("02_model", cfg)
    ck |= {"arch": model.arch(), "model": model.state_dict(), "heads": heads.state_dict()}
    print(f"wrote {common.save_ckpt(ck, os.path.join(cfg.out_dir, '02_model_init.pt'))}")
    return model, heads


if __name__ == "__main__":
    common.run(main, Config)
