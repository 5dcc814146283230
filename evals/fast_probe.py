"""The fast linear probe: softmax regression on cached features (no augmentation), its L2
penalty chosen on a validation split carved from the training set, then refitted on the whole
training set. Seconds instead of hours: for sweeps over checkpoints and few-shot tables.

MAE's own probe (augmented views through the frozen encoder, LARS) is ``evals/mae_probe.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from evals.distributed_eval import topk_correct
from evals.splits import train_val_split
from mae_bench.errors import ConfigError

DEFAULT_WEIGHT_DECAYS = tuple(float(w) for w in np.logspace(-1, -6, 11))  # 1e-1 ... 1e-6
DEFAULT_LRS = (1.0,)


def fast_linear_probe(
    train_features: Tensor | np.ndarray,
    train_labels: Tensor | np.ndarray,
    test_features: Tensor | np.ndarray,
    test_labels: Tensor | np.ndarray,
    *,
    num_classes: int | None = None,
    val_fraction: float = 0.1,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 300,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Softmax regression on cached features, hyper-parameters chosen on a training split.

    1. ``select_probe_hyperparameters`` sees the training set alone: a stratified, seeded
       ``val_fraction`` of it is held out; every (lr, weight decay) pair is fitted on the rest
       and scored on it (top-1, then cross-entropy to break ties).
    2. The chosen pair is refitted on the whole training set; only then is the test set
       touched, once.

    Each fit minimises ``mean cross-entropy + weight_decay / 2 * ||W||^2`` (bias not
    penalised) on features standardised with the statistics of the samples being fitted, with
    full-batch L-BFGS and a strong-Wolfe line search. The problem is convex, so the result is
    its unique optimum and depends on the weight decay alone: the learning rate is only the
    line search's first trial step. ``lrs`` therefore defaults to (1.0,); it stays a grid axis
    so that the protocol reads like SGD probes. ``weight_decay = 1 / (C x N)`` is
    scikit-learn's ``LogisticRegression(C=C)`` on N samples; the default grid (1e-1 to 1e-6 in
    half decades) brackets C = 1 for N from 10 to 10^6.

    Args:
        train_features: [N, D] float (numpy or torch, any float dtype).
        train_labels: [N] integer class indices.
        test_features: [M, D] float.
        test_labels: [M] integer class indices.
        num_classes: number of classes; None: max training label + 1.
        val_fraction: share of each training class held out for selection (at least 1 each).
        lrs: L-BFGS initial step sizes to try.
        weight_decays: L2 penalties to try. A grid of one (lr, weight decay) pair skips the
            validation split (val_top1 is then NaN): the way to probe one-shot sets.
        max_iter: L-BFGS iterations per fit.
        seed: chooses the validation split.
        device: where to fit.
        progress: called with (fits done, fits in all) after each L-BFGS fit: one per grid
            pair, then the refit. The search takes tens of seconds on large sets, so a user
            sees it move.

    Returns:
        top1, top5 (percent on test), val_top1 (percent, of the chosen pair), lr and
        weight_decay (the chosen ones), seconds (the whole call).

    Raises:
        ConfigError: mismatched shapes or lengths, non-finite features, labels out of range,
            fewer than 2 classes, or a class with a single training sample while there is a
            grid to choose from.
    """
    t0 = time.perf_counter()
    x_train, y_train, num_classes = _check_features(train_features, train_labels, num_classes,
                                                    "train")
    x_test, y_test, _ = _check_features(test_features, test_labels, num_classes, "test")
    if x_test.shape[1] != x_train.shape[1]:
        raise ConfigError(f"test features have {x_test.shape[1]} dims but training features "
                          f"have {x_train.shape[1]}; extract both with the same encoder and pool")
    searched = len(lrs) * len(weight_decays) if len(lrs) * len(weight_decays) > 1 else 0
    chosen = select_probe_hyperparameters(
        x_train, y_train, num_classes=num_classes, val_fraction=val_fraction, lrs=lrs,
        weight_decays=weight_decays, max_iter=max_iter, seed=seed, device=device,
        progress=None if progress is None else lambda done, _: progress(done, searched + 1))
    basis = _Basis(x_train.to(device))
    weight, bias = _fit_softmax(basis, basis.apply(x_train.to(device)), y_train.to(device),
                                num_classes, chosen["weight_decay"], chosen["lr"], max_iter)
    if progress is not None:
        progress(searched + 1, searched + 1)
    with torch.no_grad():
        logits = basis.apply(x_test.to(device)) @ weight.T + bias  # [M, C]
        top1, top5 = topk_correct(logits, y_test.to(device))
    return {
        "top1": 100.0 * top1 / len(y_test),
        "top5": 100.0 * top5 / len(y_test),
        "val_top1": chosen["val_top1"],
        "lr": chosen["lr"],
        "weight_decay": chosen["weight_decay"],
        "seconds": time.perf_counter() - t0,
    }


