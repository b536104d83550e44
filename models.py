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
        self.pad = cout - cin if (stride != 1 or cin != cout) else 0

    def shortcut(self, x):
        # Option A: subsample and zero-pad channels, half on each side (an odd width's extra
        # channel on the far side); no parameters.
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

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
    """M = sqrt(C/(C-1)) U (I - 11^T/C) (Eq. 1), d x C, columns a unit simplex ETF. U has orthonormal
    columns; the ETF spans C - 1 dimensions, so d >= C - 1 suffices (U maps the C - 1 dimensional
    complement of 1 into R^d; for d >= C this is the ETF code's P (I - 11^T/C) up to rotation)."""
    if d < C - 1:
        raise ValueError(f"a simplex ETF of {C} classes needs a feature dimension >= {C - 1}, got {d}")
    B, _ = torch.linalg.qr(torch.eye(C) - torch.ones(C, C) / C)        # columns: a basis, then one zero column
    B = B[:, :C - 1]                                                    # orthonormal basis of 1's complement
    U, _ = torch.linalg.qr(torch.randn(d, C - 1, generator=generator))
    return math.sqrt(C / (C - 1)) * U @ B.t() @ (torch.eye(C) - torch.ones(C, C) / C)


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
    """Fixed simplex-ETF classifier (Yang et al. 2022; ImbalancedLearning models/resnet_cifar.py
    ETF_Classifier): BatchNorm1d, l2-normalise, logits h M. No widening layer: the feature must have
    at least C - 1 dimensions (the public code widens the backbone instead, ResNet-32 width 32 on
    CIFAR-100)."""

    def __init__(self, d, C, seed=0):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)
        self.register_buffer("M", simplex_etf(d, C, torch.Generator().manual_seed(seed)))

    def forward(self, feat):
        h = F.normalize(self.bn(feat), dim=1)
        return h @ self.M, h

    def classifier_weight(self):
        return self.M.t()

    def classifier_bias(self):
        return None


def random_orthogonal(rows, cols, generator=None):
    """A Haar-random matrix with orthonormal rows (rows <= cols) or columns, determinant +1 when
    square (geotorch's uniform sample on SO(n), RBL's start)."""
    q, r = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
    q = q * torch.sign(torch.diagonal(r))[None]
    q = q if rows >= cols else q.t()
    if rows == cols and torch.det(q) < 0:
        q[0] = -q[0]
    return q


class RotatedETFHead(nn.Module):
    """RBL (Gao et al. 2023; qqgroup66666/rbl models/PLmodel.py): Linear(d, 256) with bias, then a
    learnable orthogonal R (parametrizations.orthogonal, matrix_exp; Haar-random start), then the
    fixed frame E = (I_256 - 11^T/256)[:, :C]: logit = f(x) R E. With C > 256 R is 256 x C with
    orthonormal rows and E = I_C - 11^T/C, as in the file."""

    def __init__(self, d, C, seed=0, dim=256):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, dim)
        n = max(dim, C)
        rot = nn.Linear(n, dim, bias=False)                    # weight dim x n
        with torch.no_grad():
            rot.weight.copy_(random_orthogonal(dim, n, g))
        self.rot = nn.utils.parametrizations.orthogonal(rot, orthogonal_map="matrix_exp")
        E = torch.eye(n) - torch.ones(n, n) / n
        self.register_buffer("E", E[:, :C] if C <= dim else E)

    def rotation(self):
        return self.rot.weight

    def forward(self, feat):
        h = self.fc(feat)
        return h @ self.rotation() @ self.E, h

    def classifier_weight(self):
        return (self.rotation() @ self.E).t()

    def classifier_bias(self):
        return None


def ncmc_center_counts(counts, f, aware=True):
    """Centers per class, NCMC's calc_cls_idx: 'ca' (aware) gives k_c = int((f-2) C n_c / N) + 1 for
    the classes in head-to-tail order, adds the shortfall to C (f - 1) one by one to the first
    entries, then reverses the list, so the smallest class gets the most (the file takes the given
    order as head to tail, as CIFAR-LT's is; we sort first); 'ave' gives f - 1 to every class."""
    C, N = len(counts), sum(counts)
    if not aware:
        return [f - 1] * C
    order = sorted(range(C), key=lambda c: -counts[c])           # head to tail, as the file assumes
    k = [int((f - 2) * C * counts[c] / N) + 1 for c in order]
    for i in range(C * (f - 1) - sum(k)):
        k[i] += 1
    out = [0] * C
    for c, kc in zip(order, k[::-1]):
        out[c] = kc
    return out


