"""Training recipes of the protocols that learn: fine-tuning and MAE's linear probe.

Two names, for both protocols:

``paper``: the official recipe (facebookresearch/mae ``main_finetune.py`` with the hyper-parameters
    of FINETUNE.md, ``main_linprobe.py`` with those of LINPROBE.md), exactly, as far as this code
    implements its pieces: made for ImageNet (1.28M images at 224 px, batches of 1,024 / 16,384,
    50-100 / 90 epochs).

``auto`` (the default): the paper's recipe where the data and schedule are ImageNet-like, and
    otherwise the changes that small images, small training sets and short schedules need, each
    with the measurement behind it (``results/finetune-recipes.md``). The chosen recipe is printed
    and every knob of it is recorded in each result row.

A recipe is a plain frozen value; the caller may override any field (``dataclasses.replace``),
and the row records the final values.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mae_bench.data.randaugment import PAPER_POLICY, RandAugmentSpec
from mae_bench.errors import ConfigError

RECIPES = ("auto", "paper")
PROBE_OPTIMIZERS = ("lars", "sgd")

# What the auto rules look at. Below these, Mixup / CutMix and the 8 %-area crops of ImageNet
# training cost more accuracy than they give (results/finetune-recipes.md).
IMAGENET_LIKE_PX = 64  # images smaller than this are "small images" (CIFAR 32, digits 8, MNIST 28)
IMAGENET_LIKE_TRAIN = 100_000  # fewer training images than this: a "small data set"
TINY_PX = 16  # the probe: images this small are not cropped at all (digits: 8 px)
# Fine-tuning: images this small are not cropped at all (digits 8 px, MNIST / Fashion-MNIST 28).
FINETUNE_NO_CROP_PX = 28
PAPER_WARMUP_EPOCHS = 5.0  # main_finetune.py --warmup_epochs
MIN_STEPS_PER_EPOCH = 40  # auto batch: at least this many optimizer steps per epoch
SMALL_BATCH_LR = 1e-3  # auto: the lr at batch 32 (square-root rule elsewhere)
SMALL_DATA_LAYER_DECAY = 0.75  # auto, pretrained, small images or data


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every knob of a fine-tuning run (see ``evals.finetune.finetune`` for each one's meaning),
    checked once when built (also by ``dataclasses.replace``). The defaults are a plain AdamW
    run with the paper's augmentation; the named recipes below are what evaluations use.

    ``why`` holds one sentence per choice that differs from the paper's recipe."""

    name: str = "custom"
    epochs: int = 100
    batch_size: int = 128
    blr: float = 1e-3  # lr = blr x batch / 256
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float | None = None  # None: 5 % of the epochs, at least one step
    min_lr: float = 1e-6
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    drop_path: float = 0.0
    head_init_std: float | None = None  # None: the model's own init (xavier), else trunc-normal
    clip_grad: float | None = None
    head_bn: bool = False  # BatchNorm (no affine) before the head, as MAE's linear probe
    erase: float = 0.0  # random erasing probability (the paper: 0.25)
    rand_augment: str | None = None  # timm's RandAugment policy (the paper: rand-m9-mstd0.5-inc1)
    why: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (not self.mixing or self.batch_size % 2 == 0,
             f"batch_size {self.batch_size} is odd, but Mixup / CutMix mix each image with the "
             "reversed batch and need an even one: use an even batch_size or mixup=cutmix=0"),
            (self.blr > 0, f"blr must be > 0, got {self.blr}"),
            (0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs is None or 0 <= self.warmup_epochs <= self.epochs,
             f"warmup_epochs must be in 0..epochs ({self.epochs}), got {self.warmup_epochs}"),
            (self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}"),
            (self.mixup >= 0, f"mixup must be >= 0 (0 = off), got {self.mixup}"),
            (self.cutmix >= 0, f"cutmix must be >= 0 (0 = off), got {self.cutmix}"),
            (0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}"),
            (0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}"),
            (0 <= self.erase <= 1, f"erase must be a probability in [0, 1], got {self.erase}"),
            (self.clip_grad is None or self.clip_grad > 0,
             f"clip_grad must be > 0 or None, got {self.clip_grad}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.rand_augment:
            RandAugmentSpec.parse(self.rand_augment)  # a bad policy: ConfigError naming the part

    @property
    def mixing(self) -> bool:
        """Mixup or CutMix is on: the targets are soft and the batch must be even."""
        return self.mixup > 0 or self.cutmix > 0

    def knobs(self) -> dict[str, object]:
        """The recipe as flat result-row fields: ``recipe`` (the name), ``epochs``,
        ``layer_decay`` and ``drop_path`` (the names rows have always had), and ``ft_*`` for
        the rest; ``why`` is left out."""
        plain = ("epochs", "layer_decay", "drop_path")
        out: dict[str, object] = {"recipe": self.name}
        for k, v in dataclasses.asdict(self).items():
            if k in ("name", "why", "crop_scale"):
                continue
            out[k if k in plain else f"ft_{k}"] = v
        out["ft_crop_min"], out["ft_crop_max"] = self.crop_scale
        return out


@dataclass(frozen=True)
class ProbeRecipe:
    """Every knob of MAE's linear probe (``evals.mae_probe.linear_probe``), checked once when
    built. The defaults are the paper's protocol at a batch one machine holds."""

    name: str = "custom"
    optimizer: str = "lars"  # "lars" (the paper) | "sgd" (momentum 0.9, no trust ratio)
    epochs: int = 90
    batch_size: int = 256
    blr: float = 0.1  # lr = blr x batch / 256
    weight_decay: float = 0.0
    warmup_epochs: float | None = None  # None: 10 % of the epochs (the paper: 10 of 90)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    why: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.blr <= 0:
            raise ConfigError(f"need epochs >= 1, batch_size >= 2 and blr > 0, got "
                              f"epochs={self.epochs}, batch_size={self.batch_size}, "
                              f"blr={self.blr}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs={self.epochs}], got "
                              f"{self.warmup_epochs}")
        if self.optimizer not in PROBE_OPTIMIZERS:
            raise ConfigError(f"unknown probe optimizer {self.optimizer!r}; valid: "
                              f"{', '.join(PROBE_OPTIMIZERS)}")
        if self.weight_decay < 0 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"need weight_decay >= 0 and 0 < crop_scale[0] <= crop_scale[1] "
                              f"<= 1, got {self.weight_decay} and {self.crop_scale}")


