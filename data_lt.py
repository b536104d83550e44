"""Long-tailed splits, datasets and augmentation for the AllNC reproduction.

    python data_lt.py --dataset cifar100 --imb 100 --counts     # split sizes, no data needed

Two data paths:
  * tensor path (CIFAR-scale sets: cifar10/100, fmnist, synthetic): the whole uint8 training
    set lives on the training device; crop, flip and RandAugment run batched on that device.
  * PIL path (ImageFolder sets, and `--loader pil` for comparison): torchvision transforms per
    image in DataLoader workers.
Importing this module has no side effects (no downloads, no file access).
"""
import argparse
import gzip
import json
import math
import os
import sys
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Datasets known to the command line

@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    n_max: int            # images per class in the full training set
    channels: int
    size: int             # training image side (crop size)
    mean: tuple
    std: tuple
    kind: str             # 'tensor' (CIFAR-scale, kept as one uint8 tensor) or 'folder'

DATASETS = {
    "cifar10": DatasetInfo(10, 5000, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "tensor"),
    "cifar100": DatasetInfo(100, 500, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "tensor"),
    "fmnist": DatasetInfo(10, 6000, 1, 28, (0.2860,), (0.3530,), "tensor"),
    # A tiny generated set (class-coloured patterns plus noise) for smoke runs and tests.
    "synthetic": DatasetInfo(10, 200, 3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "tensor"),
    "imagenet_lt": DatasetInfo(1000, 1280, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "folder"),
    "inat2018": DatasetInfo(8142, 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "folder"),
}
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
PARETO_ALPHA = 6.35       # the Pareto shape that gives ImageNet-LT's split (pareto_counts)
FOLDER_MIN = {"imagenet_lt": 5, "inat2018": 2}   # smallest class of the standard splits


class DataError(Exception):
    """A problem with the user's data or arguments; the message says what to do."""

# ----------------------------------------------------------------------------------------------
# Long-tailed profiles

def exp_counts(n_max, C, imb):
    """Exponential profile of LDAM/BCL: n_c = int(n_max * imb^(-c/(C-1))), c = 0..C-1."""
    if C == 1:
        return [int(n_max)]
    return [int(n_max * imb ** (-c / (C - 1))) for c in range(C)]


def pareto_counts(C, n_max, n_min, alpha=PARETO_ALPHA):
    """Pareto-shaped counts falling from n_max (class 0) to n_min (class C-1): the sorted sizes of C
    classes drawn from a Pareto distribution of shape alpha, as ImageNet-LT was built (Liu et al.
    2019, OLTR: "sampling a subset following the Pareto distribution with the power value alpha=6").

    Class c (c = 0..C-1, largest first) gets the median of the (c+1)-th largest of C Pareto draws,
    x_c = p_c^(-1/alpha) with p_c = (c + 0.7) / (C + 0.4) (Benard's median rank: the survival
    probability at the median of that order statistic; C + 0.4 cancels below), and the x_c are
    mapped linearly onto [n_min, n_max]:

        n_c = round(n_min + (n_max - n_min) * (x_c - x_{C-1}) / (x_0 - x_{C-1})),

    so class 0 gets n_max, class C-1 gets n_min, and the counts never increase. The linear map makes
    the Pareto's scale and location (Pareto I or Lomax) irrelevant: only alpha shapes the profile.

    alpha = 6.35 is fitted to ImageNet-LT: pareto_counts(1000, 1280, 5) then has the real split's
    total (115,902 images against 115,846), and Many (> 100 images) / Medium (21..100) / Few (<= 20)
    are 389 / 460 / 151 against the real 385 / 469 / 146 (BCL's 20..100 / < 20: 469 / 142 against
    479 / 136). The real figures are the per-class counts of ImageNet_LT_train.txt
    (facebookresearch/classifier-balancing, data/ImageNet_LT/), as JiahuiKChen/LT-classification
    lists them in cls_freq/ImageNet_LT_train.json, counted from that same file. Least squares on the log counts gives alpha = 6.25; OLTR's alpha = 6 gives
    112,732 images and 377 / 467 / 156.
    """
    if C == 1 or n_max == n_min:
        return [int(n_max)] * C
    x = [((c + 0.7) / (C + 0.4)) ** (-1.0 / alpha) for c in range(C)]
    lo, span = x[-1], x[0] - x[-1]
    counts = [int(round(n_min + (n_max - n_min) * (v - lo) / span)) for v in x]
    counts[0], counts[-1] = int(n_max), int(n_min)
    return counts


def split_counts(dataset, imb, imb_type="exp", n_max=None):
    """Per-class training counts of `dataset` at imbalance factor imb = N_max / N_min; n_max: the
    largest class's count (default: all of the dataset's images of a class)."""
    info = DATASETS[dataset]
    if n_max is not None:
        info = dataclasses.replace(info, n_max=min(int(n_max), info.n_max))
    if imb < 1:
        raise DataError(f"--imb {imb} is below 1; the imbalance factor is N_max/N_min, use 1 for balanced data")
    if info.kind == "folder" and imb_type == "pareto" and imb == 1:
        imb = info.n_max / FOLDER_MIN[dataset]      # the standard split's own factor
    if imb_type == "exp":
        return exp_counts(info.n_max, info.num_classes, imb)
    if imb_type == "pareto":
        return pareto_counts(info.num_classes, info.n_max, max(1, int(round(info.n_max / imb))))
    raise DataError(f"unknown --imb-type {imb_type!r}; use exp or pareto")


