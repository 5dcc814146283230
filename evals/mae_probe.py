"""MAE's linear probe (He et al. 2021, appendix A.2; ``main_linprobe.py``): a BatchNorm without
affine parameters and a linear layer on the frozen encoder's features, trained with LARS, lr =
blr x batch / 256, warmup then cosine, on random-resized-crop + flip views, so the encoder runs
on every step. The reference protocol, slow. Under torchrun it trains the head with
DistributedDataParallel, each process encoding its share of every global batch.

Any mae-bench encoder takes it: a ViT pools its tokens (``pool``), a ResNet or timm backbone
gives its own pooled embedding; a convolutional one runs in channels-last (oneDNN's and cuDNN's
fast layout), and in eval mode, like every frozen encoder: BatchNorm uses its running statistics.

Its knobs are one ``ProbeRecipe`` (``evals/recipes.py``), checked when built; the fast probe on
cached features is ``evals/fast_probe.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from evals.distributed_eval import rank_rows, topk_accuracy
from evals.encoders import encoder_pools
from evals.features import encode
from evals.lars import LARS
from evals.recipes import ProbeRecipe
from mae_bench.data import ArrayDataset
from mae_bench.data.augment import BatchViews, ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.models.backbones import is_convnet
from mae_bench.models.vit import VisionTransformer
from mae_bench.training.distributed import rank_and_world, sync_batchnorm
from mae_bench.training.runtime import autocast, lr_at, resolve_precision
from mae_bench.training.step import TrainStep


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
    encoder: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    recipe: ProbeRecipe = ProbeRecipe(),
    *,
    pool: str = "cls",
    img_size: int | None = None,
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
        encoder: the frozen encoder: a ``VisionTransformer``, or a backbone with the Encoder
            hooks (``mae_bench.models.backbones``: a ResNet, a timm model).
        train: training images and labels (in memory).
        test: test images and labels.
        recipe: epochs, batch (over all processes; capped at the training set size, and the
            capped value must be a multiple of the number of processes; incomplete last
            batches are dropped, as MAE does), blr, warmup, optimizer ("lars": MAE's; "sgd":
            momentum 0.9 without the trust ratio, see ``evals.recipes.auto_probe``), weight
            decay of the linear weight, crop scale.
        pool: "cls" (normed cls token) or "mean" (mean normed patch token); a backbone: its
            own pooling's name (a CNN's average pool: "mean"; ``evals.encoders.encoder_pools``).
        img_size: input side; None: the encoder's own (a ViT's grid_size x patch_size; a
            backbone takes any size: None is the training images' own).
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
    native = _check_probe_inputs(encoder, train, test, pool, img_size)
    precision = resolve_precision(precision, device)  # validates the name
    num_classes = len(train.classes)
    indices = _check_indices(train_indices, len(train))
    _check_labels_in_range(train.labels[indices], num_classes, "training")
    _check_labels_in_range(test.labels, num_classes, "test")
    n = len(indices)
    batch = min(recipe.batch_size, n)
    what = (None if batch == recipe.batch_size else
            f"the batch of {batch} (batch_size {recipe.batch_size} capped at the training set)")
    rows = rank_rows(batch, what)  # this process's share of a batch
    head = probe_head(encoder.num_features, num_classes, torch.Generator().manual_seed(seed))
    # Under torchrun: BatchNorm statistics over the global batch, as in one process.
    head = sync_batchnorm(head.to(device), device)
    was_training = encoder.training
    encoder.to(device).eval()
    if is_convnet(encoder):  # its weights in the layout each batch is put in (``_layout``)
        encoder.to(memory_format=torch.channels_last)
    if rank_and_world()[1] > 1:
        _broadcast_weights(encoder)
    try:
        t0 = time.perf_counter()
        train_loss, steps = _train_head(encoder, head, train, indices, recipe, batch, rows,
                                        pool=pool, img_size=native, hflip=hflip, seed=seed,
                                        device=device, precision=precision, progress=progress)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        head.eval()

        def logits_of(x: Tensor) -> Tensor:  # the encoder under autocast, the head in fp32
            with autocast(device, precision):
                features = encode(encoder, _layout(encoder, x), pool)  # [B, D]
            return head(features.float())  # [B, num_classes]

        top1, top5 = topk_accuracy(logits_of, test, img_size=native, batch_size=batch,
                                   device=device)
        eval_seconds = time.perf_counter() - t0
    finally:
        encoder.train(was_training)
    return {"top1": top1, "top5": top5, "train_loss": train_loss,
            "lr": recipe.blr * batch / 256, "epochs": recipe.epochs, "steps": steps,
            "batch_size": batch, "train_samples": n, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds}


def _train_head(encoder: nn.Module, head: nn.Module, train: ArrayDataset,
                indices: Tensor, recipe: ProbeRecipe, batch: int, rows: slice, *, pool: str,
                img_size: int, hflip: float, seed: int, device: torch.device, precision: str,
                progress: Callable[[int, int], None] | None) -> tuple[float, int]:
    """Train ``head`` (in place) on crops of the frozen encoder; returns the mean loss of the
    last epoch and the steps taken."""
    n, epochs = len(indices), recipe.epochs
    steps_per_epoch = n // batch
    total_steps = steps_per_epoch * epochs
    peak_lr = recipe.blr * batch / 256
    warmup = 0.1 * epochs if recipe.warmup_epochs is None else recipe.warmup_epochs
    train_head: nn.Module = head
    if rank_and_world()[1] > 1:
        train_head = nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(train_head, _probe_optimizer(recipe.optimizer, head,
                                                        recipe.weight_decay),
                           lambda s: lr_at(s, steps_per_epoch, epochs, warmup, peak_lr, 0.0),
                           device=device, precision=precision)
    views = BatchViews(ViewSpec(img_size, scale=recipe.crop_scale, hflip=hflip),
                       train.info.mean, train.info.std)
    order_gen = torch.Generator().manual_seed(seed)
    view_gen = torch.Generator(device=device).manual_seed(seed)

    def frozen_features(x: Tensor) -> Tensor:
        with torch.no_grad():
            return encode(encoder, _layout(encoder, x), pool)  # [b, D]

    head.train()
    rank = rank_and_world()[0]
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
    return float(epoch_losses.mean()), total_steps


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


def _layout(encoder: nn.Module, x: Tensor) -> Tensor:
    """[B, C, S, S] in channels-last for a convolutional encoder (whose weights are), else as
    it is."""
    return x.contiguous(memory_format=torch.channels_last) if is_convnet(encoder) else x


def _check_probe_inputs(encoder: nn.Module, train: ArrayDataset, test: ArrayDataset,
                        pool: str, img_size: int | None) -> int:
    """What the recipe cannot check: the data, the pool and the input size. Returns the image
    size to use."""
    for name, ds in (("train", train), ("test", test)):
        if not hasattr(ds, "images"):
            raise ConfigError(f"the linear probe needs an in-memory data set for {name}, got "
                              f"{type(ds).__name__}; use the fast probe on cached features")
    if len(test) == 0:
        raise ConfigError("the test set is empty")
    pools = encoder_pools(encoder)
    if pool not in pools:
        raise ConfigError(f"unknown pool {pool!r}; valid: {', '.join(pools)}")
    if not isinstance(encoder, VisionTransformer):  # a backbone: any input size
        in_chans = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d)).in_channels
        if train.images.shape[1] != in_chans:
            raise ConfigError(f"the data has {train.images.shape[1]} channels but the encoder "
                              f"takes {in_chans}")
        return img_size or train.info.img_size
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
