"""Few-shot: the linear probe trained on a small, stratified, seeded fraction of the labels."""

from __future__ import annotations

from evals.protocols.linear import Linear, LinearOptions
from mae_bench.errors import ConfigError


class Fewshot(Linear):
    name = "fewshot"
    frozen_usage = "fewshot --probe fast"
    few_shot = True

    def validate(self, options: LinearOptions) -> None:
        if options.label_fraction >= 1.0:
            raise ConfigError("fewshot needs --label-fraction below 1, e.g. 0.01 or 0.1")