def long_tail_indices(labels, counts, mode="ldam", seed=0):
    """Indices of the images kept for each class c (counts[c] of them).

    ldam: LDAM-DRW's recipe (imbalance_cifar.py; BCL and PaCo reuse it): np.random.seed(0), then for
          each class in order, that class's indices shuffled by np.random.shuffle, first counts[c]
          kept; returned in that order (class by class). A private RandomState gives the same
          stream without touching numpy's global state.
    first: the first counts[c] images of each class in file order (weight balancing's demo)."""
    import numpy as np
    lab = torch.as_tensor(labels).numpy()
    rs = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(lab == c)[0]
        if len(idx) < n:
            raise DataError(f"class {c} has {len(idx)} images, the split asks for {n}; lower --imb or check the data")
        if mode == "ldam":
            rs.shuffle(idx)
        keep.append(idx[:n])
    out = torch.from_numpy(np.concatenate(keep)).long()
    return out if mode == "ldam" else out.sort().values


# ----------------------------------------------------------------------------------------------
# Loading CIFAR-scale sets as uint8 tensors (N, C, H, W) and int64 labels

def _cifar_corrupt(cls, root):
    """The first file of a torchvision CIFAR folder that exists but fails its MD5 check, or None."""
    import torchvision.datasets.cifar as tvc
    folder = os.path.join(root, cls.base_folder)
    for name, md5 in cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(folder, name)
        if os.path.exists(path) and not tvc.check_integrity(path, md5):
            return path
    return None


def _cifar(dataset, root, train, download):
    import pickle
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    folder = os.path.join(root, cls.base_folder)
    bad = _cifar_corrupt(cls, root)
    if bad:
        raise DataError(f"{dataset}: {bad} is corrupt (truncated or altered: its MD5 differs from torchvision's); "
                        f"delete {folder} and download again ({cls.url}, extracted into {root})")
    try:
        ds = cls(root, train=train, download=False)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
        raise DataError(f"{dataset}: a file under {folder} is corrupt ({type(e).__name__}); delete {folder} and "
                        f"download again ({cls.url})") from None
    except RuntimeError:
        if not download:
            raise DataError(f"{dataset} not found under {folder}; put the python-version CIFAR files there "
                            f"(cifar-*-python.tar.gz extracted) or drop --no-download to fetch them")
        try:
            import socket
            socket.setdefaulttimeout(60)
            ds = cls(root, train=train, download=True)
        except Exception as e:       # no network, proxy, disk: say where the files go instead
            raise DataError(f"{dataset} not found under {folder} and the download failed ({type(e).__name__}); "
                            f"download {cls.url} and extract it into {root}") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def _read_idx(path):
    """An IDX (MNIST-format) uint8 file, plain or gzipped, as a tensor."""
    import numpy as np
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        buf = np.frombuffer(f.read(), dtype=np.uint8)
    ndim = int(buf[3])
    dims = [int.from_bytes(buf[4 + 4 * i: 8 + 4 * i].tobytes(), "big") for i in range(ndim)]
    return torch.from_numpy(buf[4 + 4 * ndim:].copy().reshape(dims))


def _fmnist(root, train, download):
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    for folder in (os.path.join(root, "FashionMNIST", "raw"), root, DEBIAN_FMNIST):
        for ext in ("", ".gz"):
            paths = [os.path.join(folder, n + ext) for n in names]
            if all(os.path.exists(p) for p in paths):
                x, y = (_read_idx(p) for p in paths)
                return x.unsqueeze(1).contiguous(), y.long()
    if not download:
        raise DataError(f"Fashion-MNIST not found under {root} or {DEBIAN_FMNIST}; "
                        f"apt-get install dataset-fashion-mnist, or drop --no-download")
    try:
        from torchvision.datasets import FashionMNIST
        ds = FashionMNIST(root, train=train, download=True)
    except Exception as e:
        raise DataError(f"Fashion-MNIST not found under {root} and the download failed ({type(e).__name__}); "
                        f"apt-get install dataset-fashion-mnist (files land in {DEBIAN_FMNIST})") from None
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def _synthetic(train, seed=0):
    """Ten classes of 16x16 colour patterns: a class colour and stripe frequency, plus noise."""
    info = DATASETS["synthetic"]
    n = info.n_max if train else 50
    g = torch.Generator().manual_seed(seed + (0 if train else 1))
    y = torch.arange(info.num_classes).repeat_interleave(n)
    colour = torch.rand(info.num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
    grid = torch.arange(info.size).float()
    stripes = torch.stack([torch.sin(grid[None, :] * (c + 1) * 0.4 + grid[:, None] * 0.3 * (c % 3))
                           for c in range(info.num_classes)])
    x = 0.5 * colour[y] + 0.3 * stripes[y][:, None] + 0.35 * torch.randn(len(y), 3, info.size, info.size, generator=g)
    return (x.clamp(-0.5, 1.0) * 170 + 85).round().clamp(0, 255).to(torch.uint8), y


def load_tensor_dataset(dataset, root, train, download=True):
    """(images uint8 N x C x H x W, labels int64) of a CIFAR-scale dataset."""
    if dataset in ("cifar10", "cifar100"):
        return _cifar(dataset, root, train, download)
    if dataset == "fmnist":
        return _fmnist(root, train, download)
    if dataset == "synthetic":
        return _synthetic(train)
    raise DataError(f"{dataset} is not a tensor dataset")

# ----------------------------------------------------------------------------------------------
# Batched augmentation on the training device (tensor path)
# Every random decision (crop offset, flip, RandAugment op, apply-or-not, magnitude, sign,
# interpolation) is drawn per image on a CPU generator; images are then grouped by operation on
# the CPU and each group is transformed in one batched call on the device. Per-image draws,
# batched application: the same distribution as transforming the images one by one.

def random_crop_flip(x, pad, gen):
    """Per-image random crop (zero padding `pad`) and horizontal flip of a uint8 batch."""
    n, _, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()

# timm's RandAugment 'rand-n2-m10-mstd0.5', the file PaCo ships (PaCo/LT/randaugment.py, copied
# by BCL and GLMC): 15 ops, 2 drawn per image with replacement, each applied with probability
# 0.5 at magnitude m ~ N(10, 0.5) clipped to [0, 10]; geometric ops fill with the dataset mean
# and resample bilinear or bicubic at random. Each op below is named after timm's and takes a
# uint8 batch and its per-image argument (after timm's level-to-argument rule).

def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor): float32, truncated, clipped to 0..255."""
    out = degenerate.float() + factor.view(-1, 1, 1, 1).float() * (x.float() - degenerate.float())
    return out.clamp(0, 255).trunc().to(torch.uint8)


def _gray(x):
    """PIL's convert('L'): (19595 R + 38470 G + 7471 B + 2^15) >> 16; grey images unchanged."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).to(torch.uint8)[:, None]


