"""Tests of the AllNC reproduction, by subject: losses against hand-computed values and known optima;
heads and models; the training steps and the loop; the schedules; splits, loaders and augmentation;
NC metrics against an independent float64 computation; runs, resume and faults; input validation;
tables and run_all.sh; speed (a sync-free, capture-safe step); several processes under torchrun.

    python -m pytest -q -n 2 test_allnc.py          # the suite (two pytest-xdist workers)
    python -m pytest -q -m mutation test_allnc.py   # the fast tests aimed at MUTATION_TARGETS

ALLNC_TORCHRUN_STRESS=N launches the torchrun stress test's run N times per kind (plain, sigterm,
nodes2) instead of its defaults (5, 1, 1)."""
import copy
import dataclasses
from contextlib import nullcontext
import itertools
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import allnc
import data_lt
import models

# `mutation` marks the tests of the mutation check (README). The layout has no pytest configuration
# file to register a marker in, so pytest would warn (PytestUnknownMarkWarning) where the decorators
# run, at this module's import: that one warning is filtered here, before them. `-m mutation` selects
# by the marker all the same. `device` marks the tests whose result depends on the device
# (ALLNC_TEST_DEVICE): run_all.sh --gpu-check runs them on the GPU.
warnings.filterwarnings("ignore", message=r"Unknown pytest\.mark\.(mutation|device)\b",
                        category=pytest.PytestUnknownMarkWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
# ALLNC_TEST_DEVICE=cuda runs the device-dependent tests (training steps, AMP, the sync-free loop,
# the benchmark, resume) on a GPU; CI leaves it unset and everything runs on the CPU.
DEV = os.environ.get("ALLNC_TEST_DEVICE", "cpu")
DEVICE = torch.device(DEV)
# The README's command runs the tests on two pytest-xdist workers (-n 2, one per core): each worker,
# and every process its tests start (OMP_NUM_THREADS), then takes its share of the cores instead of
# all of them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if WORKERS:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def cli(*args, cwd=HERE, timeout=600, env=None):
    return subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def main_here(capsys, *args, threads=None):
    """`python allnc.py args` as allnc.main(args) in this process (no interpreter to start): its exit
    code and what it printed, as cli() returns them. One real command line per behaviour stays a cli()
    case (what only a real process shows: no traceback, the exit status). threads: run it with that
    many (a run compared bit for bit with one started with OMP_NUM_THREADS)."""
    capsys.readouterr()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        rc = allnc.main(list(args))
    except SystemExit as e:                   # argparse: a bad choice or type
        rc = e.code
    finally:
        torch.set_num_threads(before)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


RUN_ALL_VARS = ("SCALE", "SEEDS", "RESULTS", "GPUS", "CUDA_VISIBLE_DEVICES", "JOBS", "WIDTH", "EXTRA", "NPROC",
                "TORCHRUN_ARGS", "IMAGENET_LT_ROOT", "IMAGENET_LT_TRAIN_LIST", "IMAGENET_LT_TEST_LIST",
                "INAT2018_ROOT", "INAT2018_TRAIN_LIST", "INAT2018_TEST_LIST", "OMP_NUM_THREADS")


def run_all(*args, timeout=60, **env):
    """bash run_all.sh with none of its settings inherited from the caller's environment, this
    test's interpreter as PYTHON, and `env` as the only settings."""
    clean = {k: v for k, v in os.environ.items() if k not in RUN_ALL_VARS} | {"PYTHON": PY} | env
    return subprocess.run(["bash", "run_all.sh", *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env=clean)


def wait_for(event, proc, what, timeout=120):
    """Until event() holds; fails at once, saying what never came, if proc ends first or the time
    runs out (a signal is then never sent at a wrong moment)."""
    t0 = time.time()
    while not event():
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before {what}"
        assert time.time() - t0 < timeout, f"no {what} within {timeout} s"
        time.sleep(0.02)


def make_data(cfg):
    return data_lt.Data(cfg, DEVICE, allnc.VIEWS[cfg.method])


def tiny_cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", imb=10.0, epochs=2, depth=8, batch_size=64, out=str(tmp_path),
                nc_every=1, device=DEV)
    return allnc.resolve(allnc.Config(**(base | kw)))


def tiny_setup(tmp_path, init_seed=None, **kw):
    """The tiny run's config, data, training state and model (on DEVICE, in train mode): tiny_cfg's
    config with kw, its data, a TrainState and the method's model; init_seed: torch's seed set just
    before the model is built (its initial weights)."""
    cfg = tiny_cfg(tmp_path, **kw)
    data = make_data(cfg)
    st = allnc.TrainState(cfg, data, DEVICE)
    if init_seed is not None:
        torch.manual_seed(init_seed)
    model = allnc.build_model(cfg, data.C, data.counts, data.in_channels).to(DEVICE)
    return cfg, data, st, model


# The mutation check (README, "Mutation check"): the method's functions mutmut mutates; the fast tests
# aimed at them carry the marker @pytest.mark.mutation.
MUTATION_TARGETS = ("etf_gram", "p2p_loss", "p2p_loss_raw", "hycon_sim", "hycon_loss", "gbbn_eta", "bbn_eta",
                    "grw_weights", "grw_loss", "gbbn_cls_loss", "cb_weights", "cb_loss", "etf_dr_loss", "ncmc_loss",
                    "batch_class_means", "step_allnc", "loss_ce", "loss_etf", "loss_ncmc", "mixup", "step_single",
                    "step_stage2", "eval_logits", "logit_adjust", "eta_for", "lr_at", "lr_for", "warmup_epochs",
                    "maxnorm_cap", "max_norm_", "begin_stage", "best_epoch")


# ----------------------------------------------------------------------------------------------
# Losses

@pytest.mark.mutation
def test_etf_gram_is_eq9():
    rho = allnc.etf_gram(4)
    assert torch.allclose(rho.diag(), torch.ones(4))
    off = rho[~torch.eye(4, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 3))
    assert torch.allclose(rho.sum(1), torch.zeros(4), atol=1e-6)   # simplex: rows sum to 0


@pytest.mark.mutation
def test_p2p_zero_on_exact_etf_and_hand_value():
    M = models.simplex_etf(16, 10, torch.Generator().manual_seed(0))      # columns are the ETF
    assert allnc.p2p_loss(M.t()).item() == pytest.approx(0, abs=1e-10)
    assert allnc.p2p_loss(M.t() * torch.arange(1, 11)[:, None]).item() == pytest.approx(0, abs=1e-10)  # scale-free
    # C=2, both rows equal: gram [[1,1],[1,1]] vs rho [[1,-1],[-1,1]] -> (0+4+4+0)/4 = 2
    assert allnc.p2p_loss(torch.tensor([[3.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(2.0)
    # C=3, orthonormal rows: off-diagonal error (0 + 1/2)^2 six times -> 6 * 0.25 / 9
    assert allnc.p2p_loss(torch.eye(3)).item() == pytest.approx(6 * 0.25 / 9)


@pytest.mark.mutation
def test_p2p_mask_uses_only_present_rows():
    M = models.simplex_etf(8, 4).t()
    v = torch.cat([M, torch.randn(1, 8)])
    rho = allnc.etf_gram(4)
    full_rho = torch.zeros(5, 5)
    full_rho[:4, :4] = rho
    mask = torch.tensor([True, True, True, True, False])
    assert allnc.p2p_loss(v, full_rho, mask).item() == pytest.approx(0, abs=1e-10)


@pytest.mark.mutation
def test_p2p_raw_rows_eq11_as_written():
    """Eq. 11 on raw rows: 0 on a unit-norm simplex ETF like the normalised form; scaling the rows
    changes the raw loss (rho_ii = 1 pulls norms to 1) and not the unit one."""
    M = models.simplex_etf(16, 10, torch.Generator().manual_seed(0)).t()       # unit rows
    assert allnc.p2p_loss_raw(M).item() == pytest.approx(0, abs=1e-10)
    assert allnc.p2p_loss(M).item() == pytest.approx(0, abs=1e-10)
    assert allnc.p2p_loss_raw(2 * M).item() > 0.1
    assert allnc.p2p_loss(2 * M).item() == pytest.approx(0, abs=1e-10)
    # C=2, rows (2, 0) and (0, 1): gram [[4, 0], [0, 1]] vs rho [[1, -1], [-1, 1]] -> (9 + 1 + 1 + 0) / 4
    assert allnc.p2p_loss_raw(torch.tensor([[2.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(11 / 4)


@pytest.mark.mutation
def test_hycon_minus_four_when_aligned_and_hand_value():
    z = torch.randn(5, 8)
    assert allnc.hycon_loss(2 * z, z, z, 3 * z, z, z).item() == pytest.approx(-4.0, abs=1e-6)
    # h orthogonal to z, u equal to z: each sim = 0 - 1; two terms -> -2
    z = torch.tensor([[1.0, 0.0]])
    h = torch.tensor([[0.0, 1.0]])
    assert allnc.hycon_loss(h, h, z, z, z, z).item() == pytest.approx(-2.0)
    # opposite directions: +4 (the maximum)
    assert allnc.hycon_loss(-z, -z, z, z, -z, -z).item() == pytest.approx(4.0)


@pytest.mark.mutation
def test_hycon_stops_gradient_on_z():
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    h1, h2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    u1, u2 = torch.randn(4, 6), torch.randn(4, 6)
    allnc.hycon_loss(h1, h2, z1, z2, u1, u2).backward()
    assert z1.grad is None and z2.grad is None
    assert h1.grad.abs().sum() > 0 and h2.grad.abs().sum() > 0


@pytest.mark.mutation
def test_hycon_pairs_each_view_with_the_other():
    """Eq. 8 with asymmetric views, written from the paper: sim(h1, u2, sg z2) + sim(h2, u1, sg z1); pairing
    each view with itself gives another value."""
    g = torch.Generator().manual_seed(3)
    h1, h2, z1, z2, u1, u2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(6))
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    sim = lambda h, u, z: -cos(h, z) - cos(u, z)
    want = (sim(h1, u2, z2) + sim(h2, u1, z1)).mean().item()
    assert allnc.hycon_loss(h1, h2, z1, z2, u1, u2).item() == pytest.approx(want, rel=1e-6)
    assert abs(want - (sim(h1, u1, z1) + sim(h2, u2, z2)).mean().item()) > 0.1     # the test can tell them apart


@pytest.mark.mutation
def test_hycon_class_mean_term_moves_a_class_together():
    """Eq. 8's class-mean term: its gradient reaches z only through u, so every member of a class gets
    the same gradient through it, and a class present once gets none (u = z itself, and the
    derivative of z/|z| is orthogonal to z). A finding about the paper's loss, not a bug of ours."""
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 0, 1])
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    h1, h2 = torch.randn(4, 6), torch.randn(4, 6)                  # no gradient through h
    u1, u2 = (allnc.batch_class_means(z, y, 2)[0][y] for z in (z1, z2))
    allnc.hycon_loss(h1, h2, z1, z2, u1, u2).backward()
    for g in (z1.grad, z2.grad):
        assert g[:3].abs().sum() > 1e-3                                     # the class of 3 moves ...
        assert torch.allclose(g[0], g[1], atol=1e-6) and torch.allclose(g[0], g[2], atol=1e-6)   # ... together
        assert g[3].abs().max() < 1e-6                                      # the class seen once: nothing


@pytest.mark.mutation
def test_batch_class_means_by_hand():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [-1.0, 0.0]])
    means, present = allnc.batch_class_means(z, torch.tensor([0, 0, 2, 3]), 4)
    assert torch.equal(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 6.0], [-1.0, 0.0]]))
    assert present.tolist() == [True, False, True, True]


@pytest.mark.mutation
def test_grw_weights_and_loss_reductions():
    w = allnc.grw_weights([100, 10, 1])
    assert torch.allclose(w, torch.tensor([1.0, 10.0, 100.0]) / 111 * 3)
    assert w.sum().item() == pytest.approx(3)
    assert torch.allclose(allnc.grw_weights([100, 10, 1], rho=0), torch.ones(3))
    assert torch.allclose(allnc.grw_weights([4, 1], rho=0.5), torch.tensor([1.0, 2.0]) / 3 * 2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(1 / (2 + math.e))]
    wy = [w[0].item(), w[2].item()]
    by_batch = (wy[0] * ce[0] + wy[1] * ce[1]) / 2
    by_weight = (wy[0] * ce[0] + wy[1] * ce[1]) / (wy[0] + wy[1])
    assert allnc.grw_loss(logits, y, w, "batch").item() == pytest.approx(by_batch, rel=1e-5)
    assert allnc.grw_loss(logits, y, w, "weights").item() == pytest.approx(by_weight, rel=1e-5)


@pytest.mark.mutation
def test_grw_default_is_disalign_weighted_cross_entropy():
    """DisAlign's GRW loss is F.cross_entropy(logits, y, weight=w) with the default mean: torch's
    weighted mean is the oracle for our default reduction."""
    torch.manual_seed(1)
    logits, y = torch.randn(16, 5), torch.randint(5, (16,))
    w = allnc.grw_weights([500, 120, 40, 12, 5], rho=1.2)
    assert allnc.grw_loss(logits, y, w).item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item(), rel=1e-6)
    assert allnc.Config().grw_reduction == "weights" and allnc.Config().p2p_w == "raw"


@pytest.mark.mutation
@pytest.mark.parametrize("dataset,imb,rho", [("cifar10", 200, 1.2), ("cifar10", 100, 1.2), ("cifar10", 50, 1.2),
                                            ("cifar10", 10, 1.0), ("cifar100", 10, 1.2), ("cifar100", 100, 1.2),
                                            ("fmnist", 100, 1.0), ("synthetic", 10, 1.0)])
def test_grw_exponent_follows_glmcs_commands(tmp_path, dataset, imb, rho):
    """GLMC's README: --label_weighting 1.2 on CIFAR-10-LT at rates 0.01/0.02 and all of CIFAR-100-LT,
    1 on CIFAR-10-LT at 0.1; an explicit --grw-rho wins."""
    assert allnc.resolve(allnc.Config(dataset=dataset, imb=imb, out=str(tmp_path))).grw_rho == rho
    assert allnc.resolve(allnc.Config(dataset=dataset, imb=imb, grw_rho=0.5, out=str(tmp_path))).grw_rho == 0.5


@pytest.mark.mutation
def test_gbbn_cls_loss_eq12_endpoints():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.randint(4, (8,))
    w = allnc.grw_weights([40, 20, 10, 5])
    W = torch.randn(4, 6)
    ce = F.cross_entropy(logits, y)
    re = allnc.grw_loss(logits, y, w)
    assert allnc.gbbn_cls_loss(logits, y, 1.0, w, W, True)[0].item() == pytest.approx(ce.item())
    # Eq. 11 as written by default: the raw rows; --p2p-w unit: normalised rows
    raw = ((W @ W.t() - allnc.etf_gram(4)) ** 2).sum() / 16
    assert allnc.gbbn_cls_loss(logits, y, 0.0, w, W, True)[0].item() == pytest.approx((re + raw).item(), rel=1e-6)
    assert allnc.gbbn_cls_loss(logits, y, 0.0, w, W, True, p2p_w="unit")[0].item() == pytest.approx(
        (re + allnc.p2p_loss(W)).item(), rel=1e-6)
    mid = allnc.gbbn_cls_loss(logits, y, 0.3, w, W, False)[0].item()
    assert mid == pytest.approx(0.3 * ce.item() + 0.7 * re.item(), rel=1e-6)


@pytest.mark.mutation
def test_etf_dot_regression_loss_with_ew():
    M = models.simplex_etf(12, 10)
    y = torch.tensor([0, 3, 7])
    assert allnc.etf_dr_loss(M.t()[y], M, y).item() == pytest.approx(0, abs=1e-12)
    h = torch.zeros(3, 12)       # <h, m_y> = 0 -> 0.5 * (0 - 1)^2, Ew = 1 with one sample per class
    assert allnc.etf_dr_loss(h, M, y).item() == pytest.approx(0.5)
    # produce_Ew: Ew_c = sqrt((B / classes in batch) / count_c); B = 4, classes {0, 1}: Ew_0^2 = 2/3, Ew_1^2 = 2
    y2 = torch.tensor([0, 0, 0, 1])
    h2 = torch.zeros(4, 12)
    assert allnc.etf_dr_loss(h2, M, y2, balance=False).item() == pytest.approx(0.5)
    assert allnc.etf_dr_loss(h2, M, y2).item() == pytest.approx(0.5 * (3 * 2 / 3 + 2) / 4)
    # with mixup the counts are the un-mixed batch's, whatever labels the term is for
    yb = torch.tensor([1, 0, 0, 0])
    assert allnc.etf_dr_loss(h2, M, yb, y_count=y2).item() == pytest.approx(0.5 * (2 + 3 * 2 / 3) / 4)
    assert allnc.Config().etf_balance is True


@pytest.mark.mutation
def test_etf_balance_counts_the_given_labels():
    """produce_Ew counts y_count (the un-mixed labels) and weights each sample by its own label's count;
    by default, balance on: Ew_c^2 = (B / classes present) / count_c."""
    M = models.simplex_etf(6, 4)
    h = F.normalize(torch.randn(2, 6, generator=torch.Generator().manual_seed(4)), dim=1)
    y, y_count = torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1])
    per = 0.5 * ((h * M.t()[y]).sum(1) - 1) ** 2
    want = (per * torch.tensor([(4 / 2) / 3, (4 / 2) / 1])).mean()
    assert allnc.etf_dr_loss(h, M, y, True, y_count).item() == pytest.approx(want.item(), rel=1e-6)
    yy = torch.tensor([0, 0, 0, 1])
    hh = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), dim=1)
    per = 0.5 * ((hh * M.t()[yy]).sum(1) - 1) ** 2
    assert allnc.etf_dr_loss(hh, M, yy).item() == pytest.approx((per * torch.tensor([2 / 3] * 3 + [2.0])).mean().item(), rel=1e-6)


@pytest.mark.mutation
def test_cb_loss_matches_weight_balancing_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y, counts, beta = torch.tensor([0, 2]), [100, 10, 1], 0.9
    w = np.array([(1 - beta) / (1 - beta ** n) for n in counts])
    w = w / w.sum() * 3
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    terms = [-w[y[i]] * (np.log(p[i, c]) if c == y[i] else np.log(1 - p[i, c])) for i in range(2) for c in range(3)]
    assert allnc.cb_loss(logits, y, allnc.cb_weights(counts, beta)).item() == pytest.approx(np.mean(terms), rel=1e-5)
    w9 = np.array([(1 - 0.9999) / (1 - 0.9999 ** n) for n in counts])      # weight balancing's default beta
    w9 = w9 / w9.sum() * 3
    for y in (torch.tensor([0, 2]), torch.tensor([0, 1])):                  # the last class absent: still 3 columns
        default = [-w9[y[i]] * (np.log(p[i, c]) if c == y[i] else np.log(1 - p[i, c])) for i in range(2) for c in range(3)]
        assert allnc.cb_loss(logits, y, allnc.cb_weights(counts)).item() == pytest.approx(np.mean(default), rel=1e-5)


@pytest.mark.mutation
def test_stage2_loss_runs_outside_autocast(monkeypatch):
    seen = []
    real = F.binary_cross_entropy
    monkeypatch.setattr(F, "binary_cross_entropy",
                        lambda *a, **k: seen.append(torch.is_autocast_enabled(DEVICE.type)) or real(*a, **k))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        allnc.cb_loss(torch.randn(4, 3, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE),
                      allnc.cb_weights([10, 5, 1]).to(DEVICE))
    assert seen == [False]                   # CUDA's autocast refuses binary_cross_entropy


# ----------------------------------------------------------------------------------------------
# Heads and models