def paper_finetune(arch: str, epochs: int | None = None) -> FinetuneRecipe:
    """The official fine-tuning recipe for an architecture (FINETUNE.md): ViT-B blr 5e-4, layer
    decay 0.65, drop path 0.1, 100 epochs; ViT-L / H blr 1e-3, layer decay 0.75, drop path 0.2 /
    0.3, 50 epochs; all at batch 1,024, weight decay 0.05, 5 warm-up epochs, min lr 1e-6, Mixup
    0.8, CutMix 1.0, label smoothing 0.1, RandomResizedCrop from 8 %, head at std 2e-5.
    Smaller ViTs take ViT-B's values; random erasing 0.25 (timm's pixel mode) and RandAugment
    ``rand-m9-mstd0.5-inc1`` (timm's ops, per image), both batched on the device here."""
    large = "large" in arch or "huge" in arch
    default_epochs = 50 if large else 100
    drop_path = 0.3 if "huge" in arch else 0.2 if large else 0.1
    return FinetuneRecipe(
        name="paper", epochs=epochs or default_epochs, batch_size=1024,
        blr=1e-3 if large else 5e-4, layer_decay=0.75 if large else 0.65, weight_decay=0.05,
        warmup_epochs=5.0 if (epochs or default_epochs) > 5 else 0.0, min_lr=1e-6, mixup=0.8,
        cutmix=1.0, label_smoothing=0.1, crop_scale=(0.08, 1.0), drop_path=drop_path,
        head_init_std=2e-5, erase=0.25, rand_augment=PAPER_POLICY)


