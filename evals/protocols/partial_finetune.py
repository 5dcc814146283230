"""Partial fine-tuning (MAE paper, Fig. 9): the last ``--blocks`` blocks and the head train, the
rest stays frozen; ``--blocks 0`` is a probe on the pooled, re-normed features. On a ResNet the
blocks are its stages, on a timm model its layer groups (``evals.finetune.partial_units``)."""

from __future__ import annotations

from dataclasses import dataclass

from evals.protocol import knob
from evals.protocols.finetune import Finetune, FinetuneOptions
from mae_bench.errors import ConfigError


@dataclass(frozen=True)
class PartialOptions(FinetuneOptions):
    blocks: int | None = knob(None, "partial-finetune: train the last N blocks and the head (a "
                              "ResNet: its last N stages, 0..4).",
                              check=lambda v: v >= 0, message="--blocks must be >= 0, got {value}")


class PartialFinetune(Finetune):
    name = "partial-finetune"
    Options = PartialOptions

    def validate(self, options: PartialOptions) -> None:
        if options.blocks is None:
            raise ConfigError("partial-finetune needs --blocks N (train the last N blocks + "
                              "head)")

    def blocks(self, options: PartialOptions) -> int | None:
        return options.blocks