def _lut(x, table):
    """Apply per-(image, channel) lookup tables (n*c x 256) to a uint8 batch."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    return table.gather(1, flat).reshape(n, c, h, w).to(torch.uint8)


def auto_contrast(x, _):
    """PIL ImageOps.autocontrast: per channel, stretch [lo, hi] to [0, 255] via int(i*scale + offset)."""
    n, c = x.shape[:2]
    lo = x.reshape(n * c, -1).amin(1).double()[:, None]
    hi = x.reshape(n * c, -1).amax(1).double()[:, None]
    scale = 255.0 / (hi - lo).clamp(min=1)
    i = torch.arange(256, dtype=torch.float64, device=x.device)[None]
    table = (i * scale + (-lo * scale)).trunc().clamp(0, 255)
    return _lut(x, torch.where(hi > lo, table, i).long())


def equalize(x, _):
    """PIL ImageOps.equalize, per channel, with its integer step rule."""
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))            # count of the highest value present
    step = (flat.shape[1] - last) // 255
    cum = torch.cumsum(hist, 1) - hist                           # counts below each value
    table = ((step // 2 + cum) // step.clamp(min=1)).clamp(max=255)     # PIL's point() clips
    ident = torch.arange(256, device=x.device)[None].expand_as(table)
    flat_img = ((hist > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    return _lut(x, torch.where(flat_img, ident, table))


def invert(x, _):
    return 255 - x


def posterize(x, bits):
    """Keep the `bits` most significant bits (0 bits: black)."""
    mask = ((0xFF << (8 - bits.clamp(max=8))) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def solarize(x, thresh):
    t = thresh.view(-1, 1, 1, 1)
    return torch.where(x.int() < t, x, 255 - x)


def solarize_add(x, add, thresh=128):
    a = add.view(-1, 1, 1, 1)
    return torch.where(x.int() < thresh, (x.int() + a).clamp(max=255).to(torch.uint8), x)


def color(x, factor):
    return _blend(_gray(x).expand_as(x), x, factor)


def contrast(x, factor):
    """Blend with the image's mean grey level, rounded as PIL's int(mean + 0.5)."""
    mean = (_gray(x).double().mean((1, 2, 3)) + 0.5).floor()
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, factor)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


_SMOOTH = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13


def sharpness(x, factor):
    """Blend with PIL's SMOOTH filter (3x3, border pixels unfiltered), rounded to nearest."""
    c = x.shape[1]
    k = _SMOOTH.to(x.device).expand(c, 1, 3, 3)
    smooth = F.conv2d(x.float(), k, groups=c).add(0.5).floor().clamp(0, 255)
    deg = x.clone()
    deg[:, :, 1:-1, 1:-1] = smooth.to(torch.uint8)
    return _blend(deg, x, factor)


def _pil_bicubic(x, qx, qy):
    """PIL's affine BICUBIC filter: the a = -1 cubic over 4 x 4 edge-clamped neighbours, truncated."""
    n, c, h, w = x.shape
    fx, fy = qx - 0.5, qy - 0.5
    x0, y0 = fx.floor(), fy.floor()
    dx, dy = (fx - x0)[:, None], (fy - y0)[:, None]

    def cubic(v1, v2, v3, v4, d):
        return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))

    flat = x.reshape(n, c, h * w).float()
    cols = [(x0 + k).clamp(0, w - 1).long() for k in (-1, 0, 1, 2)]
    rows = []
    for k in (-1, 0, 1, 2):
        r = (y0 + k).clamp(0, h - 1).long() * w
        taps = [flat.gather(2, (r + cc).reshape(n, 1, -1).expand(n, c, -1)).reshape(n, c, h, w) for cc in cols]
        rows.append(cubic(*taps, dx))
    return cubic(*rows, dy).clamp(0, 255).trunc()


