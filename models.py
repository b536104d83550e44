"""Backbones and heads for the AllNC reproduction.

CIFAR ResNets (He et al. 2016, option-A shortcut, as in LDAM-DRW, akamaster/pytorch_resnet_cifar10
and GLMC's ResNet_cifar.py), stages of width / 2 width / 4 width channels, feature 4 width:

    depth | blocks/stage | width 16 (LDAM/BCL)  | width 64 (GLMC's "resnet32", nf=64)
    ------+--------------+----------------------+------------------------------------
       8  |      1       |  0.08M               |  1.2M
      20  |      3       |  0.27M               |  4.3M
      32  |      5       |  0.46M               |  7.4M
      44  |      7       |  0.66M               | 10.5M
      56  |      9       |  0.85M               | 13.6M
    (parameters with a 10-class linear classifier)

ImageNet-LT / iNaturalist 2018: torchvision ResNeXt-50-32x4d / ResNet-50 without their fc (2048-d).
`python models.py` prints and checks the parameter counts.
"""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# CIFAR ResNet-(6n+2)

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else 0

    def shortcut(self, x):
        # Option A: subsample and zero-pad channels; no parameters.
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """The encoder phi: image -> 4*width-d feature (global average pool after three stages)."""

    def __init__(self, depth=32, in_channels=3, width=16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = 4 * width
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def torchvision_encoder(name):
    """ResNeXt-50-32x4d or ResNet-50 from torchvision (random init), fc removed: 2048-d features."""
    import torchvision
    net = {"resnext50": torchvision.models.resnext50_32x4d, "resnet50": torchvision.models.resnet50}[name](weights=None)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def encoder_for(arch, depth=32, in_channels=3, width=16):
    if arch == "resnet_cifar":
        return ResNetCifar(depth, in_channels, width)
    return torchvision_encoder(arch)

# ----------------------------------------------------------------------------------------------
# Heads. Every head maps the encoder feature to (logits, h) where h is the vector the classifier
# acts on (used by the NC metrics), and exposes classifier_weight() as a C x d matrix.

def mlp(din, dhidden, dout):
    return nn.Sequential(nn.Linear(din, dhidden), nn.BatchNorm1d(dhidden), nn.ReLU(inplace=True),
                         nn.Linear(dhidden, dout))


def simplex_etf(d, C, generator=None):
    """M = sqrt(C/(C-1)) U (I - 11^T/C), U a random d x C matrix with orthonormal columns (Eq. 1)."""
    if d < C:
        raise ValueError(f"a simplex ETF of {C} classes needs a feature dimension >= {C}, got {d}")
    U, _ = torch.linalg.qr(torch.randn(d, C, generator=generator))
    return math.sqrt(C / (C - 1)) * U @ (torch.eye(C) - torch.ones(C, C) / C)


class LinearHead(nn.Module):
    """Learnable linear classifier f (CE, AllNC). heads=2 adds GLMC's conventional head `fc_ce`
    (trained by CE); `fc` is then GLMC's rebalanced head fc_cb, which predicts and is measured."""

    def __init__(self, d, C, heads=1):
        super().__init__()
        self.fc = nn.Linear(d, C)
        self.fc_ce = nn.Linear(d, C) if heads == 2 else None

    def forward(self, feat):
        return self.fc(feat), feat

    def ce_logits(self, feat):
        """Logits the CE term of Eq. 12 sees: the conventional head if there is one, else f."""
        return self.fc_ce(feat) if self.fc_ce is not None else self.fc(feat)

    def classifier_weight(self):
        return self.fc.weight

    def classifier_bias(self):
        return self.fc.bias


class ETFHead(nn.Module):
    """Fixed simplex-ETF classifier (Yang et al. 2022): BatchNorm1d, l2-normalise, logits h M.
    When the encoder is narrower than C, a linear layer widens it to C first."""

    def __init__(self, d, C, seed=0):
        super().__init__()
        dh = max(d, C)
        self.widen = nn.Linear(d, dh) if dh != d else nn.Identity()
        self.bn = nn.BatchNorm1d(dh)
        self.register_buffer("M", simplex_etf(dh, C, torch.Generator().manual_seed(seed)))

    def forward(self, feat):
        h = F.normalize(self.bn(self.widen(feat)), dim=1)
        return h @ self.M, h

    def classifier_weight(self):
        return self.M.t()

    def classifier_bias(self):
        return None


class RotatedETFHead(nn.Module):
    """RBL (Gao et al. 2023): logit = f(x)^T R M*, R = exp(A - A^T) learnable orthogonal d x d."""

    def __init__(self, d, C, seed=0):
        super().__init__()
        dh = max(d, C)
        self.widen = nn.Linear(d, dh) if dh != d else nn.Identity()
        rot = nn.Linear(dh, dh, bias=False)
        nn.init.eye_(rot.weight)      # start at R = I (the parametrization keeps the given orthogonal start)
        self.rot = nn.utils.parametrizations.orthogonal(rot, orthogonal_map="matrix_exp")
        self.register_buffer("M", simplex_etf(dh, C, torch.Generator().manual_seed(seed)))

    def rotation(self):
        return self.rot.weight

    def forward(self, feat):
        h = self.widen(feat)
        return h @ self.rotation() @ self.M, h

    def classifier_weight(self):
        return (self.rotation() @ self.M).t()

    def classifier_bias(self):
        return None


def ncmc_center_counts(counts, f, aware=True):
    """Centers per class. 'aware': f for the smallest class, 1 for the largest, linear in
    log(count) between (our reading of NCMC's class-aware rule: minority classes get more)."""
    if not aware:
        return [f] * len(counts)
    lo, hi = math.log(min(counts)), math.log(max(counts))
    if hi - lo < 1e-12:
        return [f] * len(counts)
    return [1 + int(round((f - 1) * (hi - math.log(n)) / (hi - lo))) for n in counts]


class MultiCenterHead(nn.Module):
    """NCMC (Yan et al. 2024): fixed centers W_ij = cos(theta) v_ij + sin(theta) w_i per class i,
    w_i a simplex ETF, v_ij random unit vectors orthogonal to w_i. Features are l2-normalised;
    the class score is the cosine to the class's mean center (see README, NCMC assumptions)."""

    def __init__(self, d, C, centers, theta=0.2, seed=0):
        super().__init__()
        dh = max(d, C)
        g = torch.Generator().manual_seed(seed)
        self.widen = nn.Linear(d, dh) if dh != d else nn.Identity()
        w = simplex_etf(dh, C, g).t()                                   # C x dh, unit rows
        fmax = max(centers)
        v = torch.randn(C, fmax, dh, generator=g)
        v = v - (v * w[:, None]).sum(-1, keepdim=True) * w[:, None]     # orthogonal to w_i
        v = F.normalize(v, dim=-1)
        W = math.cos(theta) * v + math.sin(theta) * w[:, None]          # C x fmax x dh, unit rows
        mask = torch.arange(fmax)[None, :] < torch.tensor(centers)[:, None]
        self.register_buffer("W", W)
        self.register_buffer("mask", mask)
        self.register_buffer("mean_center", (W * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    def forward(self, feat):
        h = F.normalize(self.widen(feat), dim=1)
        return h @ F.normalize(self.mean_center, dim=1).t(), h

    def classifier_weight(self):
        return self.mean_center

    def classifier_bias(self):
        return None


class Net(nn.Module):
    """Encoder phi, classifier head f, and (AllNC only) projection proj1 and predictor proj2.

    proj 'linear': GLMC's projection_head Linear(d, 128) and contrast_head Linear(128, 128);
    proj 'mlp': SimSiam-style Linear-BN-ReLU-Linear (d -> 4d -> 128 and 128 -> 64 -> 128).
    The head always runs in float32 (autocast off): logits and the features it sees are exact."""

    def __init__(self, encoder, head, proj_dim=0, pred_hidden=0, proj="linear"):
        super().__init__()
        self.encoder, self.head = encoder, head
        d = encoder.out_dim
        self.proj1 = self.proj2 = None
        if proj_dim:
            self.proj1 = nn.Linear(d, proj_dim) if proj == "linear" else mlp(d, 4 * d, proj_dim)
            self.proj2 = nn.Linear(proj_dim, proj_dim) if proj == "linear" else mlp(proj_dim, pred_hidden, proj_dim)

    def forward(self, x):
        feat = self.encoder(x).float()
        with torch.autocast(feat.device.type, enabled=False):
            logits, h = self.head(feat)
        return feat, logits, h


def count_params(m):
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    ok = True
    print(f"{'network':<24} {'params (10 classes)':>20} {'expected':>9}")
    for width, table in ((16, ((8, 0.08), (20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85))),
                         (64, ((32, 7.4),))):
        for depth, want in table:
            d = 4 * width
            n = count_params(ResNetCifar(depth, 3, width)) + d * 10 + 10
            ok &= abs(n / 1e6 - want) < max(0.006, 0.01 * want)
            print(f"resnet{depth}, width {width:<3d}     {n / 1e6:17.3f}M {want:>8}M")
    sys.exit(0 if ok else 1)
