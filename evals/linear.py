"""Linear probes: a linear classifier on top of a frozen encoder.

Two protocols:

``linear_probe``: MAE's (He et al. 2021, appendix A.2; ``main_linprobe.py``). A BatchNorm
    without affine parameters and a linear layer on the frozen encoder's features, trained with
    LARS, lr = blr x batch / 256, warmup then cosine, on random-resized-crop + flip views, so the
    encoder runs on every step. The reference protocol, slow. Under torchrun it trains the head
    with DistributedDataParallel, each process encoding its share of every global batch.

``fast_linear_probe``: softmax regression on cached features (no augmentation), its L2 penalty
    chosen on a validation split carved from the training set, then refitted on the whole
    training set. Seconds instead of hours: for sweeps over checkpoints and few-shot tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from evals.features import POOLS, encode
from evals.lars import LARS
from evals.splits import train_val_split
from mae_bench.data import ArrayDataset
from mae_bench.data.augment import BatchViews, ViewSpec, eval_resize
from mae_bench.errors import ConfigError
from mae_bench.models.vit import VisionTransformer
from mae_bench.training.distributed import rank_and_world, sync_batchnorm
from mae_bench.training.runtime import autocast, lr_at, resolve_precision
from mae_bench.training.step import TrainStep

# MAE's linear probe crops harder than its pretraining (0.2-1): torchvision's default range.
PROBE_CROP_SCALE = (0.08, 1.0)
PROBE_OPTIMIZERS = ("lars", "sgd")


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of ``logits`` [N, C] have their label among the top k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hit = top == labels[:, None]  # [N, kmax]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


# --- MAE's protocol --------------------------------------------------------------------------


def probe_head(dim: int, num_classes: int, generator: torch.Generator | None = None
               ) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d (no affine, eps 1e-6) then Linear (trunc-normal std 0.01
    weights, zero bias). The BatchNorm makes the probe invariant to the feature scale, which
    differs a lot between methods."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head


def linear_probe(
    encoder: VisionTransformer,
    train: ArrayDataset,
    test: ArrayDataset,
    *,
    pool: str = "cls",
    img_size: int | None = None,
    epochs: int = 90,
    batch_size: int = 256,
    blr: float = 0.1,
    warmup_epochs: float | None = None,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    crop_scale: tuple[float, float] = PROBE_CROP_SCALE,
    hflip: float = 0.5,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    train_indices: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """MAE's linear probe: train a BatchNorm + Linear head on augmented views of a frozen
    encoder, then report test accuracy.

    The encoder runs in eval mode under ``torch.no_grad()``; only the head is trained. The
    encoder is moved to ``device`` and its train/eval mode is restored afterwards. Everything
    random (head init, data order, crops, flips) comes from generators seeded by ``seed``.

    Under torch.distributed (W > 1 processes; every process calls this with the same
    arguments): every process draws the same global batch of B images and crops, encodes and
    trains on rows [rank * B/W, (rank + 1) * B/W) of it; the head is wrapped in
    DistributedDataParallel and its BatchNorm normalises over the global batch; each process
    evaluates a share of the test set. Every process returns the same accuracies and loss,
    equal to one process's up to float rounding. The encoder takes rank 0's weights. Only rank
    0 calls ``progress``.

    Args:
        encoder: the frozen encoder.
        train: training images and labels (in memory).
        test: test images and labels.
        pool: "cls" (normed cls token) or "mean" (mean normed patch token).
        img_size: input side; None: the encoder's own (grid_size x patch_size).
        epochs: training epochs (MAE: 90 on ImageNet).
        batch_size: images per step, over all processes; capped at the training set size (the
            capped value must be a multiple of the number of processes). Incomplete last
            batches are dropped, as MAE does.
        blr: base learning rate; lr = blr x batch / 256 (MAE: 0.1).
        warmup_epochs: linear warmup length; None: 10% of ``epochs`` (MAE: 10 of 90).
        optimizer: "lars" (MAE's: SGD with momentum 0.9 and LARS's per-layer trust ratio) or
            "sgd" (momentum 0.9, no trust ratio: converges at the small batches of one machine,
            see ``evals.recipes.auto_probe``).
        weight_decay: on the linear layer's weight (MAE: 0).
        crop_scale: area range of the training crops (MAE: 0.08-1).
        hflip: probability of a horizontal flip of a training crop (0 for digits and text).
        seed: seeds every random choice; the same seed gives the same result on CPU.
        device: where the encoder and head run.
        precision: "auto", "bf16", "fp16" (CUDA only) or "fp32" (``mae_bench.config.
            PRECISIONS``): autocast for the encoder forward (the head and its loss stay fp32).
        train_indices: [M] indices into ``train`` to train on (few-shot); None: all.
        progress: called with (steps done, total steps) after every step.

    Returns:
        top1, top5 (percent on ``test``), train_loss (mean over the last epoch), lr (peak),
        epochs, steps, batch_size (global), train_samples, train_seconds, eval_seconds (this
        process's).

    Raises:
        ConfigError: a bad argument, labels out of range, or a batch that the processes
            cannot share equally.
    """
    img_size = _check_probe_args(encoder, train, test, pool, img_size, epochs, batch_size, blr,
                                 warmup_epochs, optimizer, weight_decay, crop_scale)
    precision = resolve_precision(precision, device)  # validates the name
    num_classes = len(train.classes)
    indices = _check_indices(train_indices, len(train))
    _check_labels_in_range(train.labels[indices], num_classes, "training")
    _check_labels_in_range(test.labels, num_classes, "test")
    n = len(indices)
    batch = min(batch_size, n)
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * epochs
    peak_lr = blr * batch / 256
    warmup = 0.1 * epochs if warmup_epochs is None else warmup_epochs
    rank, world = rank_and_world()
    if batch % world:
        what = (f"batch_size {batch_size}" if batch == batch_size else
                f"the batch of {batch} (batch_size {batch_size} capped at the training set)")
        raise ConfigError(f"{what} cannot be split equally between {world} processes (it is "
                          f"the global batch of a step); use a multiple of {world}")
    per_rank = batch // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this process's share of a batch

    head = probe_head(encoder.embed_dim, num_classes, torch.Generator().manual_seed(seed))
    # Under torchrun: BatchNorm statistics over the global batch, as in one process.
    head = sync_batchnorm(head.to(device), device)
    opt = _probe_optimizer(optimizer, head, weight_decay)
    train_head: nn.Module = head
    if world > 1:
        train_head = nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(train_head, opt,
                           lambda s: lr_at(s, steps_per_epoch, epochs, warmup, peak_lr, 0.0),
                           device=device, precision=precision)
    views = BatchViews(ViewSpec(img_size, scale=crop_scale, hflip=hflip), train.info.mean,
                       train.info.std)
    order_gen = torch.Generator().manual_seed(seed)
    view_gen = torch.Generator(device=device).manual_seed(seed)

    def frozen_features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return encode(encoder, x, pool)  # [b, D]

    was_training = encoder.training
    encoder.to(device).eval()
    if world > 1:
        _broadcast_weights(encoder)
    try:
        t0 = time.perf_counter()
        head.train()
        for _ in range(epochs):
            order = indices[torch.randperm(n, generator=order_gen)]  # [n]
            for i in range(steps_per_epoch):
                idx = order[i * batch:(i + 1) * batch]  # [B]
                images = train.images[idx].to(device, non_blocking=True)  # [B, C, H, W] uint8
                labels = train.labels[idx].to(device, non_blocking=True)  # [B]
                # Crops for the whole global batch, so that the generator advances as in one
                # process; this process encodes its own rows only.
                x = views(images, view_gen)[rows]  # [b, C, S, S]
                # the frozen encoder under autocast; the head and its loss in fp32 outside it
                train_step.micro_batch(
                    lambda x=x: frozen_features(x),
                    lambda f, y=labels[rows]: F.cross_entropy(train_head(f.float()), y))
                if progress is not None and rank == 0:
                    progress(train_step.step, total_steps)
            # One device sync per epoch; the mean of the processes' equal shares is the global
            # batch's loss. Not checked: a non-finite probe loss shows as NaN in the result.
            epoch_losses = train_step.flush(check=False)["loss"]  # [steps_per_epoch]
        train_loss = float(epoch_losses.mean())
        train_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        head.eval()
        correct = [0, 0]
        with torch.no_grad():
            # Every W-th batch, the same batches as in one process (the same logits); the
            # counts are summed over processes below.
            for start in range(rank * batch, len(test), world * batch):
                images = test.images[start:start + batch].to(device)  # [B, C, H, W] uint8
                x = views.normalize(eval_resize(images, img_size))  # [B, C, S, S]
                with autocast(device, precision):
                    features = encode(encoder, x, pool)  # [B, D]
                logits = head(features.float())  # [B, num_classes]
                labels = test.labels[start:start + batch].to(device)
                hits = topk_correct(logits, labels)
                correct = [a + b for a, b in zip(correct, hits, strict=True)]
        if world > 1:
            counts = torch.tensor(correct, device=device)  # [2]; NCCL reduces device tensors
            dist.all_reduce(counts)
            correct = counts.tolist()
        eval_seconds = time.perf_counter() - t0
    finally:
        encoder.train(was_training)
    return {
        "top1": 100.0 * correct[0] / len(test),
        "top5": 100.0 * correct[1] / len(test),
        "train_loss": train_loss,
        "lr": peak_lr,
        "epochs": epochs,
        "steps": total_steps,
        "batch_size": batch,
        "train_samples": n,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
    }


@torch.no_grad()
def _broadcast_weights(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers (in place). The frozen encoder is not
    wrapped in DDP, which would do this; processes that loaded different weights (a random
    init seeded per rank) would otherwise probe different encoders."""
    for tensor in (*module.parameters(), *module.buffers()):
        dist.broadcast(tensor.detach(), src=0)


def _probe_optimizer(name: str, head: nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """The probe head's optimizer: LARS (MAE) or plain SGD, both with momentum 0.9; weight
    decay on the linear weight only."""
    decay = [p for n, p in head.named_parameters() if p.ndim > 1]
    rest = [p for n, p in head.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if name == "lars":
        return LARS(groups, lr=0.0, weight_decay=0.0, momentum=0.9)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


def _check_probe_args(encoder: VisionTransformer, train: ArrayDataset, test: ArrayDataset,
                      pool: str, img_size: int | None, epochs: int, batch_size: int, blr: float,
                      warmup_epochs: float | None, optimizer: str, weight_decay: float,
                      crop_scale: tuple[float, float]) -> int:
    """Validates linear_probe's arguments; returns the image size to use."""
    for name, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "images"):
            raise ConfigError(f"the linear probe needs an in-memory data set for {name}, got "
                              f"{type(ds).__name__}; use the fast probe on cached features")
    if len(test) == 0:
        raise ConfigError("the test set is empty")
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    if epochs < 1 or batch_size < 2 or blr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 2 and blr > 0, got epochs={epochs}, "
                          f"batch_size={batch_size}, blr={blr}")
    if warmup_epochs is not None and not 0 <= warmup_epochs <= epochs:
        raise ConfigError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if optimizer not in PROBE_OPTIMIZERS:
        raise ConfigError(f"unknown probe optimizer {optimizer!r}; valid: "
                          f"{', '.join(PROBE_OPTIMIZERS)}")
    if weight_decay < 0 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ConfigError(f"need weight_decay >= 0 and 0 < crop_scale[0] <= crop_scale[1] <= 1, "
                          f"got {weight_decay} and {crop_scale}")
    native = encoder.grid_size * encoder.patch_size
    if img_size is not None and img_size != native:
        raise ConfigError(f"img_size {img_size} differs from the encoder's {native} (its "
                          "position embedding is fixed); leave img_size unset")
    if train.images.shape[1] != encoder.in_chans:
        raise ConfigError(f"the data has {train.images.shape[1]} channels but the encoder takes "
                          f"{encoder.in_chans}")
    return native


def _check_indices(train_indices: Tensor | None, n: int) -> Tensor:
    if train_indices is None:
        return torch.arange(n)
    idx = torch.as_tensor(train_indices)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ConfigError("train_indices must be a 1-D integer tensor of sample indices, got "
                          f"shape {tuple(idx.shape)} dtype {idx.dtype}")
    idx = idx.long().cpu()
    if len(idx) < 2:
        raise ConfigError(f"train_indices holds {len(idx)} sample(s); the BatchNorm head needs "
                          "at least 2")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ConfigError(f"train_indices must lie in [0, {n}), got values "
                          f"{int(idx.min())}..{int(idx.max())}")
    return idx


def _check_labels_in_range(labels: Tensor, num_classes: int, split: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(f"{split} labels must lie in [0, {num_classes}) (unlabelled samples "
                          f"are -1), got {int(labels.min())}..{int(labels.max())}")


# --- fast probe on cached features -----------------------------------------------------------

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