def _affine(x, mats, bicubic, fill):
    """PIL Image.transform(AFFINE): output pixel (x, y) samples the input at (a x + b y + c,
    d x + e y + f) (pixel centres at +0.5); samples outside the image take `fill`, those inside
    clamp to the edge as PIL does. mats n x 6 (PIL's coefficient order), bicubic n bools."""
    n, c, h, w = x.shape
    dev = x.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev) + 0.5, torch.arange(w, device=dev) + 0.5, indexing="ij")
    m = mats.to(dev, torch.float32)
    qx = m[:, 0, None, None] * xs + m[:, 1, None, None] * ys + m[:, 2, None, None]
    qy = m[:, 3, None, None] * xs + m[:, 4, None, None] * ys + m[:, 5, None, None]
    grid = torch.stack((2 * qx / w - 1, 2 * qy / h - 1), -1)
    lin = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).trunc()
    out = torch.where(bicubic.to(dev).view(-1, 1, 1, 1), _pil_bicubic(x, qx, qy), lin)
    inside = ((qx >= 0) & (qx < w) & (qy >= 0) & (qy < h))[:, None]
    fill = torch.tensor(fill, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    return torch.where(inside, out.clamp(0, 255), fill).to(torch.uint8)


def _const(n, *vals):
    return torch.tensor(vals, dtype=torch.float64).expand(n, len(vals)).clone()


def rotate(x, deg, bicubic, fill):
    """PIL Image.rotate(deg) about the image centre (counter-clockwise)."""
    n, _, h, w = x.shape
    a = -torch.deg2rad(deg.double().cpu())
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2, h / 2
    mats = torch.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], 1)
    return _affine(x, mats, bicubic, fill)


def shear_x(x, factor, bicubic, fill):
    m = _const(len(x), 1, 0, 0, 0, 1, 0)
    m[:, 1] = factor.double().cpu()
    return _affine(x, m, bicubic, fill)


def shear_y(x, factor, bicubic, fill):
    m = _const(len(x), 1, 0, 0, 0, 1, 0)
    m[:, 3] = factor.double().cpu()
    return _affine(x, m, bicubic, fill)


def translate_x_rel(x, pct, bicubic, fill):
    m = _const(len(x), 1, 0, 0, 0, 1, 0)
    m[:, 2] = pct.double().cpu() * x.shape[-1]
    return _affine(x, m, bicubic, fill)


def translate_y_rel(x, pct, bicubic, fill):
    m = _const(len(x), 1, 0, 0, 0, 1, 0)
    m[:, 5] = pct.double().cpu() * x.shape[-2]
    return _affine(x, m, bicubic, fill)


# op name -> (function, level-to-argument rule of timm (level in [0, 10]), random sign, geometric)
TIMM_OPS = {
    "AutoContrast": (auto_contrast, lambda m: m * 0, False, False),
    "Equalize": (equalize, lambda m: m * 0, False, False),
    "Invert": (invert, lambda m: m * 0, False, False),
    "Rotate": (rotate, lambda m: m / 10 * 30, True, True),
    "Posterize": (posterize, lambda m: (m / 10 * 4).long(), False, False),
    "Solarize": (solarize, lambda m: (m / 10 * 256).long().clamp(max=256), False, False),
    "SolarizeAdd": (solarize_add, lambda m: (m / 10 * 110).long().clamp(max=128), False, False),
    "Color": (color, lambda m: m / 10 * 1.8 + 0.1, False, False),
    "Contrast": (contrast, lambda m: m / 10 * 1.8 + 0.1, False, False),
    "Brightness": (brightness, lambda m: m / 10 * 1.8 + 0.1, False, False),
    "Sharpness": (sharpness, lambda m: m / 10 * 1.8 + 0.1, False, False),
    "ShearX": (shear_x, lambda m: m / 10 * 0.3, True, True),
    "ShearY": (shear_y, lambda m: m / 10 * 0.3, True, True),
    "TranslateXRel": (translate_x_rel, lambda m: m / 10 * 0.45, True, True),
    "TranslateYRel": (translate_y_rel, lambda m: m / 10 * 0.45, True, True),
}
TIMM_NAMES = tuple(TIMM_OPS)


def timm_op(name, x, magnitude, sign=None, bicubic=None, fill=(128, 128, 128)):
    """One timm op on a uint8 batch at per-image magnitudes (float tensor n, level 0..10) and
    signs (+1/-1, for rotate/shear/translate); bicubic: per-image resampling choice."""
    fn, level, signed, geometric = TIMM_OPS[name]
    arg = level(magnitude.double())
    if signed:
        arg = arg * (sign if sign is not None else torch.ones_like(arg))
    if not geometric:
        return fn(x, arg.to(x.device))
    bic = bicubic if bicubic is not None else torch.zeros(len(x), dtype=torch.bool)
    return fn(x, arg, bic, tuple(fill)[:x.shape[1]] if len(fill) >= x.shape[1] else tuple(fill) * x.shape[1])


def rand_augment(x, gen=None, num_ops=2, magnitude=10.0, magnitude_std=0.5, prob=0.5, fill=(128, 128, 128)):
    """timm RandAugment (rand-n2-m10-mstd0.5 by default) on a uint8 batch, drawn independently per
    image on the CPU generator `gen` (torch's default generator if None)."""
    n = len(x)
    for _ in range(num_ops):
        op = torch.randint(len(TIMM_NAMES), (n,), generator=gen)
        apply = torch.rand(n, generator=gen) <= prob                 # timm skips if random() > prob
        mag = (magnitude + magnitude_std * torch.randn(n, generator=gen, dtype=torch.float64)).clamp(0, 10)
        sign = torch.where(torch.rand(n, generator=gen) > 0.5, -1.0, 1.0).double()
        bicubic = torch.rand(n, generator=gen) < 0.5
        out = x.clone()
        for k, name in enumerate(TIMM_NAMES):
            sel = ((op == k) & apply).nonzero().flatten()        # CPU tensors: no device sync
            if len(sel) == 0:
                continue
            idx = sel.to(x.device)
            out[idx] = timm_op(name, x[idx], mag[sel], sign[sel], bicubic[sel], fill)
        x = out
    return x


