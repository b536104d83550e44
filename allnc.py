"""AllNC: All-around Neural Collapse for Imbalanced Classification (Zhang et al.), reproduced.

    python allnc.py --dataset cifar10 --imb 200 --gamma 2          # train, evaluate, print table
    python allnc.py --dataset fmnist --imb 100 --depth 8 --epochs 4 --compare ce   # CPU: AllNC vs CE
    python allnc.py --tables results/                               # paper tables, ours beside theirs
    python allnc.py --eval results/RUN.json                         # re-evaluate from the kept weights
    python allnc.py --plot results/RUN.json                         # ICPA heatmaps, NC curves, features
    python allnc.py --benchmark                                     # images/s, projected run time
    torchrun --standalone --nproc-per-node 8 allnc.py --dataset inat2018 ...   # one run on 8 GPUs (README)

Equation numbers are the paper's. Importing this module trains nothing and downloads nothing.
"""
import argparse
import dataclasses
import errno
import hashlib
import importlib
import inspect
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data_lt
import models
from data_lt import DataError

# ==============================================================================================

# ==============================================================================================
# Config: every hyperparameter in one place, the paper's values by dataset beside the recipes;
# each run writes it into its result JSON.

METHODS = ("allnc", "allnc++", "ce", "etf", "rbl", "ncmc")


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to run
    dataset: str = opt("cifar10", "cifar10 | cifar100 | fmnist | synthetic | imagenet_lt | inat2018",
                       choices=tuple(data_lt.DATASETS))
    imb: float = opt(100.0, "imbalance factor N_max/N_min (1 = balanced; ImageNet-LT/iNat: 1 = standard split)")
    imb_type: str = opt("exp", "exp (CIFAR-LT profile) or pareto (ImageNet-LT style)", choices=("exp", "pareto"))
    n_max: int = opt(None, "training images of the largest class, N_max (default: the dataset's own, e.g. 5000 "
                     "CIFAR-10, 6000 fmnist); smaller makes a cheaper long-tailed set (the CPU study: 1000)")
    method: str = opt("allnc", "allnc | allnc++ | ce | etf | rbl | ncmc", choices=METHODS)
    seed: int = opt(0, "random seed (init, batch order, augmentation)")
    # schedule (None = the paper's value for the dataset, see resolve())
    epochs: int = opt(None, "training epochs (paper: 200 on CIFAR)")
    batch_size: int = opt(None, "batch size (paper: 64 CIFAR, 128 ImageNet-LT/iNat)")
    lr: float = opt(None, "peak learning rate (paper: 0.01 CIFAR, 0.1 ImageNet-LT/iNat)")
    wd: float = opt(None, "weight decay (paper: 5e-3 CIFAR, 2e-4 ImageNet-LT/iNat)")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(False, "Nesterov momentum (RBL's recipe)")
    lr_schedule: str = opt("cosine", "per-epoch lr after the warm-up: cosine (GLMC/PaCo) | cosine-rbl (RBL's "
                           "denominator) | step (LDAM-DRW / ETF milestones)", choices=("cosine", "cosine-rbl", "step"))
    lr_steps: str = opt("160,180", "step schedule: 0-based epochs from which the lr is multiplied by --lr-step-factor")
    lr_step_factor: float = opt(0.1, "step schedule: factor per milestone (ETF 0.1, LDAM-DRW 0.01)")
    warmup_start: float = opt(0.0, "warm-up starts at this fraction of the lr (RBL: 0.5)")
    recipe: str = opt("allnc", "allnc: every method with AllNC's recipe (the controlled comparison); own: the "
                      "method's published recipe (RECIPES, README)", choices=("allnc", "own"))
    warmup: int = opt(None, "linear warm-up epochs before the per-epoch cosine decay (at most a fifth of the "
                      "run); default 0 on CIFAR-scale sets (GLMC: CosineAnnealingLR), 10 on ImageNet-LT/iNat (PaCo)")
    # model
    arch: str = opt(None, "resnet_cifar | resnext50 | resnet50 (default by dataset)")
    depth: int = opt(32, "CIFAR ResNet depth 6n+2 (8, 20, 32, ...)")
    width: int = opt(None, "CIFAR ResNet base width: stages width/2 width/4 width (16: the LDAM/BCL ResNet-32, "
                     "0.46M; 64: GLMC's ResNet-32, 7.4M). Default 64 on cifar10/100, 16 on fmnist/synthetic")
    heads: int = opt(1, "1: one classifier f carries CE and L_re + L_p(w) (Algorithm 1); 2: GLMC's conventional "
                     "head for CE plus a rebalanced head for L_re + L_p(w), which predicts", choices=(1, 2))
    proj: str = opt("linear", "proj1/proj2: linear = GLMC's Linear(d,128) and Linear(128,128); mlp = SimSiam-style "
                    "Linear-BN-ReLU-Linear", choices=("linear", "mlp"))
    proj_dim: int = opt(None, "output size of proj1 (z) and proj2 (h); default 128 on CIFAR-scale sets, 256 on "
                        "ImageNet-LT/iNat (GLMC's two models)")
    pred_hidden: int = opt(64, "hidden size of proj2 with --proj mlp (SimSiam bottleneck)")
    head_init: str = opt(None, "learned Linear layers of heads and projections: kaiming (kaiming_normal_, GLMC's and "
                         "LDAM-DRW's CIFAR ResNet, default on CIFAR-scale sets) | torch (PyTorch's default; GLMC's "
                         "ImageNet-LT/iNat models and RBL's classifier, default there)", choices=("kaiming", "torch"))
    # AllNC (Eq. 8-14)
    gamma: float = opt(2.0, "GBBN exponent gamma of Eq. 13")
    alpha: float = opt(1.0, "weight alpha of L_con + L_p(mu~) in Eq. 14 (paper gives no default)")
    grw_rho: float = opt(None, "GRW exponent rho: w_c ~ (1/N_c)^rho, normalised to sum C (default: GLMC's training "
                         "commands, 1.2 on CIFAR-LT but 1.0 for CIFAR-10-LT at imb <= 10, 1.0 elsewhere; GRW_RHO)")
    grw_reduction: str = opt("weights", "weights: GRW as the paper cites it (DisAlign's F.cross_entropy(weight=w), "
                             "sum_i w_yi CE_i / sum_i w_yi); batch: GLMC's (1/B) sum_i w_yi CE_i, which GLMC only "
                             "uses on batches mixed with a re-sampled tail-heavy partner", choices=("batch", "weights"))
    p2p_w: str = opt("raw", "L_p(w) of Eq. 11 on the raw classifier rows as written (rho_ii = 1 also pulls every "
                     "row norm to 1) or on l2-normalised rows (unit)", choices=("raw", "unit"))
    mean_momentum: float = opt(0.9, "EMA momentum of the running class means used for classes absent "
                               "from a batch")
    p2p_space: str = opt("feature", "class means for L_p(mu~): feature = phi(x), the classifier's input, where Eq. 4 "
                         "and Remark 3 put them, or z = proj1(phi(x)), after which Algorithm 1 computes them",
                         choices=("feature", "z"))
    no_hycon: bool = opt(False, "ablation: drop L_con (Table VII)")
    no_p2p: bool = opt(False, "ablation: drop L_p(mu~) and L_p(w) (Table VII)")
    no_gbbn: bool = opt(False, "ablation: eta = 0 from the start, i.e. rebalancing loss only (Table VII)")
    fixed_gamma: bool = opt(False, "ablation: BBN's own schedule eta = 1 - ((T-1)/T_max)^2 (Table VII)")
    # AllNC++ (weight balancing, Alshammari et al. 2022; ShadeAlsha/LTR-weight-balancing)
    maxnorm: float = opt(0.1, "allnc++: MaxNorm threshold on classifier rows (relative: a fraction of the "
                         "norms' range; absolute: a norm)")
    maxnorm_mode: str = opt("relative", "relative: cap = min + t (max - min) of the row norms at the start of the "
                            "stage (regularizers.py); absolute: cap = t", choices=("relative", "absolute"))
    maxnorm_every: str = opt("epoch", "apply MaxNorm after each epoch's steps (trainval.py) or after every step",
                             choices=("epoch", "step"))
    maxnorm_stage1: bool = opt(False, "allnc++: MaxNorm in stage 1 too (the public demo applies it in stage 2 only)")
    wb_stage2_epochs: int = opt(10, "allnc++: epochs of classifier-only retraining after the main run")
    wb_stage2_lr: float = opt(0.01, "allnc++: stage-2 learning rate (cosine over the stage)")
    wb_stage2_wd: float = opt(0.1, "allnc++: stage-2 weight decay")
    wb_cb_beta: float = opt(0.9999, "allnc++: stage-2 class-balanced loss beta (effective number of samples)")
    wb_stage2_bn: str = opt("batch", "allnc++: the frozen encoder's BatchNorm in stage 2: batch (train mode, batch "
                            "statistics, running statistics re-estimated: trainval.py's model.train()) | frozen "
                            "(eval mode, stage 1's statistics)", choices=("batch", "frozen"))
    # baselines
    etf_balance: bool = opt(True, "etf: the per-batch Ew class-balance factor of the public code (GivenEw)")
    mixup: float = opt(0.0, "input mixup Beta(a, a) for ce/etf/rbl/ncmc (0 = off; ETF's recipe: 1.0)")
    rbl_tau: float = opt(1.0, "rbl: post-hoc logit adjustment strength tau")
    ncmc_f: int = opt(20, "ncmc: centers per class (the most a class gets with --ncmc-centers aware)")
    ncmc_theta: float = opt(0.2, "ncmc: angle theta between centers and the class direction")
    ncmc_centers: str = opt("aware", "ncmc: aware (calc_cls_idx 'ca': minority classes get more centers) or "
                            "fixed ('ave': f - 1 each)",
                            choices=("aware", "fixed"))
    # data and augmentation
    data_root: str = opt("./data", "where datasets live (CIFAR is downloaded there if missing)")
    download: bool = opt(True, "download CIFAR / Fashion-MNIST if missing (--no-download to forbid)")
    randaug: str = opt("timm", "RandAugment after crop + flip: timm (rand-n2-m10-mstd0.5, the file PaCo ships) | "
                       "torchvision (RandAugment(2, 9)) | none", choices=("timm", "torchvision", "none"))
    autoaugment: bool = opt(False, "AutoAugment, torchvision's CIFAR10 policy, after crop + flip (RBL's recipe)")
    cutout: int = opt(0, "Cutout: one square hole of this side in pixels, 0 = off (RBL's recipe: 16)")
    lt_subset: str = opt("ldam", "which images form the LT subset: ldam (numpy seed 0, per-class shuffle: LDAM-DRW, "
                         "BCL, PaCo) | first (file order: weight balancing)", choices=("ldam", "first"))
    augment: bool = opt(True, "any augmentation at all (--no-augment: for checks only)")
    loader: str = opt("auto", "tensor (batched on the device) | pil (per-image DataLoader) | auto",
                      choices=("auto", "tensor", "pil"))
    workers: int = opt(2, "DataLoader workers for the PIL path (per process under torchrun)")
    train_list: str = opt(None, "ImageNet-LT/iNat: standard train split list file (path label per line)")
    test_list: str = opt(None, "ImageNet-LT/iNat: standard test/val split list file")
    smoke: bool = opt(False, "replace the images by a tiny generated stand-in with the same classes and "
                      "profile (pipeline checks only; results are marked SMOKE)")
    # running
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off"))
    compile: bool = opt(False, "torch.compile the whole training step")
    compile_mode: str = opt("default", "--compile's torch.compile mode: default | reduce-overhead (CUDA graphs: one "
                            "launch per step) | max-autotune (also tunes kernels, slow to compile)",
                            choices=("default", "reduce-overhead", "max-autotune"))
    dist_backend: str = opt("auto", "under torchrun: nccl (GPUs) | gloo (CPU processes) | auto (nccl on CUDA, "
                            "gloo on CPU)", choices=("auto", "nccl", "gloo"))
    eval_every: int = opt(1, "evaluate test top-1 every K epochs (and the last)")
    nc_every: int = opt(10, "NC metrics on the un-augmented training set every K epochs (and the last); 0 = last only")
    out: str = opt("results", "directory for result JSONs and checkpoints")
    name: str = opt(None, "run name (default: built from the config)")
    force: bool = opt(False, "re-run even if a finished result exists")


# The paper's values by dataset (Sec. V-B: CIFAR-LT, and ImageNet-LT / iNaturalist with PaCo's
# schedule), used where a flag is not given. Widths: GLMC's ResNet-32 on CIFAR (nf=64); 16 elsewhere.
# proj1/proj2: GLMC's ResNet_cifar.py Linear(d, 128), Linear(128, 128); its Resnet_LT.py 256 and 256.
_CIFAR = dict(epochs=200, batch_size=64, lr=0.01, wd=5e-3, warmup=0, arch="resnet_cifar", width=16,
              head_init="kaiming", proj_dim=128)
_BIG = dict(batch_size=128, lr=0.1, wd=2e-4, warmup=10, width=16, head_init="torch", proj_dim=256)
DATASET_DEFAULTS = {
    "cifar10": _CIFAR | {"width": 64}, "cifar100": _CIFAR | {"width": 64}, "fmnist": _CIFAR, "synthetic": _CIFAR,
    "imagenet_lt": _BIG | {"epochs": 90, "arch": "resnext50"}, "inat2018": _BIG | {"epochs": 100, "arch": "resnet50"},
}
# ... and by method, over the dataset's: RBL's classifier Linear(d, 256) sits outside the backbone whose
# __init__ applies kaiming_normal_ (qqgroup66666/rbl models/resnet_balancedsoftmax.py), so it keeps PyTorch's.
METHOD_DEFAULTS = {"rbl": {"head_init": "torch"}}


def grw_rho_default(dataset, imb):
    """GRW's exponent as AllNC's lineage ran it: GLMC's README commands give --label_weighting 1.2 for
    CIFAR-10-LT at imb 100 and 50 and for every CIFAR-100-LT run, 1 for CIFAR-10-LT at imb 10 and 1.0
    for ImageNet-LT and iNaturalist (DisAlign's own ImageNet-LT config: GRW_SCALE 1.2). Fashion-MNIST
    and the synthetic set keep cvpods' and GLMC's code default, 1.0."""
    if dataset == "cifar100" or (dataset == "cifar10" and imb > 10):
        return 1.2
    return 1.0


def defaults_for(dataset, method, imb):
    """The values a field left unset (None) takes: the dataset's, the method's over them, GRW's rho."""
    return DATASET_DEFAULTS[dataset] | METHOD_DEFAULTS.get(method, {}) | {"grw_rho": grw_rho_default(dataset, imb)}


# --recipe own: each method's published recipe as Config overrides (README: "Baselines").
# A value may be a dict by dataset ("*" for the rest). Flags the user gives explicitly win.
_ETF_RECIPE = dict(batch_size=128, lr=0.1, wd=2e-4, epochs=200, warmup=5, lr_schedule="step", lr_steps="160,180",
                   lr_step_factor=0.1, mixup=1.0, randaug="none", width={"cifar100": 32, "*": 16})
RECIPES = {
    # LDAM-DRW cifar_train.py, its CE baseline: lr x0.01 after epoch 160, x0.0001 after 180
    "ce": dict(batch_size=128, lr=0.1, wd=2e-4, epochs=200, warmup=5, lr_schedule="step", lr_steps="160,180",
               lr_step_factor=0.01, randaug="none", width=16),
    # ImbalancedLearning config/cifar*/..._ETF_DR.yaml, train.py
    "etf": _ETF_RECIPE,
    # rbl run/configs/cifar*_pl_posthoc.json, run/utils.py
    "rbl": dict(batch_size=256, lr=0.1, wd=5e-4, epochs=600, warmup=8, warmup_start=0.5, lr_schedule="cosine-rbl",
                nesterov=True, randaug="none", autoaugment=True, cutout=16, width=16),
    # NCMC's file publishes no recipe; it is built on the ETF code base, whose recipe we use
    "ncmc": _ETF_RECIPE,
}

# ==============================================================================================
# Losses (each a pure function of tensors; equation numbers are the paper's). Under torchrun a
# loss that needs the global batch gets `dist`, whose sum() adds the processes' parts.

def etf_gram(C, device=None):
    """Eq. 9: rho_ij = C/(C-1) delta_ij - 1/(C-1), i.e. 1 on the diagonal and -1/(C-1) off it."""
    return torch.eye(C, device=device) * (C / (C - 1)) - 1.0 / (C - 1)


def p2p_loss(v, rho=None, mask=None):
    """Eq. 10/11: (1/C^2) sum_ij (<v_i, v_j> - rho_ij)^2 over l2-normalised rows v_i.

    mask (optional, bool C): only rows that exist yet take part, C counts those rows (used while
    some classes have not been seen in training). The Gram matrix is float32 even under autocast."""
    with torch.autocast(v.device.type, enabled=False):
        v = F.normalize(v.float(), dim=1)
        rho = etf_gram(len(v), v.device) if rho is None else rho
        err = (v @ v.t() - rho) ** 2
        if mask is None:
            return err.sum() / len(v) ** 2
        m = mask.float()
        return (err * m[:, None] * m[None, :]).sum() / m.sum().clamp(min=1) ** 2


def p2p_loss_raw(v, rho=None):
    """Eq. 11 as written: (1/C^2) sum_ij (<w_i, w_j> - rho_ij)^2 on the raw classifier rows (no
    tilde: rho_ii = 1 pulls every row norm to 1, against the shrinking of tail rows). Float32."""
    with torch.autocast(v.device.type, enabled=False):
        v = v.float()
        rho = etf_gram(len(v), v.device) if rho is None else rho
        return ((v @ v.t() - rho) ** 2).sum() / len(v) ** 2


def hycon_sim(h, u, z):
    """sim(h, u, sg(z)) = -<h/|h|, z/|z|> - <u/|u|, z/|z|> per sample (Eq. 8)."""
    z = F.normalize(z.detach().float(), dim=1)
    return -(F.normalize(h.float(), dim=1) * z).sum(1) - (F.normalize(u.float(), dim=1) * z).sum(1)


