"""Frozen features for the protocols that run on them (k-NN, the fast probe): both splits
extracted (or read from the cache, or from ``--features``), the label fraction applied.

Under torchrun every rank extracts its part of the data and rank 0 receives all of it; the other
ranks get None and return no numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from evals.features import features_for
from evals.protocol import EvalContext, train_subset
from mae_bench.training.distributed import is_main_process


@dataclass(frozen=True)
class FrozenSplits:
    """The training (after any label fraction) and test features and labels."""

    train_x: Tensor  # [N, D]
    train_y: Tensor  # [N]
    test_x: Tensor  # [M, D]
    test_y: Tensor  # [M]
    subset: Tensor | None  # the kept training indices (None: all)

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def frozen_splits(context: EvalContext, label_fraction: float,
                  check_subset: Callable[[Tensor, Tensor], None] | None = None
                  ) -> FrozenSplits | None:
    """The features of both splits; None on ranks other than 0.

    Args:
        context: the evaluation's inputs and settings.
        label_fraction: the share of training labels kept (stratified, seeded).
        check_subset: called with (all training labels, kept indices) before they are cut, to
            refuse a fraction that does not fit the protocol.
    """
    inputs = context.inputs
    if inputs.features is not None:
        if not is_main_process():  # every rank read the files; rank 0 runs the protocol
            return None
        f = inputs.features
        train_x, train_y, test_x, test_y = (f["train_features"], f["train_labels"],
                                            f["test_features"], f["test_labels"])
    else:
        got = {split: _extract(context, split) for split in ("train", "test")}
        if not is_main_process():  # its part went to rank 0, which runs the protocol
            return None
        train_x, train_y = got["train"]
        test_x, test_y = got["test"]
    subset = train_subset(train_y, label_fraction, context.seed)
    if subset is not None:
        if check_subset is not None:
            check_subset(torch.as_tensor(train_y), subset)
        train_x, train_y = train_x[subset], train_y[subset]
        context.notes.append(f"label fraction {label_fraction}: {len(subset)} training samples")
    present = int(torch.as_tensor(train_y).unique().numel())
    if present < 2:
        context.notes.append(f"warning: the training set has {present} class: every prediction "
                             "is that class, so the accuracy says nothing about the encoder")
    return FrozenSplits(train_x, train_y, test_x, test_y, subset)


def _extract(context: EvalContext, split: str) -> tuple[Tensor, Tensor]:
    inputs = context.inputs
    feats = features_for(inputs.source, inputs.train if split == "train" else inputs.test,
                         dataset_name=inputs.dataset, split=split, pool=inputs.pool,
                         device=context.device, precision=context.precision,
                         cache_dir=context.cache_dir, use_cache=context.use_cache,
                         progress=context.bar(f"features {split}"))
    context.notes.append(f"{split} features [{feats.features.shape[0]} x "
                         f"{feats.features.shape[1]}]: "
                         f"{'cache' if feats.cached else 'extracted'} in {feats.seconds:.1f} s")
    return feats.features, feats.labels
