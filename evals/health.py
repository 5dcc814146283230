"""Representation health: numbers that tell a collapsing encoder from a learning one without
labels, computed on a batch of embeddings [N, D].

* ``rankme``: the effective rank of the embeddings (Garrido, Balestriero, Najman, LeCun 2023,
  "RankMe: Assessing the downstream performance of pretrained self-supervised representations
  by their rank", arXiv 2210.02885, eq. 1): exp of the entropy of the normalised singular
  values, between 1 (every embedding on one line) and min(N, D).
* ``embedding_std``: the mean over dimensions of the per-dimension std of the l2-normalised
  embeddings (SimSiam's collapse monitor, Chen & He 2021, section 4.1): 1/sqrt(D) for
  embeddings spread over the sphere, 0 when every image maps to one point.
* ``alignment``: the mean squared distance of the l2-normalised embeddings of two views of the
  same images (Wang & Isola 2020): 0 when the views agree, 4 at most.

Collapse (``collapsed``): the embedding std below ``COLLAPSE_STD_FRACTION`` of 1/sqrt(D), or an
effective rank below ``COLLAPSE_RANK`` (the thresholds and why: the constants' comments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# SimSiam's collapsed run has an embedding std of ~0 against 1/sqrt(D) for a healthy one (its
# Fig. 2); a random network's sits near 1/sqrt(D) and trained ones at 0.5-1x of it. A tenth of it
# is far below anything that learns, and far above float noise.
COLLAPSE_STD_FRACTION = 0.1
# An effective rank this low means the embeddings span a line or a plane: complete collapse
# (RankMe's collapsed runs, its Fig. 1, sit at 1-2 while learning runs keep tens to hundreds).
COLLAPSE_RANK = 2.0


def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe of [N, D] embeddings (float64 SVD)."""
    s = torch.linalg.svdvals(embeddings.double())  # [min(N, D)]
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def embedding_std(embeddings: Tensor) -> float:
    """Mean per-dimension std of the l2-normalised [N, D] embeddings."""
    z = F.normalize(embeddings.double(), dim=1)  # [N, D]
    return float(z.std(dim=0).mean())


def alignment(first: Tensor, second: Tensor) -> float:
    """Mean squared distance of the l2-normalised embeddings of two views [N, D] each."""
    a, b = F.normalize(first.double(), dim=1), F.normalize(second.double(), dim=1)
    return float((a - b).square().sum(1).mean())


def collapsed(std: float, rank: float, dim: int) -> str | None:
    """Why the representation has collapsed, in words, or None when it has not."""
    floor = COLLAPSE_STD_FRACTION / math.sqrt(dim)
    if std < floor:
        # three significant digits: at two, a std just under the floor printed as equal to it
        return (f"embedding std {std:.3g} < {COLLAPSE_STD_FRACTION:g}/sqrt({dim}) = "
                f"{floor:.3g}")
    if rank < COLLAPSE_RANK:
        return f"effective rank (RankMe) {rank:.2f} < {COLLAPSE_RANK:g}"
    return None