def hycon_loss(h1, h2, z1, z2, u1, u2):
    """Eq. 8: L_con = sim(h1, u2, sg(z2)) + sim(h2, u1, sg(z1)), batch mean; -4 at perfect alignment."""
    return (hycon_sim(h1, u2, z2) + hycon_sim(h2, u1, z1)).mean()


def gbbn_eta(epoch, total_epochs, gamma):
    """Eq. 13: eta = 1 - (T / T_max)^gamma, T the current epoch (1-based)."""
    return 1.0 - (epoch / total_epochs) ** gamma


def bbn_eta(epoch, total_epochs):
    """BBN's cumulative weight 1 - ((T-1)/T_max)^2, the --fixed-gamma ablation."""
    return 1.0 - ((epoch - 1) / total_epochs) ** 2


def grw_weights(counts, rho=1.0):
    """GRW (DisAlign): w_c = (1/r_c)^rho with r_c = N_c/N, normalised to sum to C."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (n.sum() / n) ** rho
    return (w / w.sum() * len(n)).float()


def grw_loss(logits, y, weights, reduction="weights", dist=None):
    """Class-weighted CE. 'weights': GRW as DisAlign computes it (F.cross_entropy(weight=w), the
    weighted mean sum_i w_yi CE_i / sum_i w_yi; under torchrun (dist) sum w_y of the global batch:
    each of the N processes divides its part by the mean over processes); 'batch': GLMC's
    (1/B) sum_i w_yi CE_i."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    wy = weights[y]
    if reduction == "batch":
        return (wy * ce).sum() / len(y)
    return (wy * ce).sum() / (wy.sum() if dist is None else dist.sum(wy.sum()) / dist.world)


def gbbn_cls_loss(logits, y, eta, weights, w_rows, use_p2p, reduction="weights", ce_logits=None, p2p_w="raw",
                  dist=None):
    """Eq. 12: mean_i [eta CE + (1 - eta)(L_re + L_p(w))] for one view. ce_logits: a separate
    conventional head's logits for the CE term (--heads 2, GLMC); by default the same classifier.
    p2p_w: L_p(w) on the raw rows (Eq. 11 as written) or on unit rows."""
    ce = F.cross_entropy((logits if ce_logits is None else ce_logits).float(), y)
    re = grw_loss(logits, y, weights, reduction, dist)
    pw = (p2p_loss_raw(w_rows) if p2p_w == "raw" else p2p_loss(w_rows)) if use_p2p else ce.new_zeros(())
    return eta * ce + (1 - eta) * (re + pw), {"ce": ce, "grw": re, "p2p_w": pw}


def cb_weights(counts, beta=0.9999):
    """Class-balanced weights (1 - beta) / (1 - beta^N_c), normalised to sum C."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w / w.sum() * len(n)).float()


def cb_loss(logits, y, w):
    """Class-balanced loss of weight balancing's stage 2 (class_balanced_loss.py, 'softmax'): mean
    over samples and classes of w_{y_i} BCE(softmax(logits)_ic, onehot_ic), w = cb_weights(counts, beta)."""
    with torch.autocast(logits.device.type, enabled=False):      # CUDA autocast refuses BCE
        p = logits.float().softmax(1)
        onehot = F.one_hot(y, len(w)).float()
        return F.binary_cross_entropy(p, onehot, weight=w[y][:, None].expand_as(p))


def etf_dr_loss(h, M, y, balance=True, y_count=None, dist=None):
    """Dot-regression loss of Yang et al. (reg_dot_loss): 0.5 mean((<h, Ew_y m_y> - Ew_y)^2) for unit h
    and unit m_y, i.e. 0.5 mean(Ew_y^2 (<h, m_y> - 1)^2). produce_Ew: Ew_c = sqrt((B / classes in the
    batch) / count_c), counted on y_count (the un-mixed labels; default y) over the global batch
    (under torchrun, dist sums the counts); balance=False: Ew = 1."""
    dot = (h.float() * M.t()[y]).sum(1)
    per = 0.5 * (dot - 1) ** 2
    if balance:
        yc = y if y_count is None else y_count
        cnt = torch.zeros(M.shape[1], device=y.device).index_add_(0, yc, torch.ones_like(yc, dtype=torch.float))
        cnt = cnt if dist is None else dist.sum(cnt)
        per = per * cnt.sum() / ((cnt > 0).sum() * cnt[y].clamp(min=1))
    return per.mean()


def ncmc_loss(x, V, mask, k, y, theta, reg=6e-4):
    """NCMC's ClassAwareLoss: per sample, sum over its class's k_y centers of
    g(k_y) (1 - <x/|x|, V_yj>)^2 with g(k) = sqrt(cos^2 theta + k sin^2 theta) / sqrt(k), plus
    reg (|x| - 1)^2; mean over the batch. x: the BN output the classifier normalises. In float32
    under autocast too (the einsum would run as a bf16 bmm), as every other loss."""
    x = x.float()
    norm = x.norm(dim=1).clamp(min=1e-8)
    with torch.autocast(x.device.type, enabled=False):
        cos = torch.einsum("bd,bkd->bk", x / norm[:, None], V[y].float())
    ky = k[y]
    g = torch.sqrt(math.cos(theta) ** 2 + ky * math.sin(theta) ** 2) / torch.sqrt(ky)
    per = g * (((1 - cos) ** 2) * mask[y]).sum(1) + reg * (norm - 1) ** 2
    return per.mean()


def batch_class_means(z, y, C, dist=None):
    """Mean of z over each class present in the (global) batch, with gradient, and the present mask.
    Under torchrun dist sums the sums and counts over the processes, so that every process gets the
    global batch's means. Counts by index_add_ (bincount on CUDA syncs with the host)."""
    zc = torch.cat([z, torch.ones(len(y), 1, device=z.device, dtype=z.dtype)], 1)     # z and a count column
    both = torch.zeros(C, zc.shape[1], device=z.device, dtype=z.dtype).index_add(0, y, zc)
    both = both if dist is None else dist.sum(both)
    sums, cnt = both[:, :-1], both[:, -1]
    return sums / cnt.clamp(min=1)[:, None], cnt > 0

# ==============================================================================================
# The steps of Algorithm 1: the model, one training step per method (a dict from method name to
# step function; each returns (total loss, {term: value}), the terms logged and checked for
# NaN/inf), GBBN's eta and the learning rate per epoch, MaxNorm, the optimizer.

def build_model(cfg, C, counts, in_channels):
    enc = models.encoder_for(cfg.arch, cfg.depth, in_channels, cfg.width)
    d = enc.out_dim
    head = {"ce": lambda: models.LinearHead(d, C), "allnc": lambda: models.LinearHead(d, C, cfg.heads),
            "allnc++": lambda: models.LinearHead(d, C, cfg.heads), "etf": lambda: models.ETFHead(d, C, cfg.seed),
            "rbl": lambda: models.RotatedETFHead(d, C, cfg.seed),
            "ncmc": lambda: models.MultiCenterHead(
                d, C, models.ncmc_center_counts(counts, cfg.ncmc_f, cfg.ncmc_centers == "aware"),
                cfg.ncmc_f, cfg.ncmc_theta, cfg.seed)}[cfg.method]()
    allnc = cfg.method.startswith("allnc")
    model = models.Net(enc, head, cfg.proj_dim if allnc else 0, cfg.pred_hidden, cfg.proj, cfg.head_init)
    if allnc:
        model.register_buffer("mu_run", torch.zeros(C, cfg.proj_dim if cfg.p2p_space == "z" else d))
        model.register_buffer("mu_seen", torch.zeros(C, dtype=torch.bool))
    return model


def step_allnc(model, views, y, st):
    """Algorithm 1, lines 5-13, for one batch (two augmented views of it)."""
    cfg, C, B, dist = st.cfg, st.C, len(y), st.dist
    feat, logits, _ = model(torch.cat(views))
    with torch.autocast(feat.device.type, enabled=False):
        ce_logits = model.head.ce_logits(feat) if cfg.heads == 2 else None
    z = model.proj1(feat).float()
    p1, p2, z1, z2 = logits[:B], logits[B:], z[:B], z[B:]
    u1, present = batch_class_means(z1, y, C, dist)
    u2, _ = batch_class_means(z2, y, C, dist)
    if cfg.p2p_space == "feature":
        f = feat.float()
        mu_batch = (batch_class_means(f[:B], y, C, dist)[0] + batch_class_means(f[B:], y, C, dist)[0]) / 2
    else:
        mu_batch = (u1 + u2) / 2
    use_p2p = not cfg.no_p2p
    W = model.head.classifier_weight()
    c1, c2 = (None, None) if ce_logits is None else (ce_logits[:B], ce_logits[B:])
    cls1, t = gbbn_cls_loss(p1, y, st.eta_t, st.grw, W, use_p2p, cfg.grw_reduction, c1, cfg.p2p_w, dist)
    cls2, t2 = gbbn_cls_loss(p2, y, st.eta_t, st.grw, W, use_p2p, cfg.grw_reduction, c2, cfg.p2p_w, dist)
    terms = {k: (t[k] + t2[k]) / 2 for k in t}
    zero = cls1.new_zeros(())
    terms["hycon"] = zero
    if not cfg.no_hycon:
        h = model.proj2(z).float()
        terms["hycon"] = hycon_loss(h[:B], h[B:], z1, z2, u1[y], u2[y])
    terms["p2p_mu"] = zero
    if use_p2p:
        # classes absent from the batch enter through their running mean (README: choices)
        mu = torch.where(present[:, None], mu_batch, model.mu_run)
        avail = present | model.mu_seen
        mu_g = (mu * avail[:, None]).sum(0) / avail.sum().clamp(min=1)     # unweighted mu_G
        terms["p2p_mu"] = p2p_loss(mu - mu_g, st.gram, avail)
    with torch.no_grad():
        m = cfg.mean_momentum
        upd = torch.where(model.mu_seen[:, None], m * model.mu_run + (1 - m) * mu_batch.detach(), mu_batch.detach())
        model.mu_run.copy_(torch.where(present[:, None], upd, model.mu_run))
        model.mu_seen |= present
    total = cls1 + cls2 + cfg.alpha * (terms["hycon"] + terms["p2p_mu"])
    return total, terms


# Single-view baselines: a loss of (logits, h, labels, the model's head); step_single adds input
# mixup around it. y_count: the batch's own (un-mixed) labels, for the ETF loss's balance factor.
def loss_ce(logits, h, y, head, st, y_count=None):
    return F.cross_entropy(logits.float(), y)


def loss_etf(logits, h, y, head, st, y_count=None):
    """Dot regression; with --etf-balance the Ew factor comes from the batch's own (un-mixed) labels."""
    return etf_dr_loss(h, head.M, y, st.cfg.etf_balance, y_count, st.dist)


def loss_ncmc(logits, h, y, head, st, y_count=None):
    return ncmc_loss(h, head.V, head.mask, head.k, y, st.cfg.ncmc_theta)


BASELINE_LOSS = {"ce": (loss_ce, "ce"), "rbl": (loss_ce, "ce"), "etf": (loss_etf, "dr"), "ncmc": (loss_ncmc, "cal")}


def mixup(x, y, alpha, rng, dist):
    """Input mixup (Zhang et al.; the ETF code's mixup_data): lam ~ Beta(alpha, alpha) and a random
    pairing over the global batch (under torchrun the partners come from every process), drawn from
    the numpy RandomState rng (seeded per epoch: resume replays them)."""
    lam = float(rng.beta(alpha, alpha))
    xs, ys = dist.gather_batch(x), dist.gather_batch(y)
    perm = data_lt.to_device(torch.from_numpy(rng.permutation(len(ys))[dist.part(len(ys))]), x.device)
    return lam * x + (1 - lam) * xs[perm], y, ys[perm], lam


def step_single(model, views, y, st):
    """CE / ETF / RBL / NCMC: one view; with --mixup, loss = lam L(y_a) + (1 - lam) L(y_b)."""
    loss_fn, name = BASELINE_LOSS[st.cfg.method]
    x = views[0]
    if st.cfg.mixup > 0:
        x, ya, yb, lam = mixup(x, y, st.cfg.mixup, st.mix_rng, st.dist)
        _, logits, h = model(x)
        loss = lam * loss_fn(logits, h, ya, model.head, st, y) + (1 - lam) * loss_fn(logits, h, yb, model.head, st, y)
    else:
        _, logits, h = model(x)
        loss = loss_fn(logits, h, y, model.head, st)
    return loss, {name: loss}


def step_stage2(model, views, y, st):
    """AllNC++ stage 2 (weight balancing's demo 2): classifier only, class-balanced loss. The encoder's
    weights are frozen; its BatchNorm runs in train mode as trainval.py's model.train() leaves it
    (batch statistics, running statistics re-estimated), or in eval mode with --wb-stage2-bn frozen."""
    model.encoder.train(st.cfg.wb_stage2_bn == "batch")
    with torch.no_grad():
        feat = model.encoder(views[0]).float()
    with torch.autocast(feat.device.type, enabled=False):
        logits, _ = model.head(feat)
    loss = cb_loss(logits, y, st.cb_w)
    return loss, {"cb": loss}


STEPS = {"allnc": step_allnc, "allnc++": step_allnc, "ce": step_single, "etf": step_single, "rbl": step_single,
         "ncmc": step_single}
VIEWS = {"allnc": 2, "allnc++": 2, "ce": 1, "etf": 1, "rbl": 1, "ncmc": 1}


def eval_logits(model, x, st):
    """Test-time logits (float32: the model runs without autocast at evaluation; bf16 near-ties
    would round toward class 0, the head class); RBL subtracts tau * log prior."""
    logits = model(x)[1].float()
    if st.cfg.method == "rbl":
        logits = logit_adjust(logits, st.counts, st.cfg.rbl_tau)
    return logits


def logit_adjust(logits, counts, tau):
    """logit_i - tau * log(N_i / N): argmax of this is RBL's prediction rule."""
    n = torch.as_tensor(counts, dtype=torch.float32, device=logits.device)
    return logits - tau * torch.log(n / n.sum())


def eta_for(cfg, epoch):
    if cfg.no_gbbn:
        return 0.0
    if cfg.fixed_gamma:
        return bbn_eta(epoch, cfg.epochs)
    return gbbn_eta(epoch, cfg.epochs, cfg.gamma)


def lr_at(epoch, epochs, base, warmup=0, schedule="cosine", steps=(), step_factor=0.1, warmup_start=0.0):
    """Learning rate of 0-based `epoch`, set once per epoch.
    warm-up (e < W): base (s + (1 - s)(e + 1) / W), s = warmup_start (0: LDAM/ETF/PaCo; 0.5: RBL).
    cosine, no warm-up: GLMC's CIFAR CosineAnnealingLR(T_max=E): base (1 + cos(pi e / E)) / 2;
    cosine after a warm-up: PaCo's adjust_learning_rate, base (1 + cos(pi (e - W + 1) / (E - W + 1))) / 2;
    cosine-rbl: RBL's run/utils.py, the same with E - W in the denominator;
    step: LDAM-DRW / ETF, base * step_factor^(number of milestones <= e)."""
    if epoch < warmup:
        return base * (warmup_start + (1 - warmup_start) * (epoch + 1) / warmup)
    if schedule == "step":
        return base * step_factor ** sum(epoch >= s for s in steps)
    if warmup == 0:
        return base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    end = epochs - warmup + (1 if schedule == "cosine" else 0)
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup + 1) / end))


def parse_steps(text):
    """'160,180' -> (160, 180): the 0-based epochs from which the step schedule decays."""
    return tuple(int(s) for s in str(text).split(",") if s.strip())


def warmup_epochs(cfg):
    """--warmup, cut to a fifth of the run for short runs (10 warm-up epochs of a 90-epoch
    ImageNet-LT run stay 10; a 10-epoch test run warms up for 2)."""
    return min(cfg.warmup, cfg.epochs // 5)


def lr_for(cfg, epoch):
    """The learning rate of 1-based `epoch`, set once per epoch: stage 1's schedule (--lr-schedule
    after the warm-up), then AllNC++'s stage 2, a cosine from --wb-stage2-lr over its own epochs, stepped
    before each epoch as trainval.py's schedulerW.step(): stage-2 epoch k of K at lr (1 + cos(pi k / K)) / 2,
    the last at 0."""
    if epoch > cfg.epochs:
        return lr_at(epoch - cfg.epochs, cfg.wb_stage2_epochs, cfg.wb_stage2_lr, 0, "cosine")
    return lr_at(epoch - 1, cfg.epochs, cfg.lr, warmup_epochs(cfg), cfg.lr_schedule, parse_steps(cfg.lr_steps),
                 cfg.lr_step_factor, cfg.warmup_start)


def maxnorm_cap(W, thresh, mode="relative"):
    """MaxNorm's cap on classifier row norms. relative (weight balancing's regularizers.py):
    min + thresh (max - min) of the current row norms, fixed for the stage; absolute: thresh."""
    if mode == "absolute":
        return float(thresh)
    n = W.detach().norm(dim=1)
    return (n.min() + thresh * (n.max() - n.min())).item()


def max_norm_(W, cap):
    """MaxNorm's projection (PGD): rows longer than cap are scaled to it; the bias is exempt."""
    with torch.no_grad():
        W.mul_((cap / W.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0))


def gpu_path(device):
    """Whether a run on `device` makes the GPU's choices: fused SGD, bf16 autocast by default (fp16 with a
    GradScaler), channels_last, cudnn.benchmark. torch has each of them on the CPU too, so a test that
    makes this true there reaches every line of a GPU run but the device placement."""
    return device.type == "cuda"


def gpu_backends(cfg, device):
    """cuDNN's settings for a run on the GPU path: autotuned convolutions (cudnn.benchmark) and, with
    --amp off, float32 that is float32: PyTorch's default lets cuDNN convolutions use TF32 on Ampere and
    later (10 mantissa bits), which --amp off turns off, matmuls included."""
    if gpu_path(device):
        torch.backends.cudnn.benchmark = True
        exact = amp_mode(cfg, device) == "off"
        torch.backends.cudnn.conv.fp32_precision = "ieee" if exact else "tf32"
        if exact:
            torch.set_float32_matmul_precision("highest")


def make_optimizer(model, cfg, stage2=False):
    if stage2:
        params, lr, wd = model.head.parameters(), cfg.wb_stage2_lr, cfg.wb_stage2_wd
    else:
        params, lr, wd = model.parameters(), cfg.lr, cfg.wd
    fused = gpu_path(next(model.parameters()).device)   # one kernel, and no GradScaler sync
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, nesterov=cfg.nesterov and not stage2,
                           fused=fused or None)

