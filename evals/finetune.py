"""End-to-end fine-tuning: full, and partial (the last k blocks), as in MAE (He et al. 2021, A.1).

The recipe of the official ``main_finetune.py``: AdamW (0.9, 0.999), layer-wise lr decay 0.75,
weight decay 0.05 (none on biases, norms and tokens), lr = blr x batch / 256 with a 5 % linear
warmup then half-cycle cosine to ``min_lr``, Mixup 0.8 + CutMix 1.0 with label smoothing 0.1,
drop path (set by the caller when building the model), global average pooling with ``fc_norm``.

Partial fine-tuning (paper Fig. 9) trains the last ``k`` blocks plus ``fc_norm`` and the head and
freezes everything else; k = 0 is an MLP-free probe on the pooled, re-normed features.

Any backbone of ``mae_bench.models.backbones`` fine-tunes the same way, through its Encoder hooks:
its classifier (a ResNet's ``fc``, a timm model's ``reset_classifier``), its layer groups
(``layer_id``, ``num_layer_groups``: a ResNet's stem, four stages, head) for lr decay and for
partial fine-tuning (the last k groups below the head: a ResNet's stages), its BatchNorm in train
mode where it trains (in eval mode where frozen; synchronised across processes under torchrun).
A ViT keeps the code and numbers it always had; only a ViT has drop path.

Under torchrun (world size W > 1) the model trains with DistributedDataParallel and the result
is one process's: ``batch_size`` stays the global batch, every process builds that same batch
(data order, crops, Mixup / CutMix: cheap) and runs the model on its own 1/W of the rows, and
DDP's gradient averaging of the per-process mean losses gives the gradient of the global mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from evals.distributed_eval import rank_rows, topk_accuracy
from evals.recipes import FinetuneRecipe
from mae_bench.data import ArrayDataset
from mae_bench.data.augment import BatchViews, ViewSpec, random_erasing
from mae_bench.data.randaugment import RandAugmentSpec
from mae_bench.errors import ConfigError, DataError
from mae_bench.models.backbones import ResNet, is_convnet, vit_layer_id
from mae_bench.models.vit import VisionTransformer
from mae_bench.training.distributed import rank_and_world, sync_batchnorm
from mae_bench.training.runtime import (
    autocast,
    exempt_from_weight_decay,
    lr_at,
    resolve_precision,
    seed_everything,
)
from mae_bench.training.step import TrainStep, grad_scaler

# Parameters that are never trained: the fixed 2-D sin-cos position embedding.
FIXED_PARAMS = frozenset({"pos_embed"})


# --- layer-wise lr decay ---------------------------------------------------------------------


# A ViT parameter's layer for lr decay: embeddings 0, ``blocks.i`` i + 1, the rest (``norm``,
# ``fc_norm``, ``head``) depth + 1. One home: mae_bench.models.backbones.
layer_id = vit_layer_id


def layer_groups(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """(parameter name -> layer group, number of groups) of a classifier, input side first and
    the head last: a ViT's embeddings, blocks and head (``layer_id``); any other backbone's own
    ``layer_id`` and ``num_layer_groups`` (a ResNet: stem, ``layer1``..``layer4``, head)."""
    if isinstance(model, VisionTransformer):
        depth = len(model.blocks)
        return (lambda name: vit_layer_id(name, depth)), depth + 2
    return model.layer_id, int(model.num_layer_groups)


def partial_units(model: nn.Module) -> tuple[int, str]:
    """How many layer groups partial fine-tuning may train below the head, and what they are
    called: a ViT's blocks, a ResNet's stages (the stem trains with all four), a timm model's
    layer groups (timm's ``group_matcher``)."""
    groups = layer_groups(model)[1] - 2  # without the input side (embeddings, stem), the head
    unit = ("blocks" if isinstance(model, VisionTransformer) else
            "stages" if isinstance(model, ResNet) else "layer groups")
    return groups, unit


def classifier_name(model: nn.Module) -> str:
    """Where a classifier keeps its head: a ViT ``head``, a ResNet ``fc``, a timm backbone the
    module its ``get_classifier()`` returns (``model.fc``, ``model.head``, ...)."""
    if isinstance(model, VisionTransformer):
        return "head"
    if isinstance(model, ResNet):
        return "fc"
    head = model.model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head)