_RA = None


def _torchvision_ra():
    global _RA
    if _RA is None:
        from torchvision.transforms import v2
        _RA = v2.RandAugment()
    return _RA


def rand_augment_torchvision(x, gen=None, num_ops=2, magnitude=9, bins=31):
    """torchvision RandAugment(num_ops, magnitude) (14 ops with identity, fill 0, nearest), drawn
    independently per image, grouped by (op, sign) and applied with torchvision's own ops."""
    ra = _torchvision_ra()
    names = list(ra._AUGMENTATION_SPACE)
    h, w = x.shape[-2:]
    for _ in range(num_ops):
        op = torch.randint(len(names), (len(x),), generator=gen)
        sign = torch.rand(len(x), generator=gen) <= 0.5
        out = x.clone()
        for k, name in enumerate(names):
            mags_fn, signed = ra._AUGMENTATION_SPACE[name]
            mags = mags_fn(bins, h, w)
            for neg in ((False, True) if signed else (False,)):
                sel = (((op == k) & (sign == neg)) if signed else (op == k)).nonzero().flatten()
                if len(sel) == 0:
                    continue
                m = 0.0 if mags is None else float(mags[magnitude]) * (-1 if neg else 1)
                idx = sel.to(x.device)
                out[idx] = ra._apply_image_or_video_transform(x[idx], name, m, ra.interpolation, ra._fill)
        x = out
    return x


_AA = None


def _torchvision_aa():
    global _AA
    if _AA is None:
        from torchvision.transforms import v2
        _AA = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return _AA


def auto_augment(x, gen=None):
    """torchvision's AutoAugment, CIFAR10 policy (25 sub-policies of two ops, each op applied with
    its probability, signed ops with a random sign, fill 0), drawn independently per image and
    applied group by group with torchvision's own ops."""
    aa = _torchvision_aa()
    n, (h, w) = len(x), x.shape[-2:]
    pol = torch.randint(len(aa._policies), (n,), generator=gen)
    u = torch.rand(n, 2, generator=gen)
    neg = torch.randint(2, (n, 2), generator=gen) == 0
    for slot in range(2):
        out = x.clone()
        for p, policy in enumerate(aa._policies):
            name, prob, mag_id = policy[slot]
            mags_fn, signed = aa._AUGMENTATION_SPACE[name]
            for sign in ((False, True) if signed else (False,)):
                sel = (pol == p) & (u[:, slot] <= prob) & ((neg[:, slot] == sign) if signed else True)
                sel = sel.nonzero().flatten()
                if len(sel) == 0:
                    continue
                mags = mags_fn(10, h, w)
                m = float(mags[mag_id]) if mag_id is not None else 0.0
                idx = sel.to(x.device)
                out[idx] = aa._apply_image_or_video_transform(x[idx], name, -m if sign else m, aa.interpolation, aa._fill)
        x = out
    return x