# ==============================================================================================
# The training loop: Algorithm 1 epoch by epoch; the run's machinery (checkpoints, resume,
# progress, signals, other processes) enters through the Run object `rs` (below the banner).

class TrainState:
    """The method's state, what the step functions see besides the model: config, class counts,
    GRW and class-balanced weights, the Gram target of Eq. 9, GBBN's eta, MaxNorm's cap, the mixup
    generator, autocast, and `dist`, the sums over processes the losses need under torchrun. (The
    running class means of L_p(mu~) are model buffers: they are checkpointed with the weights.)"""

    def __init__(self, cfg, data, device, dist=None):
        self.cfg, self.C, self.counts, self.device = cfg, data.C, data.counts, device
        self.dist = dist or Dist()
        self.grw = grw_weights(data.counts, cfg.grw_rho).to(device)
        self.cb_w = cb_weights(data.counts, cfg.wb_cb_beta).to(device)
        self.gram = etf_gram(data.C, device)
        self.eta_t = torch.ones((), device=device)   # eta as the step sees it: a tensor, so that a
        self.eta = 1.0                               # compiled step is not recompiled every epoch
        self.maxnorm_cap = None      # allnc++: MaxNorm's cap for the current stage (None: off)
        self.step = STEPS[cfg.method]
        if cfg.compile:                              # the whole step: forward, losses and (traced) backward
            self.step = torch.compile(self.step, mode=cfg.compile_mode)
        self.mix_rng = np.random.RandomState(cfg.seed)    # mixup draws; re-seeded at every epoch
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp_mode(cfg, device))

    @property
    def eta(self):
        return self._eta

    @eta.setter
    def eta(self, value):
        self._eta = float(value)
        self.eta_t.fill_(self._eta)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def train(cfg, model, data, st, rs):
    """Algorithm 1: for each epoch T the learning rate and GBBN's eta (Eq. 13), the epoch's steps,
    test top-1 and the NC metrics; then AllNC++'s stage 2. Returns the final evaluation: the head's
    top-1 per shot group, the same weights scored as features (decoupled), the NC metrics."""
    total = cfg.epochs + cfg.wb_stage2_epochs
    for epoch in range(rs.start, total + 1):
        stage2 = epoch > cfg.epochs
        if epoch in (1, cfg.epochs + 1) and not rs.partial:
            begin_stage(cfg, model, st, rs, stage2)
        lr = lr_for(cfg, epoch)
        st.eta = eta_for(cfg, min(epoch, cfg.epochs))         # stage 2 keeps the last eta
        row = {"epoch": epoch, "stage": 2 if stage2 else 1} | ({"eta": st.eta} if cfg.method.startswith("allnc") else {})
        row |= train_epoch(model, data, st, rs, epoch, lr, stage2)
        if epoch == total or epoch % cfg.eval_every == 0:
            row["test"] = {k: v for k, v in evaluate(model, data, st).items() if k != "per_class"}
        if epoch == total or (cfg.nc_every and epoch % cfg.nc_every == 0):
            row["nc"] = train_nc_metrics(model, data, st)
        rs.end_epoch(row, last=epoch == total)   # best weights, progress line, checkpoint, agreed stop
    final = evaluate(model, data, st)
    final["decoupled"] = decoupled_scores(model, data, st, final)
    final["nc"] = train_nc_metrics(model, data, st, icpa=True)
    return final


def begin_stage(cfg, model, st, rs, stage2):
    """AllNC++: stage 2 trains the classifier alone with its own optimizer; MaxNorm's cap is taken
    from the row norms at the start of the stage (stage 1 too with --maxnorm-stage1)."""
    if stage2:
        rs.opt = make_optimizer(model, cfg, stage2=True)
    if cfg.method == "allnc++" and (stage2 or cfg.maxnorm_stage1):
        st.maxnorm_cap = maxnorm_cap(model.head.fc.weight, cfg.maxnorm, cfg.maxnorm_mode)


def train_epoch(model, data, st, rs, epoch, lr, stage2=False):
    """One epoch's steps: the step's losses, backward, SGD, MaxNorm (AllNC++). Returns the epoch's
    mean loss terms, lr and images/s; the terms stay on the device until the epoch's end."""
    cfg = st.cfg
    views = 1 if stage2 else VIEWS[cfg.method]
    step_fn = step_stage2 if stage2 else st.step
    for g in rs.opt.param_groups:
        g["lr"] = lr
    st.mix_rng = np.random.RandomState((cfg.seed * 100003 + epoch) % 2**32)
    sums = rs.epoch_sums()                   # a resumed epoch continues from its partial sums
    for i, (xs, y) in enumerate(data.train_batches(epoch, views, start=sums.step), start=sums.step):
        if cfg.compile:        # a new step: its CUDA graphs (reduce-overhead) may reuse the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with st.autocast():
            loss, terms = rs.forward(step_fn, xs, y, stage2)     # DDP around it under torchrun
        rs.backward(loss)
        if st.maxnorm_cap is not None and cfg.maxnorm_every == "step":
            max_norm_(model.head.fc.weight, st.maxnorm_cap)
        sums.add(i, loss, terms, len(y) * views)
        rs.between_steps(epoch, sums)         # progress; a pending signal: checkpoint here and stop
    means = sums.means(epoch, data.n_train(), cfg.batch_size)       # one sync; non-finite terms stop
    if st.maxnorm_cap is not None and cfg.maxnorm_every == "epoch":
        max_norm_(model.head.fc.weight, st.maxnorm_cap)          # once, after the epoch's steps
    dt = sums.elapsed()
    return means | {"lr": lr, "img_per_s": sums.imgs / dt, "time": dt}

# ==============================================================================================
# Evaluation and neural-collapse metrics

def shot_groups(counts):
    """Class masks by training images. many/medium/few: the paper's text and GLMC's validate()
    (> 100, 21..100, <= 20); *_bcl: BCL/PaCo's (> 100, 20..100, < 20)."""
    n = torch.as_tensor(counts)
    return {"many": n > 100, "medium": (n > 20) & (n <= 100), "few": n <= 20,
            "medium_bcl": (n >= 20) & (n <= 100), "few_bcl": n < 20}


@torch.no_grad()
def evaluate(model, data, st, scores=None):
    """Top-1 on the balanced test set, per shot group (shot_groups) and per class. The model
    runs in float32 here, autocast or not in training. scores(x): class scores to predict by
    (default: the method's test-time logits)."""
    model.eval()
    C = data.C
    correct = torch.zeros(C, dtype=torch.float64, device=data.device)
    total = torch.zeros(C, dtype=torch.float64, device=data.device)
    for x, y in data.plain(train=False):            # under torchrun: this process's part, then summed
        pred = (scores(x) if scores else eval_logits(model, x, st)).argmax(1)
        total.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        correct.index_add_(0, y, (pred == y).double())
    st.dist.reduce_(correct)
    st.dist.reduce_(total)
    model.train()
    acc = (correct / total.clamp(min=1)).cpu()
    out = {"top1": 100 * correct.sum().item() / max(total.sum().item(), 1)}
    for g, m in shot_groups(data.counts).items():
        out[g] = 100 * acc[m].mean().item() if m.any() else None
    out["per_class"] = [round(100 * a, 3) for a in acc.tolist()]
    return out


# Post-hoc logit adjustment assumes a head trained on the long-tailed prior; these are not.
LA_NOT_APPLICABLE = {"etf": "a fixed ETF trained with the balancing Ew factor",
                     "ncmc": "fixed class directions, class-aware centers",
                     "rbl": "its prediction already is logit-adjusted",
                     "allnc++": "its stage 2 retrains the head class-balanced"}


@torch.no_grad()
def train_class_means(model, data, dist):
    """Class means of phi(x) over the un-augmented training set (summed over processes)."""
    model.eval()
    sums, cnt = None, torch.zeros(data.C, dtype=torch.float64, device=data.device)
    for x, y in data.plain(train=True):
        f = model(x)[0].double()
        sums = f.new_zeros(data.C, f.shape[1]) if sums is None else sums
        sums.index_add_(0, y, f)
        cnt.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    model.train()
    return (dist.reduce_(sums) / dist.reduce_(cnt).clamp(min=1)[:, None]).float()


def decoupled_scores(model, data, st, head):
    """Features or classifier? The final weights scored three ways: the trained head (head: its
    evaluate() result), post-hoc logit adjustment (logit - log prior, tau 1; None where it does
    not apply, see LA_NOT_APPLICABLE), and the nearest class mean of phi(x) by cosine. A tail that
    the head misses and NCM finds is a classifier bias, not a representation failure."""
    cfg = st.cfg
    groups = lambda r: {k: v for k, v in r.items() if k != "per_class"}
    no_la = LA_NOT_APPLICABLE.get(cfg.method) if cfg.method != "allnc++" or cfg.wb_stage2_epochs else None
    la = None if no_la else groups(evaluate(model, data, st, lambda x: logit_adjust(eval_logits(model, x, st),
                                                                                    st.counts, 1.0)))
    means = F.normalize(train_class_means(model, data, st.dist), dim=1)
    ncm = evaluate(model, data, st, lambda x: F.normalize(model(x)[0].float(), dim=1) @ means.t())
    return {"head": groups(head), "logit_adjusted": la, "ncm": groups(ncm)} | ({"la_not_applicable": no_la} if no_la else {})


def best_epoch(log):
    """The epoch with the highest test top-1 (the first on ties), as every public code base we
    compare with reports; None if no epoch was evaluated."""
    rows = [r for r in log if "test" in r]
    if not rows:
        return None
    r = max(rows, key=lambda r: (r["test"]["top1"], -r["epoch"]))
    return {"epoch": r["epoch"]} | r["test"]


def nc_metrics(features, labels, W, b=None, icpa=False, chunk=8192, dist=None):
    """Neural-collapse metrics in float64 (NC1, Eq. 4, 6, 7, equinorm, NC4).

    features N x d (the vectors the classifier acts on), labels N, W C x d classifier rows.
    mu_G is the unweighted mean of the class means. Std/mean of cosines are over the C(C-1)
    off-diagonal pairs (population std). Under torchrun each process passes its own rows and
    `dist`: every term is a sum over samples, so the processes add their sums (no features are
    gathered) and all get the metrics of the whole set."""
    total = dist.reduce_ if dist is not None else (lambda t: t)
    W = W.detach().double()
    C, d = W.shape
    labels = labels.to(features.device)
    cnt = total(torch.bincount(labels, minlength=C).double())
    sums = torch.zeros(C, d, dtype=torch.float64, device=features.device)
    for i in range(0, len(features), chunk):
        sums.index_add_(0, labels[i:i + chunk], features[i:i + chunk].double())
    present = cnt > 0
    mu = total(sums) / cnt.clamp(min=1)[:, None]
    mu_g = mu[present].mean(0)
    Mc = (mu - mu_g)[present]                                   # centered class means
    # NC1 = tr(Sigma_W Sigma_B^+) / C. Sigma_B = Mc^T Mc / C has rank < C: its pseudo-inverse is
    # sum_i v_i v_i^T / lambda_i over Mc's right singular vectors, so only Sigma_W's d x k block
    # along them is needed (no d x d matrix: NCMC's features have f*C dimensions)
    _, sv, Vh = torch.linalg.svd(Mc, full_matrices=False)
    evals = sv ** 2 / len(Mc)                                   # Sigma_B's non-zero eigenvalues
    keep = evals > evals.max() * max(d, C) * torch.finfo(torch.float64).eps * 1e3
    basis, evals = Vh[keep].t(), evals[keep]
    within = torch.zeros(len(evals), dtype=torch.float64, device=features.device)   # v_i^T Sigma_W v_i * N
    agree = torch.zeros((), dtype=torch.float64, device=features.device)
    Wd, bd = W.to(features.device), (b.detach().double().to(features.device) if b is not None else None)
    for i in range(0, len(features), chunk):
        f, yy = features[i:i + chunk].double(), labels[i:i + chunk]
        within += ((f - mu[yy]) @ basis).square().sum(0)
        logits = f @ Wd.t() + (bd if bd is not None else 0)
        near = torch.cdist(f, mu[present]).argmin(1)
        agree += (logits[:, present].argmax(1) == near).sum()
    Wp, n = Wd[present], cnt.sum().item()
    out = {"nc1": (total(within) / n / evals).sum().item() / len(Mc)}
    for key, V in (("mu", Mc), ("w", Wp - Wp.mean(0))):
        Vn = F.normalize(V, dim=1)
        cos = Vn @ Vn.t()
        off = cos[~torch.eye(len(V), dtype=torch.bool, device=V.device)]
        out[f"cos_{key}_mean"], out[f"cos_{key}_std"] = off.mean().item(), off.std(unbiased=False).item()
        if icpa:
            out[f"icpa_{key}"] = torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).cpu().round(decimals=2).tolist()
    nm, nw = Mc.norm(dim=1), Wp.norm(dim=1)
    out["equinorm_mu"] = (nm.std(unbiased=False) / nm.mean()).item()
    out["equinorm_w"] = (nw.std(unbiased=False) / nw.mean()).item()
    out["self_duality"] = (Wp / Wp.norm() - Mc / Mc.norm()).norm().item()       # Eq. 4
    out["ncc_agreement"] = total(agree).item() / n
    return out


@torch.no_grad()
def training_h(model, data):
    """The classifier's input h on this process's part of the un-augmented training set, as w sees
    it (NCMC's unit-normalised features), and the labels."""
    model.eval()
    hs, ys = [], []
    with torch.no_grad():
        for x, y in data.plain(train=True):
            h = model(x)[2].float()
            hs.append(F.normalize(h, dim=1) if isinstance(model.head, models.MultiCenterHead) else h)
            ys.append(y)
    model.train()
    return torch.cat(hs), torch.cat(ys)


def train_nc_metrics(model, data, st, icpa=False):
    """NC metrics of the classifier input h on the un-augmented training set (one float32 pass); under
    torchrun each process scores its part, and only rank 0, which writes them, builds the ICPA matrices."""
    h, y = training_h(model, data)
    head = model.head
    return nc_metrics(h, y, head.classifier_weight().float(), head.classifier_bias(), icpa=icpa and st.dist.main,
                      dist=st.dist if st.dist.on else None)


# ##############################################################################################
# Everything below is machinery, not the method: validation rules, the run's state and results
# on disk (atomic writes, checkpoints, locks, resume), signals, torchrun, the run itself,
# tables, figures, the stress check, the benchmark and the command line.
# ##############################################################################################

# ==============================================================================================
# Validation: every flag is checked before any work starts (bad input: one line, exit code 2)

def feature_dim(cfg):
    return 4 * cfg.width if cfg.arch == "resnet_cifar" else 2048


ICPA_JSON_MAX = 100      # classes up to which the ICPA matrices stay inside the result JSON


# Fields that do not change what a run computes; left out of the run name's hash.
NOT_IDENTITY = {"out", "name", "force", "workers", "device", "amp", "compile", "compile_mode", "nc_every",
                "dist_backend", "data_root", "download", "train_list", "test_list"}


# Fields added after results existed: left out of the hash at their default, so old names still match.
HASHED_ONLY_IF_SET = {"n_max"}


# Valid values of every numeric field: (test, what the value must be). Checked by resolve()
# before any work starts; bad input gets one line naming the flag and the valid range.
_pos, _nonneg = (lambda v: v >= 1, "a positive integer"), (lambda v: v >= 0, ">= 0")
RULES = {
    "imb": (lambda v: v >= 1, ">= 1 (the imbalance factor N_max/N_min; 1 = balanced)"),
    "seed": (lambda v: 0 <= v < 2 ** 31, "in [0, 2^31)"),
    "epochs": _pos, "batch_size": _pos, "width": _pos, "proj_dim": _pos, "pred_hidden": _pos, "eval_every": _pos,
    "lr": (lambda v: v > 0, "> 0"), "wd": _nonneg, "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup": _nonneg, "warmup_start": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr_step_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "depth": (lambda v: v >= 8 and (v - 2) % 6 == 0, "6n+2: 8, 20, 32, 44 or 56"),
    "gamma": (lambda v: v > 0, "> 0"), "alpha": _nonneg, "grw_rho": _nonneg,
    "mean_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "maxnorm": (lambda v: v > 0, "> 0"), "wb_stage2_epochs": _nonneg, "wb_stage2_lr": (lambda v: v > 0, "> 0"),
    "wb_stage2_wd": _nonneg, "wb_cb_beta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "rbl_tau": _nonneg, "ncmc_f": (lambda v: v >= 2, ">= 2"),
    "ncmc_theta": (lambda v: 0 < v < math.pi / 2, "in (0, pi/2)"),
    "mixup": _nonneg, "cutout": _nonneg, "workers": _nonneg, "nc_every": _nonneg,
}


# Fields that act only for some methods: given explicitly to another method, the run would
# silently differ from its name (the hash takes every field), so resolve() refuses them.
_ALLNC_ONLY = ("gamma", "alpha", "grw_rho", "grw_reduction", "mean_momentum", "p2p_space", "p2p_w", "no_hycon",
               "no_p2p", "no_gbbn", "fixed_gamma", "heads", "proj", "proj_dim", "pred_hidden")
_STAGE2_ONLY = ("maxnorm", "maxnorm_mode", "maxnorm_every", "maxnorm_stage1", "wb_stage2_epochs", "wb_stage2_lr",
                "wb_stage2_wd", "wb_cb_beta", "wb_stage2_bn")
METHOD_ONLY = {**{k: ("allnc", "allnc++") for k in _ALLNC_ONLY}, **{k: ("allnc++",) for k in _STAGE2_ONLY},
               "etf_balance": ("etf",), "rbl_tau": ("rbl",),
               **{k: ("ncmc",) for k in ("ncmc_f", "ncmc_theta", "ncmc_centers")},
               "mixup": ("ce", "etf", "rbl", "ncmc")}


