"""The trained protocols' functions called as the tests wrote them before recipes were objects:
keyword arguments, split here into the recipe (checked when built) and the call's own."""

from __future__ import annotations

import dataclasses
from typing import Any

from evals.finetune import finetune
from evals.mae_probe import linear_probe
from evals.recipes import FinetuneRecipe, ProbeRecipe


def _split(recipe_class: type, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(recipe_class)}
    recipe = recipe_class(**{k: v for k, v in kwargs.items() if k in names})
    return recipe, {k: v for k, v in kwargs.items() if k not in names}


def run_finetune(model: Any, train: Any, test: Any, **kwargs: Any) -> dict[str, float]:
    """``finetune`` with the recipe's knobs (epochs, batch_size, mixup, ...) as keywords."""
    recipe, rest = _split(FinetuneRecipe, kwargs)
    return finetune(model, train, test, recipe, **rest)


def run_probe(encoder: Any, train: Any, test: Any, **kwargs: Any) -> dict[str, float]:
    """MAE's ``linear_probe`` with the recipe's knobs (epochs, batch_size, blr, ...) as
    keywords."""
    recipe, rest = _split(ProbeRecipe, kwargs)
    return linear_probe(encoder, train, test, recipe, **rest)
