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
PARETO_ALPHA = 6          # ImageNet-LT's Pareto shape (Liu et al. 2019)
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
    """Pareto-shaped counts falling from n_max (class 0) to n_min (class C-1).

    n_c = n_max * (1 + s*c)^(-alpha), the Pareto (Lomax) tail with shape alpha, with s chosen so
    that the last class gets exactly n_min. Rounded, and kept non-increasing.
    """
    if C == 1 or n_max == n_min:
        return [int(n_max)] * C
    s = ((n_max / n_min) ** (1.0 / alpha) - 1.0) / (C - 1)
    counts = [max(int(n_min), int(round(n_max * (1.0 + s * c) ** (-alpha)))) for c in range(C)]
    counts[0], counts[-1] = int(n_max), int(n_min)
    return counts


def split_counts(dataset, imb, imb_type="exp"):
    """Per-class training counts of `dataset` at imbalance factor imb = N_max / N_min."""
    info = DATASETS[dataset]
    if imb < 1:
        raise DataError(f"--imb {imb} is below 1; the imbalance factor is N_max/N_min, use 1 for balanced data")
    if info.kind == "folder" and imb_type == "pareto" and imb == 1:
        imb = info.n_max / FOLDER_MIN[dataset]      # the standard split's own factor
    if imb_type == "exp":
        return exp_counts(info.n_max, info.num_classes, imb)
    if imb_type == "pareto":
        return pareto_counts(info.num_classes, info.n_max, max(1, int(round(info.n_max / imb))))
    raise DataError(f"unknown --imb-type {imb_type!r}; use exp or pareto")


def long_tail_indices(labels, counts):
    """Indices of the first counts[c] images of every class c, in file order (LDAM/BCL)."""
    labels = torch.as_tensor(labels)
    keep = []
    for c, n in enumerate(counts):
        idx = (labels == c).nonzero().flatten()
        if len(idx) < n:
            raise DataError(f"class {c} has {len(idx)} images, the split asks for {n}; lower --imb or check the data")
        keep.append(idx[:n])
    return torch.cat(keep).sort().values

# ----------------------------------------------------------------------------------------------
# Loading CIFAR-scale sets as uint8 tensors (N, C, H, W) and int64 labels

def _cifar(dataset, root, train, download):
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    folder = os.path.join(root, cls.base_folder)
    try:
        ds = cls(root, train=train, download=False)
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
# RandAugment draws, per image, num_ops operations uniformly and a random sign; the magnitude
# is fixed. Grouping the images of a batch by (operation, sign) and calling torchvision's own
# op on each group is therefore the same distribution as per-image RandAugment.

_RA = None


def _rand_augment():
    global _RA
    if _RA is None:
        from torchvision.transforms import v2
        _RA = v2.RandAugment()
    return _RA


def random_crop_flip(x, pad, gen):
    """Per-image random crop (zero padding `pad`) and horizontal flip of a uint8 batch."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    flip = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def rand_augment(x, gen, num_ops=2, magnitude=9, bins=31):
    """torchvision RandAugment(num_ops, magnitude), drawn independently per image, on a uint8 batch."""
    ra = _rand_augment()
    names = list(ra._AUGMENTATION_SPACE)
    h, w = x.shape[-2:]
    fill = ra._fill
    for _ in range(num_ops):
        op = torch.randint(len(names), (len(x),), generator=gen, device=gen.device).cpu()
        sign = (torch.rand(len(x), generator=gen, device=gen.device) <= 0.5).cpu()
        out = x.clone()
        for k, name in enumerate(names):
            mags_fn, signed = ra._AUGMENTATION_SPACE[name]
            mags = mags_fn(bins, h, w)
            for neg in ((False, True) if signed else (False,)):
                sel = ((op == k) & (sign == neg)) if signed else (op == k)
                if not sel.any():
                    continue
                m = 0.0 if mags is None else float(mags[magnitude]) * (-1 if neg else 1)
                idx = sel.nonzero().flatten().to(x.device)
                out[idx] = ra._apply_image_or_video_transform(x[idx], name, m, ra.interpolation, fill)
        x = out
    return x


def to_float(x, mean, std):
    """uint8 -> normalised float, the same operations as ToTensor() + Normalize()."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.float().div(255).sub(m).div(s)


def augment_view(x, gen, info, randaug=True, pad=4):
    x = random_crop_flip(x, pad, gen)
    if randaug:
        x = rand_augment(x, gen)
    return to_float(x, info.mean, info.std)


def epoch_batches(n, batch_size, seed, epoch, drop_last=True):
    """The index batches of one epoch; the same for both loaders and after a resume."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def tensor_loader(x, y, info, batch_size, seed, epoch, views=2, augment=True, randaug=True):
    """Yield (views, labels) batches of a device-resident uint8 training set."""
    gen = torch.Generator(device=x.device).manual_seed(seed * 100003 + epoch + 7)
    for idx in epoch_batches(len(x), batch_size, seed, epoch):
        idx = idx.to(x.device)
        xb = x[idx]
        if augment:
            out = [augment_view(xb, gen, info, randaug) for _ in range(views)]
        else:
            out = [to_float(xb, info.mean, info.std)] * views
        yield out, y[idx]

# ----------------------------------------------------------------------------------------------
# PIL path: per-image torchvision transforms in DataLoader workers

class PILViews(torch.utils.data.Dataset):
    """Returns (view_1, ..., view_k, label) of a uint8 tensor dataset through PIL transforms."""

    def __init__(self, x, y, info, views=2, augment=True, randaug=True):
        from torchvision import transforms as T
        self.x, self.y, self.views = x, y, views
        steps = [T.RandomCrop(info.size, padding=4), T.RandomHorizontalFlip()] if augment else []
        steps += [T.RandAugment()] if augment and randaug else []
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


def pil_loader(dataset, batches, workers, seed, epoch, device):
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=FixedBatches(batches), num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=False,
                                     generator=torch.Generator().manual_seed(seed * 100003 + epoch + 11))
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
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return (*[self.tf(img) for _ in range(self.views)], label)


def folder_transforms(info, train, size=None):
    from torchvision import transforms as T
    size = size or info.size
    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.RandAugment()] + norm)
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] + norm)


def _read_list(root, list_file):
    samples = []
    with open(list_file) as f:
        for line in f:
            if line.strip():
                path, label = line.rsplit(maxsplit=1)
                samples.append((os.path.join(root, path), int(label)))
    return samples


def folder_samples(dataset, root, train, imb=1, imb_type="pareto", train_list=None, test_list=None):
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
    ds = ImageFolder(sub)
    C = len(ds.classes)
    if not train:
        return ds.samples, C
    n_max = max(torch.bincount(torch.tensor(ds.targets)).tolist())
    n_min = max(1, int(round(n_max / imb))) if imb > 1 else FOLDER_MIN.get(dataset, 1)
    counts = pareto_counts(C, n_max, min(n_min, n_max)) if imb_type == "pareto" else exp_counts(n_max, C, imb)
    keep = long_tail_indices(ds.targets, counts).tolist()
    return [ds.samples[i] for i in keep], C

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