def flag(name):
    return "--" + name.replace("_", "-")


def memory_needed(cfg, info):
    """Bytes one training process needs at least, by the flag that sets them, estimated before any
    allocation: parameters with gradients and momentum (x 3), NCMC's frame and centers (its QR while
    it is built: about 3 copies more), and one batch's activations (two per block output, a floor)."""
    C, d, p = info.num_classes, feature_dim(cfg), cfg.proj_dim
    if cfg.arch == "resnet_cifar":                  # 3x3 convs and BatchNorms, counted (a deep net builds slowly)
        n, w = (cfg.depth - 2) // 6, cfg.width
        enc = 9 * info.channels * w + 2 * w + sum(9 * c * c * (2 * n - 1) + 9 * c * (c // 2 if i else c) + 4 * c * n
                                                 for i, c in enumerate((w, 2 * w, 4 * w)))
    else:
        with torch.device("meta"):
            enc = sum(t.numel() for t in models.encoder_for(cfg.arch, cfg.depth, info.channels, cfg.width).parameters())
    head = {"rbl": d * 256 + max(256, C) ** 2, "etf": d * C, "ncmc": 0}.get(cfg.method, d * C * cfg.heads)
    frame = proj = 0
    if cfg.method == "ncmc":                          # frame f*C x dim (4 copies while built), centers C x k x dim
        dim, f = max(d, cfg.ncmc_f * C), cfg.ncmc_f
        counts = data_lt.split_counts(cfg.dataset, cfg.imb, cfg.imb_type, cfg.n_max) if info.kind == "tensor" else None
        k = max(models.ncmc_center_counts(counts, f, cfg.ncmc_centers == "aware")) if counts else f - 1
        frame = 3 * d * dim * (dim != d) + 4 * f * C * dim + C * k * dim
    if cfg.method.startswith("allnc"):
        proj = d * p + p * p if cfg.proj == "linear" else 4 * d * d + 4 * d * p + 2 * p * cfg.pred_hidden
    if cfg.arch == "resnet_cifar":
        n, s = (cfg.depth - 2) // 6, info.size
        act = cfg.width * s * s + sum(2 * n * k * cfg.width * (s >> i) ** 2 for i, k in enumerate((1, 2, 4)))
    else:
        act = 8_000_000                               # a ResNet-50 at 224 px, per image
    return {"--width": 12 * (enc + head), "--proj-dim": 12 * proj, "--ncmc-f": 4 * frame,
            "--batch-size": 4 * act * cfg.batch_size * VIEWS[cfg.method]}


def check_memory(cfg, info):
    """Refuse a run whose model, frame or batch cannot fit in this machine's (or GPU's) memory."""
    dev = pick_device(cfg.device)
    if dev.type == "cuda":
        limit, where = torch.cuda.get_device_properties(dev).total_memory, "GPU memory"
    else:
        limit, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"
    parts = memory_needed(cfg, info)
    if sum(parts.values()) > limit:
        worst = max(parts, key=parts.get)
        raise DataError(f"{worst} {getattr(cfg, worst[2:].replace('-', '_'))}: the run needs about "
                        f"{sum(parts.values()) / 2**30:.1f} GiB ({worst}: {parts[worst] / 2**30:.1f} GiB), more than "
                        f"this machine's {limit / 2**30:.1f} GiB of {where}; give a smaller {worst}"
                        + (" or --depth" if cfg.arch == "resnet_cifar" and worst in ("--width", "--batch-size") else ""))


def check_writable_dir(path, attempts=20):
    """The --out directory exists or can be made, and is writable; leaves nothing behind. The
    processes of one torchrun launch check the same new directory at once, so another may make it
    (EEXIST) or remove it (ENOENT) under this one: not a fault of the directory, so check again."""
    target = os.path.abspath(path)
    for attempt in range(attempts):
        made, created, p = [], [], target
        while not os.path.exists(p):
            made.append(p)
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise DataError(f"--out {path}: {p} is a file, not a directory; choose another --out")
        try:
            for d in reversed(made):
                os.mkdir(d)
                created.append(d)
            probe = os.path.join(target, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOENT) or attempt == attempts - 1:
                raise DataError(f"--out {path} cannot be created or written ({e.strerror}); "
                                f"choose a writable directory") from None
        finally:
            for d in reversed(created):          # only what this process made, deepest first
                try:
                    os.rmdir(d)
                except OSError:                  # another process's probe is in it: that one goes on
                    pass


def apply_recipe(cfg, explicit=()):
    """--recipe own: the method's RECIPES overrides, except fields the user set explicitly."""
    if cfg.recipe != "own":
        return cfg
    if cfg.method not in RECIPES:
        raise DataError(f"--recipe own: {cfg.method} has no published recipe besides AllNC's; use --recipe allnc")
    for k, v in RECIPES[cfg.method].items():
        if k not in explicit:
            setattr(cfg, k, v.get(cfg.dataset, v.get("*")) if isinstance(v, dict) else v)
    return cfg


def resolve(cfg, explicit=()):
    """Apply --recipe, fill dataset-dependent defaults (paper V-B) and validate every field; raises
    DataError on bad input. explicit: the fields the user set on the command line (they beat a recipe)."""
    apply_recipe(cfg, explicit)
    for f in dataclasses.fields(cfg):          # numbers first: finite, then in range
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise DataError(f"{flag(f.name)} {v} is not a finite number")
    if cfg.imb < 1:
        raise DataError(f"--imb {cfg.imb:g} is below 1; the imbalance factor is N_max/N_min, use 1 for balanced data")
    info = data_lt.DATASETS[cfg.dataset]
    big = info.kind == "folder"
    for k, v in defaults_for(cfg.dataset, cfg.method, cfg.imb).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for k, (ok, what) in RULES.items():
        if not ok(getattr(cfg, k)):
            raise DataError(f"{flag(k)} {getattr(cfg, k)!r} is invalid: it must be {what}")
    if cfg.n_max is not None and not (info.kind == "tensor" and 1 <= cfg.n_max <= info.n_max):
        raise DataError(f"--n-max {cfg.n_max} is invalid for {cfg.dataset}: " + (
            f"give 1 to {info.n_max} (its largest class)" if info.kind == "tensor" else
            "it applies to cifar10, cifar100, fmnist and synthetic; ImageFolder data keep their split"))
    if cfg.arch not in ("resnet_cifar", "resnext50", "resnet50"):
        raise DataError(f"--arch {cfg.arch!r} unknown; use resnet_cifar, resnext50 or resnet50")
    C = info.num_classes
    for k in sorted(set(explicit) & set(METHOD_ONLY)):
        if cfg.method not in METHOD_ONLY[k]:
            raise DataError(f"{flag(k)} applies to {' and '.join(METHOD_ONLY[k])}, not to --method {cfg.method} "
                            f"(the run would be the same without it, under another name); drop it")
    split = data_lt.split_counts(cfg.dataset, cfg.imb, cfg.imb_type, cfg.n_max) if info.kind == "tensor" else None
    if info.kind == "tensor" and not cfg.smoke:
        data_lt.check_split_sizes(cfg, split)
    if cfg.method == "etf" and feature_dim(cfg) < C - 1:
        raise DataError(f"etf on {cfg.dataset} needs a feature dimension >= {C - 1} for {C} ETF vertices; "
                        f"--width {cfg.width} gives {feature_dim(cfg)}: use --width {math.ceil((C - 1) / 4)} or more "
                        f"(the ETF code's CIFAR-100 ResNet-32 has width 32)")
    if cfg.mixup > 0 and cfg.method.startswith("allnc"):
        raise DataError("--mixup applies to ce, etf, rbl and ncmc (AllNC trains on two views); drop it")
    try:
        parse_steps(cfg.lr_steps)
    except ValueError:
        raise DataError(f"--lr-steps {cfg.lr_steps!r}: give comma-separated epochs, e.g. 160,180") from None
    if cfg.loader == "auto":
        cfg.loader = "pil" if big else "tensor"
    if big and cfg.loader == "tensor":
        raise DataError(f"{cfg.dataset} is an ImageFolder dataset; use --loader pil")
    pick_device(cfg.device)
    if cfg.nesterov and cfg.momentum == 0:
        raise DataError("--nesterov needs --momentum > 0")
    if info.kind == "tensor" and not torch.isfinite(grw_weights(split, cfg.grw_rho)).all():
        raise DataError(f"--grw-rho {cfg.grw_rho:g}: the class weights (N/N_c)^rho overflow for this split; give a "
                        f"smaller --grw-rho (GLMC's commands: 1.0 or 1.2)")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise DataError(f"--compile-mode {cfg.compile_mode} applies to the compiled step; add --compile")
    if cfg.compile_mode != "default" and cfg.method == "rbl":
        raise DataError(f"--compile-mode {cfg.compile_mode} captures the step in CUDA graphs, which rbl's step cannot "
                        f"enter (its rotation's matrix_exp reads the device from the host); use --compile-mode default")
    if cfg.cutout > info.size:                 # larger than the image: most images blanked, all from 2 x size
        raise DataError(f"--cutout {cfg.cutout}: a hole larger than the {info.size}-pixel images of {cfg.dataset} "
                        f"blanks most of them; give --cutout {info.size} or less (RBL's recipe: 16 on 32-pixel CIFAR)")
    if cfg.method == "ncmc" and C > 100:
        raise DataError(f"ncmc's frame needs f x C = {cfg.ncmc_f * C} dimensions for {C} classes; it is "
                        f"implemented for up to 100 classes (CIFAR-100)")
    if cfg.name is not None and (not cfg.name.strip() or os.sep in cfg.name or cfg.name.startswith(".")):
        raise DataError(f"--name {cfg.name!r} must be a plain file name (no '{os.sep}', not starting with '.')")
    if os.path.exists(cfg.data_root) and not os.path.isdir(cfg.data_root):
        raise DataError(f"--data-root {cfg.data_root} is a file; give the directory that holds the dataset")
    for k in ("train_list", "test_list"):
        if getattr(cfg, k) is not None and not os.path.isfile(getattr(cfg, k)):
            raise DataError(f"{flag(k)} {getattr(cfg, k)} does not exist; give the split list file or leave it out")
    check_memory(cfg, info)
    check_writable_dir(cfg.out)
    if cfg.method != "allnc++":
        cfg.wb_stage2_epochs = 0
    return cfg


def run_name(cfg):
    if cfg.name:
        return cfg.name
    ident = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in NOT_IDENTITY and not (k in HASHED_ONLY_IF_SET and v is None)}
    h = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:6]
    abl = "".join(f"-{k.replace('_', '')}" for k in ("no_hycon", "no_p2p", "no_gbbn", "fixed_gamma") if ident[k])
    return (f"{cfg.dataset}-imb{cfg.imb:g}-{cfg.method}{abl}-g{cfg.gamma:g}-a{cfg.alpha:g}-e{cfg.epochs}"
            f"-s{cfg.seed}{'-smoke' if cfg.smoke else ''}-{h}")

# ==============================================================================================
# The run's state beside the method's: optimizer, log, resume point, best weights, checkpoints,
# progress, GradScaler, DDP; and an epoch's loss sums

def amp_mode(cfg, device):
    return cfg.amp if cfg.amp != "auto" else ("bf16" if gpu_path(device) else "off")


class Run:
    """What one run keeps besides the method, and the helpers through which the training loop
    resumes, checkpoints, reports and agrees with the other processes. Without name/out (tests,
    the benchmark) it writes nothing."""

    def __init__(self, cfg, model, st, dist=None, say=None, ck_path=None):
        self.cfg, self.dist, self.ck_path = cfg, dist or Dist(), ck_path
        self.say = say or (lambda *a: None)
        self.opt = make_optimizer(model, cfg)
        fp16 = amp_mode(cfg, st.device) == "fp16" and gpu_path(st.device)
        self.scaler = torch.amp.GradScaler(st.device.type) if fp16 else None
        self.log, self.start, self.partial = [], 1, None      # partial: a preempted epoch's sums and step
        self.best_model = None       # a CPU copy of the best test epoch's weights (checkpointed with the run)
        self.ddp, self.ddp_stage = None, None   # under torchrun: DDP around the step, for this stage
        self.progress, self.steps, self.model, self.st = None, None, model, st

    def resume(self, name):
        """From this run's checkpoint, or (AllNC++) from the finished AllNC run that is its stage 1."""
        cfg, model, st, dist = self.cfg, self.model, self.st, self.dist
        mine = dist.main and not cfg.force and os.path.exists(self.ck_path)
        ck = dist.broadcast(load_checkpoint(self.ck_path, cfg) if mine else None)   # every process: rank 0's
        if ck:
            self.partial = partial = ck.get("partial")
            model.load_state_dict(ck["model"])
            if (partial["epoch"] if partial else ck["epoch"]) > cfg.epochs:      # the saved optimizer is stage 2's
                self.opt = make_optimizer(model, cfg, stage2=True)
            self.opt.load_state_dict(ck["opt"])
            if self.scaler and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
            self.log, self.start = ck["log"], ck["epoch"] + 1
            st.maxnorm_cap = ck.get("maxnorm_cap")
            self.best_model = ck.get("best_model")
            self.say(f"resuming {name} from epoch {ck['epoch']}" + (
                f", step {partial['step']} of epoch {partial['epoch']}" if partial else ""))
        elif cfg.method == "allnc++" and not cfg.force:       # stage 1 = the AllNC run: continue from it if done
            s1 = dist.broadcast(load_stage1(cfg, self.say) if dist.main else None)
            if s1:
                model.load_state_dict(s1["model"])
                self.log, self.start, self.best_model = s1["log"], cfg.epochs + 1, s1["best_model"]
                self.say(f"stage 1 of {name} is the finished AllNC run {s1['name']}: continuing from its weights "
                         f"at stage 2")

    def epoch_sums(self):
        """The epoch's running loss sums: new, or a preempted epoch's (its mixup generator too)."""
        partial, self.partial = self.partial, None
        if partial:
            self.st.mix_rng.set_state(partial["mix_state"])
        return EpochSums(self.st.device, self.dist, partial)

    def forward(self, step_fn, xs, y, stage2):
        """The step; under torchrun inside DDP (a new wrapper per stage: other parameters take part)."""
        if not self.dist.on:
            return step_fn(self.model, xs, y, self.st)
        if self.ddp_stage != stage2:
            self.ddp, self.ddp_stage = replicate(self.model, self.st.device), stage2
        return self.ddp(step_fn, xs, y, self.st)

    def backward(self, loss):
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def between_steps(self, epoch, sums):
        end_setup()                   # a first step is done: a signal now stops at a step boundary
        if self.progress is not None:
            self.progress(epoch, sums.step, sums.imgs, sums.elapsed())
        if self.dist.stop_requested(sums.step):
            state = sums.partial_state(epoch, self.st.mix_rng)
            if self.dist.main and self.ck_path:
                self.save_checkpoint(epoch - 1, state)
            stop(f"at epoch {epoch}, step {sums.step} of {self.steps}", self.ck_path)

    def end_epoch(self, row, last):
        """Log the epoch, keep the best test epoch's weights, print its line, checkpoint, and stop
        here if a signal is pending (agreed by every process)."""
        prev = best_epoch(self.log)
        self.log.append(row)
        if self.dist.main and "test" in row and (prev is None or row["test"]["top1"] > prev["top1"]):  # best so far
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.progress:
            self.progress.clear()
        self.say(progress_line(row, self.cfg.epochs + self.cfg.wb_stage2_epochs))
        if self.dist.main and self.ck_path:
            self.save_checkpoint(row["epoch"])
        if not last and self.dist.stop_requested():
            stop(f"after epoch {row['epoch']}", self.ck_path)

    def save_checkpoint(self, epoch, partial=None):
        ck = {"config": dataclasses.asdict(self.cfg), "epoch": epoch, "log": self.log, "model": self.model.state_dict(),
              "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
              "maxnorm_cap": self.st.maxnorm_cap, "partial": partial, "best_model": self.best_model}
        atomic_write(self.ck_path, lambda f: f.write(torch_bytes(ck)))


class EpochSums:
    """An epoch's loss terms summed on the device (read once, at the epoch's end), the images seen,
    and the first step at which each term went non-finite (-1: none); partial: a preempted epoch's."""

    def __init__(self, device, dist, partial=None):
        self.dist, self.sums, self.first_bad, self.keys = dist, None, None, None
        self.n = self.imgs = self.step = 0
        spent = 0.0
        if partial:
            self.sums, self.first_bad = partial["sums"].to(device), partial["first_bad"].to(device)  # saved on the CPU
            self.n, self.imgs, self.keys, self.step, spent = (partial[k] for k in ("n", "imgs", "keys", "step", "time"))
        self.t0 = time.time() - spent

    def elapsed(self):
        return time.time() - self.t0

    def add(self, i, loss, terms, images):
        vec = torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
        bad = ~torch.isfinite(vec)
        if self.sums is None:
            self.keys = ["loss"] + list(terms)
            self.sums, self.first_bad = torch.zeros_like(vec), torch.full_like(vec, -1)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(vec, float(i)), self.first_bad)
        self.sums += torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)
        self.n, self.step = self.n + 1, i + 1
        self.imgs += images * self.dist.world

    def across_processes(self):
        """The loss sums as one process would have them: each process holds its part's mean of
        every global batch, so the global means are the average over processes; and the first step
        at which any process saw a non-finite term."""
        if not self.dist.on:
            return
        never = torch.full_like(self.first_bad, float("inf"))
        first = self.dist.reduce_(torch.where(self.first_bad < 0, never, self.first_bad), "min")
        self.sums = self.dist.reduce_(self.sums.clone()) / self.dist.world
        self.first_bad = torch.where(torch.isinf(first), torch.full_like(first, -1), first)

    def partial_state(self, epoch, mix_rng):
        self.across_processes()
        return {"epoch": epoch, "step": self.step, "sums": self.sums, "first_bad": self.first_bad, "n": self.n,
                "imgs": self.imgs, "keys": self.keys, "mix_state": mix_rng.get_state(), "time": self.elapsed()}

    def means(self, epoch, n_train, batch_size):
        """The epoch's mean loss terms (one sync); NonFinite names the first term that went bad."""
        if self.n == 0:
            raise DataError(f"the training set ({n_train} images) is smaller than one batch ({batch_size}); "
                            f"lower --batch-size")
        self.across_processes()
        if (self.first_bad >= 0).any():      # one sync per epoch
            fb = self.first_bad.tolist()
            step = min(s for s in fb if s >= 0)
            # name the first term that went bad at that step; the total only if no term did
            term = next((self.keys[j] for j in range(1, len(fb)) if fb[j] == step), "loss")
            raise NonFinite(f"loss term '{term}' became non-finite at epoch {epoch} (step {int(step)}); "
                            f"no result written; try a lower --lr or --amp off")
        return {k: v / self.n for k, v in zip(self.keys, self.sums.tolist())}