def cutout(x, length, gen=None):
    """DeVries & Taylor's Cutout(n_holes=1, length): a length x length square centred at a uniform
    pixel, clipped at the border, set to 0 before normalisation (as RBL: ToTensor, Cutout, Normalize)."""
    n, _, h, w = x.shape
    cy = torch.randint(h, (n,), generator=gen).to(x.device)
    cx = torch.randint(w, (n,), generator=gen).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    box = ((ys >= (cy - length // 2).clamp(min=0)[:, None, None]) & (ys < (cy + length // 2).clamp(max=h)[:, None, None])
           & (xs >= (cx - length // 2).clamp(min=0)[:, None, None]) & (xs < (cx + length // 2).clamp(max=w)[:, None, None]))
    return x.masked_fill(box[:, None], 0)


def fill_colour(info):
    """timm's img_mean hparam: the dataset mean colour in 0..255 (PaCo: round(255 * mean))."""
    return tuple(min(255, round(255 * m)) for m in info.mean)


_NORM = {}


def to_float(x, mean, std):
    """uint8 -> normalised float, the same operations as ToTensor() + Normalize()."""
    key = (x.device, tuple(mean), tuple(std))
    if key not in _NORM:         # built once per device: no per-step host-to-device copies
        _NORM[key] = (torch.tensor(mean, device=x.device).view(1, -1, 1, 1),
                      torch.tensor(std, device=x.device).view(1, -1, 1, 1))
    m, s = _NORM[key]
    return x.float().div(255).sub(m).div(s)


def augment_view(x, gen, info, randaug="timm", pad=4, autoaugment=False, cutout_px=0, normalise=True):
    """One training view: random crop (pad 4) + flip, [AutoAugment], RandAugment (timm | torchvision
    | none), [Cutout], then (normalise=True) normalisation to float."""
    x = random_crop_flip(x, pad, gen)
    if autoaugment:
        x = auto_augment(x, gen)
    if randaug == "timm":
        x = rand_augment(x, gen, fill=fill_colour(info))
    elif randaug == "torchvision":
        x = rand_augment_torchvision(x, gen)
    if cutout_px:
        x = cutout(x, cutout_px, gen)
    return to_float(x, info.mean, info.std) if normalise else x


def epoch_batches(n, batch_size, seed, epoch, drop_last=True):
    """The index batches of one epoch; the same for both loaders and after a resume."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def to_device(t, device):
    """A CPU tensor onto `device` without making the host wait (pinned memory, non-blocking copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment_set(x, gen, info, randaug="timm", autoaugment=False, cutout_px=0, chunk=2048):
    """One augmented view of every image of x (uint8, on its device), in chunks of `chunk` images:
    a few large batched calls per epoch instead of a few hundred small ones per step. Each image
    draws independently, so chunking does not change the distribution."""
    out = torch.empty_like(x)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = augment_view(x[i:i + chunk], gen, info, randaug, 4, autoaugment, cutout_px, normalise=False)
    return out


def tensor_loader(x, y, info, batch_size, seed, epoch, views=2, augment=True, randaug="timm", autoaugment=False,
                  cutout_px=0, start=0, chunk=2048, share=slice(None)):
    """Yield (views, labels) batches of a device-resident uint8 training set, from batch `start` on.
    At the start of the epoch the permuted set is gathered once and each view of it augmented in a
    few chunked calls; the batches are then slices, normalised per batch (no host-device sync, no
    per-step copies). Random decisions come from a CPU generator seeded by (seed, epoch): the same
    on every device, and the same epoch again on resume. share: the rows of each batch this process
    trains on (torchrun); every process augments the whole epoch, the same draws as one process."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch + 7)
    batches = epoch_batches(len(x), batch_size, seed, epoch)
    if not batches:
        return
    order = to_device(torch.cat(batches), x.device)
    xs, ys = x[order], y[order]
    if augment:
        views_u8 = [augment_set(xs, gen, info, randaug, autoaugment, cutout_px, chunk) for _ in range(views)]
    else:
        views_u8 = [xs] * views
    for b in range(start, len(batches)):
        rows = range(b * batch_size, b * batch_size + len(batches[b]))[share]
        sl = slice(rows.start, rows.stop)
        yield [to_float(v[sl], info.mean, info.std) for v in views_u8], ys[sl]


# ----------------------------------------------------------------------------------------------
# PIL path: per-image torchvision transforms in DataLoader workers

class TimmRandAugment:
    """The tensor path's timm RandAugment on one PIL image (same ops, same semantics); random
    draws from torch's generator, which the DataLoader seeds per worker."""

    def __init__(self, fill):
        self.fill = fill

    def __call__(self, img):
        return TensorOp(lambda x: rand_augment(x, None, fill=self.fill))(img)


def pil_randaugment(info, randaug):
    from torchvision import transforms as T
    return {"timm": [TimmRandAugment(fill_colour(info))], "torchvision": [T.RandAugment()], "none": []}[randaug]


class TensorOp:
    """A uint8-batch augmentation of the tensor path applied to one PIL image."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, img):
        import numpy as np
        from PIL import Image
        a = np.asarray(img)
        x = torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)[None]
        out = self.fn(x)[0].permute(1, 2, 0).numpy()
        return Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out)


class PILViews(torch.utils.data.Dataset):
    """Returns (view_1, ..., view_k, label) of a uint8 tensor dataset through PIL transforms."""

    def __init__(self, x, y, info, views=2, augment=True, randaug="timm", autoaugment=False, cutout_px=0):
        from torchvision import transforms as T
        self.x, self.y, self.views = x, y, views
        steps = [T.RandomCrop(info.size, padding=4), T.RandomHorizontalFlip()] if augment else []
        steps += [TensorOp(auto_augment)] if augment and autoaugment else []
        steps += pil_randaugment(info, randaug) if augment else []
        steps += [TensorOp(lambda x: cutout(x, cutout_px))] if augment and cutout_px else []
        self.tf = T.Compose(steps + [T.ToTensor(), T.Normalize(info.mean, info.std)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image
        a = self.x[i].permute(1, 2, 0).numpy()
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        return (*[self.tf(img) for _ in range(self.views)], self.y[i])


class FixedBatches(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self):
        return len(self.batches)


def quiet_worker(_):
    """DataLoader workers leave Ctrl-C (SIGINT, sent to the whole terminal process group) to the main
    process, which checkpoints and stops. SIGTERM keeps its default: the loader's shutdown uses it."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pil_loader(dataset, batches, workers, seed, epoch, device, rank=0):
    """The given index batches (this process's parts under torchrun) through `workers` DataLoader
    workers; the augmentation draws are seeded by (seed, epoch, rank)."""
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=FixedBatches(batches), num_workers=workers,
                                     worker_init_fn=quiet_worker if workers else None,
                                     pin_memory=device.type == "cuda", persistent_workers=False,
                                     generator=torch.Generator().manual_seed(seed * 100003 + epoch + 11 + 1000003 * rank))
    for *views, y in dl:
        yield [v.to(device, non_blocking=True) for v in views], y.to(device, non_blocking=True)

# ----------------------------------------------------------------------------------------------
# ImageFolder datasets (ImageNet-LT, iNaturalist 2018)

class ListDataset(torch.utils.data.Dataset):
    """Images listed as (path, label); returns `views` transformed copies and the label."""

    def __init__(self, samples, transform, views=1):
        self.samples, self.tf, self.views = samples, transform, views
        self.targets = [s[1] for s in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:       # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path} ({type(e).__name__}); replace or remove it") from None
        return (*[self.tf(img) for _ in range(self.views)], label)


def folder_transforms(info, train, size=None, randaug="timm"):
    """ImageNet-LT / iNat views as PaCo/BCL (paco_lt.py): RandomResizedCrop(0.08-1), flip,
    ColorJitter(0.4, 0.4, 0.4, 0), then RandAugment; test: Resize(size * 256/224) + CenterCrop."""
    from torchvision import transforms as T
    size = size or info.size
    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if train:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                          T.ColorJitter(0.4, 0.4, 0.4, 0.0)] + pil_randaugment(info, randaug) + norm)
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] + norm)


def _read_list(root, list_file):
    """(path, label) pairs of a split list ('relative/path label' per line); every file must exist."""
    samples = []
    with open(list_file) as f:
        for k, line in enumerate(f, 1):
            if line.strip():
                try:
                    path, label = line.rsplit(maxsplit=1)
                    samples.append((os.path.join(root, path), int(label)))
                except ValueError:
                    raise DataError(f"{list_file} line {k} is not 'path label': {line.strip()!r}") from None
    missing = [p for p, _ in samples if not os.path.exists(p)]
    if missing:
        raise DataError(f"{list_file} names {len(missing)} file(s) missing under {root}, e.g. {missing[0]}; "
                        f"check --data-root or the list")
    return samples


def folder_samples(dataset, root, train, imb=1, imb_type="pareto", train_list=None, test_list=None,
                   lt_subset="ldam"):
    """(samples, num_classes) of an ImageFolder-style root, from a split list file if given,
    else root/train (long-tailed by a Pareto split over sorted class folders) or root/val."""
    list_file = train_list if train else test_list
    if list_file:
        if not os.path.exists(list_file):
            raise DataError(f"split list {list_file} does not exist; pass the standard "
                            f"{dataset} list file or leave the option out")
        samples = _read_list(root, list_file)
        return samples, max(s[1] for s in samples) + 1
    sub = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(sub):
        raise DataError(f"{sub} not found; {dataset} needs --data-root with train/ and val/ "
                        f"ImageFolder directories (one folder per class), or --train-list/--test-list")
    from torchvision.datasets import ImageFolder
    try:
        ds = ImageFolder(sub)
    except FileNotFoundError as e:               # no class folder, or no image in any of them
        raise DataError(f"{sub} is not an ImageFolder directory ({str(e).rstrip('.')}): {dataset} needs one "
                        f"folder of images per class in train/ and val/, or --train-list/--test-list") from None
    C = len(ds.classes)
    if not train:
        return ds.samples, C
    n_max = max(torch.bincount(torch.tensor(ds.targets)).tolist())
    n_min = max(1, int(round(n_max / imb))) if imb > 1 else FOLDER_MIN.get(dataset, 1)
    counts = pareto_counts(C, n_max, min(n_min, n_max)) if imb_type == "pareto" else exp_counts(n_max, C, imb)
    keep = long_tail_indices(ds.targets, counts, lt_subset).tolist()
    return [ds.samples[i] for i in keep], C

# ----------------------------------------------------------------------------------------------
# One run's data: the split, the loaders, and this process's share of every batch

def rank_part(n, rank=0, world=1):
    """Process `rank`'s share of n items split evenly in rank order (all of them for one process)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def check_split_sizes(cfg, counts):
    """Every class keeps a training image, the imbalance is the one asked for, and a batch fits in
    the training set (under torchrun the global batch: each process's share then fits in its share).
    A hint names only values that can be given: at most the dataset's own largest class."""
    most = DATASETS[cfg.dataset].n_max
    n_max = cfg.n_max or most
    cap = "" if cfg.n_max else f" ({cfg.dataset} has {most} images in its largest class)"
    if cfg.imb_type == "pareto" and n_max / cfg.imb < 0.5:
        need = math.ceil(cfg.imb / 2)
        raise DataError(f"--n-max {n_max} with --imb-type pareto --imb {cfg.imb:g}: the smallest class would need "
                        f"{n_max / cfg.imb:.2f} images and is raised to 1, so the imbalance would be {n_max:g}, not "
                        f"{cfg.imb:g}; give " + (f"--n-max {need} or more, or " if need <= most else "")
                        + f"--imb {n_max:g} or less{cap}")
    if min(counts) == 0:
        C = len(counts)
        need = next((n for n in range(max(1, math.floor(cfg.imb)), most + 1) if min(exp_counts(n, C, cfg.imb)) > 0), None)
        imb_max = next(i for i in (n_max, n_max * (1 - 1e-9), n_max * (1 - 1e-6)) if min(exp_counts(n_max, C, i)) > 0)
        raise DataError(f"--n-max {n_max} at --imb {cfg.imb:g} leaves {sum(c == 0 for c in counts)} of {C} classes "
                        f"without a training image (n_c = int(n_max * imb^(-c/(C-1)))); give "
                        + (f"--n-max {need} or more, or " if need else "") + f"--imb {imb_max:g} or less{cap}")
    if cfg.batch_size > sum(counts):
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the training set ({sum(counts)} images): every "
                        f"step would train on all of them; give --batch-size {sum(counts)} or less")


def smoke_data(cfg, size=16, n_max=40):
    """A generated stand-in for `cfg.dataset` with its classes and LT profile: tiny for SCALE=smoke;
    the benchmark passes the real n_max so that an epoch has the real number of images."""
    C = DATASETS[cfg.dataset].num_classes
    counts = [max(2, n) for n in (exp_counts(n_max, C, cfg.imb) if cfg.imb_type == "exp"
                                  else pareto_counts(C, n_max, max(2, int(n_max / cfg.imb))))]
    g = torch.Generator().manual_seed(1234)
    proto = torch.rand(C, 3, 1, 1, generator=g) * 200 + 20
    stripe = torch.rand(C, 1, size, size, generator=g) * 60

    def make(ns, seed):
        gg = torch.Generator().manual_seed(seed)
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(ns)])
        x = proto[y] + stripe[y] + torch.randn(len(y), 3, size, size, generator=gg) * 25
        return x.clamp(0, 255).to(torch.uint8), y

    xtr, ytr = make(counts, 1)
    xte, yte = make([5] * C, 2)
    return xtr, ytr, xte, yte, counts


