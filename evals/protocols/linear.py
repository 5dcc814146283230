"""A linear classifier on the frozen encoder: ``--probe fast`` (softmax regression on cached
features, ``evals/fast_probe.py``) or ``--probe mae`` (the MAE paper's protocol: augmented
views through the encoder, BatchNorm + linear head, ``evals/mae_probe.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evals.protocol import EvalContext, Knobs, Numbers, Protocol, knob, train_subset
from mae_bench.errors import ConfigError

if TYPE_CHECKING:
    import torch

PROBES = ("fast", "mae")
RECIPES = ("auto", "paper")  # evals.recipes.RECIPES (checked equal by tests/test_protocols.py)


@dataclass(frozen=True)
class RecipeKnobs(Knobs):
    """The knobs of every protocol that trains (the MAE probe, fine-tuning): a named recipe and
    overrides of its schedule (None: the recipe's value)."""

    recipe: str = knob(
        "auto",
        "Trained protocols (finetune, partial-finetune, linear --probe mae): paper (the "
        "official MAE recipe exactly: made for ImageNet, batches of 1,024 / 16,384) | auto "
        "(the paper's where data and schedule are ImageNet-like; on small images or data "
        "sets: no Mixup / CutMix / RandAugment / random erasing, crops from 35 % (none up "
        "to 28 px), a BatchNorm before the head, a batch that leaves >= 40 steps per epoch "
        "with the lr carried by the square-root rule, no layer decay from random init; "
        "short runs warm up for 10 % of their epochs; the probe: SGD instead of "
        "LARS, whose trust ratio barely moves the head at "
        "small batches). The chosen recipe is printed and recorded in every row; the "
        "options below override single knobs.",
        check=lambda v: v in RECIPES,
        message=lambda v: f"unknown recipe {v!r}; valid: {', '.join(RECIPES)}")
    epochs: int | None = knob(
        None, "Training epochs (default: the recipe's: the paper's probe 90, fine-tuning 100 "
        "for ViT-B and smaller, 50 for ViT-L / H).",
        check=lambda v: v >= 1, message="--epochs must be >= 1, got {value}")
    batch_size: int | None = knob(None, "Training batch size (default: the recipe's).",
                                  check=lambda v: v >= 2,
                                  message="--batch-size must be >= 2, got {value}")
    blr: float | None = knob(None, "Base lr, x batch / 256 (default: the recipe's).")

    def schedule(self) -> dict[str, Any]:
        """The schedule knobs given (not None), as recipe fields."""
        return {k: v for k, v in (("batch_size", self.batch_size), ("blr", self.blr))
                if v is not None}


@dataclass(frozen=True)
class LinearOptions(RecipeKnobs):
    probe: str = knob(
        "fast",
        "linear / fewshot: fast (softmax regression on cached features, its weight "
        "decay chosen on a validation split of the training set) | mae (the MAE paper's "
        "protocol: BatchNorm + linear head, LARS, crops and flips through the frozen "
        "encoder; made for large batches: at small ones raise --blr).",
        check=lambda v: v in PROBES,
        message=lambda v: f"unknown probe {v!r}; valid: {', '.join(PROBES)}")


class Linear(Protocol):
    name = "linear"
    Options = LinearOptions
    frozen_usage = "linear --probe fast"
    uses_pool = True

    def frozen(self, options: LinearOptions) -> bool:
        return options.probe == "fast"

    def describe(self, options: LinearOptions) -> str:
        return self.name if options.probe == "fast" else f"{self.name} --probe {options.probe}"

    def features_refusal(self, options: LinearOptions) -> str | None:
        return ("--probe mae augments images through the encoder; with --features use "
                "--probe fast")

    def run(self, options: LinearOptions, context: EvalContext) -> Numbers:
        if options.probe == "fast":
            return _fast(options, context)
        return _mae(options, context)


def _fast(options: LinearOptions, context: EvalContext) -> Numbers:
    from evals.fast_probe import fast_linear_probe
    from evals.frozen import frozen_splits

    def check(labels: torch.Tensor, subset: torch.Tensor) -> None:
        _check_fraction_leaves_two(options.label_fraction, labels, subset)

    splits = frozen_splits(context, options.label_fraction, check)
    if splits is None:
        return []
    res = fast_linear_probe(splits.train_x, splits.train_y, splits.test_x, splits.test_y,
                            num_classes=splits.num_classes, seed=context.seed,
                            device=context.device, progress=context.bar("fast probe fits"))
    context.notes.append(f"fast probe: lr {res['lr']:g}, weight decay {res['weight_decay']:g} "
                         f"chosen on a validation split of the training set (val top-1 "
                         f"{res['val_top1']:.2f})")
    knobs = {"probe": "fast", "chosen_lr": res["lr"], "chosen_weight_decay": res["weight_decay"]}
    return [(m, res[m], knobs) for m in ("top1", "top5")]


def _mae(options: LinearOptions, context: EvalContext) -> Numbers:
    from evals.mae_probe import linear_probe
    from evals.recipes import probe_recipe

    inputs = context.inputs
    encoder = inputs.source.build(init_seed=context.seed).to(context.device)
    subset = train_subset(inputs.train.labels, options.label_fraction, context.seed)
    train_size = len(inputs.train) if subset is None else len(subset)
    img_size = inputs.source.img_size  # the encoder's input (a ViT's grid x patch)
    recipe = probe_recipe(options.recipe, train_size=train_size, img_size=img_size,
                          epochs=options.epochs)
    recipe = dataclasses.replace(recipe, **options.schedule())
    context.notes.append(f"linear probe recipe {recipe.name}: {recipe.optimizer}, "
                         f"{recipe.epochs} epochs at batch {recipe.batch_size}, blr "
                         f"{recipe.blr:g}" + "".join(f"; {w}" for w in recipe.why))
    res = linear_probe(encoder, inputs.in_memory("train"), inputs.in_memory("test"), recipe,
                       pool=inputs.pool, img_size=img_size, seed=context.seed,
                       device=context.device, precision=context.precision, train_indices=subset,
                       progress=context.bar("linear probe"), hflip=inputs.hflip)
    knobs = {"probe": "mae", "recipe": recipe.name, "epochs": int(res["epochs"]),
             "probe_optimizer": recipe.optimizer, "batch_size": int(res["batch_size"]),
             "blr": recipe.blr, "probe_crop_min": recipe.crop_scale[0]}
    return [(m, res[m], knobs) for m in ("top1", "top5")]


def _check_fraction_leaves_two(fraction: float, labels: torch.Tensor,
                               subset: torch.Tensor) -> None:
    """The fast probe chooses its weight decay on a validation split, 2 samples per class at
    least: name --label-fraction when it is what leaves a class one (not the class's size)."""
    import torch

    full = torch.bincount(labels)  # [C]
    kept = torch.bincount(labels[subset], minlength=len(full))  # [C]
    cut = torch.nonzero((kept == 1) & (full >= 2)).flatten()
    if len(cut):
        c = int(cut[torch.argmin(full[cut])])  # the smallest such class needs the most
        raise ConfigError(
            f"--label-fraction {fraction:g} leaves 1 training sample of class {c} "
            f"(of its {int(full[c])}), but the fast probe picks its weight decay on a "
            f"validation split that needs 2 per class; use --label-fraction "
            f"{2 / int(full[c]):.2g} or more")