# ==============================================================================================
# Results on disk: atomic JSON and checkpoints

class WriteError(Exception):
    """Saving failed (disk full, I/O error); what was on disk before is intact."""


def atomic_write(path, write):
    """Write to a temporary file, fsync, then rename over `path`: a reader sees the old file or
    the new one, never a part. On an OS error the temporary file is removed and `path` untouched."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise WriteError(f"could not write {path} ({e.strerror or e}); the previous checkpoint and finished "
                         f"results are intact: free space or fix the disk, then run the same command to resume") from None
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def torch_bytes(obj):
    """torch.save into memory: a full disk then fails in our own write (an OSError), not inside
    torch's zip writer (a RuntimeError)."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_result(path):
    """A finished result, or None if the file is missing, partial or corrupt."""
    try:
        with open(path) as f:
            r = json.load(f)
        ok = r.get("complete") is True and isinstance(r.get("final", {}).get("top1"), (int, float))
        return r if ok else None
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(path, cfg):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        same = all(ck["config"].get(k) == v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY)
        if not same:
            return None
        return ck
    except Exception:
        return None

# ==============================================================================================
# Signals: SIGTERM / SIGINT stop the run after a step, with a checkpoint

class NonFinite(Exception):
    pass


STOP = {"signal": None}        # set by the signal handler; read between steps (a Python flag, no sync)
SETUP = {"release": None}      # until the first step: guard_setup's release


def end_setup():
    if SETUP["release"] is not None:
        SETUP["release"]()
        SETUP["release"] = None


class Interrupted(Exception):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; args: (message, exit code)."""


def on_signal(signum, frame):
    """First SIGTERM/SIGINT: finish the current step, checkpoint, exit. A second one: default action."""
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


def guard_setup():
    """Until the run's first step a stop signal ends the process at once, with one line and the
    signal's exit code: nothing is trained yet, so there is nothing to checkpoint, and the Python
    handler would only run after a long C call (a large frame, a compile) returns. CPython's C-level
    handler writes the signal number to the wakeup pipe at once; a thread watches it. Returns the
    release, called after the first step (from then on the handler stops at a step boundary)."""
    import threading
    r, w = os.pipe()
    os.set_blocking(w, False)
    released = threading.Event()

    def watch():
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while (b := pipe.read(1)) and not released.is_set():
                if b[0] in (signal.SIGTERM, signal.SIGINT):
                    print(f"stopped by {signal.Signals(b[0]).name} before the first training step: nothing was "
                          f"trained or written; run the same command to start", file=sys.stderr, flush=True)
                    os._exit(128 + b[0])
    old = signal.set_wakeup_fd(w)
    threading.Thread(target=watch, daemon=True).start()

    def release():
        released.set()
        signal.set_wakeup_fd(old)
        os.close(w)
    return release


def stop(where, ck_path):
    sig = STOP["signal"]
    raise Interrupted(f"stopped by {signal.Signals(sig).name} {where}; checkpoint written to {ck_path}; "
                      f"run the same command to resume", 128 + sig)

# ==============================================================================================
# Several processes (torchrun): one run on N processes with the numbers of one process. The global
# batch is split evenly in rank order; the step functions do not know how many processes there are:
# Dist.sum() gives the losses the global batch's class sums and counts, and everything else lives here,
# at the edges (which rows a process trains on, gradient averaging, who writes).

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STOP_CHECK_EVERY = 20      # steps between the processes' agreement on a pending signal


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and the collectives the
    run needs. Created once, by setup_distributed(), and passed down: to the losses as `dist` (sums
    over the global batch), to the data (this process's share), to the loop (who writes, the stop
    agreement). With one process every method returns its input."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = None
    cpu_group: object = None   # gloo group for host-side flags and objects (None: the default group)

    @property
    def on(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def sum(self, t):
        """t summed over the processes, differentiable: each process's part gets the gradient of the
        global result (one process: t itself)."""
        return models.all_reduce_sum(t) if self.on else t

    def reduce_(self, t, op="sum"):
        """In place, without gradient: t summed (or min, max) over the processes."""
        if self.on:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return t

    def part(self, n):
        """This process's share of n items split evenly in rank order."""
        return data_lt.rank_part(n, self.rank, self.world)

    def gather_batch(self, t):
        """This process's share of a global batch (equal shares) -> the whole global batch, in rank order."""
        if not self.on:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def local_first(self, load):
        """load() on each machine's local rank 0 first, then on its other processes: a dataset that
        it downloads is on disk for them (one download, not one per process into the same folder)."""
        if self.on and self.local_rank != 0:
            torch.distributed.barrier(group=self.cpu_group)
        try:
            return load()
        finally:                     # also when it fails: the others then fail on their own, saying why
            if self.on and self.local_rank == 0:
                torch.distributed.barrier(group=self.cpu_group)

    def broadcast(self, obj):
        """Rank 0's obj (a checkpoint, a decision) on every process."""
        if not self.on:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def stop_requested(self, step=None):
        """A stop signal is pending. Under torchrun the processes agree every STOP_CHECK_EVERY steps
        and at the end of each epoch (host-side, no device sync), so that all stop after the same step."""
        if not self.on:
            return STOP["signal"] is not None
        if step is not None and step % STOP_CHECK_EVERY:
            return False
        # Decide on the agreed value alone: a signal that lands after the snapshot below (even between
        # the all_reduce and the return) must not make this process stop while the others go on; it is
        # seen at the next agreement.
        flag = torch.tensor([STOP["signal"] or 0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        agreed = int(flag.item())
        if agreed:                                   # a signal on any process stops all
            STOP["signal"] = STOP["signal"] or agreed
        return bool(agreed)


def torchrun_env(environ=None):
    """(rank, world size, local rank) from torchrun's environment, None without torchrun."""
    environ = os.environ if environ is None else environ
    have = [k for k in TORCHRUN_ENV if k in environ]
    if not have:
        return None
    if len(have) < len(TORCHRUN_ENV):
        missing = [k for k in TORCHRUN_ENV if k not in environ]
        raise DataError(f"the torchrun environment is incomplete ({', '.join(have)} set, {', '.join(missing)} "
                        f"missing): launch with torchrun --nproc-per-node N allnc.py ..., or unset "
                        f"{', '.join(have)} to run one process")
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DataError("RANK, WORLD_SIZE and LOCAL_RANK must be integers: launch with torchrun") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DataError(f"RANK {rank} of WORLD_SIZE {world} (LOCAL_RANK {local}) is not a valid place: launch with torchrun")
    return rank, world, local


def check_split(cfg, world):
    if cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size} is the global batch and does not split over {world} "
                        f"processes: give a multiple of {world}")


def setup_distributed(cfg):
    """Under torchrun with WORLD_SIZE > 1: check the launch against cfg, give this process its
    device (cuda:LOCAL_RANK or the CPU) and join the process group. Raises DataError on a bad launch."""
    env = torchrun_env()
    if env is None or env[1] == 1:
        return Dist()
    rank, world, local = env
    check_split(cfg, world)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DataError("--dist-backend nccl needs GPUs and this machine has none: use --dist-backend gloo "
                        "(CPU processes)")
    if backend == "nccl" and not cuda:
        raise DataError("--dist-backend nccl runs on GPUs: drop --device cpu, or use --dist-backend gloo")
    if backend == "gloo" and cuda:
        raise DataError("--dist-backend gloo runs CPU processes: on GPUs use nccl (the default), or add --device cpu")
    if cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise DataError(f"LOCAL_RANK {local}, but this machine has {n} GPU(s): --nproc-per-node at most {n}")
        torch.cuda.set_device(local)
    cfg.device = f"cuda:{local}" if cuda else "cpu"
    # torch._dynamo before the process group: imported after it (lazily, by the optimizer, DDP or
    # the functional collectives), it keeps references to the default group that
    # destroy_process_group() cannot drop; the group's gloo threads then outlive the interpreter,
    # and one of them releasing a finished collective during shutdown aborts the process
    # (README: torchrun, "a finished run exits 0").
    importlib.import_module("torch._dynamo")       # (a plain `import torch._dynamo` here would make torch local)
    torch.distributed.init_process_group(backend)
    group = torch.distributed.new_group(backend="gloo") if backend == "nccl" else None
    return Dist(rank, world, local, backend, group)


class Replicated(nn.Module):
    """The training step as one module, so that DistributedDataParallel sees every use of the
    parameters (heads, projections, P2P on the classifier rows) inside its forward. The state
    comes in as an argument: held here, it would make a cycle (state -> DDP -> state) that keeps
    DDP, and with it the process group, alive past destroy_process_group()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, step_fn, views, y, st):
        return step_fn(self.model, views, y, st)


def replicate(model, device):
    """DDP around the step: gradients averaged over the processes (static graph: which parameters
    take part is fixed within a stage; AllNC++'s stage 2 gets a new wrapper). Buffers are not synced
    in forward: BatchNorm's are global already, and every process builds the same model. torch 2.13
    renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns there)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(Replicated(model), device_ids=[device.index] if device.type == "cuda" else None, static_graph=True,
               **{no_sync: False})

# ==============================================================================================
# The run: locks, skip or resume, train, write; re-evaluation

def pick_device(name):
    """--device as a torch.device ('auto': CUDA if there is one); DataError if it is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name!r} unknown; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name} but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is not None:   # the current device: synchronize, memory statistics
        torch.cuda.set_device(dev)                     # and the loader's pinning act on it, not on GPU 0
    return dev


class Progress:
    """Progress inside an epoch, at most every `every` seconds: one updating line on a terminal,
    plain lines (every 30 s) otherwise, so that logs stay clean; images/s and time left for the run."""

    def __init__(self, total_epochs, steps, start_epoch, tty, start_step=0):
        self.total, self.steps, self.tty = total_epochs, steps, tty
        self.every = 2.0 if tty else 30.0
        self.t0, self.last, self.shown = time.time(), time.time(), False
        self.done0 = (start_epoch - 1) * steps + start_step

    def __call__(self, epoch, step, imgs, dt):
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        done = (epoch - 1) * self.steps + step
        rate = (done - self.done0) / max(now - self.t0, 1e-9)
        left = (self.total * self.steps - done) / max(rate, 1e-9)
        line = (f"epoch {epoch}/{self.total} step {step}/{self.steps} | {imgs / max(dt, 1e-9):.0f} img/s | "
                f"{int(left // 60)}m{int(left % 60):02d}s left")
        print(("\r" + line.ljust(79)) if self.tty else line, end="" if self.tty else "\n", flush=True)
        self.shown = True

    def clear(self):
        if self.tty and self.shown:
            print("\r" + " " * 79 + "\r", end="", flush=True)
        self.shown = False


def acquire_lock(path):
    """An exclusive lock that dies with its holder (fcntl); None if another process holds it."""
    import fcntl
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None


def run(cfg, quiet=False, dist=None):
    """Train and evaluate one configuration; returns the result dict (also written to --out), or
    None if another process is training the same configuration into the same --out."""
    dist = dist or Dist()
    quiet = quiet or not dist.main          # under torchrun rank 0 prints and writes
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    device = pick_device(cfg.device)
    name = run_name(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    res_path = os.path.join(cfg.out, name + ".json")
    lock = acquire_lock(os.path.join(cfg.out, name + ".lock")) if dist.main else None
    if not dist.broadcast(lock is not None):
        say(f"skip (running elsewhere): another process is training {name} into {cfg.out}")
        return None
    try:
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:            # not the main thread: no handlers, no graceful stop
        handlers = {}
    STOP["signal"] = None
    SETUP["release"] = guard_setup() if handlers else None
    try:
        done = finished_result(cfg, res_path, dist, say)
        return done or train_run(cfg, name, res_path, device, dist, say, quiet)
    finally:
        end_setup()
        for s, h in handlers.items():
            signal.signal(s, h)
        if lock is not None:
            lock.close()


def finished_result(cfg, res_path, dist, say):
    """The finished result of this configuration (not with --force), or None; a partial or corrupt
    file is moved aside."""
    done = None
    if dist.main and os.path.exists(res_path) and not cfg.force:
        done = load_result(res_path)
        if not done:
            bad = res_path + ".corrupt"
            os.replace(res_path, bad)
            say(f"warning: {res_path} was partial or corrupt; moved to {bad} and re-running")
    done = dist.broadcast(done)
    if done:
        say(f"skip (done): {res_path} exists (--force to re-run)")
    return done


def train_run(cfg, name, res_path, device, dist, say, quiet):
    """Set up data, model, method and run state (resuming where a checkpoint says), train, write."""
    torch.manual_seed(cfg.seed)
    gpu_backends(cfg, device)
    data = dist.local_first(lambda: data_lt.Data(cfg, device, VIEWS[cfg.method], dist.rank, dist.world))
    st = TrainState(cfg, data, device, dist)
    model = build_model(cfg, data.C, data.counts, data.in_channels)
    if dist.on:                  # BatchNorm statistics of the global batch
        model = models.sync_batchnorm(model)
    model = model.to(device)
    if gpu_path(device):
        model = model.to(memory_format=torch.channels_last)
    rs = Run(cfg, model, st, dist, say, res_path[:-5] + ".ckpt")
    rs.resume(name)
    rs.steps = steps = len(data_lt.epoch_batches(data.n_train(), cfg.batch_size, 0, 0))
    if not quiet:
        rs.progress = Progress(cfg.epochs + cfg.wb_stage2_epochs, steps, rs.start, sys.stdout.isatty(),
                               rs.partial["step"] if rs.partial else 0)
    procs = f" x {dist.world} processes ({dist.backend}, {cfg.batch_size // dist.world} images each)" if dist.on else ""
    say(f"{name}: {data.n_train()} training images, {data.C} classes, {steps} steps/epoch, device {device}{procs}, "
        f"amp {st.dtype or 'off'}, loader {cfg.loader}")
    final = train(cfg, model, data, st, rs)
    result = {"version": RESULT_VERSION, "name": name, "world_size": dist.world, "config": dataclasses.asdict(cfg),
              "counts": data.counts, "n_train": data.n_train(), "device": str(device), "log": rs.log, "final": final,
              "best": best_epoch(rs.log), "complete": True}
    if dist.main:
        write_result(result, res_path, model, rs)
    return result


def write_result(result, res_path, model, rs):
    """The result JSON with the final and best weights beside it (ICPA matrices too, for many
    classes); then the checkpoint goes."""
    final, best = result["final"], result["best"]
    if len(result["counts"]) > ICPA_JSON_MAX:     # two C x C matrices: beside the JSON, never loaded by --tables
        icpa = {k: torch.tensor(final["nc"].pop(k), dtype=torch.float16) for k in ("icpa_mu", "icpa_w")}
        atomic_write(res_path[:-5] + ".icpa.pt", lambda f: f.write(torch_bytes(icpa)))
        final["nc"]["icpa_file"] = os.path.basename(res_path[:-5] + ".icpa.pt")
    weights = {"final": save_weights(res_path[:-5] + ".pt", model)}
    if best and rs.best_model is not None:
        weights["best"] = {"epoch": best["epoch"]} | save_weights(res_path[:-5] + ".best.pt", rs.best_model)
    result["weights"] = weights
    save_json(res_path, result)
    if os.path.exists(rs.ck_path):
        os.remove(rs.ck_path)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(path, model):
    """The model's state dict (weights and buffers, no optimizer), written atomically."""
    atomic_write(path, lambda f: f.write(torch_bytes(model.state_dict() if isinstance(model, nn.Module) else model)))
    return {"file": os.path.basename(path), "sha256": file_sha256(path)}


def stage1_name(cfg):
    """AllNC++'s stage 1 is the AllNC run of the same config: that run's name; None where they differ
    (MaxNorm in stage 1, no stage 2, or a --name of the user's)."""
    if cfg.method != "allnc++" or not cfg.wb_stage2_epochs or cfg.maxnorm_stage1 or cfg.name:
        return None
    stage2_defaults = {k: Config.__dataclass_fields__[k].default for k in _STAGE2_ONLY}
    return run_name(dataclasses.replace(cfg, method="allnc", **(stage2_defaults | {"wb_stage2_epochs": 0})))


def load_stage1(cfg, say):
    """The finished AllNC run that is this AllNC++ run's stage 1, as AllNC++ would have it after its
    epoch cfg.epochs: log (that epoch's test and NC entries only on AllNC++'s cadence), final weights
    and best-epoch weights; None if there is none, or if its kept best weights are not AllNC++'s best.
    Waits while another process is training that AllNC run (run_all.sh runs AllNC++ last)."""
    name = stage1_name(cfg)
    if name is None:
        return None
    base = os.path.join(cfg.out, name)
    if os.path.exists(base + ".lock") and not os.path.exists(base + ".json"):
        held = acquire_lock(base + ".lock")
        if held is None:
            say(f"waiting for {name}, running elsewhere, to continue from it")
            import fcntl
            held = open(base + ".lock", "a")
            fcntl.flock(held, fcntl.LOCK_EX)
        held.close()
    r = load_result(base + ".json") if os.path.exists(base + ".json") else None
    w = (r or {}).get("weights") or {}
    if "final" not in w:
        return None
    log = [dict(row) for row in r["log"]]
    last = log[-1]
    if last["epoch"] % max(cfg.eval_every, 1):
        last.pop("test", None)
    if not (cfg.nc_every and last["epoch"] % cfg.nc_every == 0):
        last.pop("nc", None)
    best = best_epoch(log)
    if best and best["epoch"] != (r.get("best") or {}).get("epoch"):
        return None                                   # AllNC++'s best epoch is one whose weights were not kept
    files = {k: os.path.join(cfg.out, w[k]["file"]) for k in ("final",) + (("best",) if best else ())}
    if any(k not in w or not os.path.exists(f) or file_sha256(f) != w[k]["sha256"] for k, f in files.items()):
        return None
    load = lambda f: torch.load(f, map_location="cpu", weights_only=True)
    return {"name": name, "log": log, "model": load(files["final"]), "best_model": load(files["best"]) if best else None}