class MultiCenterHead(nn.Module):
    """NCMC (Yan et al. 2024; the public file's CAL_classifier and ClassAwareLoss). One orthogonal
    frame of f*C rows: the last C rows are the class directions w_i, the first C (f - 1) the
    per-center vectors v; class i owns k_i consecutive v's and its centers are
    V_ij = cos(theta) v_ij + sin(theta) w_i (unit, since v _|_ w). The feature goes through
    BatchNorm1d and is l2-normalised; logits = x^ w^T. The frame needs f*C dimensions to be
    orthonormal: narrower features are first mapped by a learnable Linear(d, f*C) (README)."""

    def __init__(self, d, C, centers, f=20, theta=0.2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = max(d, f * C)
        self.proj = nn.Linear(d, dim) if dim != d else nn.Identity()
        self.bn = nn.BatchNorm1d(dim)
        frame = random_orthogonal(f * C, dim, g)                     # orthonormal rows
        w, v = frame[-C:], frame[:-C]
        kmax = max(centers)
        V = torch.zeros(C, kmax, dim)
        start = 0
        for i, k in enumerate(centers):
            V[i, :k] = math.cos(theta) * v[start:start + k] + math.sin(theta) * w[i]
            start += k
        self.register_buffer("w", w)
        self.register_buffer("V", V)
        self.register_buffer("mask", torch.arange(kmax)[None] < torch.tensor(centers)[:, None])
        self.register_buffer("k", torch.tensor(centers, dtype=torch.float32))
        self.theta = theta

    def forward(self, feat):
        x = self.bn(self.proj(feat))
        return F.normalize(x, dim=1) @ self.w.t(), x      # h: the tensor the norm regulariser sees

    def classifier_weight(self):
        return self.w

    def classifier_bias(self):
        return None


class Net(nn.Module):
    """Encoder phi, classifier head f, and (AllNC only) projection proj1 and predictor proj2.

    proj 'linear': GLMC's projection_head Linear(d, 128) and contrast_head Linear(128, 128);
    proj 'mlp': SimSiam-style Linear-BN-ReLU-Linear (d -> 4d -> 128 and 128 -> 64 -> 128).
    The head always runs in float32 (autocast off): logits and the features it sees are exact.
    head_init 'kaiming': every learned Linear of the head and projections gets kaiming_normal_ weights
    (std sqrt(2 / fan_in)), as GLMC's and LDAM-DRW's self.apply(_weights_init) over the whole CIFAR
    model; biases, fixed frames and RBL's orthogonal rotation keep their own initialisation."""

    def __init__(self, encoder, head, proj_dim=0, pred_hidden=0, proj="linear", head_init="torch"):
        super().__init__()
        self.encoder, self.head = encoder, head
        d = encoder.out_dim
        self.proj1 = self.proj2 = None
        if proj_dim:
            self.proj1 = nn.Linear(d, proj_dim) if proj == "linear" else mlp(d, 4 * d, proj_dim)
            self.proj2 = nn.Linear(proj_dim, proj_dim) if proj == "linear" else mlp(proj_dim, pred_hidden, proj_dim)
        if head_init == "kaiming":
            for part in (head, self.proj1, self.proj2):
                for m in part.modules() if part is not None else ():
                    if isinstance(m, nn.Linear) and not nn.utils.parametrize.is_parametrized(m):
                        nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        feat = self.encoder(x).float()
        with torch.autocast(feat.device.type, enabled=False):
            logits, h = self.head(feat)
        return feat, logits, h


def all_reduce_sum(t):
    """The sum of t over the processes of a torchrun job; differentiable (backward sums the
    gradients, so each process's part gets the gradient of the global result)."""
    from torch.distributed import _functional_collectives as funcol, group
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group.WORLD))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch of a torchrun job, on GPUs (NCCL) and CPU
    processes (gloo) alike. In training the per-channel sum, sum of squares and count are all-reduced
    in one call (float64, with gradient: backward sees the global batch too); evaluation uses the
    running statistics, updated as nn.BatchNorm's (unbiased variance, momentum). Unlike
    nn.SyncBatchNorm, whose forward indexes its counts by a mask (a host read per layer and step,
    and a graph break under torch.compile), nothing here reads the device."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        C, dims = x.shape[1], [0] + list(range(2, x.dim()))
        xd = x.double()                 # E[x^2] - E[x]^2: float32 squares lose the variance (measured)
        stats = all_reduce_sum(torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_full((1,), x.numel() / C)]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked   # a tensor
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1).clamp(min=1)).to(self.running_var.dtype))
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module):
    """Every BatchNorm of `module` computing its statistics over the global batch of a torchrun job:
    GlobalBatchNorm on every device. Parameters and buffers are kept (the same tensors), so state
    dicts and checkpoints are those of the plain model."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child))
    return module


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