def test_resnet32_parameters_at_both_widths():
    n = models.count_params(models.ResNetCifar(32)) + 64 * 10 + 10
    assert 0.46e6 <= n <= 0.47e6                                  # LDAM/BCL's ResNet-32
    wide = models.ResNetCifar(32, 3, 64)
    assert wide.out_dim == 256 and wide.conv1.out_channels == 64 and wide.layers[-1].conv2.out_channels == 256
    assert 7.35e6 <= models.count_params(wide) + 256 * 10 + 10 <= 7.45e6      # GLMC's resnet32 (nf=64)
    assert models.ResNetCifar(20)(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert models.ResNetCifar(8, 3, 64)(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    assert allnc.resolve(allnc.Config(dataset="cifar100")).width == 64
    assert allnc.resolve(allnc.Config(dataset="fmnist")).width == 16
    assert allnc.resolve(allnc.Config(dataset="cifar10", width=16)).width == 16
    with pytest.raises(ValueError):
        models.ResNetCifar(30)


@pytest.mark.parametrize("method,kw", [("allnc", {}), ("allnc", {"heads": 2, "proj": "mlp"}), ("ce", {}),
                                       ("rbl", {}), ("ncmc", {"width": 16}), ("etf", {})])
def test_heads_and_projections_start_as_glmc_initialises_them(tmp_path, method, kw):
    """GLMC's (and LDAM-DRW's, RBL's backbone's) self.apply(_weights_init): kaiming_normal_ on every
    learned Linear, heads and projections included, so std sqrt(2 / fan_in); PyTorch's default with
    --head-init torch (uniform, std 1 / sqrt(3 fan_in)). The fixed ETF, RBL's orthogonal rotation and
    frame and NCMC's centers are the same under both; biases keep PyTorch's default."""
    built = {}
    for init in ("kaiming", "torch"):
        cfg = tiny_cfg(tmp_path, method=method, width=kw.get("width", 64), head_init=init,
                       **{k: v for k, v in kw.items() if k != "width"})
        torch.manual_seed(0)
        built[init] = allnc.build_model(cfg, 10, [100] * 10, 3)
    for init, model in built.items():
        parts = [model.head] + [p for p in (model.proj1, model.proj2) if p is not None]
        lins = [m for p in parts for m in p.modules() if isinstance(m, torch.nn.Linear)
                and not torch.nn.utils.parametrize.is_parametrized(m)]
        assert len(lins) == {"allnc": 3 + kw.get("heads", 1) + (2 if kw.get("proj") == "mlp" else 0) - 1,
                             "ce": 1, "rbl": 1, "ncmc": 1, "etf": 0}[method]
        for m in lins:
            fan_in = m.weight.shape[1]
            want = math.sqrt(2 / fan_in) if init == "kaiming" else 1 / math.sqrt(3 * fan_in)
            assert m.weight.std().item() == pytest.approx(want, rel=0.12), (init, m)
            assert m.bias.abs().max().item() <= 1 / math.sqrt(fan_in)       # PyTorch's default bias
    fixed = lambda m: {k: v for k, v in m.state_dict().items() if k.startswith("head.") and
                       (k.split(".")[-1] in ("M", "E", "V", "w", "mask", "k") or "parametrizations" in k)}
    a, b = fixed(built["kaiming"]), fixed(built["torch"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert bool(a) == (method in ("etf", "rbl", "ncmc"))
    if method == "rbl":
        R = built["kaiming"].head.rotation()
        assert torch.allclose(R @ R.t(), torch.eye(R.shape[0]), atol=1e-5)


def test_head_init_defaults_by_dataset_and_method(tmp_path):
    """kaiming on CIFAR-scale sets (GLMC's ResNet_cifar.py), PyTorch's default on ImageNet-LT / iNat (its
    Resnet_LT.py) and for RBL everywhere: its classifier Linear(64, 256) is built outside the ResNet_Cifar
    whose __init__ runs self.apply(_weights_init) (qqgroup66666/rbl models/resnet_balancedsoftmax.py).
    A flag the user gives wins."""
    res = lambda **kw: allnc.resolve(allnc.Config(**kw), explicit=tuple(k for k in kw if k == "head_init"))
    assert res(dataset="cifar10").head_init == "kaiming"
    assert res(dataset="fmnist").head_init == "kaiming"
    assert res(dataset="fmnist", method="ce").head_init == "kaiming"
    assert res(dataset="imagenet_lt", imb_type="pareto").head_init == "torch"
    assert res(dataset="cifar10", method="rbl").head_init == "torch"
    assert res(dataset="fmnist", method="rbl").head_init == "torch"
    assert res(dataset="fmnist", method="rbl", head_init="kaiming").head_init == "kaiming"
    cfg = allnc.resolve(allnc.Config(dataset="synthetic", imb=10.0, depth=8, width=64, method="rbl", out=str(tmp_path)))
    torch.manual_seed(0)
    fc = allnc.build_model(cfg, 10, [100] * 10, 3).head.fc          # Linear(256, 256): PyTorch's U(+-1/sqrt(256))
    assert fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    assert fc.weight.abs().max().item() <= 1 / math.sqrt(256)


def test_projection_widths_follow_glmcs_models_by_dataset(tmp_path):
    """proj1 / proj2: GLMC's ResNet_cifar.py Linear(d, 128), Linear(128, 128); its Resnet_LT.py (ImageNet-LT,
    iNaturalist) projection_head Linear(2048, 256), contrast_head Linear(256, 256). --proj-dim wins."""
    for dataset, want in (("cifar10", 128), ("fmnist", 128), ("imagenet_lt", 256), ("inat2018", 256)):
        assert allnc.resolve(allnc.Config(dataset=dataset, imb_type="pareto" if dataset in ("imagenet_lt", "inat2018")
                                          else "exp")).proj_dim == want, dataset
    assert allnc.resolve(allnc.Config(dataset="inat2018", imb_type="pareto", proj_dim=64)).proj_dim == 64
    cfg = allnc.resolve(allnc.Config(dataset="imagenet_lt", imb_type="pareto", imb=1.0, p2p_space="z", out=str(tmp_path)))
    model = allnc.build_model(cfg, 1000, [10] * 1000, 3)
    assert (model.proj1.in_features, model.proj1.out_features) == (2048, 256)
    assert (model.proj2.in_features, model.proj2.out_features) == (256, 256)
    assert tuple(model.mu_run.shape) == (1000, 256)                   # L_p(mu~)'s class means on z


def test_simplex_etf_definition():
    M = models.simplex_etf(64, 10)
    G = M.t() @ M
    assert torch.allclose(G, allnc.etf_gram(10), atol=1e-5)
    with pytest.raises(ValueError):
        models.simplex_etf(5, 10)


def test_etf_needs_c_minus_1_dimensions():
    M = models.simplex_etf(9, 10)                 # C - 1 dimensions are enough for a simplex ETF
    assert torch.allclose(M.t() @ M, allnc.etf_gram(10), atol=1e-5)
    with pytest.raises(ValueError):
        models.simplex_etf(8, 10)
    r = cli("allnc.py", "--dataset", "cifar100", "--method", "etf", "--width", "16", "--epochs", "1")
    assert r.returncode == 2 and "--width 25" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    own = allnc.resolve(allnc.Config(dataset="cifar100", method="etf", recipe="own"))
    assert own.width == 32 and allnc.feature_dim(own) == 128


def test_etf_buffer_survives_save_and_load(tmp_path):
    a = models.Net(models.ResNetCifar(8), models.ETFHead(64, 10, seed=1))
    b = models.Net(models.ResNetCifar(8), models.ETFHead(64, 10, seed=2))
    assert not torch.allclose(a.head.M, b.head.M)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(a.head.M, b.head.M)
    assert "head.M" in a.state_dict() and not any(p is a.head.M for p in a.parameters())


def test_rbl_head_bias_reaches_logits_and_rotation_stays_orthogonal():
    head = models.RotatedETFHead(16, 10)
    assert head.fc.in_features == 16 and head.fc.out_features == 256 and head.fc.bias is not None
    E = torch.eye(256) - torch.ones(256, 256) / 256
    assert torch.equal(head.E, E[:, :10])
    feat = torch.randn(32, 16)
    before = head(feat)[0].detach().clone()
    with torch.no_grad():
        head.fc.bias += torch.randn(256)
    assert not torch.allclose(head(feat)[0], before)          # the bias term reaches the logits
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)         # the recipe's lr
    y = torch.randint(10, (32,))
    R0 = head.rotation().detach().clone()
    assert torch.allclose(R0.t() @ R0, torch.eye(256), atol=1e-5) and torch.det(R0) > 0
    for _ in range(20):
        loss = F.cross_entropy(head(feat)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = head.rotation().detach()
    assert torch.allclose(R.t() @ R, torch.eye(256), atol=1e-4)
    assert (R - R0).abs().max() > 1e-3          # it did rotate
    logits, h = head(feat)
    assert torch.allclose(logits, h @ R @ head.E, atol=1e-4)


@pytest.mark.mutation
def test_ncmc_centers_frames_and_loss():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    k = models.ncmc_center_counts(counts, 20)
    assert k == [1, 2, 3, 4, 6, 10, 17, 28, 45, 74] and sum(k) == 10 * 19
    assert models.ncmc_center_counts(counts, 20, aware=False) == [19] * 10
    head = models.MultiCenterHead(256, 10, k, f=20, theta=0.2)          # 200 frame rows fit in 256 dims
    assert isinstance(head.proj, torch.nn.Identity)
    frame = torch.cat([head.V[i, :n] for i, n in enumerate(k)])
    assert torch.allclose(head.w @ head.w.t(), torch.eye(10), atol=1e-5)
    assert torch.allclose(frame.norm(dim=1), torch.ones(190), atol=1e-5)
    v = torch.cat([(head.V[i, :n] - math.sin(0.2) * head.w[i]) / math.cos(0.2) for i, n in enumerate(k)])
    full = torch.cat([v, head.w])
    assert torch.allclose(full @ full.t(), torch.eye(200), atol=1e-5)   # one orthonormal frame of f*C rows
    narrow = models.MultiCenterHead(64, 10, k)                            # 64 < 200: projected to 200
    assert narrow.proj.out_features == 200 and narrow.w.shape == (10, 200)
    # loss: 0 at a center for a class with one center (|x| = 1); g(k) weights a class's k centers
    y = torch.tensor([0])
    x = head.V[0, :1].clone()
    assert allnc.ncmc_loss(x, head.V, head.mask, head.k, y, 0.2).item() == pytest.approx(0, abs=1e-6)
    y1 = torch.tensor([1])                     # class 1: two centers, x = w_1 (cos = sin(theta) to both)
    g = math.sqrt(math.cos(0.2) ** 2 + 2 * math.sin(0.2) ** 2) / math.sqrt(2)
    want = g * 2 * (1 - math.sin(0.2)) ** 2 + 6e-4 * (3 - 1) ** 2
    got = allnc.ncmc_loss(3 * head.w[1:2], head.V, head.mask, head.k, y1, 0.2).item()
    assert got == pytest.approx(want, rel=1e-5)
    # a batch: x = 0.5 V_00 (cos 1, |x| = 0.5) and x = 3 w_1; the batch mean of each sample's own loss
    both = allnc.ncmc_loss(torch.cat([0.5 * head.V[0, :1], 3 * head.w[1:2]]), head.V, head.mask, head.k,
                           torch.tensor([0, 1]), 0.2).item()
    assert both == pytest.approx((6e-4 * (0.5 - 1) ** 2 + want) / 2, rel=1e-5)
    head.eval()                                 # BN at its initial running stats: identity
    feat = torch.randn(5, 256)
    logits, h = head(feat)
    assert torch.equal(logits.argmax(1), (F.normalize(feat, dim=1) @ head.w.t()).argmax(1))


def test_ncmc_loss_is_float32_under_autocast():
    """NCMC's loss as every other loss: float32 under bf16 autocast, where its einsum would otherwise
    run as a bf16 bmm (8 mantissa bits: a relative error of about 1e-3 in each cosine)."""
    k = models.ncmc_center_counts([500, 300, 100, 50, 20, 10, 5, 5, 5, 5], 20)
    head = models.MultiCenterHead(256, 10, k, f=20, theta=0.2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
    exact = allnc.ncmc_loss(x.double(), head.V.double(), head.mask, head.k.double(), y, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = allnc.ncmc_loss(x, head.V, head.mask, head.k, y, 0.2)
        bf16_cos = torch.einsum("bd,bkd->bk", F.normalize(x, dim=1), head.V[y])      # what autocast makes of it
    assert got.dtype == torch.float32 and bf16_cos.dtype == torch.bfloat16
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)


@pytest.mark.mutation
def test_logits_and_gram_are_float32_under_bf16_autocast():
    model = models.Net(models.ResNetCifar(8), models.LinearHead(64, 10)).to(DEVICE)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        feat, logits, h = model(x)
        v = torch.randn(10, 64, device=DEVICE)
        g_auto = allnc.p2p_loss(v)
    assert logits.dtype == torch.float32 and h.dtype == torch.float32
    assert torch.allclose(logits, model.head.fc(feat), atol=1e-6)
    assert g_auto.item() == pytest.approx(allnc.p2p_loss(v).item(), rel=1e-6)


@pytest.mark.mutation
def test_two_heads_predict_with_the_rebalanced_head(tmp_path):
    cfg, data, st, model = tiny_setup(tmp_path, heads=2, epochs=1)
    with torch.no_grad():
        for fc, cls in ((model.head.fc, 3), (model.head.fc_ce, 5)):
            fc.weight.zero_()
            fc.bias.zero_()
            fc.bias[cls] = 10.0
    acc = allnc.evaluate(model, data, st)["per_class"]
    assert acc[3] == 100 and sum(acc) == 100                 # every prediction is the rebalanced head's
    assert torch.equal(model.head.classifier_weight(), model.head.fc.weight)
    st.eta = 1.0                                              # eta = 1: only the CE term, on the conventional head
    (xs, y), = [next(iter(data.train_batches(1, 2)))]
    loss, _ = allnc.step_allnc(model, xs, y, st)
    loss.backward()
    assert model.head.fc_ce.weight.grad.abs().sum() > 0
    assert model.head.fc.weight.grad is None or model.head.fc.weight.grad.abs().sum() == 0


@pytest.mark.mutation
def test_logit_adjustment_follows_formula():
    logits = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    counts = [90, 10]
    adj = allnc.logit_adjust(logits, counts, tau=1.0)
    expect = logits - torch.log(torch.tensor([0.9, 0.1]))
    assert torch.allclose(adj, expect)
    assert adj.argmax(1).tolist() == [1, 0]            # tie goes to the rare class; a big margin stays
    assert allnc.logit_adjust(logits, counts, tau=0.0).argmax(1).tolist() == [0, 0]


@pytest.mark.mutation
@pytest.mark.parametrize("method", ["rbl", "ce"])
def test_rbl_predicts_by_logit_adjusted_scores_at_test_time(method):
    """RBL's prediction rule: argmax of logit - tau log(N_i / N), tau = --rbl-tau; other methods: the logits."""
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 0.3, 0.2]])
    model = lambda x: (None, logits, None)
    counts = [80, 15, 5]
    st = type("St", (), {"cfg": allnc.Config(method=method, rbl_tau=0.5), "counts": counts})()
    got = allnc.eval_logits(model, torch.zeros(2, 1), st)
    prior = torch.tensor(counts, dtype=torch.float64) / 100
    want = logits.double() - (0.5 * prior.log() if method == "rbl" else 0)
    assert torch.allclose(got.double(), want, atol=1e-6)


class _OneHotModel(torch.nn.Module):
    """phi(x) = x; logits = x W^T + b with W = I and a bias that favours class 0."""

    def __init__(self, bias):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(bias))

    def forward(self, x):
        return x, x + self.b, x


class _TwoClassData:
    C, device, counts = 2, torch.device("cpu"), [90, 10]

    def plain(self, train):
        x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
        yield x, torch.tensor([0] * 4 + [1] * 4)


@pytest.mark.mutation
def test_decoupled_scores_find_the_tail_the_head_misses():
    """Features that separate the classes, a bias that favours the head class: the head gets Few 0;
    logit adjustment by hand: class-1 logits [1.5, 1] - log([0.9, 0.1]) = [1.61, 3.30] -> class 1,
    class-0 logits [2.5, 0] -> [2.61, 2.30] -> class 0, so 100; nearest class mean: 100."""
    model, data = _OneHotModel([1.5, 0.0]), _TwoClassData()
    st = type("St", (), {"cfg": allnc.Config(method="ce"), "counts": data.counts, "dist": allnc.Dist()})()
    head = allnc.evaluate(model, data, st)
    d = allnc.decoupled_scores(model, data, st, head)
    assert d["head"]["top1"] == 50 and d["head"]["few"] == 0 and d["head"]["medium"] == 100
    assert d["logit_adjusted"]["top1"] == 100 and d["logit_adjusted"]["few"] == 100
    assert d["ncm"]["top1"] == 100 and d["ncm"]["few"] == 100
    model.b.data = torch.tensor([3.5, 0.0])               # gap 3.5 - 1 > log 9: LA no longer recovers class 1
    assert allnc.decoupled_scores(model, data, st, head)["logit_adjusted"]["few"] == 0
    st.cfg = allnc.Config(method="etf")                   # LA does not apply to a fixed, balanced head
    d = allnc.decoupled_scores(model, data, st, head)
    assert d["logit_adjusted"] is None and "ETF" in d["la_not_applicable"]


# ----------------------------------------------------------------------------------------------
# Training steps and the loop: every method's step, Eq. 14 by hand, a batch split over processes,
# AllNC++'s stage 2 and MaxNorm

@pytest.mark.device
@pytest.mark.mutation
@pytest.mark.parametrize("method,space", [(m, "z") for m in allnc.METHODS] + [("allnc", "feature")])
def test_each_method_trains_one_step(tmp_path, method, space):
    cfg, data, st, model = tiny_setup(tmp_path, method=method, p2p_space=space)
    st.eta = 0.5
    opt = allnc.make_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, y = next(iter(data.train_batches(1, allnc.VIEWS[method])))
    loss, terms = allnc.STEPS[method](model, xs, y, st)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.isfinite(loss)
    # every part the method trains got a gradient and moved: encoder and head; AllNC's proj1 and proj2 too
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    parts = ("encoder.", "head.") + (("proj1.", "proj2.") if method.startswith("allnc") else ())
    assert all(any(n.startswith(part) for n in trained) for part in parts), (parts, sorted(trained))
    assert all(not torch.equal(before[n], after[n]) for n in trained), trained
    for fixed in ("head.M", "head.w", "head.V", "head.E"):
        if fixed in before:
            assert torch.equal(before[fixed], after[fixed])
    if method.startswith("allnc"):
        assert set(terms) == {"ce", "grw", "p2p_w", "hycon", "p2p_mu"}
        assert model.mu_seen.sum() == (torch.bincount(y, minlength=data.C) > 0).sum()
        assert model.mu_run.shape[1] == (cfg.proj_dim if space == "z" else model.encoder.out_dim)


@pytest.mark.mutation
def test_allnc_total_is_eq14(tmp_path):
    cfg, data, st, model = tiny_setup(tmp_path, alpha=0.7)
    model.eval()                                          # eval: BN is deterministic
    st.eta = 0.4
    xs, y = next(iter(data.train_batches(1, 2)))
    total, t = allnc.step_allnc(model, xs, y, st)
    cls = lambda: 0.4 * t["ce"] + 0.6 * (t["grw"] + t["p2p_w"])     # t holds the mean over both views
    assert total.item() == pytest.approx((2 * cls() + 0.7 * (t["hycon"] + t["p2p_mu"])).item(), rel=1e-5)


@pytest.mark.mutation
@pytest.mark.parametrize("flag", ["no_hycon", "no_p2p"])
def test_ablation_flags_drop_exactly_their_terms(tmp_path, flag):
    """Table VII: --no-hycon drops alpha L_con; --no-p2p drops alpha L_p(mu~) and L_p(w) in both views'
    (1 - eta) part; every other term and the total's remainder stay as they were."""
    full_cfg = tiny_cfg(tmp_path, alpha=0.7)
    cfg = dataclasses.replace(full_cfg, **{flag: True})
    data = make_data(full_cfg)
    xs, y = next(iter(data.train_batches(1, 2)))
    torch.manual_seed(0)
    model = allnc.build_model(full_cfg, data.C, data.counts, data.in_channels).to(DEVICE).eval()
    out = {}
    for name, c in (("full", full_cfg), ("ablated", cfg)):
        st = allnc.TrainState(c, data, DEVICE)
        st.eta = 0.4
        out[name] = allnc.step_allnc(copy.deepcopy(model), xs, y, st)
    (full, t), (abl, ta) = out["full"], out["ablated"]
    dropped = {"no_hycon": ("hycon",), "no_p2p": ("p2p_mu", "p2p_w")}[flag]
    assert all(ta[k].item() == 0 for k in dropped) and all(t[k].item() != 0 for k in dropped)
    assert all(ta[k].item() == pytest.approx(t[k].item(), rel=1e-6) for k in t if k not in dropped)
    less = 0.7 * t["hycon"] if flag == "no_hycon" else 0.7 * t["p2p_mu"] + 2 * 0.6 * t["p2p_w"]
    assert abl.item() == pytest.approx((full - less).item(), rel=1e-5)


@pytest.mark.mutation
@pytest.mark.parametrize("reduction", ["weights", "batch"])
def test_allnc_step_against_the_paper_by_hand(tmp_path, reduction):
    """Eq. 14 on a hand-made batch, every term from the paper's formulas in this test: GRW (DisAlign's
    weighted mean, or GLMC's 1/B sum with --grw-reduction batch), L_p(w) on the raw rows (Eq. 11), HyCon's cross-view pairing with class means u
    (Eq. 8), L_p(mu~) over the centred, normalised class means (Eq. 10) where classes absent from the
    batch enter by their running mean, never-seen classes are left out (mu_G and the denominator), and
    the running means after the step (first sighting: the batch mean; then momentum 0.9)."""
    cfg = tiny_cfg(tmp_path, alpha=0.7, grw_reduction=reduction, p2p_space="z")     # the feature space: below
    C, eta, m = 10, 0.4, cfg.mean_momentum
    counts = data_lt.split_counts("synthetic", 10)
    st = allnc.TrainState(cfg, type("D", (), {"C": C, "counts": counts})(), DEVICE)
    st.eta = eta
    torch.manual_seed(0)
    model = allnc.build_model(cfg, C, counts, 3).to(DEVICE).eval()         # eval: BN is deterministic
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3], device=DEVICE)               # classes 4..9 absent
    views = [torch.randn(8, 3, 16, 16, device=DEVICE) for _ in range(2)]
    seen_before = torch.tensor([True, False, False, False, True, True, True, False, False, False], device=DEVICE)
    old = torch.randn(C, cfg.proj_dim, device=DEVICE) * seen_before[:, None]
    model.mu_run.copy_(old)
    model.mu_seen.copy_(seen_before)
    with torch.no_grad():
        feat, logits, _ = model(torch.cat(views))
        z = model.proj1(feat).double()
        h = model.proj2(model.proj1(feat)).double()
        logits, W = logits.double(), model.head.fc.weight.double()
    n = torch.tensor(counts, dtype=torch.float64)
    w = (n.sum() / n) / (n.sum() / n).sum() * C                              # GRW weights, rho 1, sum C
    rho = torch.full((C, C), -1 / (C - 1), dtype=torch.float64) + torch.eye(C, dtype=torch.float64) * (1 + 1 / (C - 1))
    p2p_w = ((W @ W.t() - rho) ** 2).sum() / C ** 2
    B, yl = 8, y.tolist()
    cls, u = [], []
    for v in range(2):
        ce_i = -torch.log_softmax(logits[v * B:(v + 1) * B], 1)[torch.arange(B), y]
        grw = (w[y.cpu()].to(ce_i) * ce_i).sum() / (w[y.cpu()].sum().item() if reduction == "weights" else B)
        cls.append(eta * ce_i.mean() + (1 - eta) * (grw + p2p_w))
        zv = z[v * B:(v + 1) * B]
        u.append(torch.stack([zv[[j for j in range(B) if yl[j] == yl[i]]].mean(0) for i in range(B)]))
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    z1, z2, h1, h2 = z[:B], z[B:], h[:B], h[B:]
    hycon = (-cos(h1, z2) - cos(u[1], z2) - cos(h2, z1) - cos(u[0], z1)).mean()
    batch_mu = {c: (z1[y == c].mean(0) + z2[y == c].mean(0)) / 2 for c in set(yl)}
    avail = [c for c in range(C) if c in batch_mu or seen_before[c]]
    mu = torch.stack([batch_mu[c] if c in batch_mu else old[c].double() for c in avail])
    v_ = mu - mu.mean(0)
    v_ = v_ / v_.norm(dim=1, keepdim=True)
    idx = torch.tensor(avail)
    p2p_mu = ((v_ @ v_.t() - rho[idx][:, idx]) ** 2).sum() / len(avail) ** 2
    total, t = allnc.step_allnc(model, views, y, st)
    assert t["hycon"].item() == pytest.approx(hycon.item(), rel=1e-4)
    assert t["p2p_mu"].item() == pytest.approx(p2p_mu.item(), rel=1e-4)
    assert t["p2p_w"].item() == pytest.approx(p2p_w.item(), rel=1e-4)
    want = cls[0] + cls[1] + 0.7 * (hycon + p2p_mu)
    assert total.item() == pytest.approx(want.item(), rel=1e-4)
    for c in range(C):                                                         # running means after the step
        expect = (m * old[c].double() + (1 - m) * batch_mu[c] if seen_before[c] else batch_mu[c]) if c in batch_mu \
            else old[c].double()
        assert torch.allclose(model.mu_run[c].double(), expect, atol=1e-5), c
    assert model.mu_seen.tolist() == [c in batch_mu or bool(seen_before[c]) for c in range(C)]


@pytest.mark.mutation
def test_p2p_on_feature_means_by_hand(tmp_path):
    """--p2p-space feature: L_p(mu~) of Eq. 10 on the class means of phi(x) (the mean of the two views'
    batch means), centred on their unweighted mean; every class seen for the first time."""
    cfg, data, st, model = tiny_setup(tmp_path, init_seed=0, p2p_space="feature")
    model.eval()
    (v1, v2), y = next(iter(data.train_batches(1, 2)))
    with torch.no_grad():
        f = model(torch.cat([v1, v2]))[0].double()
    B, present = len(y), sorted(set(y.tolist()))
    mu = torch.stack([(f[:B][y == c].mean(0) + f[B:][y == c].mean(0)) / 2 for c in present])
    v = mu - mu.mean(0)
    v = v / v.norm(dim=1, keepdim=True)
    n = len(present)
    rho = torch.full((n, n), -1 / (data.C - 1), dtype=torch.float64) + torch.eye(n, dtype=torch.float64) * (1 + 1 / (data.C - 1))
    want = ((v @ v.t() - rho) ** 2).sum() / n ** 2
    _, t = allnc.step_allnc(model, [v1, v2], y, st)
    assert t["p2p_mu"].item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.allclose(model.mu_run[present].double(), mu, atol=1e-5)


@pytest.mark.mutation
def test_second_heads_ce_term_is_float32_under_bf16_autocast(tmp_path):
    """--heads 2: the CE term of Eq. 12 on the conventional head's logits, computed in float32 from the
    features even when the step runs under bf16 autocast (a bf16 product would be off by about 1e-3)."""
    cfg = tiny_cfg(tmp_path, heads=2)
    counts = data_lt.split_counts("synthetic", 10)
    st = allnc.TrainState(cfg, type("D", (), {"C": 10, "counts": counts})(), DEVICE)
    torch.manual_seed(0)
    model = allnc.build_model(cfg, 10, counts, 3).to(DEVICE).eval()
    y = torch.arange(8, device=DEVICE) % 10
    views = [torch.randn(8, 3, 16, 16, device=DEVICE) for _ in range(2)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        feat = model(torch.cat(views))[0]
        _, t = allnc.step_allnc(model, views, y, st)
    fc = model.head.fc_ce
    logits = feat.double() @ fc.weight.double().t() + fc.bias.double()
    ce = [F.cross_entropy(logits[v * 8:(v + 1) * 8], y) for v in range(2)]
    assert t["ce"].item() == pytest.approx(((ce[0] + ce[1]) / 2).item(), rel=1e-5)


class PartnerDist:
    """Process `me` of two, in one process: sum() adds what the partner passed to its own sum() at the
    same call (recorded in a first pass, where the partner's contributions are not known yet)."""
    world, on = 2, True

    def __init__(self, partner_calls=None):
        self.calls, self.partner, self.i = [], partner_calls, 0

    def sum(self, t):
        self.calls.append(t.detach().clone())
        self.i += 1
        return t + self.partner[self.i - 1] if self.partner is not None else t


def on_two_processes(fn, part_a, part_b):
    """fn(*part, dist) as each of two processes would compute it: what every process gets back."""
    rec_a, rec_b = PartnerDist(), PartnerDist()
    fn(*part_a, rec_a), fn(*part_b, rec_b)
    return fn(*part_a, PartnerDist(rec_b.calls)), fn(*part_b, PartnerDist(rec_a.calls))


@pytest.mark.mutation
def test_losses_over_two_processes_are_the_global_batch_losses():
    """Under torchrun each process holds half of the global batch; DDP averages the processes'
    gradients, so the mean over processes of each process's loss must be the loss of the whole batch
    (GRW: torch's weighted cross-entropy on it; the ETF loss's Ew counts the whole batch), and the
    class means every process gets are the whole batch's."""
    torch.manual_seed(2)
    logits, y = torch.randn(12, 4), torch.tensor([0, 0, 0, 0, 1, 1, 2, 0, 1, 3, 3, 0])
    w = allnc.grw_weights([50, 20, 8, 3], rho=1.2)
    a, b = (logits[:6], y[:6], w), (logits[6:], y[6:], w)
    la, lb = on_two_processes(lambda lg, yy, ww, d: allnc.grw_loss(lg, yy, ww, "weights", d), a, b)
    assert ((la + lb) / 2).item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item(), rel=1e-6)
    z = torch.randn(12, 3)
    (ma, pa), (mb, pb) = on_two_processes(lambda zz, yy, d: allnc.batch_class_means(zz, yy, 4, d), (z[:6], y[:6]),
                                          (z[6:], y[6:]))
    want = torch.stack([z[y == c].mean(0) for c in range(4)])
    assert torch.allclose(ma, want, atol=1e-6) and torch.allclose(mb, want, atol=1e-6)
    assert pa.tolist() == pb.tolist() == [True, True, True, True]          # class 3 only on the second
    M = models.simplex_etf(6, 4)
    h = F.normalize(torch.randn(12, 6), dim=1)
    ea, eb = on_two_processes(lambda hh, yy, d: allnc.etf_dr_loss(hh, M, yy, True, None, d), (h[:6], y[:6]),
                              (h[6:], y[6:]))
    cnt = torch.bincount(y, minlength=4).float()            # produce_Ew on the whole batch, by hand
    ew2 = (len(y) / 4) / cnt[y]
    want = (0.5 * ew2 * ((h * M.t()[y]).sum(1) - 1) ** 2).mean()
    assert ((ea + eb) / 2).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.mutation
@pytest.mark.parametrize("space", ["z", "feature"])
def test_allnc_step_over_two_processes_is_the_whole_batch_step(tmp_path, space):
    """AllNC's step on each half of a batch, the processes' sums exchanged (PartnerDist): the mean of
    the two processes' totals and terms is the one-process step on the whole batch (DDP averages the
    gradients), and both update the running means to the whole batch's."""
    cfg, data, _, model = tiny_setup(tmp_path, init_seed=0, alpha=0.7, p2p_space=space)
    model.eval()                                          # BN per sample
    (v1, v2), y = next(iter(data.train_batches(1, 2)))
    half = len(y) // 2
    models_ = {}

    def step(views, yy, dist, key):
        st = allnc.TrainState(cfg, data, DEVICE, dist)
        st.eta = 0.4
        models_[key] = copy.deepcopy(model)
        return allnc.step_allnc(models_[key], views, yy, st)
    whole = step([v1, v2], y, None, "whole")
    part = lambda sl: ([v1[sl], v2[sl]], y[sl])
    (pa, pb), parts = (PartnerDist(), PartnerDist()), (part(slice(None, half)), part(slice(half, None)))
    step(*parts[0], pa, "ra"), step(*parts[1], pb, "rb")
    a = step(*parts[0], PartnerDist(pb.calls), "a")
    b = step(*parts[1], PartnerDist(pa.calls), "b")
    assert ((a[0] + b[0]) / 2).item() == pytest.approx(whole[0].item(), rel=1e-5)
    for k in whole[1]:
        assert ((a[1][k] + b[1][k]) / 2).item() == pytest.approx(whole[1][k].item(), rel=1e-5, abs=1e-7), k
    for key in ("a", "b"):
        assert torch.allclose(models_[key].mu_run, models_["whole"].mu_run, atol=1e-5)
        assert torch.equal(models_[key].mu_seen, models_["whole"].mu_seen)