class Data:
    """Training/test data of one run: counts, and either device tensors (tensor path) or PIL
    datasets (ImageFolder sets, --loader pil). views: augmented views per training image (AllNC 2).
    Under torchrun (rank of world) each process gets its share of every global batch and of the
    evaluation sets; train_batches is the one place the global batch is split."""

    def __init__(self, cfg, device, views=1, rank=0, world=1, smoke_size=16, smoke_n_max=40):
        self.info = info = DATASETS[cfg.dataset]
        self.cfg, self.device, self.views, self.rank, self.world = cfg, device, views, rank, world
        if info.kind == "folder" and not cfg.smoke:
            self._init_folder(cfg)
            return
        self.C = info.num_classes
        if cfg.smoke:
            xtr, ytr, xte, yte, self.counts = smoke_data(cfg, smoke_size, smoke_n_max)
            check_split_sizes(cfg, self.counts)
            self.info = info = dataclasses.replace(DATASETS["synthetic"], num_classes=self.C, size=smoke_size)
        else:
            xtr, ytr = load_tensor_dataset(cfg.dataset, cfg.data_root, True, cfg.download)
            xte, yte = load_tensor_dataset(cfg.dataset, cfg.data_root, False, cfg.download)
            self.counts = split_counts(cfg.dataset, cfg.imb, cfg.imb_type, cfg.n_max)
            keep = long_tail_indices(ytr, self.counts, cfg.lt_subset)
            xtr, ytr = xtr[keep], ytr[keep]
        self.in_channels = xtr.shape[1]
        self.xtr, self.ytr = xtr.to(device), ytr.to(device)
        self.xte, self.yte = xte.to(device), yte.to(device)
        if cfg.loader == "pil":
            self.pil = PILViews(xtr, ytr, info, views, cfg.augment, cfg.randaug, cfg.autoaugment, cfg.cutout)

    def _init_folder(self, cfg):
        info = self.info
        tr, C = folder_samples(cfg.dataset, cfg.data_root, True, cfg.imb, cfg.imb_type,
                               cfg.train_list, cfg.test_list, cfg.lt_subset)
        te, _ = folder_samples(cfg.dataset, cfg.data_root, False, cfg.imb, cfg.imb_type,
                               cfg.train_list, cfg.test_list)
        self.C, self.in_channels = C, 3
        self.counts = torch.bincount(torch.tensor([s[1] for s in tr]), minlength=C).tolist()
        if min(self.counts) == 0:
            raise DataError(f"some classes of {cfg.dataset} have no training images; check --data-root / --train-list")
        check_split_sizes(cfg, self.counts)
        size = min(info.size, 224)
        self.pil = ListDataset(tr, folder_transforms(info, True, size, cfg.randaug), self.views)
        self.test = ListDataset(te, folder_transforms(info, False, size), 1)
        self.plain_train = ListDataset(tr, folder_transforms(info, False, size), 1)
        self.ntr = len(tr)

    def n_train(self):
        return len(self.xtr) if hasattr(self, "xtr") else self.ntr

    def train_batches(self, epoch, views, bs=None, start=0):
        """The epoch's batches from batch `start` on (the same batches as an uninterrupted epoch),
        this process's share of each: the one place where a global batch is split over processes."""
        cfg = self.cfg
        bs = bs or cfg.batch_size
        share = rank_part(bs, self.rank, self.world)
        if cfg.loader == "tensor":        # the epoch is augmented from its own seed: a restart replays it
            return tensor_loader(self.xtr, self.ytr, self.info, bs, cfg.seed, epoch, views, cfg.augment, cfg.randaug,
                                 cfg.autoaugment, cfg.cutout, start, share=share)
        batches = [b[share] for b in epoch_batches(self.n_train(), bs, cfg.seed, epoch)][start:]
        return pil_loader(self.pil, batches, cfg.workers, cfg.seed, epoch, self.device, self.rank)

    def n_plain(self, train):
        return self.n_train() if train else (len(self.xte) if hasattr(self, "xte") else len(self.test))

    def plain(self, train):
        """Un-augmented (images, labels) batches of the training or test set; under torchrun this
        process's rank_part of it."""
        part = rank_part(self.n_plain(train), self.rank, self.world)
        if hasattr(self, "xtr"):
            x, y = (self.xtr, self.ytr) if train else (self.xte, self.yte)
            x, y = x[part], y[part]
            for i in range(0, len(x), 1024):
                yield to_float(x[i:i + 1024], self.info.mean, self.info.std), y[i:i + 1024]
            return
        ds = self.plain_train if train else self.test
        ds = torch.utils.data.Subset(ds, range(part.start, part.stop)) if self.world > 1 else ds
        dl = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=self.cfg.workers)
        for x, y in dl:
            yield x.to(self.device), y.to(self.device)

# ----------------------------------------------------------------------------------------------
# Command line: split sizes

def main(argv=None):
    p = argparse.ArgumentParser(description="Long-tailed split sizes (no data is read).")
    p.add_argument("--dataset", required=True)
    p.add_argument("--imb", type=float, required=True, help="imbalance factor N_max/N_min (1 = balanced)")
    p.add_argument("--imb-type", default="exp", help="exp (CIFAR-LT) or pareto (ImageNet-LT style)")
    p.add_argument("--counts", action="store_true", help="print {counts, total} as one JSON line")
    a = p.parse_args(argv)
    try:
        if a.dataset not in DATASETS:
            raise DataError(f"unknown dataset {a.dataset!r}; choose one of {', '.join(DATASETS)}")
        counts = split_counts(a.dataset, a.imb, a.imb_type)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"counts": counts, "total": sum(counts)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
