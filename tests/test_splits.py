"""Stratified subsets (few-shot) and train/validation splits: counts, coverage, seeding, errors."""

import pytest
import torch

from evals.splits import stratified_subset, train_val_split
from mae_bench.errors import ConfigError

# 5 classes of 1, 3, 10, 25 and 61 samples, interleaved
LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate([1, 3, 10, 25, 61])])
LABELS = LABELS[torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.25, 0.5, 0.99])
def test_subset_takes_round_fraction_of_each_class_at_least_one(fraction):
    idx = stratified_subset(LABELS, fraction, seed=0)
    assert torch.equal(idx, torch.unique(idx)), "indices must be unique and ascending"
    for c, n in enumerate([1, 3, 10, 25, 61]):
        assert int((LABELS[idx] == c).sum()) == max(1, round(fraction * n)), (c, n)


def test_subset_of_fraction_one_is_everything():
    assert torch.equal(stratified_subset(LABELS, 1.0, seed=3), torch.arange(len(LABELS)))


def test_subset_is_seeded():
    a = stratified_subset(LABELS, 0.3, seed=0)
    assert torch.equal(a, stratified_subset(LABELS, 0.3, seed=0))
    assert not torch.equal(a, stratified_subset(LABELS, 0.3, seed=1))
    # numpy-style int32 labels name the same samples
    assert torch.equal(a, stratified_subset(LABELS.int(), 0.3, seed=0))


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_subset_rejects_bad_fraction(fraction):
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
        stratified_subset(LABELS, fraction, seed=0)


def test_subset_rejects_unlabelled_and_float_labels():
    with pytest.raises(ConfigError, match="some labels are negative"):
        stratified_subset(torch.tensor([0, 1, -1]), 0.5, seed=0)
    with pytest.raises(ConfigError, match="integer class indices"):
        stratified_subset(torch.tensor([0.0, 1.0]), 0.5, seed=0)


def test_train_val_split_is_a_stratified_partition():
    labels = LABELS[LABELS != 0]  # drop the single-sample class
    fit, val = train_val_split(labels, 0.2, seed=0)
    assert torch.equal(torch.sort(torch.cat([fit, val])).values, torch.arange(len(labels)))
    for c, n in [(1, 3), (2, 10), (3, 25), (4, 61)]:
        n_val = int((labels[val] == c).sum())
        assert n_val == min(max(1, round(0.2 * n)), n - 1), (c, n)
        assert int((labels[fit] == c).sum()) == n - n_val
    # a class of 2 keeps one sample on each side even with a large fraction
    fit, val = train_val_split(torch.tensor([0, 0, 1, 1, 1, 1]), 0.9, seed=0)
    assert sorted(torch.tensor([0, 0, 1, 1, 1, 1])[fit].tolist()) == [0, 1]
    a = train_val_split(labels, 0.2, seed=0)[1]
    assert torch.equal(a, train_val_split(labels, 0.2, seed=0)[1])
    assert not torch.equal(a, train_val_split(labels, 0.2, seed=1)[1])


def test_train_val_split_errors():
    with pytest.raises(ConfigError, match="class 0 has a single training sample"):
        train_val_split(LABELS, 0.1, seed=0)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        train_val_split(torch.tensor([0, 0, 1, 1]), 1.0, seed=0)