def auto_finetune(arch: str, *, img_size: int, train_size: int, pretrained: bool,
                  epochs: int | None = None) -> FinetuneRecipe:
    """The default recipe: the paper's, changed where the data or the schedule are far from
    ImageNet's. Each change and its reason is in ``why``.

    Args:
        arch: the ViT preset (the paper's values depend on the model size).
        img_size: the training resolution in pixels.
        train_size: training images (after any label fraction).
        pretrained: False for the from-scratch baseline.
        epochs: the run's epochs (None: the paper's).
    """
    r = paper_finetune(arch, epochs)
    why = []
    small_images = img_size < IMAGENET_LIKE_PX
    small_data = train_size < IMAGENET_LIKE_TRAIN
    changes: dict[str, object] = {}
    # Small data or images: at most 128 per step, so that a short run still takes thousands of
    # steps (digits, 20 epochs: 76.9 % at batch 128 = 220 steps, 93.6 % at 32 = 880 steps).
    batch = _auto_batch(train_size, 128 if small_images or small_data else r.batch_size)
    if batch != r.batch_size:
        changes["batch_size"] = batch
        # Adam's lr follows the square root of the batch (Malladi et al. 2022), from lr 1e-3 at
        # batch 32 (measured on digits: the paper's lr carried down the same way, 3.5e-4, left
        # a pretrained ViT-Tiny/2 at 87.8 % against 90.6 % at 1e-3), never above the paper's.
        paper_lr = r.blr * r.batch_size / 256
        lr = min(SMALL_BATCH_LR * math.sqrt(batch / 32), paper_lr)
        changes["blr"] = lr * 256 / batch
        why.append(f"batch {batch} (>= {MIN_STEPS_PER_EPOCH} steps per epoch on {train_size} "
                   f"images) at lr {lr:.2g} (1e-3 at batch 32, square-root rule)")
    if small_images or small_data:
        changes.update(mixup=0.0, cutmix=0.0)
        why.append("no Mixup / CutMix: on small images or data they hide too much of each "
                   "image for the few steps there are")
        changes.update(erase=0.0, rand_augment=None)
        why.append("no random erasing or RandAugment: on small images or data they cost a short "
                   "run (Fashion-MNIST from scratch, 5 epochs: the paper's RandAugment 85.68 "
                   "against 88.50 without; erasing 0.25 87.01 against 87.14)")
        changes["head_bn"] = True
        why.append("a BatchNorm (no affine) before the head, as MAE's linear probe: pooled "
                   "features vary little between images, and a short run leaves the head far "
                   "from converged without it (digits, 20 epochs: MAE 93.6 -> 96.4 %, its "
                   "1-block partial fine-tune 81.9 -> 90.3 %, from scratch 94.7 -> 96.9 %)")
    if img_size <= FINETUNE_NO_CROP_PX:
        changes["crop_scale"] = (1.0, 1.0)
        why.append(f"no crops: on {img_size}-px images a crop removes strokes or edges that "
                   "decide the class (from scratch: digits 93.6 % uncropped, 87.2 % from 35 %, "
                   "84.4 % from 8 %; Fashion-MNIST, 5 epochs, 85.0 % against 79.6 % from 35 %)")
    elif small_images or small_data:
        changes["crop_scale"] = (0.35, 1.0)
        why.append(f"crops from 35 % of the image, not 8 %: an 8 %-area crop of a "
                   f"{img_size}-px image is {math.sqrt(0.08) * img_size:.0f} px wide")
    if not pretrained:
        changes.update(layer_decay=1.0, head_init_std=None)
        why.append("no layer decay and the model's own head init from random weights: layer "
                   "decay keeps pretrained lower layers, which a random model does not have")
    elif (small_images or small_data) and r.layer_decay < SMALL_DATA_LAYER_DECAY:
        changes["layer_decay"] = SMALL_DATA_LAYER_DECAY
        why.append(f"layer decay {SMALL_DATA_LAYER_DECAY} (ViT-L's), not {r.layer_decay}: a short "
                   "pretraining leaves lower layers that still need to move (digits, MAE "
                   "ViT-Tiny/2: 93.6 % against 90.6 % at 0.65)")
    # The paper warms up for 5 epochs; a run of 50 or fewer gets 10 % of itself instead, never
    # none: AdamW from random weights at the peak lr on step 0 is what the warm-up prevents.
    warm = r.warmup_epochs if epochs is None else min(PAPER_WARMUP_EPOCHS, 0.1 * r.epochs)
    if warm != r.warmup_epochs:
        changes["warmup_epochs"] = warm
        why.append(f"warm-up {warm:g} epochs (10 % of a short run, not 5 of 100; without one, "
                   "Fashion-MNIST from scratch in 5 epochs reached 86.9-87.1 %, with it 88.5 %)")
    return dataclasses.replace(r, name="auto", why=tuple(why), **changes)


