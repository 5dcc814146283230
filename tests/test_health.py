"""Representation health (``evals/health.py``): RankMe against its formula computed another way,
the embedding std and view alignment at their known extremes, and the collapse rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evals.health import (
    COLLAPSE_RANK,
    COLLAPSE_STD_FRACTION,
    alignment,
    collapsed,
    embedding_std,
    rankme,
)


def test_rankme_equals_the_papers_formula_computed_with_numpy():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 32, generator=gen) * torch.linspace(0.1, 3, 32)  # uneven spectrum
    s = np.linalg.svd(z.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_rankme_counts_the_directions_the_embeddings_span():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(500, 16, generator=gen)
    line = torch.randn(500, 1, generator=gen) * torch.randn(1, 16, generator=gen)
    plane = torch.randn(500, 2, generator=gen) @ torch.randn(2, 16, generator=gen)
    assert 14 < rankme(full) <= 16
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    assert 1.5 < rankme(plane) <= 2.0


def test_embedding_std_is_one_over_sqrt_d_when_spread_and_zero_when_collapsed():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(20000, 64, generator=gen)
    assert embedding_std(spread) == pytest.approx(1 / math.sqrt(64), rel=0.02)
    point = torch.randn(1, 64, generator=gen).expand(100, 64) * torch.rand(100, 1) * 5
    assert embedding_std(point) < 1e-6  # the same direction at any length: one point


def test_alignment_of_equal_and_opposite_views():
    z = torch.randn(50, 8)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)
    assert alignment(z, -z) == pytest.approx(4.0)


def test_collapse_rule_names_the_signal_and_its_threshold():
    dim = 64
    floor = COLLAPSE_STD_FRACTION / math.sqrt(dim)
    assert collapsed(1 / math.sqrt(dim), 40.0, dim) is None
    assert collapsed(floor * 1.01, COLLAPSE_RANK + 0.1, dim) is None
    assert collapsed(floor * 0.5, 40.0, dim).startswith("embedding std")
    why = collapsed(0.1, 1.2, dim)
    assert why == f"effective rank (RankMe) 1.20 < {COLLAPSE_RANK:g}"