def kept_model(json_path, r, which="final", device="auto"):
    """The model of finished result r (read from json_path) rebuilt from its stored config with its
    kept weights, checked against their recorded sha256: (data, state, model, weights path)."""
    w = (r.get("weights") or {}).get(which)
    if w is None:
        raise DataError(f"{json_path} records no {which} weights (runs before weights were kept); re-run it with --force")
    wpath = os.path.join(os.path.dirname(os.path.abspath(json_path)), w["file"])
    if not os.path.exists(wpath) or file_sha256(wpath) != w["sha256"]:
        raise DataError(f"{wpath} is missing or does not match the sha256 recorded in {json_path} (corrupt or "
                        f"replaced); re-run the configuration with --force")
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in r["config"].items() if k in names})
    cfg.device = device
    dev = pick_device(device)
    data = data_lt.Data(cfg, dev, VIEWS[cfg.method])
    st = TrainState(cfg, data, dev)
    model = build_model(cfg, data.C, data.counts, data.in_channels).to(dev)
    load_weights(model, wpath, dev)
    return data, st, model, wpath


def reevaluate(path, device="auto"):
    """--eval: rebuild the model of a finished result from its stored config and kept weights
    (RESULT.json: the final weights; NAME.pt / NAME.best.pt: those), re-evaluate on the test set."""
    which = "best" if path.endswith(".best.pt") else "final"
    json_path = path if path.endswith(".json") else path[:-len(".best.pt" if which == "best" else ".pt")] + ".json"
    r = load_result(json_path)
    if r is None:
        raise DataError(f"{json_path} is not a finished result JSON of allnc.py; --eval needs a run's JSON or weights")
    data, st, model, wpath = kept_model(json_path, r, which, device)
    final = evaluate(model, data, st)
    final["decoupled"] = decoupled_scores(model, data, st, final)
    final["nc"] = train_nc_metrics(model, data, st)
    return r | {"final": final}, wpath


def load_weights(model, path, device):
    try:
        sd = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise DataError(f"{path} is not a readable weights file ({type(e).__name__}); re-run with --force") from None
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path} does not match its config's model (other method, width, depth or classes)") from None


def progress_line(r, total):
    fmt = lambda v: f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    terms = " ".join(f"{k} {fmt(v)}" for k, v in r.items()
                     if k not in ("epoch", "stage", "eta", "lr", "img_per_s", "time", "test", "nc"))
    test = f" | test {r['test']['top1']:.2f}" if "test" in r else ""
    stage = " (stage 2)" if r["stage"] == 2 else ""
    eta = f" | eta {r['eta']:.3f}" if "eta" in r else ""
    return (f"epoch {r['epoch']:>3}/{total}{stage} | {terms}{eta} | lr {r['lr']:.5f}{test} | "
            f"{r['img_per_s']:.0f} img/s | {r['time']:.1f}s")

# ==============================================================================================
# Printed tables: one run, and the paper's tables from a results directory

# Results of another version were run under another protocol (version 3: the heads' kaiming
# initialisation and AllNC++'s stage 2 as weight balancing's trainval.py): tables leave them out.
RESULT_VERSION = 3

NC_KEYS = ("nc1", "cos_mu_std", "cos_w_std", "cos_mu_mean", "cos_w_mean", "equinorm_mu", "equinorm_w",
           "self_duality", "ncc_agreement")

# The paper's numbers (Tables II-VII), typed in once; printed beside ours, never mixed into them.
PAPER = {
    "II": {  # method -> (dataset, imb) -> top-1, columns C10-LT 200/100/50/10 then C100-LT
        m: dict(zip([(d, i) for d in ("cifar10", "cifar100") for i in (200, 100, 50, 10)], v)) for m, v in {
            "ce": (65.68, 70.70, 74.81, 86.40, 34.84, 38.43, 43.90, 55.80),
            "etf": (71.90, 76.50, 81.00, None, 40.90, 45.30, 50.40, None),
            "allnc": (85.46, 88.77, 92.12, 95.22, 51.29, 56.63, 62.94, 73.48),
            "allnc++": (86.08, 90.12, 92.43, 95.56, 51.50, 57.01, 62.42, 73.60)}.items()},
    "III": {"ce": (64.0, 33.8, 5.8, 41.6), "allnc": (68.0, 54.5, 32.6, 56.5), "allnc++": (67.9, 54.9, 33.7, 56.9)},
    "IV": {"ce": (67.2, 63.0, 56.2, 61.7), "allnc": (72.6, 72.0, 70.8, 71.5), "allnc++": (72.3, 72.2, 71.6, 71.9)},
    "V": {"allnc": {"cifar10": 97.57, "cifar100": 83.78}},
    "VI": {200: {0.5: (78.83, 59.83, 21.55, 50.19), 1.0: (81.10, 57.87, 21.17, 50.16), 1.5: (79.73, 58.97, 23.90, 51.17),
                 2.0: (80.10, 57.94, 24.70, 51.29), 2.5: (80.67, 56.87, 23.82, 50.79), 3.0: (81.00, 56.90, 23.59, 50.81),
                 3.5: (80.10, 58.43, 23.86, 51.11), 4.0: (79.96, 60.59, 22.48, 51.16)},
           100: {0.5: (77.43, 59.38, 25.94, 55.30), 1.0: (79.54, 56.94, 26.68, 55.47), 1.5: (79.26, 56.18, 27.58, 55.37),
                 2.0: (78.91, 56.62, 28.16, 55.60), 2.5: (78.94, 55.26, 30.07, 55.72), 3.0: (77.66, 56.18, 33.39, 56.63),
                 3.5: (75.20, 55.38, 33.58, 55.56), 4.0: (76.86, 56.41, 33.26, 56.40)}},
    "VII": {"allnc": (77.66, 56.18, 33.39, 56.63), "no_hycon": (77.14, 56.09, 29.75, 55.21),
            "no_p2p": (79.12, 55.03, 30.16, 55.56), "no_gbbn": (63.26, 54.65, 40.19, 53.18),
            "fixed_gamma": (77.34, 59.38, 25.94, 55.30)},
}
# gamma of the Table II runs: Table VI's best rows equal Table II's AllNC numbers for CIFAR-100-LT
# (imb 200 -> gamma 2, imb 100 -> gamma 3); elsewhere the paper does not say, and we use 2.
TABLE2_GAMMA = {("cifar100", 100): 3.0}
ABLATIONS = ("no_hycon", "no_p2p", "no_gbbn", "fixed_gamma")
SHOTS = ("many", "medium", "few", "top1")


def table2_gamma(dataset, imb):
    return TABLE2_GAMMA.get((dataset, int(imb)), 2.0)


def fnum(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def format_table(head, rows):
    """The one table format of every printed table: '| a | b |' rows under a rule, the first column
    left-aligned, the others right-aligned; cells are strings, formatted by the caller."""
    rows = [[str(c) for c in r] for r in rows]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def protocol_line(cfg):
    """The protocol choices a table's numbers depend on, printed with every table."""
    net = f"ResNet-{cfg['depth']} width {cfg['width']}" if cfg["arch"] == "resnet_cifar" else cfg["arch"]
    return (f"{net}, heads {cfg['heads']}, RandAugment {cfg['randaug']}, LT subset {cfg['lt_subset']}, "
            f"warm-up {cfg['warmup']}, recipe {cfg['recipe']}" + (f", N_max {cfg['n_max']}" if cfg["n_max"] else ""))


PROTOCOL_FIELDS = ("proj", "head_init", "maxnorm", "maxnorm_mode", "maxnorm_every", "maxnorm_stage1", "wb_stage2_bn",
                   "grw_reduction", "p2p_w", "mean_momentum")


def protocol_key(cfg):
    """Everything besides method, data and the ablations that changes what a run computes; a field
    off its default (the dataset's, else Config's) is named."""
    ours = defaults_for(cfg["dataset"], cfg["method"], cfg["imb"])
    default = lambda k: ours.get(k, Config.__dataclass_fields__[k].default)
    extra = " ".join(f"{k}={cfg[k]}" for k in PROTOCOL_FIELDS if cfg[k] != default(k))
    return (protocol_line(cfg), cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["wd"], extra)


def run_table(res):
    """The table printed at the end of a run: accuracy (final and best epoch), NC metrics, config."""
    cfg, fin, best = res["config"], res["final"], res["best"] or {}
    paper = PAPER["II"].get(cfg["method"], {}).get((cfg["dataset"], int(cfg["imb"])))
    paper = None if any(cfg[a] for a in ABLATIONS) else paper
    rows = [["few<20 (BCL)" if k == "few_bcl" else k, fnum(fin.get(k)), fnum(best.get(k)),
             fnum(paper if k == "top1" else None)] for k in SHOTS + ("few_bcl",)]
    rows += [[k, f"{fin['nc'][k]:.4f}", "", ""] for k in NC_KEYS]
    base = os.path.join(cfg["out"], res["name"])
    w = res["weights"] or {}
    shown = {k: v for k, v in cfg.items() if k not in ("data_root", "out", "name", "force", "workers")}
    return "\n".join([
        f"{cfg['method']} on {cfg['dataset']} (imb {cfg['imb']:g}, {cfg['imb_type']}), {res['n_train']} train images, "
        f"{cfg['epochs']} epochs, seed {cfg['seed']}{'  [SMOKE: generated stand-in data]' if cfg['smoke'] else ''}",
        protocol_line(cfg) + "; Few = classes with <= 20 training images (paper), few<20 = BCL's split",
        format_table(("metric", "final", f"best (ep {best['epoch']})" if best else "best", "paper"), rows),
        *decoupled_lines(fin),
        "config: " + " ".join(f"{k}={v}" for k, v in shown.items()),
        f"result: {base}.json (config, per-epoch log, per-class accuracy, NC metrics)"
        + (f"; weights: {os.path.join(cfg['out'], w['final']['file'])} (final)" if "final" in w else "")
        + (f", {os.path.join(cfg['out'], w['best']['file'])} (best, epoch {w['best']['epoch']})" if "best" in w else "")
        + f"; re-evaluate: python allnc.py --eval {base}.json"])


DECOUPLED = (("head", "trained head"), ("logit_adjusted", "logit-adjusted"), ("ncm", "nearest class mean"))


def decoupled_lines(fin):
    """Features or classifier: the final weights scored by the head, by logit adjustment and by the
    nearest class mean of phi(x), per shot group."""
    d = fin.get("decoupled")
    if not d:
        return []
    rows = [[label] + ([f"n/a: {d.get('la_not_applicable', 'not scored')}", "", "", ""] if d.get(key) is None else
                       [fnum(d[key].get(k)) for k in ("top1",) + SHOTS[:3]]) for key, label in DECOUPLED]
    return ["features or classifier? the final weights scored three ways (test top-1 %):",
            format_table(("scored by", "top1", "many", "medium", "few"), rows)]


def compare_table(a, b):
    """--compare: two runs on the same split and budget, per shot group and for the rarest classes.
    A 'paper' column only where the paper has a value (Table II top-1)."""
    ca, cb = a["config"], b["config"]
    counts = a["counts"]
    groups = shot_groups(counts)
    rows = [("All (top-1)", "top1")] + [(f"{g.capitalize()} ({rule}, {int(groups[g].sum())} classes)", g)
                                        for g, rule in (("many", "> 100"), ("medium", "21..100"), ("few", "<= 20"))
                                        if groups[g].any()]
    rare = sorted(range(len(counts)), key=lambda c: counts[c])[:3]
    paper = [PAPER["II"].get(c["method"], {}).get((ca["dataset"], int(ca["imb"]))) for c in (ca, cb)]
    vals = [(label, a["final"].get(k), b["final"].get(k)) for label, k in rows]
    vals += [(f"rarest: class {c} ({counts[c]} images)", a["final"]["per_class"][c], b["final"]["per_class"][c])
             for c in rare]
    for key, name in (("logit_adjusted", "LA"), ("ncm", "NCM")):      # features or classifier
        da, db = ((r["final"].get("decoupled") or {}).get(key) or {} for r in (a, b))
        vals += [(f"{label} by {name}", da.get(k), db.get(k)) for label, k in rows if k in ("top1", "few")]
    head = ["classes (training images)", ca["method"], cb["method"], "difference"]
    head += [f"paper {ca['method']}", f"paper {cb['method']}"] if any(paper) else []
    out = []
    for i, (label, x, y) in enumerate(vals):
        out.append([label, fnum(x), fnum(y), fnum(x - y if x is not None and y is not None else None)]
                   + ([fnum(p if i == 0 else None) for p in paper] if any(paper) else []))
    return "\n".join([f"{ca['method']} vs {cb['method']} on {ca['dataset']} (imb {ca['imb']:g}), the same {a['n_train']} "
                      f"training images, {ca['epochs']} epochs, seed {ca['seed']}; final epoch, test top-1 (%)",
                      protocol_line(ca), format_table(head, out)])


def collect(results_dir):
    """Finished results of this version; partial or corrupt files, and results written under an
    earlier version's protocol (never averaged with today's), are reported by name, never used."""
    runs, bad = [], []
    for fn in sorted(os.listdir(results_dir)):
        if fn.endswith(".json"):
            r = load_result(os.path.join(results_dir, fn))
            if r and r.get("version") == RESULT_VERSION:
                runs.append(r)
            else:
                bad.append(fn + ("" if r is None else f" (version {r.get('version', 1)}: an earlier protocol)"))
    return runs, bad


def mean_std(rs, key, at="final"):
    """mean, std (None for one run) and count of a metric over runs; at = final | best (epoch)."""
    vals = [(r.get(at) or {}).get(key) for r in rs]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=False).item() if len(vals) > 1 else None), len(vals)


def cell(ms, digits=2):
    if ms is None:
        return "-"
    m, s, n = ms
    return f"{m:.{digits}f}±{s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def over_seeds(rs, value, digits=2):
    """mean±std over runs of value(run), runs without a value left out; 'n/a' where none has one."""
    ms = mean_std([{"final": {"x": value(r)}} for r in rs], "x")
    return cell(ms, digits) if ms else "n/a"


def spread_delta(a, b):
    """a - b of two mean_std cells, with '~' where it is within the seed spread (|d| <= std_a + std_b)."""
    if not a or not b:
        return "-"
    d = a[0] - b[0]
    within = a[1] is not None and b[1] is not None and abs(d) <= a[1] + b[1]
    return f"{d:+.2f}{'~' if within else ' '}"


def pick(runs, **want):
    return [r for r in runs if all(r["config"][k] == v for k, v in want.items())]


def plain_allnc(c):
    """Not an ablation, and (AllNC's methods) P2P's class means in the default space."""
    return not any(c[a] for a in ABLATIONS) and not other_p2p_space(c)


def other_p2p_space(c):
    """The space of L_p(mu~)'s class means where it is not the default: a row of its own in Table II."""
    default = Config.__dataclass_fields__["p2p_space"].default
    return c["p2p_space"] if c["method"].startswith("allnc") and c["p2p_space"] != default else None


def print_tables(results_dir):
    """The paper's tables from every finished run in results_dir, one protocol at a time (runs of
    different protocols are never averaged together), then every run."""
    runs, bad = collect(results_dir)
    print(f"Results in {results_dir}: {len(runs)} finished runs" + (f", {len(bad)} not tabulated (partial, corrupt or "
          f"of an earlier version): {', '.join(bad)}" if bad else "") + ".")
    if any(r["config"]["smoke"] for r in runs):
        print("SMOKE results: generated stand-in data, tiny budgets; the numbers only show the pipeline works.")
    print("Cells: mean±std over seeds, final epoch (the headline); 'best All' = the best test epoch, what GLMC, BCL, "
          "PaCo, ETF and RBL report. Few = <= 20 training images (the paper's text). 'All - ref', 'Few - ref': the "
          "difference from the table's (ref) row, '~' where it is within the seed spread (|d| <= std + std).")
    own = [r for r in runs if r["config"]["recipe"] == "own"]
    groups = {}
    for r in runs:
        if r["config"]["recipe"] == "allnc":
            groups.setdefault(protocol_key(r["config"]), []).append(r)
    for key in sorted(groups):
        rs = groups[key]
        print(f"\n==== protocol: {protocol_line(rs[0]['config'])}" + (f" [{key[-1]}]" if key[-1] else ""))
        paper_tables(rs, own)
    if runs:
        print_all_runs(runs)


# Which of the paper's tables a dataset's runs fill, and the paper's numbers for a row (Many, Medium,
# Few, All; None where the paper has none). Fashion-MNIST (the CPU study) shows CIFAR-10-LT's numbers
# at its imbalance as a reference only: another dataset, network and budget.
def table_name(ds, imb):
    return {"imagenet_lt": "Table III", "inat2018": "Table IV"}.get(ds, "Table V" if imb == 1 else "Table II")


def paper_row(table, ds, imb, key):
    if table == "Table II":
        v = PAPER["II"].get(key, {}).get(("cifar10" if ds == "fmnist" else ds, int(imb)))
        return (None, None, None, v) if v is not None else None
    if table == "Table V":
        v = PAPER["V"].get(key, {}).get(ds)
        return (None, None, None, v) if v is not None else None
    if table in ("Table III", "Table IV"):
        return PAPER[table.split()[1]].get(key)
    if ds != "cifar100":
        return None
    return PAPER["VI"].get(int(imb), {}).get(key) if table == "Table VI" else PAPER["VII"].get(key) if int(imb) == 100 else None