@pytest.mark.mutation
@pytest.mark.parametrize("bn", ["batch", "frozen"])
def test_stage2_step_trains_the_head_alone_on_frozen_features(tmp_path, bn):
    """AllNC++ stage 2 (weight balancing's demo 2 through trainval.py's train_model): no encoder weight
    changes or gets a gradient; its BatchNorm runs as model.train() leaves it (batch statistics, running
    statistics re-estimated), or, with --wb-stage2-bn frozen, in eval mode with stage 1's statistics; the
    loss is the class-balanced loss of the head's logits; only the head gets a gradient."""
    cfg, data, st, model = tiny_setup(tmp_path, method="allnc++", wb_stage2_epochs=1, wb_stage2_bn=bn)
    model.train()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    ref = copy.deepcopy(model)
    (x,), y = next(iter(data.train_batches(1, 1)))
    loss, terms = allnc.step_stage2(model, [x], y, st)
    loss.backward()
    after = model.encoder.state_dict()
    weights = {k for k, _ in model.encoder.named_parameters()}
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert weights and running and all(torch.equal(before[k], after[k]) for k in weights)
    moved = [not torch.allclose(before[k], after[k]) for k in running]
    assert all(moved) if bn == "batch" else not any(moved)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    ref.encoder.train(bn == "batch")          # batch statistics of this batch, or stage 1's running ones
    with torch.no_grad():
        logits = ref.head.fc(ref.encoder(x).float()).double()
    n = torch.tensor(data.counts, dtype=torch.float64)
    w = (1 - 0.9999) / (1 - 0.9999 ** n)
    w = w / w.sum() * len(n)
    p, onehot = logits.softmax(1), F.one_hot(y, len(n)).double()
    want = -(w[y][:, None] * (onehot * p.log() + (1 - onehot) * (1 - p).log())).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and set(terms) == {"cb"}


@pytest.mark.mutation
def test_maxnorm_relative_threshold_on_hand_made_weights():
    W = torch.tensor([[1.0, 0], [0, 2], [3, 0], [0, 5]])
    cap = allnc.maxnorm_cap(W, 0.5)                          # 1 + 0.5 (5 - 1)
    assert cap == pytest.approx(3.0)
    allnc.max_norm_(W, cap)
    assert W.norm(dim=1).tolist() == pytest.approx([1, 2, 3, 3])
    assert W[3].tolist() == pytest.approx([0, 3])           # scaled, not clipped per entry
    assert allnc.maxnorm_cap(W, 0.25, "absolute") == 0.25
    small = torch.tensor([[0.3, 0.4], [0.1, 0.0]])          # norms below 1: 0.5 is capped to 0.2, 0.1 stays
    allnc.max_norm_(small, 0.2)
    assert small.norm(dim=1).tolist() == pytest.approx([0.2, 0.1])


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_allnc_plus_plus_maxnorm_once_per_epoch_and_stage2(tmp_path, monkeypatch, every):
    calls = []
    real = allnc.max_norm_
    monkeypatch.setattr(allnc, "max_norm_", lambda W, cap: (calls.append(cap), real(W, cap)))
    caps = []
    real_cap = allnc.maxnorm_cap
    monkeypatch.setattr(allnc, "maxnorm_cap", lambda *a: caps.append(real_cap(*a)) or caps[-1])
    cfg = tiny_cfg(tmp_path, method="allnc++", epochs=2, wb_stage2_epochs=2, nc_every=0, maxnorm_every=every)
    res = allnc.run(cfg, quiet=True)
    assert [r["stage"] for r in res["log"]] == [1, 1, 2, 2]
    steps = len(data_lt.epoch_batches(res["n_train"], cfg.batch_size, 0, 0))
    assert len(caps) == 1                                    # one cap, taken at the start of stage 2
    assert len(calls) == (2 if every == "epoch" else 2 * steps) and set(calls) == {caps[0]}
    assert "cb" in res["log"][-1] and [r["lr"] for r in res["log"][2:]] == pytest.approx([0.005, 0.0])


# ----------------------------------------------------------------------------------------------
# Schedules: learning rate, GBBN's eta, warm-up, stage 2's schedule

@pytest.mark.mutation
def test_gbbn_eta_eq13():
    assert allnc.gbbn_eta(0, 200, 2) == 1.0
    assert allnc.gbbn_eta(200, 200, 2) == 0.0
    assert allnc.gbbn_eta(100, 200, 2) == pytest.approx(0.75)
    assert allnc.gbbn_eta(100, 200, 0.5) == pytest.approx(1 - math.sqrt(0.5))
    assert allnc.gbbn_eta(50, 200, 4) > allnc.gbbn_eta(50, 200, 1)   # larger gamma: longer on features
    assert allnc.bbn_eta(1, 200) == 1.0 and allnc.bbn_eta(101, 200) == pytest.approx(0.75)


@pytest.mark.mutation
def test_lr_schedule_per_epoch_as_glmc_and_paco():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)   # GLMC's CIFAR schedule
    for e in range(200):
        assert allnc.lr_at(e, 200, 0.01, 0) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    # PaCo's adjust_learning_rate (GLMC ImageNet-LT/iNat): (e+1)/10 warm-up, then cosine from e=10
    assert allnc.lr_at(0, 100, 0.1, 10) == pytest.approx(0.01)
    assert allnc.lr_at(9, 100, 0.1, 10) == pytest.approx(0.1)
    assert allnc.lr_at(10, 100, 0.1, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 91)))
    for e in range(10, 100):            # lr * 0.5 (1 + cos(pi (epoch - warmup + 1) / (epochs - warmup + 1)))
        assert allnc.lr_at(e, 100, 0.1, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * (e - 9) / 91)), rel=1e-9)
    for e in range(8, 600):             # RBL's run/utils.py: the same with (end - begin) = 592 in the denominator
        want = 0.05 * (1 + math.cos(math.pi * (e - 7) / 592))
        assert allnc.lr_at(e, 600, 0.1, 8, "cosine-rbl", warmup_start=0.5) == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert allnc.resolve(allnc.Config(dataset="cifar10")).warmup == 0


@pytest.mark.mutation
def test_step_and_rbl_schedules():
    lr = [allnc.lr_at(e, 200, 0.1, 5, "step", (160, 180), 0.1) for e in range(200)]
    assert lr[0] == pytest.approx(0.02) and lr[4] == pytest.approx(0.1) and lr[159] == pytest.approx(0.1)
    assert lr[160] == pytest.approx(0.01) and lr[180] == pytest.approx(0.001)
    # RBL run/utils.py: lr/2 + lr/2 (e+1)/8, then cos_decay with (end - begin) = 592 in the denominator
    assert allnc.lr_at(0, 600, 0.1, 8, "cosine-rbl", warmup_start=0.5) == pytest.approx(0.05 + 0.05 / 8)
    assert allnc.lr_at(7, 600, 0.1, 8, "cosine-rbl", warmup_start=0.5) == pytest.approx(0.1)
    assert allnc.lr_at(8, 600, 0.1, 8, "cosine-rbl", warmup_start=0.5) == \
        pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 592)))


@pytest.mark.mutation
def test_warmup_defaults_and_short_run_cap():
    big = allnc.resolve(allnc.Config(dataset="imagenet_lt", imb_type="pareto"))
    assert (big.warmup, big.epochs, allnc.warmup_epochs(big)) == (10, 90, 10)
    assert allnc.warmup_epochs(allnc.resolve(allnc.Config(dataset="imagenet_lt", epochs=10))) == 2
    short = allnc.warmup_epochs(allnc.resolve(allnc.Config(dataset="imagenet_lt", epochs=7)))
    assert short == 1 and isinstance(short, int)                      # whole epochs: 7 // 5


def loop_epochs(tmp_path, monkeypatch, **kw):
    """What train() hands each epoch (epoch, lr, eta, stage 2?, optimizer, MaxNorm cap), with the
    epoch's steps, evaluation and NC metrics stubbed out; and the model."""
    cfg, data, st, model = tiny_setup(tmp_path, method="allnc++", wb_stage2_epochs=2, **kw)
    seen = []

    def one_epoch(model, data, st, rs, epoch, lr, stage2=False):
        seen.append((epoch, lr, st.eta, stage2, rs.opt, st.maxnorm_cap))
        return {"lr": lr, "img_per_s": 1.0, "time": 1.0}
    monkeypatch.setattr(allnc, "train_epoch", one_epoch)
    monkeypatch.setattr(allnc, "evaluate", lambda *a, **k: {"top1": 0.0})
    monkeypatch.setattr(allnc, "train_nc_metrics", lambda *a, **k: {})
    monkeypatch.setattr(allnc, "decoupled_scores", lambda *a, **k: {})
    allnc.train(cfg, model, data, st, allnc.Run(cfg, model, st))
    return cfg, model, seen


@pytest.mark.mutation
@pytest.mark.parametrize("flags,eta", [({}, lambda T: 1 - (T / 5) ** 2), ({"gamma": 0.5}, lambda T: 1 - (T / 5) ** 0.5),
                                       ({"no_gbbn": True}, lambda T: 0.0),
                                       ({"fixed_gamma": True}, lambda T: 1 - ((T - 1) / 5) ** 2)])
def test_the_loop_applies_eta_lr_and_stage_2_per_epoch(tmp_path, monkeypatch, flags, eta):
    """What train() hands each epoch, written from the paper and the public code: eta of Eq. 13 at
    T = 1..T_max (BBN's schedule with --fixed-gamma, 0 with --no-gbbn), kept through AllNC++'s stage 2;
    GLMC's cosine lr, then stage 2's own cosine from --wb-stage2-lr; from stage 2 on an optimizer over
    the head alone with --wb-stage2-wd, and MaxNorm's cap from the row norms at that point."""
    cfg, model, seen = loop_epochs(tmp_path, monkeypatch, epochs=5, lr=0.02, **flags)
    assert [s[0] for s in seen] == list(range(1, 8)) and [s[3] for s in seen] == [False] * 5 + [True] * 2
    assert [s[2] for s in seen] == pytest.approx([eta(T) for T in range(1, 6)] + [eta(5)] * 2)
    cos = lambda base, e, n: base * 0.5 * (1 + math.cos(math.pi * e / n))
    # stage 2: weight balancing's schedulerW.step() before each epoch: epoch k of 2 at the cosine's k-th value
    assert [s[1] for s in seen] == pytest.approx([cos(0.02, e, 5) for e in range(5)] + [0.005, 0.0])
    one, two = seen[0][4], seen[5][4]
    assert len(one.param_groups[0]["params"]) == len(list(model.parameters())) and one.param_groups[0]["weight_decay"] == cfg.wd
    assert [id(p) for p in two.param_groups[0]["params"]] == [id(p) for p in model.head.parameters()]
    assert two.param_groups[0]["weight_decay"] == 0.1 and seen[6][4] is two
    n = model.head.fc.weight.detach().norm(dim=1)
    assert seen[4][5] is None and seen[5][5] == pytest.approx((n.min() + 0.1 * (n.max() - n.min())).item())


@pytest.mark.mutation
def test_the_loop_applies_a_warm_up_and_the_step_schedule(tmp_path, monkeypatch):
    """--warmup 2 from half the lr (RBL-style warmup_start), then LDAM-DRW's steps at 0-based epochs 5
    and 8 by a factor 0.1; an absolute MaxNorm cap is the threshold itself."""
    _, _, seen = loop_epochs(tmp_path, monkeypatch, epochs=10, lr=0.1, warmup=2, warmup_start=0.5,
                             lr_schedule="step", lr_steps="5,8", lr_step_factor=0.1, maxnorm_mode="absolute",
                             maxnorm=0.5)
    want = [0.075, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001]
    assert [s[1] for s in seen[:10]] == pytest.approx(want)
    assert seen[10][5] == 0.5


# ----------------------------------------------------------------------------------------------
# Data and augmentation: splits, loaders, the two views, RandAugment, mixup and cutout

@pytest.mark.parametrize("dataset,imb,total", [
    ("cifar10", 200, 11203), ("cifar10", 100, 12406), ("cifar10", 50, 13996), ("cifar10", 10, 20431),
    ("cifar100", 200, 9502), ("cifar100", 100, 10847), ("cifar100", 50, 12608), ("cifar100", 10, 19573)])
def test_cifar_lt_totals(dataset, imb, total):
    assert sum(data_lt.split_counts(dataset, imb)) == total


def test_exp_and_pareto_profiles():
    c = data_lt.exp_counts(500, 100, 100)
    assert c[0] == 500 and c[-1] == 5 and all(a >= b for a, b in zip(c, c[1:]))
    assert data_lt.exp_counts(500, 10, 1) == [500] * 10
    p = data_lt.pareto_counts(1000, 1280, 5)
    assert p[0] == 1280 and p[-1] == 5 and all(a >= b for a, b in zip(p, p[1:]))
    assert p[500] < (1280 + 5) / 2          # heavy head, long tail
    assert data_lt.pareto_counts(10, 50, 50) == [50] * 10


def test_n_max_shrinks_the_long_tail_profile():
    """--n-max N: the largest class keeps N images and the profile N * imb^(-c/(C-1)) follows."""
    assert data_lt.split_counts("fmnist", 100, "exp", 1000) == [int(1000 * 100 ** (-c / 9)) for c in range(10)]
    assert data_lt.split_counts("fmnist", 100, "exp", None) == data_lt.split_counts("fmnist", 100)
    plain = allnc.resolve(allnc.Config(dataset="fmnist"))
    small = allnc.resolve(allnc.Config(dataset="fmnist", n_max=1000))
    assert allnc.run_name(plain) != allnc.run_name(small) and "N_max 1000" in allnc.protocol_line(dataclasses.asdict(small))
    assert "N_max" not in allnc.protocol_line(dataclasses.asdict(plain))
    with pytest.raises(data_lt.DataError, match="--n-max 7000 is invalid for fmnist: give 1 to 6000"):
        allnc.resolve(allnc.Config(dataset="fmnist", n_max=7000))


def test_counts_cli_prints_json_and_rejects_bad_imb():
    r = cli("data_lt.py", "--dataset", "cifar10", "--imb", "200", "--counts")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["total"] == 11203 and d["counts"][-1] == 25
    r = cli("data_lt.py", "--dataset", "cifar10", "--imb", "0.5", "--counts")
    assert r.returncode == 2 and "below 1" in r.stderr and "Traceback" not in r.stderr


def test_ldam_subset_replays_numpy_recipe():
    y = torch.tensor(np.random.default_rng(3).integers(0, 4, 400))
    counts = [60, 30, 15, 7]
    np.random.seed(0)                                 # LDAM-DRW imbalance_cifar.py, verbatim recipe
    want = []
    targets = np.array(y.tolist(), dtype=np.int64)
    for c, n in zip(np.unique(targets), counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        want.extend(idx[:n].tolist())
    state = np.random.get_state()
    assert data_lt.long_tail_indices(y, counts).tolist() == want
    assert np.random.get_state()[1].tolist() == state[1].tolist()      # numpy's global RNG untouched
    first = data_lt.long_tail_indices(y, counts, "first").tolist()
    assert first != sorted(want) and first == sorted(first)
    assert [i for i in first if y[i] == 2] == [i for i in range(len(y)) if y[i] == 2][:15]


def write_cifar(root, C, per_class, name):
    """Tiny files in the real CIFAR python pickle format (labels cycle through the classes)."""
    rng = np.random.default_rng(0)
    n = C * per_class
    labels = [i % C for i in range(n)]
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(n) % 256          # a marker: file order is visible in pixel (0,0,R)
    if name == "cifar10":
        d = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(d)
        chunks = np.array_split(np.arange(n), 5)
        for i, idx in enumerate(chunks):
            with open(os.path.join(d, f"data_batch_{i + 1}"), "wb") as f:
                pickle.dump({"data": data[idx], "labels": [labels[j] for j in idx]}, f, protocol=2)
        with open(os.path.join(d, "test_batch"), "wb") as f:
            pickle.dump({"data": data[:C * 2], "labels": labels[:C * 2]}, f, protocol=2)
        with open(os.path.join(d, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(C)]}, f)
    else:
        d = os.path.join(root, "cifar-100-python")
        os.makedirs(d)
        for split, rows in (("train", slice(None)), ("test", slice(0, C * 2))):
            with open(os.path.join(d, split), "wb") as f:
                pickle.dump({"data": data[rows], "fine_labels": labels[rows]}, f, protocol=2)
        with open(os.path.join(d, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(C)]}, f)
    return data, labels