def finetune_recipe(name: str, arch: str, *, img_size: int, train_size: int, pretrained: bool,
                    epochs: int | None = None) -> FinetuneRecipe:
    """The named recipe ("auto" or "paper") for this run.

    Raises:
        ConfigError: an unknown name.
    """
    if name == "paper":
        return paper_finetune(arch, epochs)
    if name == "auto":
        return auto_finetune(arch, img_size=img_size, train_size=train_size,
                             pretrained=pretrained, epochs=epochs)
    raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")


def paper_probe(epochs: int | None = None) -> ProbeRecipe:
    """The official linear probe (LINPROBE.md): LARS, blr 0.1 at batch 16,384, no weight decay,
    90 epochs with 10 of warm-up, RandomResizedCrop from 8 % and flips."""
    epochs = epochs or 90
    return ProbeRecipe(name="paper", optimizer="lars", epochs=epochs, batch_size=16384, blr=0.1,
                       weight_decay=0.0, warmup_epochs=10.0 if epochs > 10 else 0.0,
                       crop_scale=(0.08, 1.0))


def auto_probe(*, train_size: int, img_size: int, epochs: int | None = None) -> ProbeRecipe:
    """The default probe: SGD with momentum and no trust ratio at the batch one machine holds.

    LARS scales each layer's step by ||w|| / ||g||: at batch 256 that moves the head by about a
    thousandth of its norm per step, so the probe does not converge in a few thousand steps.
    """
    r = paper_probe(epochs)
    batch = _auto_batch(train_size, largest=256)
    # The paper's blr 0.1 (lr 0.0125 at batch 32). Digits, random ViT-Tiny/2, 90 epochs, no
    # crops or flips: 90.6 % against the fast probe's 91.7 % (blr 1.0: 90.3 %); with crops from
    # 35 % and flips it was 67.2 % (results/finetune-recipes.md).
    return dataclasses.replace(
        r, name="auto", optimizer="sgd", batch_size=batch,
        warmup_epochs=min(r.warmup_epochs, 0.1 * r.epochs),
        crop_scale=((1.0, 1.0) if img_size <= TINY_PX else (0.35, 1.0)
                    if img_size < IMAGENET_LIKE_PX else r.crop_scale),
        why=(f"SGD (momentum 0.9) without LARS's trust ratio at batch {batch}",))


def probe_recipe(name: str, *, train_size: int, img_size: int,
                 epochs: int | None = None) -> ProbeRecipe:
    """The named probe recipe ("auto" or "paper").

    Raises:
        ConfigError: an unknown name.
    """
    if name == "paper":
        return paper_probe(epochs)
    if name == "auto":
        return auto_probe(train_size=train_size, img_size=img_size, epochs=epochs)
    raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")


def _auto_batch(train_size: int, largest: int = 128, smallest: int = 16) -> int:
    """The largest power of two <= ``largest`` that leaves MIN_STEPS_PER_EPOCH steps per epoch
    (``smallest`` at least)."""
    batch = largest
    while batch > smallest and train_size // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch
