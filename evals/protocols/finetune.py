"""End-to-end fine-tuning of a mae-bench encoder (a ViT, a ResNet, a timm backbone;
``evals/finetune.py``) with a named recipe (``evals/recipes.py``) and overrides of single knobs;
``--init random`` is the from-scratch baseline of the same recipe. Drop path is a ViT knob: a
backbone without it takes the recipe with none (the note says so), and refuses ``--drop-path``
above 0 in one line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evals.protocol import EvalContext, Numbers, Protocol, knob, train_subset
from evals.protocols.linear import RecipeKnobs
from mae_bench.errors import ConfigError

if TYPE_CHECKING:
    from evals.encoders import EncoderSource
    from evals.recipes import FinetuneRecipe

INITS = ("pretrained", "random")


def _policy_ok(value: str) -> bool:
    from mae_bench.data.randaugment import RandAugmentSpec

    if value != "none":
        RandAugmentSpec.parse(value)  # a bad policy: ConfigError naming the part
    return True


@dataclass(frozen=True)
class FinetuneOptions(RecipeKnobs):
    init: str = knob("pretrained", "finetune: pretrained | random (the same recipe from scratch).",
                     check=lambda v: v in INITS,
                     message="--init must be pretrained or random, got {value!r}")
    lr: float | None = knob(None, "finetune: absolute lr, overrides --blr.")
    weight_decay: float | None = knob(
        None, "finetune: AdamW weight decay (default: the recipe's, 0.05).")
    layer_decay: float | None = knob(
        None, "finetune: layer-wise lr decay (default: the recipe's).",
        check=lambda v: 0.0 < v <= 1.0, message="--layer-decay must be in (0, 1], got {value}")
    drop_path: float | None = knob(
        None, "finetune: stochastic depth, ViTs only (default: the recipe's; a ResNet or timm "
        "backbone trains without and refuses a value above 0).",
        check=lambda v: 0.0 <= v < 1.0, message="--drop-path must be in [0, 1), got {value}")
    mixup: float | None = knob(
        None, "finetune: Mixup alpha, 0 = off (default: the recipe's).")
    cutmix: float | None = knob(
        None, "finetune: CutMix alpha, 0 = off (default: the recipe's).")
    head_bn: bool | None = knob(
        None, "finetune: a BatchNorm without affine parameters before the head, as MAE's "
        "linear probe (default: the recipe's).", flags=("--head-bn/--no-head-bn",))
    crop_min: float | None = knob(
        None, "finetune: random-resized crops from this share of the image area to all of "
        "it; 1 = no crops (default: the recipe's).",
        check=lambda v: 0.0 < v <= 1.0,
        message="--crop-min must be in (0, 1] (1 = no crops), got {value}")
    label_smoothing: float | None = knob(
        None, "finetune: label smoothing (default: the recipe's, 0.1).", flags=("--smoothing",))
    erase: float | None = knob(
        None, "finetune: random erasing probability: a rectangle of 2-33 % of the image filled "
        "with noise, after normalisation (the paper's recipe: 0.25; default: the recipe's).")
    rand_augment: str | None = knob(
        None, "finetune: RandAugment policy in timm's form, per image after the crop and flip "
        "(the paper's recipe: rand-m9-mstd0.5-inc1: 2 of 15 ops, magnitude 9 +- 0.5, each at "
        "p 0.5), or none (default: the recipe's; the auto recipe has none on small images or "
        "data).", check=_policy_ok)

    def overrides(self) -> dict[str, Any]:
        """The recipe fields these options set explicitly."""
        out = {k: getattr(self, k) for k in ("batch_size", "blr", "weight_decay", "layer_decay",
                                             "drop_path", "mixup", "cutmix", "label_smoothing",
                                             "head_bn", "erase") if getattr(self, k) is not None}
        if self.rand_augment is not None:
            out["rand_augment"] = None if self.rand_augment == "none" else self.rand_augment
        if self.crop_min is not None:
            out["crop_scale"] = (self.crop_min, 1.0)
        return out


class Finetune(Protocol):
    name = "finetune"
    Options: type = FinetuneOptions

    def trains_from_scratch(self, options: FinetuneOptions, source: EncoderSource) -> bool:
        """``--init random``, or the random reference (a random model whatever ``--init``
        says): one rule for the recipe and for the rows."""
        return options.init == "random" or source.random_weights

    def blocks(self, options: FinetuneOptions) -> int | None:
        """The trained blocks (None: all)."""
        return None

    def recipe(self, options: FinetuneOptions, arch: str, img_size: int, train_size: int,
               pretrained: bool) -> FinetuneRecipe:
        """``options.recipe`` for this data and model, then every knob set explicitly."""
        from evals.recipes import finetune_recipe

        recipe = finetune_recipe(options.recipe, arch, img_size=img_size,
                                 train_size=train_size, pretrained=pretrained,
                                 epochs=options.epochs)
        return dataclasses.replace(recipe, **options.overrides())

    def run(self, options: FinetuneOptions, context: EvalContext) -> Numbers:
        from evals.finetune import finetune, partial_units

        inputs, source = context.inputs, context.inputs.source
        num_classes = int(max(inputs.train.labels.max(), inputs.test.labels.max())) + 1
        subset = train_subset(inputs.train.labels, options.label_fraction, context.seed)
        train_size = len(inputs.train) if subset is None else len(subset)
        pretrained = not self.trains_from_scratch(options, source)
        recipe = self.recipe(options, source.arch, source.img_size, train_size, pretrained)
        if not source.has_drop_path:
            recipe = _without_drop_path(recipe, options, source.arch)
        context.notes.append(
            f"fine-tuning recipe {recipe.name}: {recipe.epochs} epochs at batch "
            f"{recipe.batch_size}, blr {recipe.blr:.3g}, layer decay {recipe.layer_decay:g}, "
            f"Mixup {recipe.mixup:g} / CutMix {recipe.cutmix:g}, crops from "
            f"{recipe.crop_scale[0]:g}" + "".join(f"; {w}" for w in recipe.why))
        model = source.build(global_pool="avg", num_classes=num_classes,
                             drop_path_rate=recipe.drop_path, init_seed=context.seed,
                             pretrained=options.init == "pretrained").to(context.device)
        blocks = self.blocks(options)
        units, unit = partial_units(model)
        if blocks is not None and blocks > units:
            raise ConfigError(f"--blocks {blocks} is more than the encoder's {units} {unit}; "
                              f"use 0..{units}")
        res = finetune(model, inputs.in_memory("train"), inputs.in_memory("test"), recipe,
                       lr=options.lr, hflip=inputs.hflip, partial_blocks=blocks,
                       img_size=source.img_size, train_indices=subset, seed=context.seed,
                       device=context.device, precision=context.precision,
                       progress=context.bar(self.name))
        knobs = {"init": "pretrained" if pretrained else "random", **recipe.knobs(),
                 "epochs": int(res["epochs"]), "ft_hflip": inputs.hflip}
        if options.lr is not None:
            knobs["ft_lr"] = options.lr
        if blocks is not None:
            knobs["blocks"] = blocks
        return [(m, res[m], knobs) for m in ("top1", "top5")]


def _without_drop_path(recipe: FinetuneRecipe, options: FinetuneOptions,
                       arch: str) -> FinetuneRecipe:
    """The recipe for a backbone without stochastic depth (a ResNet, a timm model): drop path 0,
    said in ``why``; ``--drop-path`` above 0 is refused rather than silently ignored."""
    if options.drop_path:
        raise ConfigError(f"--drop-path {options.drop_path:g}: {arch} has no stochastic depth "
                          "(a ViT knob here); leave --drop-path unset or 0")
    if not recipe.drop_path:
        return recipe
    return dataclasses.replace(recipe, drop_path=0.0, why=(
        *recipe.why, f"no drop path: {arch} has no stochastic depth (the recipe's "
                     f"{recipe.drop_path:g} is a ViT's)"))