def shot_table(title, entries, ref):
    """One table of rows (label, runs, paper numbers): seeds, Many / Medium / Few / All and the best
    epoch's All (mean±std), All and Few minus the (ref) row's; a 'paper' row under each row the paper
    has numbers for."""
    base = dict((label, rs) for label, rs, _ in entries).get(ref) or []
    ref_all, ref_few = mean_std(base, "top1"), mean_std(base, "few")
    rows = []
    for label, rs, pap in entries:
        cells = [mean_std(rs, k) for k in SHOTS]
        delta = ["", ""] if label == ref else [spread_delta(cells[3], ref_all), spread_delta(cells[2], ref_few)]
        rows.append([label + (" (ref)" if label == ref else ""), str(len(rs))] + [cell(c) for c in cells]
                    + [cell(mean_std(rs, "top1", "best"))] + delta)
        if pap:
            rows.append(["  paper", ""] + [fnum(p) for p in pap] + ["", "", ""])
    print(f"\n{title}")
    print(format_table(("", "seeds", "Many", "Medium", "Few", "All", "best All", "All - ref", "Few - ref"), rows))


def paper_tables(runs, own=()):
    """Tables II-VII and Fig. 8 from the runs of one protocol, one table per dataset and imbalance;
    Table II also shows the baselines trained with their own recipes (own), labelled."""
    ds_order = {d: i for i, d in enumerate(data_lt.DATASETS)}
    splits = sorted({(r["config"]["dataset"], r["config"]["imb"]) for r in runs + list(own)},
                    key=lambda s: (ds_order[s[0]], -s[1]))
    for ds, imb in splits:
        g = table2_gamma(ds, imb)
        at = lambda pool, **k: [r for r in pick(pool, dataset=ds, imb=imb, **k) if plain_allnc(r["config"])]
        counts = next(r["counts"] for r in pick(runs + list(own), dataset=ds, imb=imb))
        split = (f"{ds} imb {imb:g}: classes of {max(counts)} to {min(counts)} training images, "
                 f"{sum(n <= 20 for n in counts)} Few")
        tab = table_name(ds, imb)
        main = []
        for m in METHODS:
            for recipe, pool in (("allnc", runs), ("own", own)):
                rs = [r for r in at(pool, method=m, alpha=1.0) if not m.startswith("allnc") or r["config"]["gamma"] == g]
                if rs:
                    main.append((m if recipe == "allnc" else f"{m} (own recipe)", rs, paper_row(tab, ds, imb, m)))
            other = [r for r in pick(runs, dataset=ds, imb=imb, method=m, alpha=1.0, gamma=g)
                     if other_p2p_space(r["config"]) and not any(r["config"][a] for a in ABLATIONS)]
            for space in sorted({r["config"]["p2p_space"] for r in other}):
                main.append((f"{m}, P2P means in {space}", [r for r in other if r["config"]["p2p_space"] == space], None))
        if main:
            shot_table(f"{tab}: {split}" + ("; paper = CIFAR-10-LT at this imbalance, a reference only"
                                            if ds == "fmnist" else ""), main, "allnc")
            decoupled_table(main)
            nc_table(main)
        allnc_runs = at(runs, method="allnc")
        gammas = sorted({r["config"]["gamma"] for r in allnc_runs if r["config"]["alpha"] == 1.0})
        if any(x != g for x in gammas):                # the sweep of Table VI, begun
            shot_table(f"Table VI: AllNC for different gamma, {split}",
                       [(f"gamma {x:g}", [r for r in allnc_runs if r["config"]["gamma"] == x and r["config"]["alpha"] == 1.0],
                         paper_row("Table VI", ds, imb, x)) for x in gammas], f"gamma {g:g}")
        abl = [r for r in pick(runs, dataset=ds, imb=imb, method="allnc", gamma=g, alpha=1.0)
               if not other_p2p_space(r["config"])]
        if any(r["config"][a] for r in abl for a in ABLATIONS):
            shot_table(f"Table VII: ablations of AllNC (gamma {g:g}), {split}",
                       [(label, sel, paper_row("Table VII", ds, imb, a)) for label, a, sel in ablation_rows(abl)], "allnc")
        alphas = sorted({r["config"]["alpha"] for r in allnc_runs if r["config"]["gamma"] == g})
        if any(a != 1.0 for a in alphas):              # the sweep of Fig. 8, begun
            shot_table(f"Fig. 8: AllNC (gamma {g:g}) for different alpha (paper: a figure, no numbers), {split}",
                       [(f"alpha {a:g}", [r for r in allnc_runs if r["config"]["alpha"] == a and r["config"]["gamma"] == g],
                         None) for a in alphas], "alpha 1")


def ablation_rows(rows):
    """Table VII's rows: (label, ablation, runs) for the full method, then each single ablation."""
    out = [("allnc", "allnc", [r for r in rows if plain_allnc(r["config"])])]
    for a in ABLATIONS:
        sel = [r for r in rows if r["config"][a] and sum(bool(r["config"][b]) for b in ABLATIONS) == 1]
        if sel:
            out.append((f"w/o {a[3:] if a.startswith('no_') else 'adjustable gamma'}", a, sel))
    return out


def decoupled_table(entries):
    """Features or classifier, per row: All and Few of the final weights scored by the trained head,
    by logit adjustment (LA) and by the nearest class mean of phi(x) (NCM), mean±std."""
    entries = [(m, rs) for m, rs, _ in entries if any(r["final"].get("decoupled") for r in rs)]
    if not entries:
        return
    print("Features or classifier? the final weights scored by the trained head, by post-hoc logit adjustment "
          "(LA; n/a where the head is not trained on the long-tailed prior) and by the nearest class mean of "
          "phi(x) (NCM). Few found by NCM but not by the head: a classifier bias, not a representation failure.")
    cols = [(w, k) for k in ("top1", "few") for w in ("head", "LA", "NCM")]
    which = {"head": "head", "LA": "logit_adjusted", "NCM": "ncm"}
    score = lambda w, k: lambda r: ((r["final"].get("decoupled") or {}).get(which[w]) or {}).get(k)
    rows = [[m] + [over_seeds(rs, score(w, k)) for w, k in cols] for m, rs in entries]
    print(format_table(["method"] + [f"{w} {'All' if k == 'top1' else 'Few'}" for w, k in cols], rows))


def nc_table(entries):
    """The NC metrics at the end of training, mean±std over seeds (Fig. 3/4)."""
    keys = ("nc1", "cos_mu_std", "equinorm_mu", "cos_w_std", "self_duality")
    print("NC at the end of training (Fig. 3/4: lower Std of cosines, equinorm and NC1 = closer to collapse; "
          "self-duality = distance between normalised class means and classifier rows, lower = closer)")
    rows = [[m] + [over_seeds(rs, lambda r: r["final"]["nc"][k], 3) for k in keys] for m, rs, _ in entries]
    print(format_table(("method", "NC1", "Std cos, means", "equinorm, means", "Std cos, W", "self-duality"), rows))


def variant(c):
    """How a run differs from its method's defaults, for the all-runs table."""
    v = [a.replace("_", "-") for a in ABLATIONS if c[a]]
    if c["method"].startswith("allnc"):
        v += [f"g{c['gamma']:g}", f"a{c['alpha']:g}"] + ([f"p2p-{c['p2p_space']}"] if other_p2p_space(c) else [])
        v += ["2heads"] if c["heads"] == 2 else []
    v += [f"ra-{c['randaug']}"] if c["randaug"] != "timm" else []
    return " ".join(v + (["smoke"] if c["smoke"] else []))


def print_all_runs(runs):
    """Every finished run, grouped over seeds: accuracy and the main NC metrics."""
    groups = {}
    for r in runs:
        c = r["config"]
        net = f"{c['depth']}x{c['width']}" if c["arch"] == "resnet_cifar" else c["arch"]
        pk = protocol_key(c)                   # its non-default fields (pk[5], e.g. grw_reduction=batch) named:
        v = " ".join(filter(None, (variant(c), pk[5])))     # never averaged with the default's seeds
        groups.setdefault((c["dataset"], c["imb"], c["method"], v, c["epochs"], net, pk), []).append(r)
    nc = ("nc1", "cos_mu_std", "cos_w_std", "self_duality")
    print("\nAll runs: top-1 (%) mean±std over seeds (final epoch; 'best All' = best test epoch), net = depth x width,"
          " and NC metrics at the end of training (mean over seeds)")
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], -k[1], order[k[2]], k[3], k[4])):
        rs = groups[key]
        d, imb, m, v, ep, net, _ = key
        rows.append([d, f"{imb:g}", m, v, str(ep), net, str(len(rs))] + [cell(mean_std(rs, k)) for k in SHOTS]
                    + [cell(mean_std(rs, "top1", "best"))] + [f"{sum(r['final']['nc'][k] for r in rs) / len(rs):.4f}"
                                                              for k in nc])
    print(format_table(("dataset", "imb", "method", "variant", "ep", "net", "seeds", "Many", "Medium", "Few", "All",
                        "best All") + nc, rows))

# ==============================================================================================
# Figures (matplotlib is optional)

def embed_2d(h):
    """Two dimensions for Fig. 6: t-SNE when scikit-learn is installed, else PCA (torch's SVD)."""
    try:
        from sklearn.manifold import TSNE
        return torch.from_numpy(TSNE(2, init="pca", random_state=0).fit_transform(h.double().numpy())).float(), "t-SNE"
    except ImportError:
        c = h.double() - h.double().mean(0)
        _, _, vt = torch.linalg.svd(c, full_matrices=False)
        return (c @ vt[:2].t()).float(), "PCA"


def draw_features(ax, h, y, C, most=4000):
    """Fig. 6: the features in two dimensions, coloured by class, class means marked (the means of
    the embedded points); returns those means (C x 2)."""
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:most]
    h, y = h[keep], y[keep]                     # a random subset, so that t-SNE stays affordable
    z, how = embed_2d(h)
    cnt = torch.zeros(C).index_add_(0, y, torch.ones(len(y)))
    means = torch.zeros(C, 2).index_add_(0, y, z) / cnt.clamp(min=1)[:, None]
    ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10" if C <= 10 else "viridis", s=3, alpha=0.5)
    ax.scatter(means[:, 0], means[:, 1], c=range(C), cmap="tab10" if C <= 10 else "viridis", s=120,
               marker="*", edgecolors="black", linewidths=0.8)
    ax.set_xlabel(f"{how} 1")
    ax.set_ylabel(f"{how} 2")
    return means


