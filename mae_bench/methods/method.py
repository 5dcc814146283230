"""The Method contract (core): what the one training loop drives and the protocols evaluate.

Methods themselves (MAE and the baselines) and their registry live one layer up, in
``mae_bench.methods.registry``.

A Method is an ``nn.Module`` that the one training loop (``mae_bench.methods.engine``) drives:

- ``view_specs()``: the train-time views it needs (MAE: one random resized crop + flip).
- ``forward(batch) -> {"loss": ..., other scalars}``.
- ``on_step_end(step, total_steps)``: momentum / EMA updates after each optimizer step; ``step``
  counts the steps done, this one included (1 after the first, ``total_steps`` after the last),
  so a method whose reference indexes its schedule from 0 after the update uses ``step - 1``.
- ``before_optimizer_step(step, total_steps)``: gradient surgery (DINO freezes its last layer).
- ``defaults``: the method's own optimizer, learning rate, weight decay and ``ssl`` knobs, filled
  into a config wherever it leaves them None (``resolve_config``), so every run folder records
  them; ``cnn_defaults`` override them on convolutional backbones (the ResNet recipes, e.g.
  solo-learn's CIFAR ones, are not the ViT ones).
- ``check_data(cfg, n_images)``: what the method cannot train on (a queue longer than the data).
- ``needs_vit``: the method only trains a mae-bench ViT preset (MAE: it drops patches).
- ``schedule_stretch``: the weight-decay schedule (``train.weight_decay_end``) spans this many
  runs (1; I-JEPA's ipe_scale); ``weight_decay_at(step, ...)`` is that schedule, for a method
  whose reference indexes it otherwise (I-JEPA) to override.
- ``encoder``: the backbone that the evaluation protocols use (``mae_bench.models.backbones``:
  a ViT, a ResNet or a timm model).
- ``no_weight_decay()``: parameter names that get no weight decay.
- ``display_mask(imgs, generator)`` / ``reconstruct(imgs, generator)``: what ``visualize``
  draws of a masked method (its mask; its pixel predictions where it has them).
- ``embedding(features)``: the projector's output where the loss compares embeddings, for the
  online evaluation's collapse signals.
- ``after_init()``: the encoder was loaded from ``--init`` weights: teachers copy it.
- ``train_features``: the last batch's first-view features (detached), where the forward embeds
  whole views, for the online classifier.
- ``own_knobs``: the config fields ("section.key") that only this method reads, so that a sweep
  of one of them with another method is refused instead of training identical runs.
- ``row_fields(cfg)``: the knobs every result row of its runs carries (MAE: ``mask_ratio``).

What is particular to a method lives here, in its class: code elsewhere asks the method (its
``own_knobs``, its ``row_fields``), never compares its name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.training.runtime import cosine_weight_decay


@dataclass
class Batch:
    """One training batch after augmentation.

    Attributes:
        views: one [N, C, H, W] normalised float tensor per view spec.
        labels: [N] int64 (-1 where unknown); methods must not use them for pretraining.
        generator: the step's random generator (masking noise etc.), seeded from the global
            step so that a resumed run replays exactly.
        step, total_steps: where the run is, for schedules applied inside ``forward`` (DINO's
            teacher temperature).
    """

    views: list[Tensor]
    labels: Tensor
    generator: torch.Generator
    step: int = 0  # optimizer steps done before this batch (schedules inside forward)
    total_steps: int = 1


class Method(nn.Module, abc.ABC):
    """Base class: see the module docstring for the contract."""

    name: str = ""
    defaults: dict[str, dict[str, Any]] = {}
    cnn_defaults: dict[str, dict[str, Any]] = {}
    needs_vit: bool = False
    # The reference's schedules (weight decay; its own momentum) span this many runs (I-JEPA's
    # ipe_scale: 1 in its released configs, its code's default 1.25 never reaches the end).
    schedule_stretch: float = 1.0
    own_knobs: frozenset[str] = frozenset()
    # The pooled encoder features [N, D] of the last batch's first view, detached, where the
    # forward computed them whole (joint-embedding methods): the online classifier's data.
    train_features: Tensor | None = None

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        """The knobs of a run's config that every result row of the run carries, beside the
        common ones (seed, epochs, ...): the columns its tables group by."""
        return {}

    @abc.abstractmethod
    def view_specs(self) -> list[ViewSpec]:
        """The train-time views, one spec per view the forward pass expects."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (step counts from 1)."""

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after the gradients of optimizer step ``step`` (0-based) are complete, before
        clipping and the update."""

    @classmethod
    def check_data(cls, cfg: RunConfig, n_images: int) -> None:
        """Raise ConfigError where the method cannot train on ``n_images`` images with this
        config (MoCo v2+: a queue of negatives longer than the data set). Called once the data
        set is loaded, before anything is written."""

    @classmethod
    def defaults_for(cls, family: str) -> dict[str, dict[str, Any]]:
        """The defaults on a backbone of ``family`` ("vit" or "cnn",
        ``mae_bench.models.backbones.family``)."""
        if family != "cnn":
            return cls.defaults
        return {section: {**cls.defaults.get(section, {}), **cls.cnn_defaults.get(section, {})}
                for section in {*cls.defaults, *cls.cnn_defaults}}

    @property
    @abc.abstractmethod
    def encoder(self) -> nn.Module:
        """The backbone that the evaluation protocols use."""

    def no_weight_decay(self) -> set[str]:
        return set()

    def weight_decay_at(self, step: int, total_steps: int, start: float, end: float) -> float:
        """The weight decay of optimizer step ``step`` (0-based) of ``total_steps`` when the
        run sets ``train.weight_decay_end``: DINO's and iBOT's half cosine from ``start`` to
        ``end``, spread over ``schedule_stretch`` runs. A method whose reference indexes its
        schedule otherwise overrides this."""
        return cosine_weight_decay(step, round(total_steps * self.schedule_stretch), start, end)

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor | None:
        """What ``mae-bench visualize`` draws of a masked method: [N, gh, gw] int64 on the
        ViT's patch grid for images [N, C, H, W], drawn with ``generator`` as a training step
        draws it: 0 = a patch the encoder sees, 1 = one the loss predicts, 2 = neither (I-JEPA:
        outside the context and every target). None: the method draws no mask."""
        return None

    def after_init(self) -> None:
        """The encoder's weights were just replaced (``--init``): copy them to whatever mirrors
        the encoder (EMA teachers, which start as the student's copy)."""
        return

    def embedding(self, features: Tensor) -> Tensor | None:
        """The training embedding [N, P] of pooled encoder features [N, D]: the space the
        method's loss compares (a projector's output), where a joint-embedding method collapses;
        the online evaluation's health signals are computed on it. None: the method has none
        (MAE and its siblings predict pixels or tokens); the signals then use the features."""
        return None

    def reconstruct(self, imgs: Tensor, generator: torch.Generator) -> Tensor | None:
        """Pixel predictions [N, C, H, W] (in the normalised space of ``imgs``) where the
        method predicts pixels (MAE, SimMIM) for the mask ``display_mask`` draws with the same
        generator state; None for methods that predict features."""
        return None