def select_probe_hyperparameters(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    val_fraction: float = 0.1,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 300,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Choose (lr, weight decay) for softmax regression on a validation split of the TRAINING
    features: fit on the rest, score on it. It takes no test data, by design.

    Args:
        features: [N, D] float32 training features.
        labels: [N] int64 training labels in [0, num_classes).
        num_classes: width of the classifier.
        val_fraction, lrs, weight_decays, max_iter, seed, device: as in ``fast_linear_probe``.
        progress: called with (fits done, grid size) after each fit.

    Returns:
        lr, weight_decay (the best pair), val_top1 (its validation top-1, percent),
        val_loss (its validation cross-entropy); both NaN when the grid holds a single pair
        (then nothing is held out).
    """
    if not lrs or not weight_decays:
        raise ConfigError("lrs and weight_decays must each hold at least one value")
    if min(lrs) <= 0 or min(weight_decays) < 0:
        raise ConfigError(f"lrs must be > 0 and weight_decays >= 0, got {list(lrs)} and "
                          f"{list(weight_decays)}")
    if len(lrs) == 1 and len(weight_decays) == 1:
        # Nothing to choose: no split, so that one-shot sets (one sample per class) work.
        return {"lr": float(lrs[0]), "weight_decay": float(weight_decays[0]),
                "val_top1": float("nan"), "val_loss": float("nan")}
    fit_idx, val_idx = train_val_split(labels, val_fraction, seed)
    x_fit, y_fit = features[fit_idx].to(device), labels[fit_idx].to(device)
    basis = _Basis(x_fit)
    x_fit = basis.apply(x_fit)  # [F, D]
    x_val, y_val = basis.apply(features[val_idx].to(device)), labels[val_idx].to(device)

    best: dict[str, float] | None = None
    fits = 0
    for lr in lrs:
        init = None
        for wd in sorted(weight_decays, reverse=True):  # strong -> weak: good warm starts
            init = _fit_softmax(basis, x_fit, y_fit, num_classes, wd, lr, max_iter, init)
            fits += 1
            if progress is not None:
                progress(fits, len(lrs) * len(weight_decays))
            with torch.no_grad():
                logits = x_val @ init[0].T + init[1]  # [V, C]
                score = {"lr": float(lr), "weight_decay": float(wd),
                         "val_top1": 100.0 * topk_correct(logits, y_val, (1,))[0] / len(y_val),
                         "val_loss": float(F.cross_entropy(logits, y_val))}
            if best is None or (score["val_top1"], -score["val_loss"]) > (best["val_top1"],
                                                                          -best["val_loss"]):
                best = score
    assert best is not None
    return best


class _Basis:
    """Standardisation (per-feature mean and std of the fitted samples) followed by a rotation
    onto the principal axes of the standardised features. A rotation leaves the L2 penalty and
    so the optimum unchanged, but makes the curvature of the loss diagonal enough for the
    preconditioning in ``_fit_softmax``."""

    def __init__(self, x: Tensor) -> None:
        self.mean = x.mean(dim=0)  # [D]
        std = x.std(dim=0, correction=0)  # [D]
        self.std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant features -> 0
        z = ((x - self.mean) / self.std).double()  # [N, D]
        variances, axes = torch.linalg.eigh(z.T @ z / len(z))  # [D], [D, D]
        self.variances = variances.clamp(min=0).float()  # [D] along each axis
        self.axes = axes.float()  # [D, D]

    def apply(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.axes  # [N, D]


def _fit_softmax(basis: _Basis, x: Tensor, y: Tensor, num_classes: int, weight_decay: float,
                 lr: float, max_iter: int, init: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + weight_decay / 2 * ||W||^2.

    Features ``x`` [N, D] are in ``basis`` coordinates. L-BFGS runs on V = W * sqrt(var +
    weight_decay) per axis: the loss curvature along an axis grows with its variance, so this
    evens it out (standardised features of real encoders are strongly correlated, and without
    it the weakly regularised fits need several times more iterations). The optimum is the
    same.

    Returns:
        weight [C, D] (in basis coordinates) and bias [C], detached.
    """
    scale = (basis.variances + weight_decay).clamp(min=1e-12).rsqrt()  # [D]
    xs = x * scale  # [N, D]
    if init is None:
        v = torch.zeros(num_classes, x.shape[1], device=x.device)  # [C, D]
        bias = torch.zeros(num_classes, device=x.device)  # [C]
    else:
        v, bias = init[0] / scale, init[1].clone()
    v.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 0.5 * weight_decay * scale.pow(2)  # [D]: ||W||^2 written in terms of V
    optimizer = torch.optim.LBFGS([v, bias], lr=lr, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-5, tolerance_change=1e-10,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = torch.addmm(bias, xs, v.T)  # [N, C]
        loss = F.cross_entropy(logits, y) + (v.pow(2) * penalty).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (v.detach() * scale), bias.detach()


def _check_features(features: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                    num_classes: int | None, split: str) -> tuple[Tensor, Tensor, int]:
    """Converts to float32 [N, D] and int64 [N] CPU tensors and validates them."""
    x = features if isinstance(features, Tensor) else torch.as_tensor(np.asarray(features))
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise ConfigError(f"{split} features must be a 2-D [N, D] float array, got shape "
                          f"{tuple(x.shape)} dtype {x.dtype}")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{split} labels must be a 1-D integer array, got shape "
                          f"{tuple(y.shape)} dtype {y.dtype}")
    if len(x) != len(y):
        raise ConfigError(f"{split} features have {len(x)} rows but {split} labels have {len(y)}")
    if len(x) == 0:
        raise ConfigError(f"{split} features are empty")
    x = x.detach().cpu().float()
    y = y.detach().cpu().long()
    if not torch.isfinite(x).all():
        raise ConfigError(f"{split} features hold NaN or infinite values")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ConfigError(f"{split} labels must lie in [0, {num_classes}) (unlabelled samples are "
                          f"-1; drop them), got {int(y.min())}..{int(y.max())}")
    if split == "train" and len(torch.unique(y)) < 2:
        raise ConfigError(f"the training labels hold {len(torch.unique(y))} class; a classifier "
                          "needs at least 2")
    return x, y, num_classes