def plot(paths, out_dir):
    runs = []
    for p in paths:                       # the files first: a wrong file is the likelier mistake
        r = load_result(p)
        if r is None:
            raise DataError(f"{p} is not a finished result JSON of allnc.py (missing, partial or another file)")
        nc = r["final"]["nc"]
        if "icpa_file" in nc:           # large C: the matrices live beside the JSON
            icpa_path = os.path.join(os.path.dirname(os.path.abspath(p)), nc["icpa_file"])
            try:
                nc.update({k: v.float().tolist() for k, v in torch.load(icpa_path, weights_only=True).items()})
            except Exception:
                raise DataError(f"{icpa_path} (the ICPA matrices of {p}) is missing or unreadable") from None
        runs.append(r)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install matplotlib") from None
    os.makedirs(out_dir, exist_ok=True)
    written = []
    vmax = max(abs(v - math.degrees(math.acos(-1 / (len(r["counts"]) - 1))))   # one colour scale for all
               for r in runs for k in ("icpa_mu", "icpa_w") for i, row in enumerate(r["final"]["nc"][k])
               for j, v in enumerate(row) if i != j)
    for r in runs:   # Fig. 2/7: ICPA heatmaps of centered class means and centered classifier rows
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        C = len(r["counts"])
        opt_deg = math.degrees(math.acos(-1 / (C - 1)))
        for ax, key, title in zip(axes, ("icpa_mu", "icpa_w"), ("class means", "classifier vectors")):
            dev = (torch.tensor(r["final"]["nc"][key]) - opt_deg).abs()
            dev.fill_diagonal_(float("nan"))            # a class with itself is no pair
            im = ax.imshow(dev, cmap="Blues", vmin=0, vmax=vmax)
            ax.set_title(f"|ICPA - {opt_deg:.1f}°|, {title}")
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(r["name"], fontsize=8)
        path = os.path.join(out_dir, r["name"] + "-icpa.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    feats = [(r, p) for r, p in zip(runs, paths) if (r.get("weights") or {}).get("final")]
    if feats:                                           # Fig. 6: last-layer features of the training set
        fig, axes = plt.subplots(1, len(feats), figsize=(5.2 * len(feats), 4.6), squeeze=False)
        for ax, (r, p) in zip(axes[0], feats):
            data, _, model, _ = kept_model(p, r)
            h, y = (t.cpu() for t in training_h(model, data))
            draw_features(ax, h, y, len(r["counts"]))
            ax.set_title(f"{r['config']['method']}: {r['name']}", fontsize=7)
        path = os.path.join(out_dir, "features.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))   # Fig. 3/4: Std of cosines and self-duality
    for key, ax in zip(("cos_mu_std", "cos_w_std", "self_duality"), axes):
        for r in runs:
            pts = [(row["epoch"], row["nc"][key]) for row in r["log"] if "nc" in row]
            ax.plot(*zip(*pts), marker="o", label=f"{r['config']['method']} ({r['config']['dataset']})")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend(fontsize=7)
    path = os.path.join(out_dir, "nc-curves.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return written + [path]

# ==============================================================================================
# Benchmark: what a user sizes a run with (images/s, ms per step, peak memory, projected time)

def benchmark(cfg, steps=20, warm=5):
    """The full training step on the tensor path (batches of the epoch's pre-augmented views) and the
    per-epoch augmentation, timed apart and amortised together; the evaluation forward pass; the peak
    memory; the projected wall time of the whole run. Images are counted per view."""
    device = pick_device(cfg.device)
    cfg.method = cfg.method if cfg.method.startswith("allnc") else "allnc"
    cfg.loader = "tensor"
    info0 = data_lt.DATASETS[cfg.dataset]
    data = data_lt.Data(cfg, device, VIEWS[cfg.method], smoke_size=info0.size, smoke_n_max=info0.n_max)   # --smoke: real size and count
    st = TrainState(cfg, data, device)
    info, V = data.info, VIEWS[cfg.method]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(fn, it, n_steps=steps, n_warm=warm):
        for _ in range(n_warm):
            fn(next(it))
        sync()
        t = time.time()
        n = sum(fn(next(it)) for _ in range(n_steps))
        sync()
        return n / (time.time() - t)

    torch.manual_seed(0)
    model = build_model(cfg, data.C, data.counts, data.in_channels).to(device)
    gpu_backends(cfg, device)                        # as a run: train_run's choices
    if gpu_path(device):
        model = model.to(memory_format=torch.channels_last)
    B = cfg.batch_size * V
    opt = make_optimizer(model, cfg)
    st.eta = 0.5
    cold = {}

    def full(batch):
        xs, yy = batch
        t0 = time.time()
        if cfg.compile:
            torch.compiler.cudagraph_mark_step_begin()
        with st.autocast():
            loss, _ = st.step(model, xs, yy, st)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cold.setdefault("s", time.time() - t0)         # the first call: compile time with --compile
        return len(yy) * len(xs)

    def endless():
        e = 0
        while True:
            e += 1
            yield from data.train_batches(e, V)

    @torch.no_grad()
    def forward_only(inp):
        model(inp)
        return len(inp)

    steps_in = endless()
    for _ in range(warm):                            # compile, autotuning: before the timed window
        full(next(steps_in))
    sync()
    t_start = t = start_together()
    gen = torch.Generator().manual_seed(1)
    for _ in range(V):                               # one epoch's augmentation, every view
        data_lt.augment_set(data.xtr, gen, info, cfg.randaug, cfg.autoaugment, cfg.cutout)
    sync()
    aug = V * data.n_train() / (time.time() - t)
    b = timed(full, steps_in, n_warm=0)
    t_end = time.time()
    x_real = torch.cat(next(iter(data.train_batches(0, V)))[0])     # real images: CPU kernels' speed depends on values
    fwd_rate = timed(forward_only, iter(lambda: x_real, None))
    b_all = 1 / (1 / b + 1 / aug)                   # the step with the augmentation amortised over it
    n_steps = len(data_lt.epoch_batches(data.n_train(), cfg.batch_size, 0, 0))
    n_test = 10000                                  # CIFAR's and Fashion-MNIST's test sets
    evals = cfg.epochs + (cfg.epochs // cfg.nc_every if cfg.nc_every else 0) * data.n_train() / n_test + 1
    total = cfg.epochs * n_steps * B / b_all + evals * n_test / fwd_rate
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if cuda else
                __import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss / 1024)
    peak = f"{peak_mib:.0f} MiB ({'CUDA' if cuda else 'process RSS'})"
    print(f"benchmark: {cfg.dataset} (imb {cfg.imb:g}, {data.n_train()} images{', stand-in' if cfg.smoke else ''}), "
          f"{cfg.arch}-{cfg.depth} width {cfg.width}, RandAugment {cfg.randaug}, batch {cfg.batch_size} x {V} views, "
          f"device {device}, amp {st.dtype or 'off'}, {steps} timed steps"
          f"{f', compiled ({cfg.compile_mode})' if cfg.compile else ''}, "
          f"{torch.get_num_threads()} threads")
    rows = [("full training step", f"{b:.0f} images/s, {1000 * B / b:.2f} ms/step"),
            ("augmentation of an epoch, every view", f"{aug:.0f} images/s"),
            ("step with the augmentation amortised", f"{b_all:.0f} images/s, {b_all / B:.2f} steps/s"),
            ("evaluation forward pass", f"{fwd_rate:.0f} images/s"), ("peak memory", peak)]
    rows += [("first step (compile)", f"{cold['s']:.1f} s")] if cfg.compile else []
    rows.append(("timed window (augmentation, steps)", f"{t_start:.2f} to {t_end:.2f} s (Unix time)"))
    rows.append((f"projected {cfg.epochs}-epoch run", f"{total / 60:.1f} min ({n_steps} steps/epoch, "
                                                      f"{evals:.0f} test-set-sized evaluations)"))
    print(format_table(("measurement", "value"), rows))
    return {"b": b, "aug": aug, "b_all": b_all, "fwd": fwd_rate, "ms_step": 1000 * B / b, "total_s": total,
            "peak_mib": peak_mib}


def start_together():
    """The time a benchmark's window opens. gpu_check's concurrent runs set ALLNC_BENCH_TOGETHER=DIR:N:
    each process, warmed up (CUDA, cuDNN's autotuning, a compile), leaves a file in DIR and waits for
    all N, so that no window runs while another process is still starting (which would overstate what
    N runs at once achieve)."""
    spec = os.environ.get("ALLNC_BENCH_TOGETHER")
    if spec:
        folder, n = spec.rsplit(":", 1)
        open(os.path.join(folder, str(os.getpid())), "w").close()
        give_up = time.time() + 600                  # a peer that died: time out, not hang
        while len(os.listdir(folder)) < int(n) and time.time() < give_up:
            time.sleep(0.005)
    return time.time()


def benchmark_loader(cfg, steps=20):
    """ImageFolder data (ImageNet-LT, iNat): images/s of the training loader alone (JPEG decode,
    RandomResizedCrop, ColorJitter, RandAugment, every view) for 1, 2, 4, ... up to --workers
    DataLoader workers: what one process's loader feeds, to size --workers per process."""
    device = pick_device(cfg.device)
    data = data_lt.Data(cfg, device, VIEWS[cfg.method])
    V = VIEWS[cfg.method]
    batches = data_lt.epoch_batches(data.n_train(), cfg.batch_size, cfg.seed, 1)
    steps = min(steps, len(batches) - 1)
    if steps < 1:
        raise DataError(f"--benchmark needs at least 2 batches of {cfg.batch_size} images; lower --batch-size")
    counts = sorted({w for w in (1, 2, 4, 8, 16, 32, 64) if w < cfg.workers} | {max(cfg.workers, 0)})
    print(f"benchmark: {cfg.dataset} loader, {data.n_train()} training images, batch {cfg.batch_size} x {V} views "
          f"at {min(data.info.size, 224)} px, RandAugment {cfg.randaug}, {steps} timed batches "
          f"after the first, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rates = {}
    for w in counts:
        it = data_lt.pil_loader(data.pil, batches[:steps + 1], w, cfg.seed, 1, device)
        next(it)                                    # workers started, first batch out
        t = time.time()
        rates[w] = sum(len(y) for _, y in it) / (time.time() - t)
    print(format_table(("workers", "images/s", "views/s", "views/s per worker"),
                       [[str(w), f"{r:.1f}", f"{r * V:.1f}", f"{r * V / max(w, 1):.1f}"] for w, r in rates.items()]))
    return rates


# What gpu_check reads from a benchmark process's printed table (benchmark() prints these rows).
BENCH_PRINTS = {"b": r"full training step\s*\|\s*([\d.]+) images/s", "ms": r"([\d.]+) ms/step",
                "b_all": r"amortised\s*\|\s*([\d.]+) images/s", "peak": r"peak memory\s*\|\s*([\d.]+) MiB",
                "min": r"projected 200-epoch run\s*\|\s*([\d.]+) min", "start": r"timed window.*?\|\s*([\d.]+) to",
                "end": r"timed window.*? to ([\d.]+) s"}


def agreement(dir_a, dir_b):
    """Whether the runs named r in two directories (one process; torchrun) computed the same: the largest
    relative difference of an epoch's loss, that of the final weights (all of them, as one vector), and
    the verdict. Two CPU processes (gloo) against one, 2 epochs of 12 steps: 8e-5 and 6e-4; class means
    or BatchNorm left per process moved the losses by 0.16 and 0.047 (test_two_processes_train_the_run_of_one)."""
    try:
        ra, rb = (load_result(os.path.join(d, "r.json")) for d in (dir_a, dir_b))
        dl = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(ra["log"], rb["log"]))
        wa, wb = (torch.load(os.path.join(d, "r.pt"), map_location="cpu", weights_only=True) for d in (dir_a, dir_b))
        keys = [k for k in wa if wa[k].is_floating_point()]
        dw = (sum((wa[k].double() - wb[k].double()).square().sum() for k in keys).sqrt()
              / sum(wa[k].double().square().sum() for k in keys).sqrt()).item()
    except (OSError, TypeError, KeyError, RuntimeError, ValueError, ZeroDivisionError):
        return "failed (see the log)"
    return (f"relative difference: epoch loss {dl:.1e} (largest), final weights {dw:.1e}: "
            + ("agree" if dl <= 1e-3 and dw <= 5e-3 else "DIFFER"))


def gpu_check(out, deadline_s=480):
    """`bash run_all.sh --gpu-check`: what a first short session on a GPU should measure, as one table
    (OUT/gpu-check.txt, rewritten after every part, so a check cut short keeps what it measured; every
    part's output in OUT/gpu-check.log): the suite's device tests on it; the benchmark at widths 16 and
    64, eager, then 1, 2, 4 and 8 concurrent benchmark processes (their images/s summed: what JOBS
    should be, and Table II's time, 48 runs of 200 epochs); with 2+ GPUs a 2-process NCCL run against 1
    process; last, the compiled step (default and reduce-overhead: CUDA graphs). Each part runs in its
    own process under the deadline; a part there is no time left for is a row saying so. Without CUDA
    every part runs at a tiny size (stand-in data, depth 8, a few steps)."""
    import re
    import shutil
    import subprocess
    import tempfile
    out, t0 = os.path.abspath(out), time.time()
    cuda, n_gpu, end = torch.cuda.is_available(), torch.cuda.device_count(), t0 + deadline_s
    size = (["--dataset", "cifar10", "--imb", "100", "--smoke"] if cuda else
            ["--dataset", "synthetic", "--imb", "100", "--smoke", "--depth", "8", "--batch-size", "32"])
    steps, jobs = (100, (1, 2, 4, 8)) if cuda else (2, (1, 2))
    here, py, log = os.path.dirname(os.path.abspath(__file__)), sys.executable, os.path.join(out, "gpu-check.log")
    where = (f"{torch.cuda.get_device_name(0)} ({n_gpu} GPU(s)), torch {torch.__version__}" if cuda else
             f"the CPU ({os.cpu_count()} cores; no CUDA), torch {torch.__version__}: every part at a tiny size "
             f"(stand-in data, depth 8, {steps} timed steps), so the numbers are the CPU's, not a GPU's")
    rows, path = [], os.path.join(out, "gpu-check.txt")
    os.makedirs(out, exist_ok=True)
    open(log, "w").close()

    def add(what, *cells):
        rows.append([what, *cells])
        atomic_write(path, lambda f: f.write(table().encode() + b"\n"))

    def table():
        return f"gpu-check on {where}; {time.time() - t0:.0f} s\n" + format_table(
            ("check", "ms/step", "images/s", "projected 200 epochs", "peak memory", "result"), rows)

    def time_for(what, need):
        if end - time.time() >= need:
            return True
        add(what, "", "", "", "", f"skipped: the check's {deadline_s} s were spent")
        return False

    def launch(cmds, env=None, cap=deadline_s):   # at once; each one's output, None where it ran out of time
        limit, outs = min(end, time.time() + cap), []
        with open(log, "a") as f:
            f.write("".join(f"\n$ {' '.join(c)}\n" for c in cmds))
            f.flush()
            procs = [subprocess.Popen(c, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, **(env or {})}) for c in cmds]
            for p in procs:
                try:
                    outs.append(p.communicate(timeout=max(limit - time.time(), 0.1))[0])
                except subprocess.TimeoutExpired:
                    p.kill()
                    outs.append(None)
                    f.write(p.communicate()[0] + "\n(stopped: out of time)\n")
                    continue
                f.write(outs[-1])
        return outs

    def bench(n, width, flags=()):             # n benchmark processes at once: their printed numbers
        cmd = [py, "allnc.py", "--benchmark", *size, "--width", str(width), "--epochs", "200", "--benchmark-steps",
               str(steps), "--out", out, "--workers", "0", *flags]
        together = tempfile.mkdtemp(prefix="allnc-together-")            # their timed windows open at once
        env = {"ALLNC_BENCH_TOGETHER": f"{together}:{n}"} | ({} if cuda else {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))})
        found, outs = [], launch([cmd] * n, env)
        shutil.rmtree(together, ignore_errors=True)
        for o in outs:
            m = {k: re.search(p, o or "") for k, p in BENCH_PRINTS.items()}
            if not all(m.values()):
                return None
            found.append({k: float(x.group(1)) for k, x in m.items()})
        return found

    # the suite's device-dependent tests on this device (on a GPU the sync-free steps under set_sync_debug_mode)
    sel = ["-m", "device"] + ([] if cuda else ["-k", "never_syncs and allnc-kw0"])   # the CPU suite runs the rest
    if time_for("device tests", 30):
        o = launch([[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_allnc.py", *sel]],
                   {"ALLNC_TEST_DEVICE": "cuda" if cuda else "cpu"}, cap=150)[0]
        n = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|errors?)", o or ""))
        res = "timed out after 150 s" if o is None else (
            f"{n.get('passed', 0)} passed, {n.get('failed', 0) + n.get('error', 0) + n.get('errors', 0)} failed"
            if n else "pytest printed no count (see the log)")
        add("device tests: pytest " + " ".join(sel), "", "", "", "", res + ("" if cuda else " (one, here)"))

    def bench_row(what, width, flags=()):
        if time_for(what, 20 if not flags else 60):
            b = bench(1, width, flags)
            note = "compile disabled here" if flags and torch._dynamo.config.disable else ""
            add(what, *([f"{b[0]['ms']:.2f}", f"{b[0]['b']:.0f}", f"{b[0]['min']:.1f} min", f"{b[0]['peak']:.0f} MiB"]
                        if b else ["", "", "", ""]), note if b else "failed or out of time (see the log)")

    for width in (16, 64):
        bench_row(f"benchmark width {width}, eager", width)

    # N benchmark processes at once on the one device (the default width): their images/s summed
    rates, at, alone = {}, {}, None
    for n in jobs:
        what = f"{n} concurrent runs (JOBS={n})"
        if not time_for(what, 30):
            break
        got = bench(n, 64 if cuda else 16)
        if not got:
            add(what, "", "", "", "", "failed or out of time (see the log)")
            break
        rates[n], alone = sum(g["b_all"] for g in got), alone or got[0]["min"]
        # one run alone takes `alone` minutes; N at once go rates[N] / rates[1] times as fast
        at[n] = len(rows)
        apart = lambda k: max(g[k] for g in got) - min(g[k] for g in got)
        add(what, "", f"{rates[n]:.0f}", f"{48 * alone * rates[1] / rates[n] / 60:.1f} h", "",
            f"Table II (48 runs x 200 epochs); windows opened {apart('start'):.2f} s, ended {apart('end'):.1f} s apart")
    if len(rates) > 1:
        rows[at[max(rates, key=rates.get)]][-1] += ": best"

    # the 2-process NCCL run against the 1-process run of the same seed: 2 epochs, every loss and weight
    what = "2-process NCCL run vs 1 process"
    if n_gpu < 2:
        add(what, "", "", "", "", f"skipped: {n_gpu} GPU(s), it needs 2")
    elif time_for(what, 60):
        args = ["allnc.py", "--dataset", "synthetic", "--imb", "10", "--depth", "8", "--epochs", "2", "--amp", "off",
                "--seed", "0", "--name", "r", "--force", "--workers", "0"]
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        launch([[py, *args, "--out", os.path.join(out, "gpu-check-1proc")]], {"CUDA_VISIBLE_DEVICES": first})
        launch([[py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args,
                 "--out", os.path.join(out, "gpu-check-nccl")]])
        note = agreement(os.path.join(out, "gpu-check-1proc"), os.path.join(out, "gpu-check-nccl"))
        add(what, "", "", "", "", note)

    for width in (16, 64):
        for mode in ("default", "reduce-overhead"):
            bench_row(f"benchmark width {width}, --compile-mode {mode}", width, ("--compile", "--compile-mode", mode))

    text = table()
    atomic_write(path, lambda f: f.write(text.encode() + b"\n"))
    print(text)
    print(f"wrote {path}; every part's output: {log}")
    return rows

# ==============================================================================================
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}; see python allnc.py --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type is bool or f.type == "bool":
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=meta["help"])
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        p.add_argument(flag, dest=f.name, type=typ, default=f.default, choices=meta.get("choices"), help=meta["help"])
    p.add_argument("--tables", metavar="DIR", help="print the paper's tables from the result JSONs in DIR")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="draw ICPA heatmaps and NC curves (PNG, into --out)")
    p.add_argument("--benchmark", action="store_true", help="images/s and ms of the training step, peak memory and "
                   "the projected run time; ImageNet-LT / iNat: the ImageFolder loader's rate per --workers count")
    p.add_argument("--compare", metavar="METHOD", choices=METHODS, help="also train METHOD on the same split, "
                   "budget and seed, and print both side by side (e.g. --compare ce)")
    p.add_argument("--eval", metavar="RESULT", help="re-evaluate a finished run from RESULT.json (final weights) or "
                   "its NAME.pt / NAME.best.pt, and print its table")
    p.add_argument("--benchmark-steps", type=int, default=20, help="timed steps per benchmark measurement")
    p.add_argument("--gpu-check", action="store_true", help="the device tests, benchmarks, concurrent runs and "
                   "(2+ GPUs) an NCCL run, as one table in --out (run_all.sh --gpu-check; tiny on a CPU)")
    a = p.parse_args(argv)
    extra = {k: getattr(a, k) for k in ("tables", "plot", "benchmark", "benchmark_steps", "eval", "compare",
                                        "gpu_check")}
    names = {f.name for f in dataclasses.fields(Config)}
    given = (t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv) if t.startswith("--"))
    extra["explicit"] = {g[3:] if g.startswith("no_") and g[3:] in names else g for g in given} & names
    cfg = Config(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Config)})
    return cfg, extra


def main(argv=None):
    cfg, extra = parse_args(argv)
    dist = Dist()                             # this process alone until torchrun's group is joined
    try:
        env = torchrun_env()
        mode = next((k for k in ("tables", "plot", "eval", "benchmark", "gpu_check") if extra[k]), None)
        if env and env[1] > 1 and mode:
            raise DataError(f"{flag(mode)} runs in one process: start it with python, not torchrun")
        if env and env[1] > 1 and cfg.device.startswith("cuda:"):      # before resolve() looks for that GPU
            raise DataError(f"--device {cfg.device}: under torchrun each process takes cuda:LOCAL_RANK; give --device cuda")
        if extra["gpu_check"]:
            check_writable_dir(cfg.out)
            gpu_check(cfg.out)
            return 0
        if extra["tables"]:
            if not os.path.isdir(extra["tables"]):
                raise DataError(f"{extra['tables']} is not a directory of result JSONs")
            runs, bad = collect(extra["tables"])
            old = [b for b in bad if "earlier protocol" in b]
            if not runs:
                raise DataError(f"{extra['tables']} holds no finished result of this version" + (
                    f" (only {len(old)} of an earlier protocol, e.g. {old[0]}): re-run them with this version"
                    if old else f"; run allnc.py or run_all.sh with --out / RESULTS={extra['tables']} first"))
            print_tables(extra["tables"])
            return 0
        if extra["plot"]:
            for path in plot(extra["plot"], cfg.out):
                print(f"wrote {path}")
            return 0
        if extra["eval"]:
            res, wpath = reevaluate(extra["eval"], cfg.device)
            print(f"re-evaluated {res['name']} from {wpath}\n")
            print(run_table(res))
            return 0
        if extra["benchmark"] and extra["benchmark_steps"] < 1:
            raise DataError(f"--benchmark-steps {extra['benchmark_steps']}: give 1 or more timed steps (default 20)")
        if extra["compare"] == cfg.method:
            raise DataError(f"--compare {cfg.method} is --method {cfg.method} itself: the same run twice; "
                            f"give another method to compare with, e.g. --compare ce")
        user = dataclasses.replace(cfg)
        resolve(cfg, extra["explicit"])
        other = None
        if extra["compare"]:       # checked before anything trains; recipe fields the user did not give reset
            m = extra["compare"]
            other = resolve(dataclasses.replace(user, method=m, name=None,
                                                recipe=user.recipe if m in RECIPES else "allnc"),
                            extra["explicit"] - set(METHOD_ONLY))      # the first method's own flags stay its own
        if extra["benchmark"]:
            if data_lt.DATASETS[cfg.dataset].kind == "folder":     # the loader is what limits these
                benchmark_loader(cfg, extra["benchmark_steps"])
            else:
                benchmark(cfg, extra["benchmark_steps"])
            return 0
        if other is not None and env:
            check_split(other, env[1])
        dist = setup_distributed(cfg)             # torchrun: this process's device and the process group
        if other is not None:
            other.device = cfg.device
        result = run(cfg, dist=dist)
        if other is not None and result is not None:
            second = run(other, dist=dist)
            if second is not None and dist.main:
                print()
                print(compare_table(result, second))
                return 0
    except DataError as e:
        msg = str(e).strip()
        if "Traceback" in msg:     # raised in a DataLoader worker: keep our own last line
            msg = msg.splitlines()[-1].split("DataError: ", 1)[-1]
        # before the process group exists every process finds the same fault: one line per machine
        if dist.on or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {rank_tag(dist)}{msg}", file=sys.stderr)
        return 2
    except NonFinite as e:
        if dist.main:              # every process raises it at the same epoch
            print(f"error: {e}", file=sys.stderr)
        return 3
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 74
    except Interrupted as e:
        if dist.main:
            print(f"\n{e.args[0]}", file=sys.stderr)
        return e.args[1]
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not (dist.on and lost_peer(e)):
            raise
        detail = str(e).strip().splitlines()[0].rsplit("] ", 1)[-1][:100]     # without gloo's source location
        print(f"error: {rank_tag(dist)}lost another process of the run ({detail}); "
              f"the checkpoint of the last finished epoch is kept: run the same torchrun command to resume",
              file=sys.stderr)
        return 75
    finally:
        if dist.on and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result is None or not dist.main:    # another process trains this configuration; or not rank 0
        return 0
    print()
    print(run_table(result))
    return 0


def rank_tag(dist):
    return f"[rank {dist.rank}] " if dist.on else ""


def lost_peer(e):
    """A collective failed because another process of the run died or hung (torchrun stops the
    rest), as opposed to a bug: the message of gloo's, NCCL's or the store's error."""
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(
        k in text for k in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out"))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # `| head` ends quietly
    sys.exit(main())