def head_linear(model: nn.Module) -> nn.Module:
    """The classifier's linear layer (the last one where a BatchNorm went before it)."""
    head = model.get_submodule(classifier_name(model))
    return head[-1] if isinstance(head, nn.Sequential) else head


def param_groups_lrd(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 0.75,
    no_weight_decay: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay: one group per (layer, decay / no decay).

    Layer ``l`` of a depth-``d`` model gets ``lr_scale = layer_decay ** (d + 1 - l)``, so the head
    trains at the full lr and the patch embedding at ``layer_decay ** (d + 1)`` of it; with G
    layer groups (``layer_groups``: d + 2 for a ViT, 6 for a ResNet) that is ``layer_decay **
    (G - 1 - l)``. Parameters with ``requires_grad`` False (the fixed position embedding, frozen
    blocks) are left out.

    Args:
        model: the classifier to fine-tune (a ViT, a ResNet, a timm backbone).
        weight_decay: decay of weight matrices; biases, norm parameters and the names in
            ``no_weight_decay`` get none (``mae_bench.training.runtime.exempt_from_weight_decay``:
            the rule pretraining uses too).
        layer_decay: lr ratio between a layer and the one above it (1 = no decay).
        no_weight_decay: parameter names without weight decay; None: ``model.no_weight_decay()``.

    Returns:
        Groups ordered by (layer, decay first), each with "params", "param_names",
        "weight_decay" and "lr_scale" (the step's lr is the scheduled lr times "lr_scale").
    """
    skip = set(model.no_weight_decay() if no_weight_decay is None else no_weight_decay)
    layer_of, num_groups = layer_groups(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_of(name)
        decay = not exempt_from_weight_decay(name, p, skip)
        group = groups.setdefault((lid, decay), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_groups - 1 - lid)})
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def freeze_for_partial(model: nn.Module, blocks: int) -> None:
    """Train only the last ``blocks`` transformer blocks plus the final norms and head (in place);
    on another backbone the last ``blocks`` layer groups below the head (``partial_units``: a
    ResNet's stages) plus the head.

    ``blocks`` = 0 trains ``fc_norm`` (or ``norm``) and ``head`` only (a ResNet: ``fc``);
    ``blocks`` = depth trains everything, i.e. full fine-tuning (a ResNet: 4, the stem too). The
    fixed position embedding stays frozen either way.

    Raises:
        ConfigError: ``blocks`` outside 0..depth (0..the number of units).
    """
    depth, unit = partial_units(model)
    if not 0 <= blocks <= depth:
        what = (f"depth-{depth} model" if isinstance(model, VisionTransformer)
                else f"model of {depth} {unit} below its head")
        raise ConfigError(f"partial fine-tuning blocks must be in 0..{depth} for this {what}, "
                          f"got {blocks}")
    # Layers below the first trained block are frozen; with every block trained, the embeddings
    # (layer 0) are trained too.
    first = 0 if blocks == depth else depth + 1 - blocks
    layer_of = layer_groups(model)[0]
    for name, p in model.named_parameters():
        p.requires_grad_(layer_of(name) >= first and name not in FIXED_PARAMS)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """What runs in eval mode while the rest trains: a ViT's frozen blocks (no drop path: they
    are a fixed feature extractor); elsewhere every module whose own parameters are all frozen
    (a frozen BatchNorm then normalises with its running statistics and leaves them as they
    are, as in a frozen encoder)."""
    if isinstance(model, VisionTransformer):
        return [b for b in model.blocks if not any(p.requires_grad for p in b.parameters())]
    return [m for m in model.modules()
            if (own := list(m.parameters(recurse=False))) and
            not any(p.requires_grad for p in own)]


# --- fine-tuning -----------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    recipe: FinetuneRecipe = FinetuneRecipe(),
    *,
    lr: float | None = None,
    hflip: float = 0.5,
    partial_blocks: int | None = None,
    img_size: int | None = None,
    train_indices: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` (in place, moved to ``device``) on ``train`` with ``recipe``;
    evaluate on ``test``.

    Train-time view: RandomResizedCrop (``recipe.crop_scale``) + horizontal flip, then
    RandAugment (``recipe.rand_augment``), normalisation, random erasing (``recipe.erase``),
    then Mixup / CutMix, all batched on the device, in timm's order. Test-time view: resize to
    ``img_size`` and normalise.

    Batches are drop-last: every step sees exactly ``recipe.batch_size`` images. Mixup / CutMix
    pair each image with the flipped batch, so with either on the batch must be even (the
    recipe checks it).

    Reproducibility: the global ``random``, numpy and torch generators are seeded with ``seed``
    (timm's Mixup draws from numpy and random, drop path from torch); crops come from a seeded
    generator on ``device`` and the data order from (seed, epoch).

    Under torch.distributed (W > 1 processes; every process calls this with the same
    arguments): each trains on rows [rank * B/W, (rank + 1) * B/W) of the global batch of B =
    ``recipe.batch_size`` images, with DistributedDataParallel (rank 0's initial weights), and
    evaluates a share of the test set; every process returns the same accuracies and loss,
    equal to one process's up to float rounding. Drop path is drawn per process, so with
    ``drop_path_rate`` > 0 the run is an equally valid but different sample. Only rank 0 calls
    ``progress``.

    Args:
        model: a ``VisionTransformer`` with a head (``num_classes`` = the data set's classes),
            built with ``global_pool="avg"`` and the recipe's ``drop_path_rate``; pretrained
            weights loaded, or random ones for a from-scratch baseline. Or a backbone of
            ``mae_bench.models.backbones`` with its classifier (``EncoderSource.build`` with
            ``num_classes``), whose recipe has no drop path.
        train: training images and labels.
        test: evaluation images and labels.
        recipe: every training knob (``evals.recipes.FinetuneRecipe``, checked when built):
            epochs, batch, blr (scaled by batch / 256), layer decay, weight decay, warmup
            (None: 5 % of the epochs, at least one step), min lr, Mixup / CutMix / label
            smoothing, crops, head BatchNorm (a BatchNorm without affine parameters between the
            pooled, normed features and the head, as MAE's linear probe: pooled features of a
            pretrained encoder barely vary between images compared with their spread across
            dimensions, which leaves a head trained by AdamW for a few hundred steps far from
            converged), head init, erasing, RandAugment, gradient clipping.
        lr: absolute peak lr; overrides ``recipe.blr``.
        hflip: probability of a horizontal flip (0 for digits and text, which flips change).
        partial_blocks: train only the last k blocks + fc_norm + head (see
            ``freeze_for_partial``); None: full fine-tuning. Frozen blocks run in eval mode
            (no drop path): they are a fixed feature extractor (``frozen_modules``).
        img_size: the training / test resolution; None: the model's own. A ViT's must equal
            it (the position embedding is fixed to the model's grid); a backbone takes any
            size (None: the training images' own).
        train_indices: [K] indices of the training images to use (few-shot subsets); None: all.
        seed: seeds everything random in the run.
        device: where to train.
        precision: "auto" | "bf16" | "fp16" (grad scaler; CUDA only) | "fp32"
            (``mae_bench.config.PRECISIONS``).
        progress: called with (steps done, total steps) after each optimizer step.

    Returns:
        {"top1", "top5"}: test accuracy of the final model (percent); "train_loss": mean
        training loss of the last epoch; "train_seconds"; "epochs".

    Raises:
        ConfigError: a bad argument, a model that does not fit the data, or a batch_size
            that the processes cannot share equally.
        DataError: labels missing or outside the model's classes; indices out of range.
        TrainingError: a non-finite loss (the message names the step; every process raises).
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)  # validates the name
    vit = isinstance(model, VisionTransformer)
    native = model.grid_size * model.patch_size if vit else img_size or train.info.img_size
    img_size = native if img_size is None else img_size
    indices = _training_indices(train, train_indices)
    _validate(model, train, test, indices, recipe, lr=lr, hflip=hflip, img_size=img_size,
              native=native)
    rows = rank_rows(recipe.batch_size)  # this process's share of a batch
    seed_everything(seed)
    train_module = _prepare_model(model, recipe, partial_blocks, device)
    t_start = time.perf_counter()
    train_loss = _train(model, train_module, train, indices, recipe, rows, lr=lr, hflip=hflip,
                        img_size=img_size, seed=seed, device=device, precision=precision,
                        progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - t_start
    top1, top5 = evaluate(model, test, img_size=img_size, batch_size=recipe.batch_size,
                          device=device, precision=precision)
    return {"top1": top1, "top5": top5, "train_loss": train_loss,
            "train_seconds": train_seconds, "epochs": float(recipe.epochs)}


def _prepare_model(model: nn.Module, recipe: FinetuneRecipe,
                   partial_blocks: int | None, device: torch.device) -> nn.Module:
    """The recipe's head (BatchNorm, init), the frozen blocks, the device; returns the module
    that trains (the model, or its DistributedDataParallel wrapper under torchrun)."""
    vit = isinstance(model, VisionTransformer)
    if recipe.head_bn and vit:  # pooled [B, D] -> fc_norm -> standardised per dimension -> head
        model.fc_norm = nn.Sequential(model.fc_norm, nn.BatchNorm1d(model.embed_dim,
                                                                    affine=False))
    elif recipe.head_bn:  # pooled [B, D] -> standardised per dimension -> classifier
        name = classifier_name(model)
        model.set_submodule(name, nn.Sequential(
            nn.BatchNorm1d(model.num_features, affine=False), model.get_submodule(name)))
    head = head_linear(model)
    if recipe.head_init_std is not None:
        nn.init.trunc_normal_(head.weight, std=recipe.head_init_std)
        nn.init.zeros_(head.bias)
    freeze_for_partial(model, partial_units(model)[0] if partial_blocks is None
                       else partial_blocks)
    model.to(device)
    if is_convnet(model):  # oneDNN's and cuDNN's fast layout (each batch is put in it too)
        model.to(memory_format=torch.channels_last)
    if rank_and_world()[1] == 1:
        return model
    if not vit:  # every BatchNorm over the global batch, as in one process
        sync_batchnorm(model, device)
    elif recipe.head_bn:  # the head's statistics over the global batch, as in one process
        model.fc_norm = nn.SyncBatchNorm.convert_sync_batchnorm(model.fc_norm)
    # Frozen parameters (requires_grad False) are left out of DDP's gradient buckets, so
    # partial fine-tuning needs no find_unused_parameters. DDP also broadcasts rank 0's
    # weights (frozen ones included) to every process here.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def _train(model: nn.Module, train_module: nn.Module, train: ArrayDataset,
           indices: Tensor, recipe: FinetuneRecipe, rows: slice, *, lr: float | None,
           hflip: float, img_size: int, seed: int, device: torch.device, precision: str,
           progress: Callable[[int, int], None] | None) -> float:
    """The training epochs; returns the mean loss of the last one."""
    frozen = frozen_modules(model)
    channels_last = is_convnet(model)
    batch_size, epochs = recipe.batch_size, recipe.epochs
    steps_per_epoch = len(indices) // batch_size  # drop-last
    total_steps = steps_per_epoch * epochs
    peak_lr = lr if lr is not None else recipe.blr * batch_size / 256
    warmup = recipe.warmup_epochs
    if warmup is None:
        warmup = max(0.05 * epochs, 1 / steps_per_epoch)
    groups = param_groups_lrd(model, recipe.weight_decay, recipe.layer_decay)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), **fast)
    train_step = TrainStep(
        train_module, optimizer,
        lambda s: lr_at(s, steps_per_epoch, epochs, warmup, peak_lr, recipe.min_lr),
        device=device, precision=precision, scaler=grad_scaler(precision),
        clip_grad=recipe.clip_grad, loss_name="fine-tuning loss",
        advice="lower the lr or use fp32")
    policy = RandAugmentSpec.parse(recipe.rand_augment) if recipe.rand_augment else None
    spec = ViewSpec(img_size, scale=recipe.crop_scale, hflip=hflip, rand_augment=policy)
    views = BatchViews(spec, train.info.mean, train.info.std)
    crop_gen = torch.Generator(device=device)
    crop_gen.manual_seed(seed)
    mixer = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                  label_smoothing=recipe.label_smoothing,
                  num_classes=head_linear(model).out_features) if recipe.mixing else None
    criterion: nn.Module = (SoftTargetCrossEntropy() if recipe.mixing
                            else nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing))
    rank = rank_and_world()[0]
    epoch_losses = torch.zeros(0)
    for epoch in range(epochs):
        train_module.train()
        for module in frozen:
            module.eval()
        order_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = indices[torch.randperm(len(indices), generator=order_gen)]  # [K]
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]  # [B]
            x = views(train.images[idx].to(device, non_blocking=True), crop_gen)  # [B, C, S, S]
            random_erasing(x, recipe.erase, crop_gen)  # in place; no draws when erase is 0
            if channels_last:  # the layout of a convnet's weights
                x = x.contiguous(memory_format=torch.channels_last)
            y = train.labels[idx].to(device, non_blocking=True)  # [B]
            if mixer is not None:
                x, y = mixer(x, y)  # y: [B, num_classes] soft targets
            # Every process drew the same global batch (so the crop generator and Mixup's RNGs
            # advance as in one process); each runs the model on its own rows.
            x, y = x[rows], y[rows]  # [b, C, S, S], [b] or [b, num_classes]
            # forward under autocast -> [b, num_classes] logits; the loss in fp32 outside it
            train_step.micro_batch(lambda x=x: train_module(x),
                                   lambda logits, y=y: criterion(logits.float(), y))
            if progress is not None and rank == 0:
                progress(train_step.step, total_steps)
        # One device sync per epoch, not per step. The mean over processes of their equal shares
        # is the global batch's loss, the same on every process: all stop at the same step.
        epoch_losses = train_step.flush()["loss"]  # [steps_per_epoch]; non-finite: raises
    return float(epoch_losses.mean())


def evaluate(model: nn.Module, data: ArrayDataset, *, img_size: int, batch_size: int,
             device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``data`` (top-5 is top-C with fewer
    than 5 classes), on resized and normalised images, in eval mode; under torch.distributed
    every process must call it (``evals.distributed_eval.topk_accuracy``)."""
    model.eval()
    channels_last = is_convnet(model)

    def logits_of(x: Tensor) -> Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return model(x)  # [B, num_classes]

    return topk_accuracy(logits_of, data, img_size=img_size, batch_size=batch_size,
                         device=device)


# --- input checks ----------------------------------------------------------------------------


def _training_indices(train: ArrayDataset, train_indices: Tensor | None) -> Tensor:
    if train_indices is None:
        return torch.arange(len(train))
    idx = torch.as_tensor(train_indices)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ConfigError(f"train_indices must be a 1-D integer tensor, got dtype {idx.dtype} "
                          f"and shape {tuple(idx.shape)}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(train)):
        raise DataError(f"train_indices must lie in 0..{len(train) - 1} (the training set's "
                        f"size), got values {int(idx.min())}..{int(idx.max())}")
    return idx.long().cpu()


def _validate(model: nn.Module, train: ArrayDataset, test: ArrayDataset, indices: Tensor,
              recipe: FinetuneRecipe, *, lr: float | None, hflip: float, img_size: int,
              native: int) -> None:
    """What the recipe cannot check: the model, the data and this run's arguments."""
    if not isinstance(head_linear(model), nn.Linear):
        raise ConfigError("the model has no classification head; build it with num_classes = "
                          "the data set's number of classes")
    in_chans = (model.in_chans if isinstance(model, VisionTransformer) else
                next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels)
    checks = [
        (len(indices) >= recipe.batch_size,
         f"{len(indices)} training images are fewer than one batch of {recipe.batch_size}; "
         "lower batch_size"),
        (lr is None or lr > 0, f"lr must be > 0, got {lr}"),
        (0 <= hflip <= 1, f"hflip must be a probability in [0, 1], got {hflip}"),
        (img_size == native,
         f"img_size {img_size} differs from the model's {native} (its position embedding "
         f"is fixed to that grid); build the model with img_size={img_size} or omit it"),
        (train.images.shape[1] == in_chans,
         f"the data has {train.images.shape[1]} channels but the model takes {in_chans}; "
         "build it with in_chans to match"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    num_classes = head_linear(model).out_features
    for name, labels in (("train", train.labels[indices]), ("test", test.labels)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise DataError(f"{name} labels must lie in 0..{num_classes - 1} (the model's "
                            f"classes), got {int(labels.min())}..{int(labels.max())}; "
                            "unlabeled (-1) images cannot be used for fine-tuning")
    if len(test) == 0:
        raise DataError("the test set is empty")