@pytest.mark.parametrize("name,C", [("cifar10", 10), ("cifar100", 100)])
def test_real_cifar_loader_on_tiny_pickles(tmp_path, monkeypatch, name, C):
    import torchvision.datasets.cifar as tv_cifar
    raw, labels = write_cifar(str(tmp_path), C, 6, name)
    # Our files cannot match the real archives' MD5 sums; everything else is torchvision's own code.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.exists(path))
    x, y = data_lt.load_tensor_dataset(name, str(tmp_path), True, download=False)
    assert x.shape == (C * 6, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == labels
    assert torch.equal(x[7], torch.from_numpy(raw[7].reshape(3, 32, 32)))
    counts = [6, 4, 2] + [1] * (C - 3)
    keep = data_lt.long_tail_indices(y, counts, "first")
    assert torch.bincount(y[keep], minlength=C).tolist() == counts
    first0 = [i for i in range(len(labels)) if labels[i] == 0][:6]
    assert [i for i in keep.tolist() if labels[i] == 0] == first0          # first n_c in file order
    xt, yt = data_lt.load_tensor_dataset(name, str(tmp_path), False, download=False)
    assert len(xt) == C * 2


def test_cifar_missing_offline_says_where_files_go(tmp_path, monkeypatch):
    r = cli("allnc.py", "--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "cifar-10-batches-py" in r.stderr
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("no network")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(data_lt.DataError, match="download .*cifar-10-python.tar.gz"):
        data_lt.load_tensor_dataset("cifar10", str(tmp_path), True, download=True)


def test_fashion_mnist_from_debian_package():
    x, y = data_lt.load_tensor_dataset("fmnist", "/nonexistent", True, download=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10


def test_imagefolder_path_with_pareto_split_and_list_files(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", [12, 7, 3]), ("val", [2, 2, 2])):
        for c, k in enumerate(n):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(k):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    tr, C = data_lt.folder_samples("imagenet_lt", str(tmp_path), True, imb=4)
    counts = torch.bincount(torch.tensor([s[1] for s in tr])).tolist()
    assert C == 3 and counts[0] == 12 and counts[-1] == 3 and counts == sorted(counts, reverse=True)
    lst = tmp_path / "train.txt"
    lst.write_text("train/class0/0.png 0\ntrain/class2/1.png 2\n")
    tr2, C2 = data_lt.folder_samples("imagenet_lt", str(tmp_path), True, train_list=str(lst))
    assert C2 == 3 and tr2[1] == (str(tmp_path / "train/class2/1.png"), 2)
    cfg = allnc.resolve(allnc.Config(dataset="imagenet_lt", data_root=str(tmp_path), epochs=1, batch_size=4,
                                     imb_type="pareto", method="ce", workers=0, device=DEV))
    assert (cfg.arch, cfg.lr, cfg.wd, cfg.loader) == ("resnext50", 0.1, 2e-4, "pil")
    data = make_data(cfg)
    (x,), y = next(iter(data.train_batches(1, 1)))
    assert x.shape == (4, 3, 224, 224)
    r = cli("allnc.py", "--dataset", "inat2018", "--data-root", str(tmp_path / "nope"), "--epochs", "1")
    assert r.returncode == 2 and "ImageFolder" in r.stderr and "Traceback" not in r.stderr


def test_tensor_and_pil_loaders_identical_without_augmentation(tmp_path):
    cfg = tiny_cfg(tmp_path, augment=False, workers=0)
    data = make_data(cfg)
    tens = list(data.train_batches(3, 2))
    cfg.loader = "pil"
    data.pil = data_lt.PILViews(data.xtr.cpu(), data.ytr.cpu(), data.info, 2, augment=False)
    pil = list(data.train_batches(3, 2))
    assert len(tens) == len(pil) > 3
    for (tv, ty), (pv, py) in zip(tens, pil):
        assert torch.equal(ty, py)
        assert torch.equal(tv[0], pv[0]) and torch.equal(tv[1], pv[1])


def test_batched_augmentation_is_per_sample_and_in_range():
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(64, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = data_lt.random_crop_flip(x, 0, g)             # pad 0: each output is x or its mirror
    flipped = torch.tensor([torch.equal(o, x[0].flip(-1)) for o in out])
    same = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert (flipped | same).all() and flipped.any() and same.any()
    crops = data_lt.random_crop_flip(x, 4, g)
    assert crops.shape == x.shape and crops.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in crops}) > 20           # per-sample offsets
    ra = data_lt.rand_augment(x, g)
    assert ra.shape == x.shape and ra.dtype == torch.uint8
    assert len({o.numpy().tobytes() for o in ra}) > 10              # per-sample ops
    info = data_lt.DATASETS["synthetic"]
    v = data_lt.augment_view(x, g, info)
    assert v.dtype == torch.float32 and v.shape == x.shape
    lo = (0 - max(info.mean)) / min(info.std)
    hi = (1 - min(info.mean)) / min(info.std)
    assert v.min() >= lo - 1e-5 and v.max() <= hi + 1e-5


def crops_and_mirrors(x, info):
    """Every view crop and flip can make of each image of x (uint8 n x c x h x w): the 81 crops of the
    image padded by 4 zero pixels and their 81 mirrors, normalised as the loaders normalise a view
    (n x 162 x c x h x w)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4))
    crops = torch.stack([xp[:, :, oy:oy + h, ox:ox + w] for oy in range(9) for ox in range(9)], 1)
    crops = torch.cat([crops, crops.flip(-1)], 1)
    return data_lt.to_float(crops.flatten(0, 1), info.mean, info.std).view(n, 162, c, h, w)


@pytest.mark.parametrize("loader", ["tensor", "pil"])
def test_the_two_views_are_independent_augmentations_of_each_image(tmp_path, loader):
    """Algorithm 1 trains on two independently augmented views of each image: each view draws its own
    random decisions. With crop and flip alone (--randaug none) each view of an image is exactly one of
    its 162 crops and mirrors, and the two views choose independently: the same crop and flip for about
    1 image in 162 and the same flip for about half of them; views that share their draws would be
    equal for every image. With RandAugment on (the default) the two views still differ for almost
    every image, and each is a view of uint8 pixels; with --no-augment both are the image itself."""
    torch.manual_seed(0)                      # the PIL path's transforms draw from torch's generator

    def first_batch(**kw):
        cfg = tiny_cfg(tmp_path, loader=loader, workers=0, **kw)
        data = make_data(cfg)
        (v1, v2), y = next(iter(data.train_batches(1, 2)))
        idx = data_lt.epoch_batches(data.n_train(), cfg.batch_size, cfg.seed, 1)[0]
        x = data.xtr.cpu()[idx]
        assert torch.equal(y.cpu(), data.ytr.cpu()[idx]) and v1.shape == v2.shape == x.shape   # the batch's images
        return data.info, x, v1.cpu(), v2.cpu()

    info, x, v1, v2 = first_batch(randaug="none")
    cands = crops_and_mirrors(x, info)
    picks = []
    for v in (v1, v2):
        match = (cands - v[:, None]).abs().flatten(2).amax(2) < 1e-5          # n x 162
        assert match.any(1).all(), f"{int((~match.any(1)).sum())} views are no crop or mirror of their image"
        k = match.float().argmax(1)                                           # the crop (k % 81) and flip (k // 81)
        assert len(set((k % 81).tolist())) > 20 and 0 < (k // 81).sum() < len(k)   # each view varies per image
        picks.append(k)
    n = len(x)
    same = int((picks[0] == picks[1]).sum())
    same_flip = float(((picks[0] // 81) == (picks[1] // 81)).double().mean())
    assert same <= 4 and 0.2 < same_flip < 0.8, \
        f"the two views of {same} of {n} images are the same crop and flip (independent: about {n / 162:.1f}); " \
        f"the same flip for {same_flip:.0%} (independent: about 50%)"
    info, x, v1, v2 = first_batch()                                           # RandAugment (timm) on top
    differ = int((v1 != v2).flatten(1).any(1).sum())
    assert differ >= n - 2, f"the two views of only {differ} of {n} images differ"
    for v in (v1, v2):                                                        # normalised uint8 pixels
        pixels = (v * torch.tensor(info.std).view(1, -1, 1, 1) + torch.tensor(info.mean).view(1, -1, 1, 1)) * 255
        assert pixels.min() > -0.01 and pixels.max() < 255.01 and (pixels - pixels.round()).abs().max() < 1e-3
    info, x, v1, v2 = first_batch(augment=False)
    assert torch.equal(v1, v2) and torch.allclose(v1, data_lt.to_float(x, info.mean, info.std), atol=1e-6)


def structured_images(n, c, s, seed=1):
    """Smooth patterns plus noise: interpolation differences show, unlike on flat images."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    x = (torch.sin(xx * torch.rand(n, c, 1, 1, generator=g) * 0.6 + yy * 0.3) * 80 + 128
         + torch.randn(n, c, s, s, generator=g) * 20 + torch.rand(n, c, 1, 1, generator=g) * 60 - 30)
    return x.clamp(0, 255).round().to(torch.uint8)


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_timm_ops_agree_with_timm_on_pil(channels, size):
    """Each of the 15 ops, batched on tensors, against timm's own PIL op at fixed magnitudes, both
    signs and both resamplings. Tolerance: mean |difference| < 0.1 uint8 levels and no pixel off by
    more than 1 (float rounding at exact .5 boundaries); measured: <= 0.06 and 1."""
    ta = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image
    assert tuple(ta._RAND_TRANSFORMS) == data_lt.TIMM_NAMES            # the same 15 ops, same order
    x = structured_images(8, channels, size)
    fill = (125, 123, 114)[:channels]
    for name in data_lt.TIMM_NAMES:
        for m in (10.0, 7.3):
            for bic in ((False, True) if name in GEOMETRIC else (False,)):
                for sign in ((1.0, -1.0) if name in GEOMETRIC else (1.0,)):
                    n = len(x)
                    ours = data_lt.timm_op(name, x, torch.full((n,), m, dtype=torch.float64),
                                           torch.full((n,), sign, dtype=torch.float64), torch.full((n,), bic), fill)
                    args = ta.LEVEL_TO_ARG[name](m, {}) if ta.LEVEL_TO_ARG[name] else ()
                    if name in GEOMETRIC:
                        args = (abs(args[0]) * sign,)
                    kw = dict(fillcolor=fill if channels == 3 else fill[0],
                              resample=Image.BICUBIC if bic else Image.BILINEAR)
                    ref = []
                    for img in x:
                        a = img.permute(1, 2, 0).numpy()
                        out = np.asarray(ta.NAME_TO_OP[name](Image.fromarray(a[:, :, 0] if channels == 1 else a),
                                                             *args, **kw))
                        ref.append(torch.from_numpy(out.copy()).reshape(size, size, channels).permute(2, 0, 1))
                    d = (ours.int() - torch.stack(ref).int()).abs().float()
                    assert d.mean() < 0.1 and d.max() <= 1, (name, m, bic, sign, d.mean().item(), d.max().item())


def test_rand_augment_draws_follow_timm_policy(monkeypatch):
    """rand-n2-m10-mstd0.5: per image and layer, an op uniform over 15, applied with p 0.5, at
    m ~ N(10, 0.5) clipped to [0, 10] (mean 10 - 0.5 * phi(0) = 9.80, P(m = 10) = 0.5)."""
    calls = []
    real = data_lt.timm_op

    def spy(name, x, mag, sign=None, bicubic=None, fill=None):
        calls.append((name, mag.clone(), None if sign is None else sign.clone()))
        return real(name, x, mag, sign, bicubic, fill)
    monkeypatch.setattr(data_lt, "timm_op", spy)
    n = 6000
    x = torch.full((n, 1, 4, 4), 100, dtype=torch.uint8)
    data_lt.rand_augment(x, torch.Generator().manual_seed(0))
    applied = sum(len(m) for _, m, _ in calls)
    assert abs(applied / (2 * n) - 0.5) < 4 * math.sqrt(0.25 / (2 * n))
    per_op = torch.tensor([sum(len(m) for nm, m, _ in calls if nm == name) for name in data_lt.TIMM_NAMES]).double()
    expect = applied / 15
    assert ((per_op - expect) ** 2 / expect).sum() < 36            # chi-square, 14 dof: p ~ 0.001
    mags = torch.cat([m for _, m, _ in calls])
    assert mags.min() >= 0 and mags.max() == 10
    assert abs(mags.mean().item() - (10 - 0.5 / math.sqrt(2 * math.pi))) < 0.02
    assert abs((mags == 10).double().mean().item() - 0.5) < 0.03
    signs = torch.cat([s for nm, _, s in calls if nm in GEOMETRIC])
    assert abs((signs < 0).double().mean().item() - 0.5) < 0.05


def test_pil_path_uses_the_same_timm_ops():
    from PIL import Image
    info = data_lt.DATASETS["cifar10"]
    x = structured_images(1, 3, 32)
    fill = data_lt.fill_colour(info)
    assert fill == (125, 123, 114)                                  # PaCo: round(255 * mean)
    for seed in range(5):
        torch.manual_seed(seed)
        a = data_lt.TimmRandAugment(fill)(Image.fromarray(x[0].permute(1, 2, 0).numpy()))
        torch.manual_seed(seed)
        b = data_lt.rand_augment(x, None, fill=fill)[0]
        assert torch.equal(torch.from_numpy(np.asarray(a).copy()).permute(2, 0, 1), b)


def test_cutout_and_autoaugment_per_image():
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = data_lt.cutout(x, 16, torch.Generator().manual_seed(0))
    holes = (out == 0).all(1).sum((1, 2))
    assert holes.max() == 256 and holes.min() >= 64 and (holes < 256).any()     # clipped at the border
    assert ((out == 0) | (out == 200)).all()
    xs = structured_images(64, 3, 32)
    aa = data_lt.auto_augment(xs, torch.Generator().manual_seed(1))
    changed = (aa != xs).flatten(1).any(1)
    assert aa.shape == xs.shape and aa.dtype == torch.uint8 and 0 < changed.sum() < 64


# The per-image random decisions of the training views (data_lt: drawn on a CPU generator, applied in
# batches), each against its policy over many images. A frequency check: `count` of `n` independent
# draws each of probability p lies within 5 binomial standard deviations sqrt(n p (1 - p)) of n p; a
# correct draw fails one such check about once in 1.7 million (normal tails), and the seeds are fixed.

def assert_frequency(what, count, n, p, sigmas=5):
    """count (of n draws, each a hit with probability p) within `sigmas` binomial sd of n p."""
    count, sd = int(count), math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= sigmas * sd, \
        f"{what}: {count} of {n} ({count / n:.4f}); policy {p:.4f}: {n * p:.1f} +- {sigmas * sd:.1f} ({sigmas} sd)"


def coordinate_images(n, h, w, seed=0):
    """uint8 n x 3 x h x w images whose pixels say where they come from: channel 0 holds the row + 1,
    channel 1 the column + 1, channel 2 noise in 1..255 (no pixel is 0: a 0 is padding or a hole)."""
    rows = torch.arange(1, h + 1, dtype=torch.uint8).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8).view(1, 1, w).expand(n, h, w)
    noise = torch.randint(1, 256, (n, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return torch.stack([rows, cols, noise], 1).contiguous()


def numbered_images(n):
    """uint8 n x 3 x 2 x 2 images that carry their index (channel 0: i // 256, channel 1: i % 256)."""
    i = torch.arange(n)
    return torch.stack([i // 256, i % 256, torch.full_like(i, 7)], 1).to(torch.uint8).view(n, 3, 1, 1).expand(
        n, 3, 2, 2).contiguous()


def numbers_of(x):
    """The indices numbered_images wrote into (a subset of) its images."""
    return x[:, 0, 0, 0].long() * 256 + x[:, 1, 0, 0].long()


@pytest.mark.mutation
def test_crop_offsets_and_flip_are_uniform_and_match_torchvision():
    """RandomCrop(size, padding=4) + RandomHorizontalFlip as the training views draw them (augment_set with
    crop and flip alone): per image, the offsets oy and ox of the window in the image zero-padded by 4 each
    uniform over 0..8 (1/9 each: a shift of -4..4, both directions equally often, 4/9 each), independent of
    each other (oy = ox for 1/9 of the images), and the flip 1/2. The draws are read off images whose
    pixels hold their coordinates; each view must then be torchvision's crop (functional.crop) of the
    image padded by functional.pad at those offsets, hflipped where flipped. 4000 images of 8 x 8;
    every frequency within 5 binomial sd of the policy's."""
    tvf = pytest.importorskip("torchvision.transforms.functional")
    n, s, pad = 4000, 8, 4
    x = coordinate_images(n, s, s)
    out = data_lt.augment_set(x, torch.Generator().manual_seed(3), data_lt.DATASETS["synthetic"], randaug="none")
    j = torch.arange(s)
    rows, cols = out[:, 0].amax(2).long(), out[:, 1].amax(1).long()   # source row / column + 1 per output row /
    valid_r, valid_c = rows > 0, cols > 0                              # column; 0 where it lies in the padding
    oy = torch.where(valid_r, rows - 1 - j + pad, -1).amax(1)          # output row j comes from row oy + j - pad
    left, right = valid_c.int().argmax(1), s - 1 - valid_c.flip(1).int().argmax(1)
    flip = cols.gather(1, left[:, None])[:, 0] > cols.gather(1, right[:, None])[:, 0]
    jj = torch.where(flip[:, None], s - 1 - j, j)
    ox = torch.where(valid_c, cols - 1 - jj + pad, -1).amax(1)
    padded = tvf.pad(x, [pad])                                         # RandomCrop's padding: 0, constant
    for key in torch.stack([oy, ox, flip.long()], 1).unique(dim=0).tolist():
        sel = (oy == key[0]) & (ox == key[1]) & (flip == bool(key[2]))
        want = tvf.crop(padded[sel], key[0], key[1], s, s)
        assert torch.equal(out[sel], tvf.hflip(want) if key[2] else want), f"offsets {key[:2]}, flip {key[2]}"
    for v in range(2 * pad + 1):
        assert_frequency(f"oy = {v}", (oy == v).sum(), n, 1 / 9)
        assert_frequency(f"ox = {v}", (ox == v).sum(), n, 1 / 9)
    for name, d in (("oy", oy), ("ox", ox)):
        assert_frequency(f"{name} < {pad} (shifted down / right)", (d < pad).sum(), n, 4 / 9)
        assert_frequency(f"{name} > {pad} (shifted up / left)", (d > pad).sum(), n, 4 / 9)
    assert_frequency("oy = ox", (oy == ox).sum(), n, 1 / 9)
    assert_frequency("flipped", flip.sum(), n, 1 / 2)


def devries_taylor_cutout(img, length, y, x):
    """Cutout(n_holes=1, length) of DeVries & Taylor (uoguelph-mlrg/Cutout util/cutout.py; RBL copies it
    into dataloaders/custom_transforms.py and applies it after ToTensor), its centre (y, x) given instead
    of drawn by np.random.randint(h), np.random.randint(w): img a float C x H x W tensor."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.
    return img * torch.from_numpy(mask).expand_as(img)


@pytest.mark.mutation
@pytest.mark.parametrize("length", [8, 7])
def test_cutout_centre_is_uniform_and_matches_devries_taylor(length):
    """Cutout's centre (cy, cx) uniform over the pixels, as DeVries & Taylor draw it: each row and each
    column 1/16 of a 16 x 16 image, both halves (top / bottom, left / right) 1/2 each, cy and cx
    independent (equal for 1/16). The centre is read off the hole in images with no 0 pixel (the hole's
    first row + length // 2, or its last + 1 - length // 2 where clipped at the top); the view must then be
    their reference Cutout at that centre (the square [cy - length // 2, cy + length // 2) in each axis,
    clipped at the border, zeroed: 0 before normalisation, as RBL's ToTensor, Cutout, Normalize), also
    for an odd length (a side of length - 1, as theirs). 4000 images; within 5 binomial sd."""
    n, s = 4000, 16
    x = coordinate_images(n, s, s)
    out = data_lt.cutout(x, length, torch.Generator().manual_seed(4))
    hole = (out == 0).all(1)
    assert hole.any(2).any(1).all() and ((out == 0) == hole[:, None]).all(), "not one hole of 0s in every image"
    centre = []
    for lines in (hole.any(2), hole.any(1)):                           # rows, columns touched by the hole
        first, last = lines.int().argmax(1), s - 1 - lines.flip(1).int().argmax(1)
        centre.append(torch.where(first > 0, first + length // 2, last + 1 - length // 2))
    cy, cx = centre
    want = torch.stack([devries_taylor_cutout(img.float() / 255, length, a, b)
                        for img, a, b in zip(x, cy.tolist(), cx.tolist())])
    assert torch.equal(out.float() / 255, want), "not DeVries & Taylor's Cutout at the centre of the hole"
    for v in range(s):
        assert_frequency(f"cy = {v}", (cy == v).sum(), n, 1 / s)
        assert_frequency(f"cx = {v}", (cx == v).sum(), n, 1 / s)
    for name, c in (("cy", cy), ("cx", cx)):
        assert_frequency(f"{name} in the first half", (c < s // 2).sum(), n, 1 / 2)
        assert_frequency(f"{name} in the second half", (c >= s // 2).sum(), n, 1 / 2)
    assert_frequency("cy = cx", (cy == cx).sum(), n, 1 / s)


class _Tagged(str):
    """An op name that also says where in the policy it sits: equal to, and hashed as, the plain name
    (the policy's magnitude table finds it), with .policy and .slot for a spy to read."""


@pytest.mark.mutation
def test_auto_augment_draws_follow_the_cifar10_policy(monkeypatch):
    """torchvision's AutoAugment (CIFAR10 policy) per image: a sub-policy uniform over the 25, each of its
    two ops applied with its own probability, independently (the image shows policy p's op of slot s with
    probability prob(p, s) / 25, both ops with prob(p, 0) prob(p, 1) / 25), at the policy's magnitude, with
    a sign 1/2 where the op is signed, drawn per op (the two signs agree for 1/2 of the images that get two
    signed ops). The ops are spied on (the images, numbered, pass through unchanged) under a copy of the
    policy whose op names carry (policy, slot). 5000 images; within 5 binomial sd."""
    from torchvision.transforms import v2
    aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    policy = list(aa._policies)
    tagged = []
    for p, pol in enumerate(policy):
        ops = []
        for slot, (name, prob, mag) in enumerate(pol):
            t = _Tagged(name)
            t.policy, t.slot = p, slot
            ops.append((t, prob, mag))
        tagged.append(tuple(ops))
    aa._policies = tagged
    seen = {}                                                          # (image, slot) -> (policy, magnitude)

    def spy(img, name, magnitude, interpolation, fill):
        for i in numbers_of(img).tolist():
            assert (i, name.slot) not in seen, "an op applied twice in one slot"
            seen[i, name.slot] = (name.policy, magnitude)
        return img
    aa._apply_image_or_video_transform = spy
    monkeypatch.setattr(data_lt, "_AA", aa)
    n = 5000
    x = numbered_images(n)
    assert torch.equal(data_lt.auto_augment(x, torch.Generator().manual_seed(5)), x)
    both = [i for i in range(n) if (i, 0) in seen and (i, 1) in seen]
    assert all(seen[i, 0][0] == seen[i, 1][0] for i in both), "the two slots of an image from different policies"
    signed = {}                                                        # (policy, slot) -> a sign is drawn
    for p, pol in enumerate(policy):
        for slot, (name, prob, mag) in enumerate(pol):
            hits = [m for (i, sl), (q, m) in seen.items() if q == p and sl == slot]
            assert_frequency(f"policy {p} slot {slot} ({name}, p {prob})", len(hits), n, prob / 25)
            mags, sign_drawn = aa._AUGMENTATION_SPACE[name]
            want = 0.0 if mag is None else float(mags(10, 2, 2)[mag])
            assert all(abs(m) == pytest.approx(want) for m in hits), (p, slot, name, set(hits))
            signed[p, slot] = sign_drawn and want != 0
    assert_frequency("both ops applied", len(both), n, sum(a[1] * b[1] for a, b in policy) / 25)
    for slot in range(2):
        neg = [m < 0 for (i, sl), (p, m) in seen.items() if sl == slot and signed[p, slot]]
        assert_frequency(f"slot {slot}'s signed ops negative", sum(neg), len(neg), 1 / 2)
    pairs = [i for i in both if signed[seen[i, 0][0], 0] and signed[seen[i, 0][0], 1]]
    assert_frequency("the two signs agree", sum((seen[i, 0][1] < 0) == (seen[i, 1][1] < 0) for i in pairs),
                     len(pairs), 1 / 2)


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.mark.mutation
def test_rand_augment_draws_per_layer_with_interpolation_and_independent_layers(monkeypatch):
    """What test_rand_augment_draws_follow_timm_policy leaves open (it pools the two layers): in each of
    the two layers of rand-n2-m10-mstd0.5, each op applied to 1/2 x 1/15 of the images; the magnitude
    m = clip(10 + 0.5 z) in the bins [0, 9), [9, 9.5), [9.5, 10), {10} with probabilities Phi(-2),
    Phi(-1) - Phi(-2), 1/2 - Phi(-1), 1/2; a geometric op's sign negative and its resampling bicubic
    (timm's random choice of bilinear / bicubic) 1/2 each. The layers draw independently: both applied
    1/4, the same op for 1/15 of those, both magnitudes 10 for 1/4 of them, the same sign and the same
    resampling for 1/2 of those with a geometric op twice. timm_op is spied on (numbered images pass through
    unchanged); 6000 images; within 5 binomial sd."""
    calls = []

    def spy(name, x, mag, sign=None, bicubic=None, fill=None):
        calls.append((name, numbers_of(x), mag.clone(), sign.clone(), bicubic.clone()))
        return x
    monkeypatch.setattr(data_lt, "timm_op", spy)
    n = 6000
    data_lt.rand_augment(numbered_images(n), torch.Generator().manual_seed(6))
    assert [c[0] for c in calls] == list(data_lt.TIMM_NAMES) * 2       # layer by layer, every op reached
    op = torch.full((2, n), -1)
    mag, sign, bic = torch.zeros(2, n, dtype=torch.float64), torch.zeros(2, n), torch.zeros(2, n, dtype=torch.bool)
    for c, (name, ids, m, sg, b) in enumerate(calls):
        layer = c // 15
        assert (op[layer, ids] == -1).all()
        op[layer, ids], mag[layer, ids], sign[layer, ids], bic[layer, ids] = c % 15, m, sg.float(), b
    geo = torch.tensor([data_lt.TIMM_NAMES.index(g) for g in GEOMETRIC])
    is_geo = torch.isin(op, geo)
    edges = [0, 9, 9.5, 10]
    probs = [normal_cdf(-2), normal_cdf(-1) - normal_cdf(-2), 0.5 - normal_cdf(-1), 0.5]
    mbin = torch.where(mag == 10, 3, torch.bucketize(mag, torch.tensor(edges, dtype=torch.float64), right=True) - 1)
    for layer in range(2):
        applied = op[layer] >= 0
        for k, name in enumerate(data_lt.TIMM_NAMES):
            assert_frequency(f"layer {layer}: {name}", (op[layer] == k).sum(), n, 1 / 30)
        for b, p in enumerate(probs):
            assert_frequency(f"layer {layer}: magnitude bin {b}", (mbin[layer][applied] == b).sum(),
                             int(applied.sum()), p)
        g = is_geo[layer]
        assert_frequency(f"layer {layer}: negative", (sign[layer][g] < 0).sum(), int(g.sum()), 1 / 2)
        assert_frequency(f"layer {layer}: bicubic", bic[layer][g].sum(), int(g.sum()), 1 / 2)
    both = (op >= 0).all(0)
    assert_frequency("both layers applied", both.sum(), n, 1 / 4)
    assert_frequency("the same op in both layers", (op[0] == op[1])[both].sum(), int(both.sum()), 1 / 15)
    assert_frequency("both magnitudes 10", ((mbin == 3).all(0))[both].sum(), int(both.sum()), 1 / 4)
    gg = is_geo.all(0)
    assert_frequency("the same sign in both layers", (sign[0] == sign[1])[gg].sum(), int(gg.sum()), 1 / 2)
    assert_frequency("the same resampling in both layers", (bic[0] == bic[1])[gg].sum(), int(gg.sum()), 1 / 2)


@pytest.mark.mutation
def test_torchvision_rand_augment_draws_op_and_sign(monkeypatch):
    """--randaug torchvision: RandAugment(2, 9) as torchvision draws it, per image and layer: an op
    uniform over its 14 (Identity among them, no apply-or-not), at magnitude bin 9 of 31, negated with
    probability 1/2 where the op is signed; the two layers independent (the same op 1/14, the same sign
    1/2 of the images with a signed op twice). The op calls are spied on (numbered images pass through
    unchanged: an image's first call is its first layer); 4200 images; within 5 binomial sd."""
    from torchvision.transforms import v2
    ra = v2.RandAugment()
    names = list(ra._AUGMENTATION_SPACE)
    assert len(names) == 14
    first, second = {}, {}

    def spy(img, name, magnitude, interpolation, fill):
        for i in numbers_of(img).tolist():
            assert i not in second, "an image through more than two ops"
            (second if i in first else first)[i] = (names.index(name), magnitude)
        return img
    ra._apply_image_or_video_transform = spy
    monkeypatch.setattr(data_lt, "_RA", ra)
    n = 4200
    data_lt.rand_augment_torchvision(numbered_images(n), torch.Generator().manual_seed(7))
    assert len(first) == len(second) == n
    for layer, draws in enumerate((first, second)):
        for k, name in enumerate(names):
            assert_frequency(f"layer {layer}: {name}", sum(o == k for o, _ in draws.values()), n, 1 / 14)
            mags = ra._AUGMENTATION_SPACE[name][0](31, 2, 2)
            want = 0.0 if mags is None else float(mags[9])
            assert all(abs(m) == pytest.approx(want) for o, m in draws.values() if o == k), name
        neg = [m < 0 for o, m in draws.values() if ra._AUGMENTATION_SPACE[names[o]][1] and m != 0]
        assert_frequency(f"layer {layer}: negative", sum(neg), len(neg), 1 / 2)
    assert_frequency("the same op in both layers", sum(first[i][0] == second[i][0] for i in range(n)), n, 1 / 14)
    twice = [i for i in range(n) if first[i][1] != 0 and second[i][1] != 0
             and ra._AUGMENTATION_SPACE[names[first[i][0]]][1] and ra._AUGMENTATION_SPACE[names[second[i][0]]][1]]
    assert_frequency("the same sign in both layers", sum((first[i][1] < 0) == (second[i][1] < 0) for i in twice),
                     len(twice), 1 / 2)


@pytest.mark.mutation
@pytest.mark.parametrize("method", ["ce", "etf"])
def test_mixup_mixes_inputs_and_both_labels_by_hand(tmp_path, method):
    """Input mixup as the ETF code's mixup_data: lam ~ Beta(a, a), x~ = lam x + (1 - lam) x[perm], and the
    loss lam L(y) + (1 - lam) L(y[perm]); the ETF loss's Ew counts the batch's own labels. Draws replayed
    from a RandomState of the same seed."""
    cfg, data, st, model = tiny_setup(tmp_path, method=method, mixup=1.0)
    model.eval()
    (x,), y = next(iter(data.train_batches(1, 1)))
    st.mix_rng = np.random.RandomState(0)
    loss, _ = allnc.step_single(model, [x], y, st)
    rng = np.random.RandomState(0)
    lam = rng.beta(1.0, 1.0)
    perm = torch.from_numpy(rng.permutation(len(y)))
    xm = lam * x + (1 - lam) * x[perm]
    with torch.no_grad():
        _, logits, h = model(xm)
    if method == "ce":
        want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    else:
        M = model.head.M
        cnt = torch.bincount(y, minlength=data.C).float()
        dr = lambda yy: (0.5 * (len(y) / (cnt > 0).sum()) / cnt[yy] * ((h * M.t()[yy]).sum(1) - 1) ** 2).mean()
        want = lam * dr(y) + (1 - lam) * dr(y[perm])
    assert 0.05 < lam < 0.95 and loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.mutation
@pytest.mark.parametrize("method", ["ce", "etf", "ncmc"])
def test_mixup_at_lambda_one_is_the_plain_loss(tmp_path, method):
    cfg, data, st, model = tiny_setup(tmp_path, init_seed=1, method=method, mixup=1.0)   # fixed weights: the same test in any order
    model.eval()
    (x,), y = next(iter(data.train_batches(1, 1)))

    class One:
        beta = staticmethod(lambda a, b: 1.0)
        permutation = staticmethod(lambda n: np.random.RandomState(0).permutation(n))
    st.mix_rng = One()
    mixed, _ = allnc.step_single(model, [x], y, st)
    cfg.mixup = 0.0
    plain, _ = allnc.step_single(model, [x], y, st)
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-6)
    class Half(One):
        beta = staticmethod(lambda a, b: 0.5)
    st.mix_rng, cfg.mixup = Half(), 1.0
    assert allnc.step_single(model, [x], y, st)[0].item() != pytest.approx(plain.item(), rel=1e-3)


class GlobalBatchDist:
    """Process `rank` of `world`, in one process, holding its share of the global batch `whole` (x and y):
    gather_batch returns the global batch, part(n) this process's share, as allnc.Dist under torchrun."""

    def __init__(self, rank, world, *whole):
        self.rank, self.world, self.whole = rank, world, whole

    def gather_batch(self, t):
        w = next(w for w in self.whole if w.dtype == t.dtype)
        assert torch.equal(t, w[self.part(len(w))])
        return w

    def part(self, n):
        return data_lt.rank_part(n, self.rank, self.world)


@pytest.mark.mutation
@pytest.mark.parametrize("alpha,cdf,world", [(1.0, lambda t: t, 1),
                                              (0.5, lambda t: 2 / math.pi * math.asin(math.sqrt(t)), 2)],
                         ids=["alpha1-one-process", "alpha0.5-two-processes"])
def test_mixup_draws_lambda_from_beta_and_partners_from_a_uniform_permutation(alpha, cdf, world):
    """Input mixup's draws (the ETF code's mixup_data): lam ~ Beta(alpha, alpha), in each tenth of [0, 1]
    with the Beta CDF's probability (alpha 1, the ETF recipe: uniform; alpha 0.5: the arcsine law,
    (2 / pi) asin(sqrt(t))) and in each half 1/2; the partners a uniform random permutation of the global
    batch: each of the 24 orderings of 4 images 1/24. Under torchrun (here 2 processes, each holding 2 of the
    4, its mix_rng seeded as the other's) every process draws the same lam and the processes' partners
    together are one permutation of the whole batch, partners from the other process included. The mixed
    input is lam x + (1 - lam) x[partner], the partner's label its own. 3000 draws; within 5 binomial sd."""
    N, draws = 4, 3000
    X, Y = torch.arange(1.0, N + 1).view(N, 1) * 10, torch.arange(N)
    rngs = [np.random.RandomState(0) for _ in range(world)]
    lams, perms = [], []
    for _ in range(draws):
        got = []
        for r in range(world):
            d = allnc.Dist() if world == 1 else GlobalBatchDist(r, world, X, Y)
            sl = data_lt.rank_part(N, r, world)
            xm, ya, yb, lam = allnc.mixup(X[sl], Y[sl], alpha, rngs[r], d)
            assert torch.equal(ya, Y[sl]) and torch.allclose(xm, lam * X[sl] + (1 - lam) * X[yb])
            got.append((lam, yb))
        assert all(g[0] == got[0][0] for g in got), "the processes drew different lam"
        lams.append(got[0][0])
        perms.append(tuple(torch.cat([g[1] for g in got]).tolist()))
    lam = torch.tensor(lams)
    for b in range(10):
        p = cdf((b + 1) / 10) - cdf(b / 10)
        assert_frequency(f"lam in [{b / 10}, {(b + 1) / 10})", ((lam >= b / 10) & (lam < (b + 1) / 10)).sum(),
                         draws, p)
    assert_frequency("lam < 1/2", (lam < 0.5).sum(), draws, 1 / 2)
    assert all(sorted(p) == list(range(N)) for p in perms), "the partners are no permutation of the global batch"
    for p in itertools.permutations(range(N)):
        assert_frequency(f"partners {p}", perms.count(p), draws, 1 / math.factorial(N))


def pareto_median_rank_profile(C, n_max, n_min, alpha):
    """The docstring's closed form, written independently: the median of the (c+1)-th largest of C
    Pareto(alpha) draws (Benard's median rank p = (c + 0.7) / (C + 0.4), x = p^(-1/alpha)), mapped
    linearly so that class 0 gets n_max and class C-1 gets n_min."""
    c = np.arange(C, dtype=np.float64)
    x = ((c + 0.7) / (C + 0.4)) ** (-1.0 / alpha)
    return np.round(n_min + (n_max - n_min) * (x - x[-1]) / (x[0] - x[-1])).astype(np.int64)


@pytest.mark.parametrize("C, n_max, n_min, alpha", [(1000, 1280, 5, 6.35), (1000, 1280, 5, 6.0),
                                                    (100, 500, 5, 6.35), (10, 50, 5, 3.0)])
def test_pareto_middle_classes_follow_the_closed_form(C, n_max, n_min, alpha):
    """Classes 1..C-2 (the first and last are forced to n_max / n_min, so a wrong scale or plotting
    position would leave them alone) are the closed form's values, at the default and other alphas."""
    got = np.array(data_lt.pareto_counts(C, n_max, n_min, alpha))
    want = pareto_median_rank_profile(C, n_max, n_min, alpha)
    assert got[0] == n_max and got[-1] == n_min and len(got) == C
    bad = np.flatnonzero(got[1:-1] != want[1:-1]) + 1
    assert bad.size == 0, f"classes {bad[:10].tolist()}: got {got[bad[:10]].tolist()}, want {want[bad[:10]].tolist()}"


def test_pareto_default_alpha_is_the_documented_one():
    assert data_lt.pareto_counts(1000, 1280, 5) == data_lt.pareto_counts(1000, 1280, 5, 6.35)
    assert data_lt.pareto_counts(1000, 1280, 5) != data_lt.pareto_counts(1000, 1280, 5, 6.0)


# ImageNet-LT's training split: the per-class counts of ImageNet_LT_train.txt (lines "path label"),
# the list in facebookresearch/classifier-balancing data/ImageNet_LT/ImageNet_LT_train.txt. As
# counted in JiahuiKChen/LT-classification, which holds the same file and the counts its scripts
# derived from it: cls_freq/ImageNet_LT_train.json (1000 counts) and
# data/ImageNet_LT/imagenet_lt_classes/imagenet_lt_balance_counts.txt (1280 - count per label),
# identical as multisets. Many > 100, Medium 21..100, Few <= 20 (allnc's shot groups); the
# often-quoted 385 / 479 / 136 is BCL's 20..100 / < 20 split of the same counts.
IMAGENET_LT = {"classes": 1000, "total": 115846, "max": 1280, "min": 5, "many": 385, "medium": 469, "few": 146}


def split_shape(counts):
    n = np.asarray(counts)
    return {"total": int(n.sum()), "many": int((n > 100).sum()),
            "medium": int(((n > 20) & (n <= 100)).sum()), "few": int((n <= 20).sum())}


def test_pareto_profile_reproduces_imagenet_lt():
    """pareto_counts(1000, 1280, 5) at its default alpha: ImageNet-LT's total and its Many / Medium /
    Few class numbers within 5%, 1280 down to 5, never increasing."""
    ref = IMAGENET_LT
    p = data_lt.pareto_counts(ref["classes"], ref["max"], ref["min"])
    assert len(p) == ref["classes"] and p[0] == ref["max"] and p[-1] == ref["min"] and max(p) == ref["max"]
    assert all(a >= b for a, b in zip(p, p[1:]))
    got = split_shape(p)
    for k in ("total", "many", "medium", "few"):
        assert abs(got[k] / ref[k] - 1) <= 0.05, f"{k}: {got[k]} vs ImageNet-LT {ref[k]} ({got})"
    # and through the command line's path (imagenet_lt at --imb 1 = the standard split's own factor)
    assert data_lt.split_counts("imagenet_lt", 1, "pareto") == p


@pytest.mark.parametrize("C, n_max, n_min", [(2, 12, 3), (3, 12, 3), (10, 50, 5), (10, 6000, 60),
                                             (100, 40, 2), (8142, 1000, 2)])
def test_pareto_contract_for_any_size(C, n_max, n_min):
    p = data_lt.pareto_counts(C, n_max, n_min)
    assert len(p) == C and p[0] == n_max and p[-1] == n_min
    assert all(isinstance(v, int) for v in p) and all(a >= b for a, b in zip(p, p[1:]))
    assert data_lt.pareto_counts(C, n_max, n_max) == [n_max] * C and data_lt.pareto_counts(1, n_max, n_min) == [n_max]


# ----------------------------------------------------------------------------------------------
# nc_metrics


# ----------------------------------------------------------------------------------------------
# Neural-collapse metrics

def reference_nc(feat, labels, W, mu_g=None):
    """Independent float64 NumPy computation of the metrics, straight from the definitions; mu_G the
    unweighted mean of the class means unless given."""
    X, y, W = (np.asarray(a, dtype=np.float64) for a in (feat, labels, W))
    y = y.astype(int)
    C = W.shape[0]
    mu = np.stack([X[y == c].mean(0) for c in range(C)])
    mg = mu.mean(0) if mu_g is None else mu_g
    Sw = sum(np.outer(X[i] - mu[y[i]], X[i] - mu[y[i]]) for i in range(len(X))) / len(X)
    Sb = sum(np.outer(m - mg, m - mg) for m in mu) / C
    nc1 = np.trace(Sw @ np.linalg.pinv(Sb, rcond=1e-10)) / C
    Mc = mu - mg

    def cos_stats(V):
        Vn = V / np.linalg.norm(V, axis=1, keepdims=True)
        c = Vn @ Vn.T
        off = c[~np.eye(len(V), dtype=bool)]
        return off.mean(), off.std()
    sd = np.linalg.norm(W / np.linalg.norm(W) - Mc / np.linalg.norm(Mc))
    pred = (X @ W.T).argmax(1)
    near = np.stack([np.linalg.norm(X - m, axis=1) for m in mu], 1).argmin(1)
    return dict(nc1=nc1, cos_mu=cos_stats(Mc), cos_mu_mean=cos_stats(Mc)[0], cos_mu_std=cos_stats(Mc)[1],
                cos_w=cos_stats(W - W.mean(0)), self_duality=sd,
                ncc=(pred == near).mean(), eq_w=np.linalg.norm(W, axis=1).std() / np.linalg.norm(W, axis=1).mean())


@pytest.mark.mutation
def test_nc_metrics_on_exactly_collapsed_features():
    C, d = 10, 32
    U, _ = torch.linalg.qr(torch.randn(d, C, dtype=torch.float64))
    M = (math.sqrt(C / (C - 1)) * U @ (torch.eye(C, dtype=torch.float64) - 1 / C)).t() * 5   # means on an ETF
    labels = torch.arange(C).repeat_interleave(7)
    feats = M[labels] + torch.ones(d, dtype=torch.float64) * 0.3   # a global offset must not matter
    m = allnc.nc_metrics(feats, labels, 2 * M, icpa=True)
    assert m["nc1"] < 1e-12 and m["cos_mu_std"] < 1e-9 and m["cos_w_std"] < 1e-9
    assert m["self_duality"] < 1e-9 and m["ncc_agreement"] == 1.0
    assert m["cos_mu_mean"] == pytest.approx(-1 / (C - 1))
    assert m["equinorm_mu"] < 1e-9 and m["equinorm_w"] < 1e-9
    assert m["icpa_mu"][0][1] == pytest.approx(math.degrees(math.acos(-1 / 9)), abs=0.01)


# (100, 64): C-1 > d, CIFAR-100 with ResNet-32; (12, 300): d far above C as NCMC's f*C features, read
# in chunks of 7 samples
@pytest.mark.mutation
@pytest.mark.parametrize("C,d,chunk", [(10, 32, 8192), (100, 64, 8192), (12, 300, 7)])
def test_nc_metrics_match_independent_float64(C, d, chunk):
    g = torch.Generator().manual_seed(C)
    labels = torch.arange(C).repeat_interleave(6)
    feats = torch.randn(C, d, generator=g)[labels] * 2 + torch.randn(len(labels), d, generator=g)
    W = torch.randn(C, d, generator=g)
    m = allnc.nc_metrics(feats, labels, W, chunk=chunk)
    ref = reference_nc(feats, labels, W)
    assert m["nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
    assert (m["cos_mu_mean"], m["cos_mu_std"]) == pytest.approx(ref["cos_mu"], rel=1e-6)
    assert (m["cos_w_mean"], m["cos_w_std"]) == pytest.approx(ref["cos_w"], rel=1e-6)
    assert m["self_duality"] == pytest.approx(ref["self_duality"], rel=1e-6)
    assert m["ncc_agreement"] == pytest.approx(ref["ncc"])
    assert m["equinorm_w"] == pytest.approx(ref["eq_w"], rel=1e-6)


def test_feature_plot_marks_the_class_means_of_the_plotted_points(monkeypatch):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)        # the PCA path, with or without t-SNE
    g = torch.Generator().manual_seed(0)
    y = torch.arange(5).repeat_interleave(40)
    h = torch.randn(5, 16, generator=g)[y] * 3 + torch.randn(200, 16, generator=g)
    fig, ax = plt.subplots()
    means = allnc.draw_features(ax, h, y, 5)
    plotted = torch.tensor(ax.collections[-1].get_offsets().data)
    c = h.double().numpy() - h.double().numpy().mean(0)               # numpy's own PCA
    z = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    want = np.stack([z[y.numpy() == k].mean(0) for k in range(5)])
    sign = np.sign((want * plotted.numpy()).sum(0))                   # a principal axis has no sign
    assert np.allclose(plotted.numpy(), want * sign, atol=1e-4) and torch.allclose(plotted.float(), means, atol=1e-5)
    plt.close(fig)


def t64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def symmetric_samples(means, counts, rng, scale=0.3):
    """Features whose class means are exactly `means`: for each class, counts[c]/2 random offsets and
    their negatives. Returns (features N x d, labels N) as numpy arrays."""
    feats, labels = [], []
    for c, (m, n) in enumerate(zip(means, counts)):
        assert n % 2 == 0
        e = rng.normal(scale=scale, size=(n // 2, len(m)))
        feats.append(m + np.concatenate([e, -e]))
        labels += [c] * n
    return np.concatenate(feats), np.array(labels)


def test_equinorm_is_the_population_coefficient_of_variation():
    """Centered class means +-1 e1 and +-2 e2 (norms 1, 1, 2, 2: population std 1/2, mean 3/2, so
    1/3; the sample std would give 0.385, std alone 0.5) around an offset global mean; classifier rows
    of norms 1, 2, 3, 4 (population std sqrt(5/4) over mean 5/2 = 0.447)."""
    g = np.array([2.0, -1.0, 4.0])
    centered = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 2.0, 0], [0, -2.0, 0]])
    f, y = symmetric_samples(g + centered, [4, 4, 4, 4], np.random.default_rng(0))
    W = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [0, 4.0, 0]])
    out = allnc.nc_metrics(t64(f), torch.as_tensor(y), t64(W))
    assert out["equinorm_mu"] == pytest.approx(1 / 3, abs=1e-12)
    assert out["equinorm_w"] == pytest.approx(np.sqrt(5 / 4) / (5 / 2), abs=1e-12)


def test_global_mean_is_the_unweighted_mean_of_class_means():
    """Long-tailed classes (30, 10, 4, 2 samples). (1) Means 3 e_c + offset: the class means' mean and
    the samples' mean differ by 3 (n_c/N - 1/4) e_c = (1.21, -0.10, -0.49, -0.62, 0, 0); around the
    class means' mean the centered means are a simplex ETF: cosines -1/3 with std 0, equinorm 0,
    self-duality 0 for W equal to them, and Sigma_B = (9/4) P (P the projection on the sum-zero
    subspace of e_1..e_4), so NC1 = tr(Sigma_W P) / 9. (2) Generic means, within-class spread mostly
    along the shift between the two means, a generic W: NC1, the cosines and self-duality against
    numpy, each at least 20% away from what the samples' mean would give."""
    C, d, counts = 4, 6, [30, 10, 4, 2]
    offset = np.array([1.0, -2.0, 0.5, 0.0, 0.7, -0.3])

    # (1) the ETF case: analytic values
    rng = np.random.default_rng(1)
    means = 3.0 * np.eye(C, d) + offset
    f, y = symmetric_samples(means, counts, rng)
    mu_classes, mu_samples = means.mean(0), f.mean(0)
    shift = 3.0 * (np.array(counts) / sum(counts) - 1 / C)
    assert np.allclose(mu_samples - mu_classes, np.r_[shift, 0, 0])          # the two mu_G differ by a known amount
    out = allnc.nc_metrics(t64(f), torch.as_tensor(y), t64(means - mu_classes))
    assert out["cos_mu_mean"] == pytest.approx(-1 / 3, abs=1e-12) and out["cos_mu_std"] == pytest.approx(0, abs=1e-12)
    assert out["self_duality"] == pytest.approx(0, abs=1e-12) and out["equinorm_mu"] == pytest.approx(0, abs=1e-12)
    dev = f - means[y]
    P = np.zeros((d, d))
    P[:C, :C] = np.eye(C) - 1 / C
    assert out["nc1"] == pytest.approx(np.trace(dev.T @ dev / len(f) @ P) / 9, rel=1e-9)
    wrong = reference_nc(f, y, means - mu_classes, mu_samples)
    assert wrong["cos_mu_std"] > 0.3 and wrong["self_duality"] > 0.3 and abs(wrong["cos_mu_mean"] + 1 / 3) > 0.1

    # (2) a generic case: every metric against numpy, and clearly apart from the sample-mean version
    rng = np.random.default_rng(1)
    means = 2.0 * rng.normal(size=(C, d)) + offset
    mu_classes = means.mean(0)
    s = (np.array(counts)[:, None] * means).sum(0) / sum(counts) - mu_classes
    f, y = symmetric_samples(means, counts, rng, scale=0.3)
    along = np.concatenate([np.r_[a, -a] for a in (rng.normal(size=n // 2) for n in counts)])
    f = f + along[:, None] * s / np.linalg.norm(s)        # class means unchanged (symmetric offsets)
    assert np.allclose(f.mean(0) - mu_classes, s)
    W = means - mu_classes + 0.3 * rng.normal(size=(C, d))
    out = allnc.nc_metrics(t64(f), torch.as_tensor(y), t64(W))
    right, wrong = reference_nc(f, y, W, mu_classes), reference_nc(f, y, W, f.mean(0))
    for k in ("nc1", "cos_mu_mean", "cos_mu_std", "self_duality"):
        assert out[k] == pytest.approx(right[k], rel=1e-9, abs=1e-12), (k, out[k], right[k])
        assert abs(wrong[k] - right[k]) > 0.2 * abs(right[k]), (k, right[k], wrong[k])   # the test can tell them apart


# ----------------------------------------------------------------------------------------------
# Runs, resume and faults: results on disk, resume, signals, a full disk, weights and --eval

def test_tiny_run_learns_and_writes_valid_json(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=6, depth=8, nc_every=3)
    res = allnc.run(cfg, quiet=True)
    path = tmp_path / (allnc.run_name(cfg) + ".json")
    on_disk = json.loads(path.read_text())
    assert on_disk["complete"] and on_disk["config"]["epochs"] == 6 and len(on_disk["log"]) == 6
    ce = [row["ce"] for row in on_disk["log"]]
    assert ce[-1] < ce[0] - 0.2                           # the loss went down
    assert res["final"]["top1"] > 30                      # ten classes: chance is 10%
    assert len(res["final"]["per_class"]) == 10
    assert set(allnc.NC_KEYS) <= set(res["final"]["nc"]) and len(res["final"]["nc"]["icpa_w"]) == 10
    assert [row["epoch"] for row in on_disk["log"] if "nc" in row] == [3, 6]
    assert not (tmp_path / (allnc.run_name(cfg) + ".ckpt")).exists()
    table = allnc.run_table(res)
    assert "top1" in table and "self_duality" in table and "gamma=2.0" in table


def test_recipes_land_in_the_run_config_and_explicit_flags_win(tmp_path):
    ce = allnc.resolve(allnc.Config(dataset="cifar10", method="ce", recipe="own"))
    assert (ce.batch_size, ce.lr, ce.wd, ce.epochs, ce.warmup, ce.lr_schedule, ce.lr_step_factor, ce.randaug,
            ce.width) == (128, 0.1, 2e-4, 200, 5, "step", 0.01, "none", 16)
    etf = allnc.resolve(allnc.Config(dataset="cifar10", method="etf", recipe="own"))
    assert (etf.mixup, etf.lr_step_factor, etf.width, etf.etf_balance) == (1.0, 0.1, 16, True)
    rbl = allnc.resolve(allnc.Config(dataset="cifar100", method="rbl", recipe="own"))
    assert (rbl.epochs, rbl.batch_size, rbl.nesterov, rbl.wd, rbl.warmup, rbl.warmup_start, rbl.autoaugment,
            rbl.cutout, rbl.lr_schedule) == (600, 256, True, 5e-4, 8, 0.5, True, 16, "cosine-rbl")
    same = allnc.resolve(allnc.Config(dataset="cifar10", method="rbl"))
    assert (same.epochs, same.batch_size, same.nesterov) == (200, 64, False)       # --recipe allnc
    cfg, extra = allnc.parse_args(["--dataset", "synthetic", "--method", "rbl", "--recipe", "own", "--epochs", "1",
                                   "--batch-size=32", "--out", str(tmp_path)])
    allnc.resolve(cfg, extra["explicit"])
    assert (cfg.epochs, cfg.batch_size, cfg.cutout, cfg.nesterov) == (1, 32, 16, True)
    res = allnc.run(cfg, quiet=True)
    assert res["config"]["recipe"] == "own" and res["config"]["cutout"] == 16 and res["config"]["epochs"] == 1
    r = cli("allnc.py", "--dataset", "synthetic", "--method", "allnc", "--recipe", "own")
    assert r.returncode == 2 and "no published recipe" in r.stderr
    with pytest.raises(SystemExit):                # an abbreviated flag would escape the explicit set
        allnc.parse_args(["--method", "rbl", "--recipe", "own", "--epoch", "5"])
    r = cli("allnc.py", "--dataset", "cifar100", "--method", "ce", "--width", "16", "--compare", "etf",
            "--out", str(tmp_path / "cmp"))
    assert r.returncode == 2 and "etf on cifar100 needs" in r.stderr and not (tmp_path / "cmp").exists()


@pytest.mark.mutation
def test_best_epoch_reported_when_last_epoch_drops(tmp_path, monkeypatch):
    seq = iter([30.0, 55.0, 41.0, 41.0])                  # epochs 1-3, then the final evaluation

    def fake_eval(model, data, st, scores=None):
        t = next(seq) if scores is None else 0.0          # the decoupled scores of the final weights: not counted
        if scores is not None:
            return {"top1": t, "per_class": [t] * data.C}
        return {"top1": t, "many": t + 1, "medium": t - 1, "few": t - 2, "medium_bcl": t, "few_bcl": None,
                "per_class": [t] * data.C}
    monkeypatch.setattr(allnc, "evaluate", fake_eval)
    res = allnc.run(tiny_cfg(tmp_path, epochs=3, nc_every=0), quiet=True)
    assert res["final"]["top1"] == 41.0
    assert res["best"]["epoch"] == 2 and res["best"]["top1"] == 55.0 and res["best"]["few"] == 53.0
    table = allnc.run_table(res)
    assert "best (ep 2)" in table and "55.00" in table and "41.00" in table
    assert allnc.mean_std([res], "top1", "best")[0] == 55.0


@pytest.mark.mutation
def test_best_epoch_keeps_the_first_of_tied_epochs():
    """Epochs that tie on top-1 with different Many / Medium / Few: the best epoch is the first of them,
    with its own groups, as the public code keeps it (GLMC's Trainer.py: is_best = acc1 > best_acc1, a
    later equal top-1 does not replace it) and as the loop keeps the best weights (end_epoch: strictly
    greater); an epoch without a test row does not count."""
    def row(epoch, top1, many, medium, few):
        return {"epoch": epoch, "stage": 1, "test": {"top1": top1, "many": many, "medium": medium, "few": few}}
    log = [row(1, 40.0, 60.0, 35.0, 20.0), row(2, 52.0, 70.0, 50.0, 30.0), {"epoch": 3, "stage": 1},
           row(4, 48.0, 65.0, 45.0, 28.0), row(5, 52.0, 62.0, 52.0, 40.0), row(6, 52.0, 58.0, 54.0, 44.0),
           row(7, 51.0, 60.0, 50.0, 41.0)]
    assert allnc.best_epoch(log) == {"epoch": 2, "top1": 52.0, "many": 70.0, "medium": 50.0, "few": 30.0}
    assert allnc.best_epoch(log[2:]) == {"epoch": 5, "top1": 52.0, "many": 62.0, "medium": 52.0, "few": 40.0}
    assert allnc.best_epoch([{"epoch": 1, "stage": 1}]) is None


@pytest.mark.mutation
def test_few_is_at_most_20_and_bcl_split_kept(tmp_path):
    counts = data_lt.split_counts("cifar100", 100)
    assert counts.count(20) == 1
    g = allnc.shot_groups(counts)
    i20 = counts.index(20)
    assert g["few"][i20] and not g["few_bcl"][i20] and g["medium_bcl"][i20] and not g["medium"][i20]
    assert int(g["few"].sum()) == int(g["few_bcl"].sum()) + 1 == sum(n <= 20 for n in counts)
    assert int(g["many"].sum() + g["medium"].sum() + g["few"].sum()) == 100


def test_large_icpa_matrices_live_beside_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(allnc, "ICPA_JSON_MAX", 5)                   # 10 classes count as "large" here
    res = allnc.run(tiny_cfg(tmp_path, epochs=1, nc_every=0, name="r"), quiet=True)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert "icpa_mu" not in on_disk["final"]["nc"] and on_disk["final"]["nc"]["icpa_file"] == "r.icpa.pt"
    m = torch.load(tmp_path / "r.icpa.pt", weights_only=True)
    assert m["icpa_w"].shape == (10, 10) and m["icpa_mu"].dtype == torch.float16
    assert res["final"]["nc"]["nc1"] > 0
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("--tables loaded a matrix file"))
    allnc.print_tables(str(tmp_path))
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    written = allnc.plot([str(tmp_path / "r.json")], str(tmp_path / "fig"))
    assert any(p.endswith("r-icpa.png") for p in written)


@pytest.mark.device
def test_bf16_autocast_path_runs(tmp_path):
    """The AMP code path (autocast + float32 losses) as CUDA uses it; with CPU bf16 in CI."""
    cfg = tiny_cfg(tmp_path, amp="bf16", epochs=2, nc_every=0, augment=False, batch_size=32)   # learns in 2 epochs
    st = allnc.TrainState(cfg, make_data(cfg), DEVICE)
    assert st.dtype == torch.bfloat16
    assert allnc.Run(cfg, allnc.build_model(cfg, 10, [1] * 10, 3), st).scaler is None     # GradScaler: fp16 only
    res = allnc.run(cfg, quiet=True)
    fp32 = allnc.run(dataclasses.replace(cfg, amp="off", out=str(tmp_path / "fp32")), quiet=True)
    assert all(math.isfinite(r["loss"]) for r in res["log"])
    # learns as fp32 does (chance is 10%): bf16 autocast must not break a loss term or the head
    assert fp32["final"]["top1"] > 80 and abs(res["final"]["top1"] - fp32["final"]["top1"]) < 5, \
        (res["final"]["top1"], fp32["final"]["top1"])
    auto = allnc.TrainState(tiny_cfg(tmp_path), make_data(cfg), DEVICE).dtype    # --amp auto
    assert auto is (torch.bfloat16 if DEVICE.type == "cuda" else None)


@pytest.mark.device
@pytest.mark.parametrize("amp,compiled", [("auto", False), ("fp16", False), ("auto", True), ("off", False)])
def test_the_gpu_configuration_runs_on_the_cpu(tmp_path, monkeypatch, request, amp, compiled):
    """A GPU run's choices (gpu_path: fused SGD, bf16 autocast by default, fp16 with a GradScaler,
    channels_last, cudnn.benchmark, TF32 convolutions but with --amp off; with --compile the step marked
    for CUDA graphs) made on the CPU, where torch has each: the run, its checkpoint with the scaler and
    the benchmark go through the lines a GPU run takes, and the run learns as the CPU's own configuration does."""
    monkeypatch.setattr(allnc, "gpu_path", lambda device: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)       # restored after the test
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.get_float32_matmul_precision()
    request.addfinalizer(lambda: (setattr(torch.backends.cudnn.conv, "fp32_precision", conv),
                                  torch.set_float32_matmul_precision(matmul)))     # restored after the test
    torch.backends.cudnn.conv.fp32_precision = "ieee" if amp != "off" else "tf32"   # the opposite of the run's
    torch.set_float32_matmul_precision("high")          # TF32 allowed: --amp off must turn it off
    if compiled:                       # the step compiled for a GPU's CUDA graphs, traced here without inductor
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **k: real(fn, backend="aot_eager", fullgraph=True))
        torch._dynamo.reset()
    runs = []
    real_init = allnc.Run.__init__
    monkeypatch.setattr(allnc.Run, "__init__", lambda self, *a, **k: (real_init(self, *a, **k), runs.append(self))[0])
    fp16 = amp == "fp16"               # the CPU's fp16 kernels are slow: one short epoch, which need not learn
    cfg = tiny_cfg(tmp_path, amp=amp, epochs=1 if fp16 else 2, n_max=40 if fp16 else None, nc_every=0, augment=False,
                   batch_size=32, compile=compiled, compile_mode="reduce-overhead" if compiled else "default")
    res = allnc.run(cfg, quiet=True)
    rs = runs[0]
    assert rs.opt.defaults["fused"] is True and torch.backends.cudnn.benchmark
    assert rs.st.dtype == {"auto": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    # --amp off is float32 in every convolution and matmul (the NCCL check's comparison runs so)
    assert torch.backends.cudnn.conv.fp32_precision == ("ieee" if amp == "off" else "tf32")
    assert torch.get_float32_matmul_precision() == ("highest" if amp == "off" else "high")
    assert isinstance(rs.scaler, torch.amp.GradScaler) == fp16
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in rs.model.parameters() if p.dim() == 4)
    assert all(math.isfinite(r["loss"]) for r in res["log"]) and (fp16 or res["final"]["top1"] > 60), res["final"]
    if fp16:                  # the scaler's state goes into the checkpoint and comes back
        rs.ck_path = str(tmp_path / "ck.ckpt")
        rs.scaler.update(1024.0)
        rs.save_checkpoint(1)
        back = allnc.Run(cfg, rs.model, rs.st, ck_path=rs.ck_path)
        back.resume("r")
        assert back.scaler.get_scale() == 1024.0 and back.start == 2
    else:
        bcfg = allnc.resolve(allnc.Config(dataset="synthetic", smoke=True, depth=8, device=DEV, workers=0, imb=100,
                                          epochs=1, batch_size=32, out=str(tmp_path / "b"), compile=compiled))
        assert allnc.benchmark(bcfg, steps=1, warm=1)["b"] > 0


def test_a_device_index_becomes_the_current_device(monkeypatch):
    """--device cuda:1 without torchrun: GPU 1 is made the current device, so that the benchmark's
    synchronize and memory statistics and the loader's pinning act on it, not on GPU 0. 'cuda' alone
    keeps the current one. (CUDA's queries answered as a 2-GPU machine would.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    assert allnc.pick_device("cuda:1") == torch.device("cuda:1") and calls == [torch.device("cuda:1")]
    assert allnc.pick_device("cuda") == torch.device("cuda") and len(calls) == 1
    with pytest.raises(allnc.DataError, match="2 CUDA device"):
        allnc.pick_device("cuda:2")
    assert len(calls) == 1


def test_progress_inside_an_epoch(capsys):
    p = allnc.Progress(total_epochs=3, steps=10, start_epoch=1, tty=False)
    p.every, p.last = 0.0, 0.0
    p(1, 5, 640, 2.0)
    out = capsys.readouterr().out
    assert out.startswith("epoch 1/3 step 5/10 | 320 img/s |") and out.endswith("left\n") and "\r" not in out
    t = allnc.Progress(total_epochs=3, steps=10, start_epoch=1, tty=True)
    t.every, t.last = 0.0, 0.0
    t(2, 1, 64, 1.0)
    t.clear()
    out = capsys.readouterr().out
    assert out.startswith("\repoch 2/3 step 1/10") and "\n" not in out


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, capsys):
    args = ["allnc.py", "--dataset", "synthetic", "--imb", "10", "--epochs", "4", "--depth", "8",
            "--nc-every", "2", "--device", "cpu", "--name", "r"]
    env = {"OMP_NUM_THREADS": "1"}
    full = main_here(capsys, *args[1:], "--out", str(tmp_path / "a"), threads=1)
    assert full.returncode == 0, full.stderr
    out_b = tmp_path / "b"
    proc = subprocess.Popen([PY, *args, "--out", str(out_b)], cwd=HERE, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out_b / "r.ckpt"
    wait_for(lambda: ck.exists() and torch.load(ck, weights_only=False)["epoch"] >= 2, proc, "epoch 2's checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_b / "r.json").exists(), "the run finished before it could be killed"
    again = cli(*args, "--out", str(out_b), env=env)
    assert again.returncode == 0 and "resuming r from epoch" in again.stdout
    a = json.loads((tmp_path / "a" / "r.json").read_text())
    b = json.loads((out_b / "r.json").read_text())
    assert a["final"] == b["final"]
    assert [{k: v for k, v in r.items() if k not in ("img_per_s", "time")} for r in a["log"]] == \
           [{k: v for k, v in r.items() if k not in ("img_per_s", "time")} for r in b["log"]]


def test_sigterm_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg_a = tiny_cfg(tmp_path / "a", epochs=3, nc_every=2, name="r")
    full = allnc.run(cfg_a, quiet=True)
    real = allnc.STEPS["allnc"]
    calls = {"n": 0}

    def signalled(*a):        # the handler's effect, deterministically at epoch 2, step 5
        calls["n"] += 1
        if calls["n"] == len(data_lt.epoch_batches(full["n_train"], 64, 0, 0)) + 5:
            allnc.on_signal(signal.SIGTERM, None)
        return real(*a)
    monkeypatch.setitem(allnc.STEPS, "allnc", signalled)
    cfg_b = tiny_cfg(tmp_path / "b", epochs=3, nc_every=2, name="r")
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(allnc.Interrupted) as e:
        allnc.run(cfg_b, quiet=True)
    assert signal.getsignal(signal.SIGTERM) == old                      # handlers restored
    assert e.value.args[1] == 143 and "epoch 2, step 5" in e.value.args[0] and "resume" in e.value.args[0]
    ck = torch.load(tmp_path / "b" / "r.ckpt", weights_only=False)
    assert ck["epoch"] == 1 and ck["partial"]["step"] == 5
    monkeypatch.setitem(allnc.STEPS, "allnc", real)
    again = allnc.run(tiny_cfg(tmp_path / "b", epochs=3, nc_every=2, name="r"), quiet=True)
    assert again["final"] == full["final"]
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("img_per_s", "time")} for r in log]
    assert strip(again["log"]) == strip(full["log"])


def test_real_sigterm_exits_143_and_resumes(tmp_path, capsys):
    args = ["allnc.py", "--dataset", "synthetic", "--imb", "10", "--epochs", "4", "--depth", "8", "--nc-every", "0",
            "--device", "cpu", "--name", "r", "--out", str(tmp_path)]
    proc = subprocess.Popen([PY, *args], cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "r.ckpt"
    wait_for(ck.exists, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "stopped by SIGTERM" in err and "run the same command" in err, err
    assert not (tmp_path / "r.json").exists()
    again = main_here(capsys, *args[1:])
    assert again.returncode == 0 and "resuming r from epoch" in again.stdout


def test_pil_path_resumes_with_the_same_batch_order(tmp_path):
    cfg = tiny_cfg(tmp_path, loader="pil", workers=0, augment=False)
    data = make_data(cfg)
    full = [y for _, y in data.train_batches(2, 1)]
    rest = [y for _, y in data.train_batches(2, 1, start=3)]
    assert len(rest) == len(full) - 3 > 0 and all(torch.equal(a, b) for a, b in zip(full[3:], rest))


@pytest.mark.parametrize("eval_every", [1, 2])
def test_allnc_plus_plus_continues_from_the_allnc_run(tmp_path, capsys, eval_every):
    """AllNC++'s stage 1 is the AllNC run of the same config: with that run finished, AllNC++ starts at
    stage 2 from its weights and log, says so, and ends bit for bit where AllNC++ from scratch ends
    (eval_every 2: the AllNC run's last-epoch test is not on AllNC++'s cadence and is dropped)."""
    kw = dict(epochs=3, nc_every=2, eval_every=eval_every, device="cpu")
    first = allnc.run(tiny_cfg(tmp_path / "a", method="allnc", **kw), quiet=True)
    cont = allnc.run(tiny_cfg(tmp_path / "a", method="allnc++", wb_stage2_epochs=2, **kw))
    # with eval_every 2, AllNC's best epoch is its last (3), which AllNC++ does not evaluate: the best
    # weights AllNC++ needs (epoch 2's) were not kept, so it trains from scratch, and says nothing
    continued = "is the finished AllNC run" in capsys.readouterr().out
    assert continued == (eval_every == 1 or first["best"]["epoch"] != 3), first["best"]
    scratch = allnc.run(tiny_cfg(tmp_path / "b", method="allnc++", wb_stage2_epochs=2, **kw), quiet=True)
    strip = lambda log: [{k: v for k, v in r.items() if k not in ("img_per_s", "time")} for r in log]
    assert strip(json.loads(json.dumps(cont["log"]))) == strip(json.loads(json.dumps(scratch["log"])))
    assert cont["final"] == scratch["final"] and cont["best"] == scratch["best"]
    wa, wb = (torch.load(d / f"{r['name']}.pt") for d, r in ((tmp_path / "a", cont), (tmp_path / "b", scratch)))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = tiny_cfg(tmp_path / "c", method="allnc++", wb_stage2_epochs=2, maxnorm_stage1=True, **kw)
    assert allnc.stage1_name(cfg) is None                       # MaxNorm in stage 1: not AllNC's run


def test_second_process_on_the_same_run_skips(tmp_path, capsys):
    import fcntl
    cfg = tiny_cfg(tmp_path, epochs=1, nc_every=0, name="r")
    with open(tmp_path / "r.lock", "a") as holder:     # flock is per open file: the run's own open is refused too
        fcntl.flock(holder, fcntl.LOCK_EX)
        r = main_here(capsys, "--dataset", "synthetic", "--imb", "10", "--epochs", "1", "--depth", "8", "--name", "r",
                      "--device", "cpu", "--out", str(tmp_path))
        assert r.returncode == 0 and r.stdout.startswith("skip (running elsewhere)")
        assert not (tmp_path / "r.json").exists()
    assert allnc.run(cfg, quiet=True)["complete"]                  # the lock died with its holder


def test_nonfinite_loss_stops_run_naming_term(tmp_path, monkeypatch):
    monkeypatch.setattr(allnc, "hycon_loss", lambda *a: torch.tensor(float("nan"), device=DEVICE))
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(allnc.NonFinite, match="'hycon' became non-finite at epoch 1"):
        allnc.run(cfg, quiet=True)
    assert not (tmp_path / (allnc.run_name(cfg) + ".json")).exists()


def test_corrupt_result_is_rerun_not_reported(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, nc_every=0)
    path = tmp_path / (allnc.run_name(cfg) + ".json")
    path.write_text('{"complete": true, "final": {"top1"')            # a partial write
    res = allnc.run(cfg, quiet=True)
    assert res["complete"] and json.loads(path.read_text())["final"]["top1"] == res["final"]["top1"]
    assert (tmp_path / (path.name + ".corrupt")).exists()
    assert allnc.collect(str(tmp_path))[1] == []


def test_disk_full_keeps_previous_checkpoint_and_result(tmp_path, monkeypatch):
    import errno
    cfg = tiny_cfg(tmp_path, epochs=3, nc_every=0, name="r")
    real_fsync, n = os.fsync, {"ck": 0}

    def full_disk(fd):            # the disk fills while the second checkpoint is being written
        if ".ckpt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            n["ck"] += 1
            if n["ck"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(allnc.WriteError, match="No space left on device.*intact"):
        allnc.run(cfg, quiet=True)
    ck = torch.load(tmp_path / "r.ckpt", weights_only=False)
    assert ck["epoch"] == 1 and os.listdir(tmp_path) and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    monkeypatch.setattr(os, "fsync", real_fsync)
    done = allnc.run(cfg, quiet=True)
    before = (tmp_path / "r.json").read_text()
    monkeypatch.setattr(allnc.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(allnc.WriteError):
        allnc.save_json(str(tmp_path / "r.json"), {"complete": False})
    assert (tmp_path / "r.json").read_text() == before and done["complete"]


def test_weights_kept_and_eval_reproduces_the_run(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--imb", "10", "--epochs", "2", "--depth", "8", "--device", "cpu",
            "--name", "r", "--out", str(tmp_path)]
    run = main_here(capsys, *args)
    assert run.returncode == 0, run.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    w = res["weights"]
    assert w["final"]["file"] == "r.pt" and w["best"]["epoch"] == res["best"]["epoch"]
    assert w["final"]["sha256"] == allnc.file_sha256(str(tmp_path / "r.pt"))
    assert not (tmp_path / "r.ckpt").exists()
    sd = torch.load(tmp_path / "r.pt", weights_only=True)
    assert not any("momentum" in k for k in sd)                      # a state dict, no optimizer
    assert f"weights: {tmp_path / 'r.pt'} (final)" in run.stdout and f"--eval {tmp_path / 'r'}.json" in run.stdout
    ev = cli("allnc.py", "--eval", str(tmp_path / "r.json"))
    assert ev.returncode == 0, ev.stderr
    top1 = [l for l in ev.stdout.splitlines() if l.startswith("| top1")][0]
    assert f"{res['final']['top1']:8.2f}" in top1                    # the same final top-1, re-evaluated
    again, _ = allnc.reevaluate(str(tmp_path / "r.json"), "cpu")
    assert again["final"]["top1"] == res["final"]["top1"] and again["final"]["per_class"] == res["final"]["per_class"]
    data = (tmp_path / "r.pt").read_bytes()
    (tmp_path / "r.pt").write_bytes(data[: len(data) // 2])          # truncated
    bad = main_here(capsys, "--eval", str(tmp_path / "r.pt"))
    assert bad.returncode == 2 and "sha256" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    other = allnc.build_model(tiny_cfg(tmp_path, method="ce", width=8), 10, [5] * 10, 3)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    model = allnc.build_model(allnc.Config(**{k: v for k, v in res["config"].items()}), 10, res["counts"], 3)
    with pytest.raises(data_lt.DataError, match="does not match its config"):
        allnc.load_weights(model, str(tmp_path / "other.pt"), torch.device("cpu"))


def test_import_has_no_side_effects(tmp_path):
    r = cli("-c", "import sys; sys.path.insert(0, %r); import allnc, data_lt, models" % HERE, cwd=str(tmp_path))
    assert r.returncode == 0 and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Validation: bad input, every field's invalid values, inputs that would change a run silently

@pytest.mark.parametrize("args,needle", [
    (["--imb", "0.5"], "below 1"), (["--dataset", "imagenet"], "invalid choice"),
    (["--method", "foo"], "invalid choice"), (["--epochs", "-3"], "positive"),
    (["--depth", "30"], "6n+2"), (["--tables", "/nonexistent"], "not a directory")])
def test_bad_input_one_line_exit_2(capsys, args, needle):
    if args[0] in ("--imb", "--dataset"):        # a real command line: a check in resolve() and one of argparse's
        r = cli("allnc.py", "--dataset", "synthetic", *args)
    else:
        r = main_here(capsys, "--dataset", "synthetic", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


BAD_VALUES = {   # field -> invalid command-line values (every Config field that takes a value)
    "imb": ["0.5", "inf", "nan", "-1"], "seed": ["-1", str(2 ** 31)], "epochs": ["0", "-3", "1.5"],
    "batch_size": ["0", "x"], "lr": ["0", "-0.1", "nan", "inf"], "wd": ["-1", "nan"], "momentum": ["1", "-0.1"],
    "warmup": ["-1"], "warmup_start": ["1.5", "-0.5"], "lr_step_factor": ["0", "2"], "lr_steps": ["a,b"],
    "depth": ["30", "2"], "width": ["0"], "proj_dim": ["0"], "pred_hidden": ["0"], "gamma": ["0", "inf"],
    "alpha": ["-1", "nan"], "grw_rho": ["-1"], "p2p_w": ["diag"], "mean_momentum": ["1.5"], "maxnorm": ["0"],
    "wb_stage2_epochs": ["-1"], "wb_stage2_lr": ["0"], "wb_stage2_wd": ["-1"], "wb_cb_beta": ["1", "0"],
    "rbl_tau": ["-1"], "ncmc_f": ["1"], "ncmc_theta": ["0", "2"], "mixup": ["-1"], "cutout": ["-1"],
    "workers": ["-1"], "eval_every": ["0"], "nc_every": ["-1"], "out": ["/proc/nope", "FILE"],
    "data_root": ["FILE"], "train_list": ["MISSING"], "test_list": ["MISSING"], "name": ["a/b", ".x"],
    "n_max": ["0", "100000", "x"], "device": ["foo"] + ([] if torch.cuda.is_available() else ["cuda"]), "dataset": ["imagenet"], "method": ["foo"], "imb_type": ["foo"], "arch": ["foo"],
    "grw_reduction": ["foo"], "p2p_space": ["foo"], "randaug": ["foo"], "lt_subset": ["foo"], "loader": ["foo"],
    "amp": ["foo"], "heads": ["3"], "proj": ["foo"], "maxnorm_mode": ["foo"], "maxnorm_every": ["foo"],
    "ncmc_centers": ["foo"], "lr_schedule": ["foo"], "recipe": ["foo"], "dist_backend": ["foo"],
    "head_init": ["foo"], "wb_stage2_bn": ["foo"], "compile_mode": ["foo"],
}


BAD_COMBINATIONS = [["--dataset", "cifar100", "--method", "etf", "--width", "16"],
                    ["--dataset", "imagenet_lt", "--loader", "tensor"], ["--method", "allnc", "--recipe", "own"],
                    ["--method", "allnc", "--mixup", "1"],
                    # runs that would silently differ from their name
                    ["--n-max", "3", "--imb", "100"], ["--batch-size", "100000"],
                    ["--imb-type", "pareto", "--n-max", "3", "--imb", "100"], ["--method", "ce", "--gamma", "3"],
                    ["--method", "ce", "--wb-stage2-epochs", "2"], ["--method", "allnc", "--rbl-tau", "2"],
                    ["--method", "etf", "--ncmc-f", "4"], ["--method", "rbl", "--no-hycon"],
                    # a mode without --compile does nothing; rbl's step cannot enter a CUDA graph
                    ["--compile-mode", "reduce-overhead"],
                    ["--method", "rbl", "--compile", "--compile-mode", "max-autotune"]]


def test_every_field_rejects_its_invalid_values(tmp_path, capsys):
    valued = {f.name for f in dataclasses.fields(allnc.Config) if f.type not in (bool, "bool")}
    assert valued <= set(BAD_VALUES), f"no invalid values listed for {valued - set(BAD_VALUES)}"
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [[f"--{k.replace('_', '-')}", {"FILE": str(afile), "MISSING": str(tmp_path / "none.txt")}.get(v, v)]
             for k, vals in BAD_VALUES.items() for v in vals] + BAD_COMBINATIONS
    out = tmp_path / "out"
    cfg, extra = allnc.parse_args(["--dataset", "synthetic", "--out", str(out)])   # control: the base is accepted
    allnc.resolve(cfg, extra["explicit"])
    for args in cases:
        argv = ["--dataset", "synthetic", "--out", str(out), *args]
        try:
            rc = allnc.main(argv)
        except SystemExit as e:        # argparse: bad choice or type
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:"), (args, rc, err)
        assert args[0] in err[0] or args in BAD_COMBINATIONS, (args, err)       # the error names the flag
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["afile"], args       # nothing written
    print(f"{len(BAD_VALUES)} fields, {len(cases)} invalid inputs")
    for args in (["--imb", "inf"], ["--lr", "nan"], ["--out", "/proc/nope"]):    # the real command line
        r = cli("allnc.py", "--dataset", "synthetic", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_silent_inputs_name_the_value_and_the_fix(tmp_path, capsys):
    """The smallest --n-max that leaves every class an image (exp profile: int(n * imb^-1) >= 1 for
    the last class: 100 at imb 100 for fmnist's 10 classes), the training set's size, and that the
    same flags are accepted where they apply."""
    def err(*args):
        assert allnc.main(["--out", str(tmp_path / "o"), "--epochs", "1", "--depth", "8", *args]) == 2
        return capsys.readouterr().err
    assert "give --n-max 100 or more" in err("--dataset", "synthetic", "--n-max", "99", "--imb", "100")
    assert "leaves 1 of 10 classes" in err("--dataset", "synthetic", "--n-max", "99", "--imb", "100")
    assert "training set (492 images)" in err("--dataset", "synthetic", "--batch-size", "493")
    assert "--gamma applies to allnc and allnc++" in err("--dataset", "synthetic", "--method", "ce", "--gamma", "3")
    for ok in (["--n-max", "100", "--imb", "100"], ["--batch-size", "492"], ["--method", "allnc", "--gamma", "3"],
               ["--method", "ce", "--mixup", "1"], ["--method", "allnc++", "--wb-stage2-epochs", "2"]):
        cfg, extra = allnc.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "o"), *ok])
        allnc.resolve(cfg, extra["explicit"])          # accepted: no DataError


def test_corrupt_cifar_is_named_corrupt_not_missing(tmp_path):
    write_cifar(str(tmp_path), 10, 2, "cifar10")          # tiny files: they fail torchvision's MD5 check
    with pytest.raises(data_lt.DataError, match=r"data_batch_1 is corrupt .*download again"):
        data_lt.load_tensor_dataset("cifar10", str(tmp_path), True, download=False)
    r = cli("allnc.py", "--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download", "--epochs", "1",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "corrupt" in r.stderr and "not found" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreadable_image_and_missing_list_entry_are_named(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (c * 100, i, 0)).save(d / f"{i}.png")
    (tmp_path / "train" / "c1" / "2.png").write_bytes(b"not an image")
    r = cli("allnc.py", "--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--method", "ce", "--epochs", "1",
            "--batch-size", "6", "--imb", "1", "--workers", "1", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "c1/2.png" in r.stderr      # named, from a worker
    lst = tmp_path / "list.txt"
    lst.write_text("train/c0/0.png 0\ntrain/c0/9.png 0\n")
    with pytest.raises(data_lt.DataError, match="1 file.* missing .*c0/9.png"):
        data_lt.folder_samples("imagenet_lt", str(tmp_path), True, train_list=str(lst))


def test_an_imagefolder_root_without_class_folders_is_named(tmp_path):
    """train/ and val/ exist, but train/ holds files and no class folder (torchvision's ImageFolder raises
    FileNotFoundError): one line naming the folder and what it needs, exit 2."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "0.png").write_bytes(b"")
    r = cli("allnc.py", "--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--method", "ce", "--epochs", "1",
            "--imb", "1", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{tmp_path / 'train'} is not an ImageFolder directory" in r.stderr and "one folder of images per class" in r.stderr


def test_tables_on_empty_dir_and_plot_on_wrong_file(tmp_path, capsys):
    r = cli("allnc.py", "--tables", str(tmp_path))
    assert r.returncode == 2 and "no finished result" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "x.json").write_text("{}")
    r = main_here(capsys, "--plot", str(tmp_path / "x.json"), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "not a finished result" in r.stderr and "matplotlib" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--width", "100000"], "--width 100000: the run needs about"),
    (["--proj-dim", "1000000"], "--proj-dim 1000000: the run needs about"),
    (["--method", "ncmc", "--ncmc-f", "5000"], "--ncmc-f 5000: the run needs about"),
    (["--imb", "1e9"], "--imb 1e+09"),
    (["--depth", "6000002"], "give a smaller --batch-size or --depth"),
    (["--grw-rho", "1e12"], "--grw-rho 1e+12: the class weights (N/N_c)^rho overflow"),
    (["--dataset", "fmnist", "--imb", "1e6", "--n-max", "1000"], "--imb 1000 or less"),
    (["--cutout", "17"], "--cutout 17: a hole larger than the 16-pixel images of synthetic"),
    (["--dataset", "fmnist", "--cutout", "100"], "--cutout 100: a hole larger than the 28-pixel images"),
    (["--method", "allnc", "--compare", "allnc"], "--compare allnc is --method allnc itself"),
    (["--benchmark", "--benchmark-steps", "0"], "--benchmark-steps 0"),
])
def test_inputs_that_cannot_run_get_one_line_fast_and_write_nothing(tmp_path, capsys, args, needle):
    """Sizes that cannot fit (estimated before any allocation), splits that leave a class empty, a
    Cutout hole as large as the image, a run compared with itself, no timed steps: one line naming the
    flag and a value that can be followed, exit 2, within seconds, and nothing in --out."""
    t0 = time.time()
    r = main_here(capsys, "--dataset", "synthetic", "--depth", "8", "--epochs", "1", "--out", str(tmp_path / "o"),
                  *args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.time() - t0 < 10
    assert not (tmp_path / "o").exists() or not any(f.endswith((".json", ".ckpt", ".pt")) for f in os.listdir(tmp_path / "o"))


def test_cutout_is_refused_where_the_hole_outgrows_the_image(tmp_path):
    """Cutout's hole is centred at a uniform pixel and clipped: a side of the image's size leaves
    pixels in nearly every 16-pixel image, one of 30 blanks most, one of 32 every one; resolve()
    accepts sides up to the image's size and refuses larger ones."""
    x, g = torch.ones(400, 1, 16, 16), torch.Generator().manual_seed(0)
    kept = lambda L: (data_lt.cutout(x, L, g).flatten(1).sum(1) > 0).float().mean().item()
    assert kept(16) > 0.97 and kept(30) < 0.3 and kept(32) == 0
    allnc.resolve(allnc.Config(dataset="synthetic", cutout=16, out=str(tmp_path)))
    with pytest.raises(data_lt.DataError, match="--cutout 17"):
        allnc.resolve(allnc.Config(dataset="synthetic", cutout=17, out=str(tmp_path)))


def test_memory_estimate_counts_the_real_parameters(tmp_path):
    """The --width term of the estimate is 12 bytes (weights, gradients, momentum) for each parameter
    of the model build_model makes (the CIFAR ResNet's counted without building it, odd widths and
    deeper nets too); NCMC's frame term covers its frame and centers buffers."""
    info = data_lt.DATASETS["synthetic"]
    for method, kw in (("allnc", {}), ("ce", {"width": 32}), ("rbl", {}), ("ce", {"width": 5, "depth": 20})):
        cfg = tiny_cfg(tmp_path, method=method, **kw)
        model = allnc.build_model(cfg, info.num_classes, [10] * info.num_classes, info.channels)
        enc_head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("proj"))
        proj = sum(p.numel() for n, p in model.named_parameters() if n.startswith("proj"))
        need = allnc.memory_needed(cfg, info)
        assert need["--width"] == pytest.approx(12 * enc_head, rel=0.02) and need["--proj-dim"] == pytest.approx(12 * proj, rel=0.02)
    cfg = tiny_cfg(tmp_path, method="ncmc", ncmc_f=30)
    model = allnc.build_model(cfg, info.num_classes, data_lt.split_counts("synthetic", cfg.imb), info.channels)
    buffers = sum(model.head.state_dict()[k].numel() for k in ("w", "V")) + model.head.proj.weight.numel()
    assert 4 * buffers <= allnc.memory_needed(cfg, info)["--ncmc-f"] <= 4 * 8 * buffers


@pytest.mark.parametrize("width", [5, 7])
def test_odd_widths_pad_the_shortcut_unevenly(width):
    """Option A's shortcut zero-pads the new channels half on each side; with an odd width (a stage of
    2w + 1... channels) the extra one goes to the far side, so every width builds and runs."""
    block = models.BasicBlock(width, 2 * width, 2)
    x = torch.randn(2, width, 8, 8)
    s = block.shortcut(x)
    lo = width // 2
    assert s.shape == (2, 2 * width, 4, 4)
    assert torch.equal(s[:, lo:lo + width], x[:, :, ::2, ::2])
    assert s[:, :lo].abs().sum() == 0 and s[:, lo + width:].abs().sum() == 0
    net = models.ResNetCifar(8, 3, width)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 4 * width)


SLOW_SETUP = """
import sys, time
sys.path.insert(0, %r)
import allnc, models, torch
real = models.random_orthogonal
def slow(*a, **k):                      # NCMC's frame, made slow on purpose: one long C call after another
    print("building the frame", file=sys.stderr, flush=True)
    x, t = torch.randn(1500, 1500), time.time()
    while time.time() - t < 120:
        torch.linalg.qr(x)
    return real(*a, **k)
models.random_orthogonal = slow
sys.exit(allnc.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_during_setup_ends_the_run_at_once(tmp_path, sig, code):
    """A scheduler's SIGTERM (or a Ctrl-C) while the run is still being set up (here NCMC's frame,
    two minutes of C calls) ends it within seconds with the signal's exit code and one line; nothing is
    trained, so no result and no checkpoint is written."""
    out = tmp_path / "o"
    p = subprocess.Popen([PY, "-c", SLOW_SETUP % HERE, "--dataset", "synthetic", "--method", "ncmc", "--depth", "8",
                          "--epochs", "1", "--device", "cpu", "--out", str(out)], cwd=HERE, stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert p.stderr.readline().strip() == "building the frame"
    time.sleep(0.5)                                   # inside the long call
    t0 = time.time()
    p.send_signal(sig)
    rc = p.wait(timeout=30)
    took, err = time.time() - t0, p.stderr.read()
    assert rc == code and took < 10, (rc, took, err)
    assert err.strip().splitlines() == [f"stopped by {signal.Signals(sig).name} before the first training step: "
                                        f"nothing was trained or written; run the same command to start"]
    assert not any(f.endswith((".json", ".ckpt", ".pt")) for f in os.listdir(out))


# ----------------------------------------------------------------------------------------------
# Tables, plots and run_all.sh: the run lists, the smoke run end to end, --tables, --compare

def test_run_all_list_covers_every_table():
    r = run_all("--list")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("Table") or l.startswith("Fig")]
    tables = {l.split()[0] + " " + l.split()[1] for l in lines}
    assert {"Table II", "Table III", "Table IV", "Table V", "Table VI", "Table VII", "Fig. 8"} <= tables
    t2 = [l for l in lines if l.startswith("Table II ")]
    assert len(t2) == 2 * 4 * len(allnc.METHODS)
    assert sum("--gamma" in l for l in lines if l.startswith("Table VI ")) == 16
    t7 = [l for l in lines if l.startswith("Table VII ")]
    assert len(t7) == 5 and sum("--no-" in l or "--fixed-gamma" in l for l in t7) == 4
    for l in t2:         # run_all.sh's Table II gamma is the one the collector looks for
        w = l.split()
        d, i, m = w[w.index("--dataset") + 1], w[w.index("--imb") + 1], w[w.index("--method") + 1]
        if m.startswith("allnc"):
            assert float(w[w.index("--gamma") + 1]) == allnc.table2_gamma(d, float(i)) and "--recipe" not in w
        else:                # the paper's baseline numbers come from each method's own recipe
            assert w[w.index("--recipe") + 1] == "own"
    wide = run_all("--list", "--only", "II", WIDTH="16").stdout.splitlines()
    assert all(("--width 16" in l) == ("--method allnc" in l) for l in wide if l.startswith("Table II"))


def test_cpu_study_list_covers_every_method_ablation_and_sweep(tmp_path):
    """SCALE=cpu --list: every method at two imbalance factors (one with a non-empty Few group),
    the four ablations, >= 4 gammas and alphas, NC curves, three seeds, one budget for every row."""
    r = run_all("--list", SCALE="cpu")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if "allnc.py" in l]
    parsed = []
    for l in lines:
        table, cmd = l[:9].strip(), l.split("allnc.py", 1)[1].split()
        args, extra = allnc.parse_args(cmd[:cmd.index("--seed")] + ["--out", str(tmp_path)])
        parsed.append((table, allnc.resolve(args, extra["explicit"])))
    budgets = {(c.epochs, c.depth, c.width, c.batch_size, c.lr, c.wd, c.n_max, c.device, c.nc_every) for _, c in parsed}
    assert len(budgets) == 1 and all(c.dataset == "fmnist" for _, c in parsed)
    (epochs, depth, width, _, _, _, n_max, device, nc_every), = budgets
    assert width == 16 and device == "cpu" and 0 < nc_every < epochs        # thin net, NC curves over epochs
    t2 = {(c.imb, c.method) for t, c in parsed if t == "Table II"}
    imbs = {i for i, _ in t2}
    assert len(imbs) == 2 and all((i, m) in t2 for i in imbs for m in allnc.METHODS)
    assert any(min(data_lt.split_counts("fmnist", i, "exp", n_max)) <= 20 for i in imbs)       # Few not empty
    assert any(min(data_lt.split_counts("fmnist", i, "exp", n_max)) > 20 for i in imbs)
    abl = [c for t, c in parsed if t == "Table VII"]
    assert {a for c in abl for a in allnc.ABLATIONS if getattr(c, a)} == set(allnc.ABLATIONS) and len(abl) == 5
    assert len({c.gamma for t, c in parsed if t == "Table VI"}) >= 4
    assert len({c.alpha for t, c in parsed if t == "Fig. 8"}) >= 4
    assert all(l.endswith("# S in: 0 1 2") for l in lines)


def test_cpu_long_list_is_the_study_at_200_epochs(tmp_path):
    """SCALE=cpu-long --list: the CPU study's data and network at the paper's 200 epochs; Table II's
    methods with seeds 0 1 2 (AllNC and CE first), AllNC and AllNC++ with P2P's class means in the other
    space, balanced Table V (AllNC, CE) with a training set of the long-tailed one's size, all seeds 0 1 2;
    the ablations and gamma 1, 4 with seeds 0 1 (every row a spread)."""
    r = run_all("--list", SCALE="cpu-long")
    assert r.returncode == 0, r.stderr
    parsed = []
    for l in (l for l in r.stdout.splitlines() if "allnc.py" in l):
        cmd = l.split("allnc.py", 1)[1].split()
        args, extra = allnc.parse_args(cmd[:cmd.index("--seed")] + ["--out", str(tmp_path)])
        parsed.append((l[:9].strip(), allnc.resolve(args, extra["explicit"]), l.rsplit("S in: ", 1)[1]))
    lt = [c for t, c, _ in parsed if t != "Table V"]
    assert {(c.dataset, c.imb, c.n_max, c.depth, c.width, c.epochs) for c in lt} == {("fmnist", 100, 1000, 8, 16, 200)}
    default = allnc.Config.__dataclass_fields__["p2p_space"].default
    t2 = [(c.method, c.p2p_space if c.method.startswith("allnc") else default, s) for t, c, s in parsed if t == "Table II"]
    other = "z" if default == "feature" else "feature"
    assert sorted(t2) == sorted([(m, default, "0 1 2") for m in allnc.METHODS]
                                + [(m, other, "0 1 2") for m in ("allnc", "allnc++")])
    assert [m for m, _, _ in t2[:2]] == ["allnc", "ce"]
    bal = [(c.method, c.imb, c.n_max, c.epochs, s) for t, c, s in parsed if t == "Table V"]
    assert sorted(bal) == [("allnc", 1, 248, 200, "0 1 2"), ("ce", 1, 248, 200, "0 1 2")]
    assert 10 * 248 == pytest.approx(sum(data_lt.split_counts("fmnist", 100, "exp", 1000)), abs=5)     # same cost
    assert sorted(c.gamma for t, c, s in parsed if t == "Table VI" and s == "0 1") == [1.0, 4.0]
    abl = [c for t, c, s in parsed if t == "Table VII" and s == "0 1"]
    assert len(parsed) == 16
    assert sorted(a for c in abl for a in allnc.ABLATIONS if getattr(c, a)) == sorted(allnc.ABLATIONS)


@pytest.mark.parametrize("setting,value", [("JOBS", "0"), ("JOBS", "many"), ("GPUS", "0 x"), ("SEEDS", "zero"),
                                           ("SEEDS", "0,1"), ("WIDTH", "wide"), ("NPROC", "0"),
                                           ("EXTRA", "--no-such-flag"), ("EXTRA", "--epochs ten"),
                                           ("PYTHON", "/nonexistent/python")])
def test_run_all_checks_its_settings_before_anything_starts(tmp_path, setting, value):
    """A bad setting: one line naming it and what to give, exit 2, and no run started (no log folder)."""
    r = run_all("--only", "V", timeout=120, SCALE="smoke", RESULTS=str(tmp_path / "res"), **{setting: value})
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith(f"error: {setting}={value}") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "res").exists()


def test_run_all_launches_tables_iii_and_iv_through_torchrun():
    env = {"NPROC": "8", "IMAGENET_LT_ROOT": "/data/inet", "INAT2018_ROOT": "/data/inat"}
    r = run_all("--list", **env)
    lines = [l for l in r.stdout.splitlines() if l.startswith(("Table", "Fig"))]
    big = [l for l in lines if l.startswith(("Table III ", "Table IV "))]
    assert len(big) == 6 and all("-m torch.distributed.run --standalone --nproc-per-node 8 allnc.py" in l for l in big)
    assert not any("torch.distributed" in l for l in lines if l not in big)
    bad = run_all("--list", **(env | {"NPROC": "0"}))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "NPROC" in bad.stderr


def test_run_all_smoke_end_to_end_prints_tables(tmp_path, capsys):
    """run_all.sh's smoke list: every configuration parsed and resolved as allnc.py would (84 lines, 74
    distinct runs); Table VII through run_all.sh for real (its processes, logs, and the skip of a
    finished run: one of its five is Table II's, trained before); one run of every other kind (each
    table, dataset, method and recipe; Table V's balanced data; alpha 0) through allnc.main() in this
    process; then the tables from the JSONs. The configurations left untrained
    differ from a trained one only in --imb or --gamma, which resolve() and the split tests check."""
    res = str(tmp_path / "res")
    env = {"SCALE": "smoke", "RESULTS": res, "SEEDS": "0"}
    listed = run_all("--list", **env)
    assert listed.returncode == 0, listed.stderr
    lines = [l for l in listed.stdout.splitlines() if l.startswith(("Table", "Fig"))]
    assert len(lines) == 84
    assert sum("IMAGENET_LT_ROOT is not set" in l for l in lines) == 3 and sum("INAT2018_ROOT is not set" in l for l in lines) == 3
    names, train = set(), []
    for l in lines:
        if "allnc.py" not in l:
            continue
        args = l.split("allnc.py", 1)[1].split("--seed")[0].split() + ["--seed", "0", "--out", res]
        cfg, extra = allnc.parse_args(args)
        allnc.resolve(cfg, extra["explicit"])
        names.add(allnc.run_name(cfg))
        kind = l.split()[0] + " " + l.split()[1]
        if (kind == "Table II" and cfg.imb == 100) or kind == "Table V" or (kind == "Fig. 8" and cfg.alpha == 0) \
                or (kind == "Table VI" and cfg.imb == 200 and cfg.gamma == 0.5):
            train.append((l, args, allnc.run_name(cfg)))
    assert len(names) == 74                     # 78 runnable lines, shared between tables
    assert len(train) == 18
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as run_all.sh's runs (OMP_NUM_THREADS=1)
    try:
        for l, args, _ in train:
            assert allnc.main(args) == 0, l
    finally:
        torch.set_num_threads(threads)
    r = run_all("--only", "VII", timeout=600, **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("| top1") == 4 and r.stdout.count("skip (done)") == 1     # one is Table II's run
    capsys.readouterr()
    runs, bad = allnc.collect(res)
    assert len(runs) == 22 and not bad
    assert allnc.main(["--tables", res]) == 0
    out = capsys.readouterr().out
    for head in ("Table II: cifar10 imb 100:", "Table II: cifar100 imb 100:", "Table V: cifar10 imb 1:",
                 "Table V: cifar100 imb 1:", "Table VI: AllNC for different gamma, cifar100 imb 200:",
                 "Table VII: ablations of AllNC (gamma 3), cifar100 imb 100:", "Fig. 8: AllNC (gamma 3)", "All runs:"):
        assert head in out, head
    assert "Table II: cifar10 imb 200" not in out and "Table III" not in out      # nothing trained there
    assert "SMOKE" in out and r.stdout.index("Results in ") > 0          # run_all.sh printed the tables too
    vii = [r for r in table_rows(out, "Table VII: ablations") if r[0] != "paper"]
    assert [r[0] for r in vii] == ["allnc (ref)", "w/o hycon", "w/o p2p", "w/o gbbn", "w/o adjustable gamma"]
    assert all(r[5] != "-" for r in vii)                                          # All filled
    for ds in ("cifar10", "cifar100"):
        t2 = table_rows(out, f"Table II: {ds} imb 100:")
        assert [r[0] for r in t2 if r[0] != "paper"] == ["allnc (ref)", "allnc++"] + [
            f"{m} (own recipe)" for m in ("ce", "etf", "rbl", "ncmc")], t2
        assert all(r[5] != "-" for r in t2 if r[0] != "paper")
        assert t2[1] == ["paper", "", "-", "-", "-", f"{allnc.PAPER['II']['allnc'][(ds, 100)]:.2f}", "", "", ""]


def table_rows(out, title):
    """The cells of the first printed table after the line starting with title (its rows, without the
    head and rule)."""
    lines = out[out.index(title):].splitlines()[3:]
    rows = []
    for l in lines:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip()[1:-1].split("|")])
    return rows


def test_run_all_gpu_check_on_the_cpu_prints_its_table_at_a_tiny_size(tmp_path):
    """run_all.sh --gpu-check without CUDA: every part at a tiny size, one table (the one written to
    RESULTS/gpu-check.txt) with a row per part. The compiles are left out here (TORCH_COMPILE_DISABLE:
    inductor takes minutes on two cores; the capture-safety tests trace the compiled step) and the
    table says so."""
    r = run_all("--gpu-check", timeout=600, RESULTS=str(tmp_path), TORCH_COMPILE_DISABLE="1")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "gpu-check.txt").read_text()
    assert text.strip() in r.stdout and f"wrote {tmp_path / 'gpu-check.txt'}" in r.stdout
    head, *table = text.strip().splitlines()
    assert "on the CPU" in head and "tiny size" in head and "projected 200 epochs" in table[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows.pop("device tests: pytest -m device -k never_syncs and allnc-kw0")[-1].startswith("1 passed, 0 failed")
    for width in (16, 64):
        for what in ("eager", "--compile-mode default", "--compile-mode reduce-overhead"):
            ms, rate, projected, peak, note = rows.pop(f"benchmark width {width}, {what}")
            assert float(ms) > 0 and float(rate) > 0 and projected.endswith(" min") and peak.endswith(" MiB"), note
            assert note == ("" if what == "eager" else "compile disabled here")
    for n in (1, 2):
        _, rate, projected, _, note = rows.pop(f"{n} concurrent runs (JOBS={n})")
        assert float(rate) > 0 and projected.endswith(" h") and note.startswith("Table II (48 runs x 200 epochs)")
        opened = float(note.split("windows opened ")[1].split(" s")[0])
        assert opened < 0.5 and " s apart" in note, note
    assert rows.pop("2-process NCCL run vs 1 process")[-1] == "skipped: 0 GPU(s), it needs 2"
    assert rows == {}


def test_concurrent_benchmarks_open_their_timed_windows_together(tmp_path):
    """gpu-check's N concurrent runs: each benchmark process, once warmed up, waits for the others before
    its timed window opens (ALLNC_BENCH_TOGETHER), so no window runs while a peer is still starting.
    The second process starts 4 s after the first; their windows still open within 0.3 s."""
    (tmp_path / "together").mkdir()
    cmd = [PY, "allnc.py", "--benchmark", "--dataset", "synthetic", "--imb", "100", "--smoke", "--depth", "8",
           "--batch-size", "32", "--benchmark-steps", "2", "--device", "cpu", "--workers", "0", "--out", str(tmp_path)]
    env = os.environ | {"ALLNC_BENCH_TOGETHER": f"{tmp_path / 'together'}:2", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)
    second = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    import re
    starts = [float(re.search(allnc.BENCH_PRINTS["start"], o).group(1)) for o in outs]
    ends = [float(re.search(allnc.BENCH_PRINTS["end"], o).group(1)) for o in outs]
    assert abs(starts[0] - starts[1]) < 0.3 and all(e > s for s, e in zip(starts, ends)), outs


def test_tables_keep_protocols_apart_and_leave_earlier_versions_out(tmp_path, capsys):
    r16 = allnc.run(tiny_cfg(tmp_path, epochs=1, nc_every=0, dataset="synthetic"), quiet=True)
    assert r16["version"] == 3
    w64 = json.loads(json.dumps(r16)) | {"name": "w64"}
    w64["config"]["width"] = 64
    (tmp_path / "w64.json").write_text(json.dumps(w64))
    old = json.loads(json.dumps(r16)) | {"name": "old", "version": 2}     # another protocol's stage 2 and init
    (tmp_path / "old.json").write_text(json.dumps(old))
    runs, bad = allnc.collect(str(tmp_path))
    assert sorted(r["name"] for r in runs) == sorted([r16["name"], "w64"])
    assert bad == ["old.json (version 2: an earlier protocol)"]
    allnc.print_tables(str(tmp_path))
    out = capsys.readouterr().out
    assert out.count("==== protocol:") == 2 and "width 64" in out and "width 16" in out and "old.json" in out
    only_old = tmp_path / "only-old"
    only_old.mkdir()
    (only_old / "old.json").write_text(json.dumps(old))
    r = main_here(capsys, "--tables", str(only_old))
    assert r.returncode == 2 and "only 1 of an earlier protocol" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    batch = json.loads(json.dumps(r16)) | {"name": "batch"}     # the same run under GLMC's GRW reduction
    batch["config"]["grw_reduction"] = "batch"
    (tmp_path / "batch.json").write_text(json.dumps(batch))
    allnc.print_tables(str(tmp_path))
    rows = [l for l in capsys.readouterr().out.split("All runs:")[1].splitlines() if l.startswith("| synthetic")]
    assert len(rows) == 3 and sum("grw_reduction=batch" in l for l in rows) == 1     # each its own row, 1 seed
    assert all(l.split("|")[7].strip() == "1" for l in rows), rows


def test_tables_mark_differences_within_the_seed_spread(capsys):
    assert allnc.spread_delta((80.0, 1.0, 3), (79.0, 0.5, 3)).strip() == "+1.00~"      # 1 <= 1 + 0.5
    assert allnc.spread_delta((83.0, 1.0, 3), (79.0, 0.5, 3)).strip() == "+4.00"
    nc = {"nc1": 1.0, "cos_mu_std": 0.5, "equinorm_mu": 0.1, "cos_w_std": 0.2, "self_duality": 0.6}
    counts = data_lt.split_counts("fmnist", 100, "exp", 1000)

    def run(method, top1s, **kw):
        cfg = dataclasses.asdict(allnc.resolve(allnc.Config(dataset="fmnist", imb=100, n_max=1000, epochs=15, depth=8,
                                                            method=method, **kw)))
        return [{"config": cfg, "counts": counts, "final": {"top1": t, "many": t, "medium": t, "few": t - 10, "nc": nc}}
                for t in top1s]
    runs = run("allnc", [70, 72, 74]) + run("ce", [60, 61, 62]) + run("allnc", [71, 72, 73], no_p2p=True)
    allnc.paper_tables(runs)
    out = capsys.readouterr().out
    assert "Table II: fmnist imb 100: classes of 1000 to 10 training images, 2 Few" in out
    ce = next(l for l in out.splitlines() if l.startswith("| ce "))
    assert "61.00±0.82" in ce and "-11.00 " in ce and "~" not in ce                     # outside the spread
    wo = next(l for l in out.splitlines() if l.startswith("| w/o p2p"))
    assert "+0.00~" in wo                                                                # same mean: within


def test_tables_give_the_other_p2p_space_rows_of_its_own(capsys):
    """AllNC's runs with L_p(mu~)'s class means in the other space (--p2p-space) are never averaged with the
    default's: Table II gives each space a row, the NC table both side by side (with the means' equinorm),
    and the ablation table takes the default's runs alone."""
    counts = data_lt.split_counts("fmnist", 100, "exp", 1000)
    other = "feature" if allnc.Config.__dataclass_fields__["p2p_space"].default == "z" else "z"

    def run(method, top1s, cos_mu, **kw):
        cfg = dataclasses.asdict(allnc.resolve(allnc.Config(dataset="fmnist", imb=100, n_max=1000, epochs=15, depth=8,
                                                            method=method, **kw)))
        nc = {"nc1": 0.2, "cos_mu_std": cos_mu, "equinorm_mu": cos_mu / 10, "cos_w_std": 0.03, "self_duality": 0.5}
        return [{"config": cfg, "counts": counts, "final": {"top1": t, "many": t, "medium": t, "few": t - 10, "nc": nc}}
                for t in top1s]
    runs = (run("allnc", [70, 72, 74], 0.36) + run("allnc", [80, 80, 80], 0.18, p2p_space=other)
            + run("allnc", [60, 61, 62], 0.3, no_p2p=True) + run("allnc", [50], 0.3, no_p2p=True, p2p_space=other))
    allnc.paper_tables(runs)
    lines = capsys.readouterr().out.splitlines()
    row = lambda label: [l for l in lines if l.startswith(f"| {label} ")]
    refs = row("allnc (ref)")                                   # Table II's and Table VII's reference rows
    assert len(refs) == 2 and all("72.00±1.63" in l for l in refs)
    mine = row(f"allnc, P2P means in {other}")
    assert len(mine) == 2 and "80.00±0.00" in mine[0] and "+8.00" in mine[0]          # Table II, then NC
    assert "0.180±0.000" in mine[1] and "0.018±0.000" in mine[1]                        # Std cos, equinorm of means
    assert "0.360±0.000" in [l for l in lines if l.startswith("| allnc  ")][0] and "equinorm, means" in "".join(lines)
    wo = row("w/o p2p")
    assert len(wo) == 1 and "61.00±0.82" in wo[0]                                       # the default's ablation only


def test_compare_table_holds_both_runs_numbers(tmp_path, capsys):
    r = main_here(capsys, "--dataset", "synthetic", "--imb", "10", "--epochs", "1", "--depth", "8", "--device", "cpu",
                  "--out", str(tmp_path), "--compare", "ce")
    assert r.returncode == 0, r.stderr
    runs = {x["config"]["method"]: x for x in allnc.collect(str(tmp_path))[0]}
    assert set(runs) == {"allnc", "ce"} and runs["allnc"]["n_train"] == runs["ce"]["n_train"]
    table = r.stdout[r.stdout.index("allnc vs ce"):]
    row = lambda label: [c.strip() for c in next(l for l in table.splitlines() if l.startswith(f"| {label}")).split("|")]
    a, c = runs["allnc"]["final"], runs["ce"]["final"]
    assert row("All (top-1)")[2:5] == [f"{a['top1']:.2f}", f"{c['top1']:.2f}", f"{a['top1'] - c['top1']:.2f}"]
    assert row("Many")[2:4] == [f"{a['many']:.2f}", f"{c['many']:.2f}"]
    rare = min(range(10), key=lambda k: runs["allnc"]["counts"][k])
    assert row(f"rarest: class {rare}")[2:4] == [f"{a['per_class'][rare]:.2f}", f"{c['per_class'][rare]:.2f}"]
    assert "paper" not in table                                     # the paper has no synthetic numbers


def test_plot_needs_matplotlib_or_draws(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, epochs=2, nc_every=1)
    allnc.run(cfg, quiet=True)
    path = str(tmp_path / (allnc.run_name(cfg) + ".json"))
    r = main_here(capsys, "--plot", path, "--out", str(tmp_path / "fig"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and "pip install matplotlib" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    pngs = sorted(os.listdir(tmp_path / "fig"))
    assert pngs == sorted([allnc.run_name(cfg) + "-icpa.png", "nc-curves.png", "features.png"])
    assert all(open(tmp_path / "fig" / p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ----------------------------------------------------------------------------------------------
# Speed: a sync-free step loop, a capture-safe step, the compiled step, the benchmarks

SYNC_CALLS = ("item", "tolist", "cpu", "numpy", "__bool__", "nonzero")


@pytest.mark.device
@pytest.mark.parametrize("method,kw", [("allnc", {}), ("allnc", {"heads": 2, "p2p_space": "z"}),
                                       ("ce", {"mixup": 1.0}), ("etf", {}), ("rbl", {}), ("ncmc", {}),
                                       ("allnc++", {"maxnorm_every": "step"})])
def test_per_step_loop_never_syncs(tmp_path, monkeypatch, method, kw):
    """During the steps after the first, nothing may read a tensor on the host: counted by patching
    torch.Tensor's item/tolist/cpu/numpy/__bool__/nonzero (on a GPU each would block on the device)."""
    cfg, data, st, model = tiny_setup(tmp_path, method=method, **kw)
    rs = allnc.Run(cfg, model, st)
    if method == "allnc++":
        st.maxnorm_cap = allnc.maxnorm_cap(model.head.fc.weight, 0.1)
    counted = {"on": False, "n": 0, "names": []}
    for name in SYNC_CALLS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if counted["on"]:
                counted["n"] += 1
                counted["names"].append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    real_batches = data.train_batches

    driver = DEVICE.type == "cuda" and method != "rbl"   # rbl's matrix_exp reads the host (README: Speed)

    def watched(*a, **k):
        for i, b in enumerate(real_batches(*a, **k)):
            counted["on"] = i >= 1            # from the second step on, through the loop's end
            if driver:                        # on a GPU the driver itself says so: a sync raises
                torch.cuda.set_sync_debug_mode("error" if i >= 1 else 0)
            yield b
        counted["on"] = False
        if driver:                            # the epoch's end reads its sums once, by design
            torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(data, "train_batches", watched)
    try:
        sums = []
        monkeypatch.setattr(rs, "between_steps", lambda epoch, s: sums.append(s.step))
        allnc.train_epoch(model, data, st, rs, 1, cfg.lr)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert len(sums) >= 5 and counted["n"] == 0, counted["names"][:10]


HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "bincount", "item")


class HostReads(TorchDispatchMode):
    """The operators that read the device from the host (HOST_READS) called under it, at the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_torchruns_batchnorm_is_global_on_every_device_and_reads_no_host(monkeypatch):
    """Under torchrun every BatchNorm becomes GlobalBatchNorm, on GPUs too: nn.SyncBatchNorm's forward
    indexes its counts by a mask (one host read per layer and step). With the all_reduce of one process
    (the identity), its forward and backward call no host-reading operator, and it computes what
    nn.BatchNorm2d computes: outputs, input gradients and running statistics."""
    torch.manual_seed(0)
    plain = models.ResNetCifar(8, 3, 16)
    synced = models.sync_batchnorm(copy.deepcopy(plain))
    bns = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 7 and all(type(m) is models.GlobalBatchNorm for m in bns)
    monkeypatch.setattr(models, "all_reduce_sum", lambda t: t)
    x = torch.randn(8, 3, 32, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with HostReads() as reads:
        out = synced(xb)
        out.square().sum().backward()
    assert reads.seen == [], sorted(set(reads.seen))
    ref = plain(xa)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(xb.grad, xa.grad, rtol=1e-3, atol=1e-5)
    for a, b in zip((m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)), bns):
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-4)
    with HostReads() as reads:              # the check can fail: the same mode sees .item()
        out.sum().item()
    assert reads.seen == ["_local_scalar_dense"]


@pytest.mark.device
@pytest.mark.parametrize("method,kw,mode", [
    ("allnc", {}, None), ("allnc", {"heads": 2, "p2p_space": "z"}, None),
    ("allnc", {"p2p_w": "unit", "grw_reduction": "batch"}, None), ("ce", {"mixup": 1.0}, None), ("etf", {}, None),
    ("ncmc", {}, None), ("allnc++", {"maxnorm_every": "step"}, None),
    # the step as --compile hands it to torch.compile under each --compile-mode
    ("allnc", {}, "default"), ("allnc", {}, "reduce-overhead"), ("allnc", {}, "max-autotune"),
    ("allnc", {"heads": 2, "p2p_space": "z"}, "reduce-overhead"), ("etf", {}, "reduce-overhead"),
    ("ncmc", {}, "reduce-overhead"), ("allnc++", {"maxnorm_every": "step"}, "reduce-overhead")])
def test_step_is_capture_safe(tmp_path, monkeypatch, method, kw, mode):
    """What a CUDA graph can capture: the step, backward and the optimizer's update call no operator that
    reads the device from the host or has a data-dependent shape (seen at the dispatcher, below every
    Python wrapper). RBL is the named exception: its rotation's matrix_exp reads the host, so it stays
    eager on the GPU and --compile-mode other than default is refused for it (README). mode: the step as
    TrainState compiles it with that --compile-mode, traced whole (fullgraph: a graph break would leave
    host code between the graphs); the operators of its forward and backward graphs (what inductor and
    the CUDA graphs get; the mode only changes what inductor emits) are read from the graphs, since
    dynamo runs nothing under a dispatch mode; the backward's graph runs under it all the same."""
    modes, graph_ops = [], []
    if mode:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def ops_of(gm, example_inputs):
            graph_ops.extend(str(n.target).split(".")[1] for n in gm.graph.nodes if str(n.target).startswith("aten."))
            return make_boxed_func(gm.forward)
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **k: modes.append(mode) or real(
            fn, backend=aot_autograd(fw_compiler=ops_of, bw_compiler=ops_of), fullgraph=True))
        torch._dynamo.reset()
    cfg, data, st, model = tiny_setup(tmp_path, method=method, compile=bool(mode), compile_mode=mode or "default", **kw)
    assert modes == ([mode] if mode else [])
    st.eta = 0.5
    opt = allnc.make_optimizer(model, cfg)
    cap = allnc.maxnorm_cap(model.head.fc.weight, 0.1) if method == "allnc++" else None
    batches = iter(data.train_batches(1, allnc.VIEWS[method]))
    seen = []
    for i in range(2):                     # the first step creates the momentum buffers (eager warm-up)
        xs, y = next(batches)
        with HostReads() if i and not mode else nullcontext() as reads:
            loss, _ = st.step(model, xs, y, st)
        seen += reads.seen if reads else []
        with HostReads() if i else nullcontext() as reads:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cap is not None:
                allnc.max_norm_(model.head.fc.weight, cap)
        seen += reads.seen if reads else []
    assert seen == [], sorted(set(seen))
    if mode:                               # one forward and one backward graph, and what they call
        assert "convolution" in graph_ops and "convolution_backward" in graph_ops, sorted(set(graph_ops))
        assert not set(graph_ops) & set(HOST_READS), sorted(set(graph_ops) & set(HOST_READS))
    with HostReads() as reads:             # the check can fail: the same mode sees .item()
        loss.item()
    assert reads.seen == ["_local_scalar_dense"]


@pytest.mark.device
def test_compiled_step_is_not_recompiled_when_eta_changes(tmp_path, monkeypatch):
    """eta changes every epoch; the compiled step must read it as a tensor, not bake it into the graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **k: real(fn, backend=backend))
    torch._dynamo.reset()
    cfg, data, st, model = tiny_setup(tmp_path, compile=True)
    batches = data.train_batches(1, 2)
    seen = []
    for eta in (1.0, 0.9, 0.5):
        st.eta = eta
        xs, y = next(batches)
        loss, t = st.step(model, xs, y, st)
        seen.append(len(graphs))
        assert (loss - (2 * (eta * t["ce"] + (1 - eta) * (t["grw"] + t["p2p_w"])) + t["hycon"] + t["p2p_mu"])).abs() < 1e-4
    torch._dynamo.reset()
    assert seen[0] > 0 and seen[1] == seen[2] == seen[0], seen


@pytest.mark.device
def test_benchmark_reports_throughputs_and_projection(tmp_path, capsys):
    """What a user sizes a run with: the step's images/s and ms per step, the augmentation amortised
    over it, peak memory, and a projected run time of at least the training steps' time."""
    cfg = allnc.resolve(allnc.Config(dataset="synthetic", smoke=True, depth=8, device=DEV, workers=0, imb=10,
                                     epochs=7, out=str(tmp_path)))
    r = allnc.benchmark(cfg, steps=2)
    out = capsys.readouterr().out
    assert all(r[k] > 0 for k in ("b", "aug", "fwd"))
    assert r["b_all"] == pytest.approx(1 / (1 / r["b"] + 1 / r["aug"]))       # augmentation amortised
    assert r["ms_step"] == pytest.approx(1000 * 128 / r["b"])                 # 64 images x 2 views a step
    steps = len(data_lt.epoch_batches(sum(data_lt.exp_counts(200, 10, 10)), 64, 0, 0))
    assert r["total_s"] >= 7 * steps * 128 / r["b_all"]                       # at least the training steps
    assert f"{r['total_s'] / 60:.1f} min ({steps} steps/epoch" in out and "| projected 7-epoch run" in out
    assert f"{r['b']:.0f} images/s, {r['ms_step']:.2f} ms/step" in out
    assert "peak memory" in out and "batch 64 x 2 views" in out


def test_folder_benchmark_measures_the_loader_per_worker_count(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 2)):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / split / f"c{c}" / f"{i}.jpg")
    r = cli("allnc.py", "--benchmark", "--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--imb", "1", "--batch-size", "4",
            "--workers", "2", "--benchmark-steps", "2", "--method", "allnc", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = [[float(c) for c in l.strip(" |").split("|")] for l in r.stdout.splitlines()
            if l.startswith("| ") and "workers" not in l]
    assert [row[0] for row in rows] == [1, 2]                       # every worker count up to --workers
    for w, img, views, per in rows:
        assert img > 0 and views == pytest.approx(2 * img, abs=0.11) and per == pytest.approx(views / w, abs=0.11)


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)

TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


DIST_ARGS = ["allnc.py", "--dataset", "synthetic", "--imb", "10", "--depth", "8", "--nc-every", "1", "--no-augment",
             "--device", "cpu", "--name", "r"]


def torchrun(*args, timeout=300):
    return subprocess.run([*TORCHRUN, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def loss_rows(result):
    skip = ("epoch", "stage", "eta", "lr", "img_per_s", "time", "test", "nc")
    return [{k: v for k, v in row.items() if k not in skip} for row in result["log"]]


@pytest.mark.parametrize("extra", [["--method", "allnc", "--epochs", "3"],
                                   ["--method", "etf", "--mixup", "1", "--epochs", "2"],
                                   ["--method", "allnc++", "--epochs", "2", "--wb-stage2-epochs", "1"]])
def test_two_processes_train_the_run_of_one(tmp_path, capsys, extra):
    """torchrun with 2 CPU processes and the same global batch gives one process's per-epoch loss terms,
    accuracy, NC metrics and running class means. The tolerance is float summation order: changing only
    the thread count of one process (1 vs 2) moved AllNC's loss terms by up to 7e-5 (relative) over 3
    epochs, 2 processes by 1.2e-4 to 1.9e-4; per-process class means (no global_sum) moved them by 0.16,
    BatchNorm without synchronisation by 0.047. 2e-3 lies between."""
    one = main_here(capsys, *DIST_ARGS[1:], *extra, "--out", str(tmp_path / "one"), threads=1)   # as torchrun's
    two = torchrun(*DIST_ARGS, *extra, "--out", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "two")) == ["r.best.pt", "r.json", "r.lock", "r.pt"]   # rank 0 writes
    a, b = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("one", "two"))
    assert sum(l.startswith("epoch ") for l in two.stdout.splitlines()) == len(a["log"])      # rank 0 prints
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(loss_rows(a)) == len(loss_rows(b))
    for ra, rb in zip(loss_rows(a), loss_rows(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-6), (k, ra, rb)
    assert abs(a["final"]["top1"] - b["final"]["top1"]) <= 100 / 500 + 1e-9      # at most one of 500 test images
    assert b["final"]["nc"]["nc1"] == pytest.approx(a["final"]["nc"]["nc1"], rel=1e-2)
    wa, wb = (torch.load(tmp_path / d / "r.pt") for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    if "mu_run" in wa:             # HyCon/P2P's running class means: the global batch's, as in one process
        assert (wa["mu_run"] - wb["mu_run"]).abs().max() < 5e-3
    # gpu_check's verdict on the same pair (it compares NCCL against one process this way)
    assert allnc.agreement(tmp_path / "one", tmp_path / "two").endswith(": agree")
    assert allnc.agreement(tmp_path / "one", tmp_path / "missing") == "failed (see the log)"
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in wb.items()}, tmp_path / "two" / "r.pt")
    assert allnc.agreement(tmp_path / "one", tmp_path / "two").endswith(": DIFFER")     # weights 1% apart


def test_a_finished_torchrun_process_leaves_no_process_group_threads(tmp_path):
    """A gloo process group that outlives destroy_process_group() keeps its worker threads, and one
    of them releasing a finished collective while Python shuts down aborts the process ('terminate
    called without an active exception'), at random. What prevents it, checked deterministically:
    after main() returns, each process has no more threads than before it started (a surviving
    group keeps gloo's 3: 2 workers and its transport loop)."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"import os, sys\nsys.path.insert(0, {HERE!r})\nimport allnc\n"
                     "n = lambda: len(os.listdir('/proc/self/task'))\nbefore = n()\nrc = allnc.main(sys.argv[1:])\n"
                     "sys.stdout.flush()\nos.write(1, f'\\nthreads {before} -> {n()}\\n'.encode())\nsys.exit(rc)\n")   # one write, on a line of its own
    args = [a for a in DIST_ARGS[1:] if a not in ("--device", "cpu")]      # --device auto, the default path
    args += ["--epochs", "1", "--nc-every", "0", "--out", str(tmp_path / "o")]
    r = subprocess.run([*TORCHRUN, str(probe), *args], cwd=HERE, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    counts = [l.split()[1:] for l in r.stdout.splitlines() if l.startswith("threads ")]
    assert len(counts) == 2 and all(int(after) <= int(before) for before, _, after in counts), r.stdout


def test_nc_metrics_of_two_processes_equal_those_of_the_whole_set(tmp_path):
    """Under torchrun each process scores its own rows and adds its sums to the others' (no features are
    gathered): both processes get nc_metrics of the whole set, as one process computes it, and only the
    process asked for them builds the ICPA matrices."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import torch, allnc
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
g = torch.Generator().manual_seed(0)
y = torch.arange(600) % 7
h = torch.randn(600, 16, generator=g) + 3 * torch.randn(7, 16, generator=g)[y]
W = torch.randn(7, 16, generator=g)
whole = allnc.nc_metrics(h, y, W, icpa=True)
part = slice(0, 250) if rank == 0 else slice(250, 600)          # unequal parts
mine = allnc.nc_metrics(h[part], y[part], W, icpa=rank == 0, dist=allnc.Dist(rank, 2, rank, "gloo", None))
far = max(abs(mine[k] - whole[k]) / max(abs(whole[k]), 1e-12) for k in whole if not k.startswith("icpa"))
os.write(1, f"\\nrank {{rank}}: {{far:.1e}} {{sorted(k for k in mine if k.startswith('icpa'))}}\\n".encode())
torch.distributed.destroy_process_group()
""")
    r = subprocess.run([*TORCHRUN, str(probe)], cwd=HERE, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(l.split(": ", 1) for l in r.stdout.splitlines() if l.startswith("rank"))
    assert [l[0] for l in lines] == ["rank 0", "rank 1"], r.stdout
    assert all(float(l[1].split()[0]) < 1e-9 for l in lines), lines
    assert lines[0][1].endswith("['icpa_mu', 'icpa_w']") and lines[1][1].endswith("[]"), lines


def test_processes_agree_on_a_signal_that_lands_during_the_agreement(tmp_path):
    """A SIGTERM that reaches one process after its flag went into the all_reduce (before the result
    is read) must not make that process stop alone: both decide on the agreed value, and the signal
    counts at the next agreement (a process that stopped alone would leave the other one training,
    alone in its next collective). The signal is made to land there by wrapping all_reduce on rank 1:
    both processes read False at the first agreement and True at the second."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import torch, allnc
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
dist = allnc.Dist(rank, 2, rank, "gloo", None)
real = torch.distributed.all_reduce
def landing(*a, **k):
    out = real(*a, **k)
    if rank == 1 and allnc.STOP["signal"] is None:
        allnc.STOP["signal"] = 15                          # the handler runs right after the collective
    return out
torch.distributed.all_reduce = landing
first, second = dist.stop_requested(), dist.stop_requested()
os.write(1, f"\\nrank {{rank}}: {{first}} {{second}}\\n".encode())   # one write, on a line of its own: the ranks share the pipe
torch.distributed.destroy_process_group()
""")
    r = subprocess.run([*TORCHRUN, str(probe)], cwd=HERE, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(l for l in r.stdout.splitlines() if l.startswith("rank")) == ["rank 0: False True", "rank 1: False True"]


# The torchrun stress check: launches of the tiny 2-process CPU run, each into a new --out.
STRESS_LAUNCHES = {"plain": 5, "sigterm": 1, "nodes2": 1}    # ALLNC_TORCHRUN_STRESS=N: N of each kind


def stress_launch(out, epochs, nodes=1):
    """Popen of each torchrun of the tiny 2-process CPU run into out/run: one node of 2 processes, or
    2 single-process nodes on this host. torchrun N's standard output and error are appended to
    out/stdout-N.log and out/stderr-N.log."""
    args = [*DIST_ARGS, "--nc-every", "0", "--batch-size", "32", "--epochs", str(epochs), "--out", str(out / "run")]
    if nodes == 1:
        launchers = [TORCHRUN]
    else:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launchers = [[PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node",
                      "1", "--master-addr", "127.0.0.1", "--master-port", str(port)] for r in range(2)]
    procs = []
    for r, launcher in enumerate(launchers):
        with open(out / f"stdout-{r}.log", "a") as o, open(out / f"stderr-{r}.log", "a") as e:
            procs.append(subprocess.Popen([*launcher, *args], cwd=HERE, env=os.environ | {"OMP_NUM_THREADS": "1"},
                                          stdout=o, stderr=e))
    return procs


def stress_one(out, kind):
    """One launch of `kind` into out/run: what went wrong, and what its processes said about it (an
    empty list: it ended as it should)."""
    def log(what):
        return "".join((out / f"{what}-{r}.log").read_text() for r in range(2) if (out / f"{what}-{r}.log").exists())

    def said(err):                 # our one-line errors, aborts and stops; else the end of standard error
        lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "terminate called" in ln or "stopped by" in ln]
        return "\n".join(lines[:10]) or err[-1500:]
    result, bad, procs = out / "run" / "r.json", [], []
    try:
        if kind != "sigterm":
            procs = stress_launch(out, 1, nodes=2 if kind == "nodes2" else 1)
            codes = [p.wait(timeout=300) for p in procs]
            err = log("stderr")
            if any(codes):
                bad.append(f"exit codes {codes}")
            if "terminate called" in err:
                bad.append("'terminate called' at exit")
            if not result.exists():
                bad.append("no result")
            return bad + [said(err)] if bad else []
        procs = stress_launch(out, 4)
        try:
            wait_for((out / "run" / "r.ckpt").exists, procs[0], "the first epoch's checkpoint")
        except AssertionError as e:
            return [str(e).splitlines()[0], said(log("stderr"))]
        procs[0].send_signal(signal.SIGTERM)
        first = procs[0].wait(timeout=120)
        err1, out1 = log("stderr"), log("stdout")
        if result.exists():
            bad.append("the run finished before SIGTERM")
        if "stopped by SIGTERM" not in err1:
            bad.append(f"no 'stopped by SIGTERM' (torchrun exited {first})")
        if "terminate called" in err1:
            bad.append("'terminate called' after SIGTERM")
        procs = stress_launch(out, 4)                          # the same command again
        again = procs[0].wait(timeout=300)
        err2, out2 = log("stderr")[len(err1):], log("stdout")[len(out1):]
        if again != 0:
            bad.append(f"the rerun exited {again}")
        if "terminate called" in err2:
            bad.append("'terminate called' in the rerun")
        if "resuming r from epoch" not in out2:
            bad.append("the rerun did not resume")
        elif again == 0 and len(json.loads(result.read_text())["log"]) != 4:
            bad.append("the resumed result is not the 4-epoch run")
        return bad + [said(err1 + err2)] if bad else []
    finally:
        for p in procs:
            if p.poll() is None:           # a launch that hangs: torchrun stops its processes on SIGTERM
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.mark.parametrize("kind", ["plain", "sigterm", "nodes2"])
def test_torchrun_launches_end_as_they_should(tmp_path, kind):
    """The torchrun stress check: N launches of a kind, each into a new --out (N from
    ALLNC_TORCHRUN_STRESS; by default plain 5, sigterm 1, nodes2 1). plain: a finished 1-epoch run on
    one node of 2 processes exits 0, writes its result, and nothing aborts at exit ('terminate called':
    a gloo worker thread that outlives the process group aborts the process when it releases a
    collective while Python shuts down); nodes2: the same on two single-process nodes on this host,
    both torchruns exit 0. sigterm: SIGTERM to torchrun after the first epoch's checkpoint of a 4-epoch
    run: the processes stop at an agreed step and say so ('stopped by SIGTERM'), nothing aborts, and
    the same command resumes and finishes the run with exit 0 (torchrun itself ends with its own
    SignalException, exit 1: not checked)."""
    n = int(os.environ.get("ALLNC_TORCHRUN_STRESS") or STRESS_LAUNCHES[kind])
    failed = {}
    for i in range(n):
        (tmp_path / str(i)).mkdir()
        bad = stress_one(tmp_path / str(i), kind)
        if bad:
            failed[i + 1] = bad
    assert not failed, f"{kind}: {n - len(failed)}/{n} launches ended as they should; " + \
        "; ".join(f"launch {i}: " + " | ".join(b) for i, b in failed.items())


def rank_pid(marker, rank):
    """The pid of the torchrun worker of `rank` whose command line contains `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and b"allnc.py" in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_killed_rank_stops_the_run_and_the_rerun_resumes(tmp_path):
    args = [*DIST_ARGS, "--epochs", "4", "--nc-every", "0", "--eval-every", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen([*TORCHRUN, *args], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "r.ckpt"
    wait_for(ck.exists, proc, "the first checkpoint")
    pid = rank_pid(str(tmp_path), 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=60) != 0                     # the run fails, nothing hangs
    assert not (tmp_path / "r.json").exists(), "the run finished before a rank could be killed"
    saved = torch.load(ck, weights_only=False)            # the last epoch checkpoint is intact
    assert 1 <= saved["epoch"] < 4 and len(saved["log"]) == saved["epoch"]
    again = torchrun(*args)
    assert again.returncode == 0 and f"resuming r from epoch {saved['epoch']}" in again.stdout, again.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["complete"] and r["world_size"] == 2 and [row["epoch"] for row in r["log"]] == list(range(1, 5))
    assert r["log"][:saved["epoch"]] == saved["log"]


def test_ranks_checking_one_new_out_dir_at_once_both_pass(tmp_path, monkeypatch):
    """Every process of a torchrun launch checks that --out can be made and written before the
    process group exists; for a new directory they race, and a directory made or removed by the
    other process must mean "check again", not 'cannot be created or written'. Both races, made
    deterministic: the other process removes the directory before this one's probe file is opened
    (ENOENT), and makes it between this one's look and its mkdir (EEXIST). A real fault still fails."""
    out = tmp_path / "new" / "out"
    real_open, opened = open, []

    def other_removes_it(path, *a, **k):
        if not opened:
            os.rmdir(out)                              # the other process's cleanup, just before this open
        opened.append(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(allnc, "open", other_removes_it, raising=False)
    allnc.check_writable_dir(str(out))
    assert len(opened) == 2 and not (tmp_path / "new").exists()        # checked again; nothing left
    monkeypatch.undo()
    real_mkdir, made = os.mkdir, []

    def other_makes_it(path, *a):
        if not made:
            real_mkdir(path, *a)                       # the other process's mkdir, just before this one
        made.append(path)
        return real_mkdir(path, *a)
    monkeypatch.setattr(os, "mkdir", other_makes_it)
    allnc.check_writable_dir(str(out))
    assert made == [str(tmp_path / "new"), str(out)] and not out.exists()    # EEXIST, checked again
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(data_lt.DataError, match="is a file, not a directory"):
        allnc.check_writable_dir(str(tmp_path / "file" / "out"))


def test_torchrun_launch_errors_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """A bad launch: one line, exit 2, before any process group exists. The first case is a real
    command line; the rest run allnc.main() here with torchrun's variables set."""
    base = ["allnc.py", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "o")]
    full = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}

    def launched(env, *extra):
        for k in allnc.TORCHRUN_ENV:
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return main_here(capsys, *base[1:], *extra)
    for i, (env, extra, needle) in enumerate([
            ({"RANK": "0", "WORLD_SIZE": "2"}, [], "torchrun environment is incomplete"),
            (full, ["--batch-size", "63"], "does not split over 2 processes"),
            (full, ["--device", "cpu", "--dist-backend", "nccl"], "--dist-backend nccl"),
            (full, ["--device", "cuda:0"], "each process takes cuda:LOCAL_RANK"),
            (full, ["--tables", str(tmp_path)], "runs in one process")]):
        r = cli(*base, *extra, env=env) if i == 0 else launched(env, *extra)
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = launched(full | {"RANK": "1", "LOCAL_RANK": "1"}, "--batch-size", "63")
    assert r.returncode == 2 and r.stderr == ""              # one line per machine: local rank 0's
    assert sorted(os.listdir(tmp_path)) == []


def test_each_machines_first_process_loads_the_data_before_the_others(monkeypatch):
    """Under torchrun the processes of a machine must not all download a missing dataset into the
    same folder at once: local rank 0 loads first, the others after a barrier (also when its load
    fails, so that they fail on their own instead of waiting). One process: no barrier."""
    calls = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None: calls.append("barrier"))

    def load():
        calls.append("load")
        return "data"
    for local, want in ((0, ["load", "barrier"]), (1, ["barrier", "load"])):
        calls.clear()
        assert allnc.Dist(local, 2, local, "gloo", None).local_first(load) == "data" and calls == want, local
    calls.clear()

    def fails():
        calls.append("load")
        raise data_lt.DataError("download failed")
    with pytest.raises(data_lt.DataError):
        allnc.Dist(0, 2, 0, "gloo", None).local_first(fails)
    assert calls == ["load", "barrier"]
    calls.clear()
    assert allnc.Dist().local_first(load) == "data" and calls == ["load"]


def test_rank_parts_of_each_batch_are_the_single_process_batch():
    shares = [data_lt.rank_part(8, r, 4) for r in range(4)]
    assert [list(range(8))[s] for s in shares] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [list(range(10))[data_lt.rank_part(10, r, 3)] for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    x, y = data_lt.load_tensor_dataset("synthetic", "", True)        # augmented views too: the same draws
    info = data_lt.DATASETS["synthetic"]
    one = list(data_lt.tensor_loader(x, y, info, 64, 0, 1, views=2))
    two = [list(data_lt.tensor_loader(x, y, info, 64, 0, 1, views=2, share=data_lt.rank_part(64, r, 2)))
           for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1])
    for k, (views, labels) in enumerate(one):
        assert torch.equal(torch.cat([two[0][k][1], two[1][k][1]]), labels)
        assert all(torch.equal(torch.cat([two[0][k][0][v], two[1][k][0][v]]), views[v]) for v in range(2))
