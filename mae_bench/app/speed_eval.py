"""How fast the evaluation protocols run: feature extraction, k-NN search (FAISS against a plain
torch brute force on the same features) and the fast linear probe. ``mae-bench speed`` reports
these beside the training numbers (``mae_bench.app.speed``).

The k-NN and probe timings use synthetic class-structured features of a chosen size (CIFAR-10's
50,000 x 10,000 by default): their cost depends only on the shapes, and a fixed seed makes the
two searches' predictions comparable one for one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from evals.fast_probe import fast_linear_probe
from evals.features import pool_tokens
from evals.knn import DEFAULT_KS, knn_evaluate, knn_torch
from mae_bench.data.augment import BatchViews, ViewSpec
from mae_bench.models.vit import VisionTransformer
from mae_bench.training.runtime import autocast


@dataclass(frozen=True)
class KnnSpeed:
    """FAISS against torch brute force on one set of features.

    Attributes:
        faiss_seconds / torch_seconds: best wall time of a whole ``knn_evaluate`` /
            ``knn_torch`` call (search and vote; no retrieval metrics).
        faiss_search_seconds / torch_search_seconds: the search part alone.
        agreement: percent of test predictions (every k) the two agree on.
        top1_faiss / top1_torch: k=20 top-1 of each (percent).
        backend: what ``knn_evaluate`` ran on (faiss-cpu | faiss-gpu).
    """

    faiss_seconds: float
    torch_seconds: float
    faiss_search_seconds: float
    torch_search_seconds: float
    agreement: float
    top1_faiss: float
    top1_torch: float
    backend: str

    @property
    def speedup(self) -> float:
        return self.torch_seconds / self.faiss_seconds


def synthetic_features(n_train: int, n_test: int, dim: int, num_classes: int = 10,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Gaussian clusters, one per class, with noise as large as the spread of the centres
    (so neighbours mix classes, as real features do).

    Returns:
        train [n_train, dim] float32, train labels [n_train], test [n_test, dim], test labels.
    """
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)  # [C, D]

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=gen)  # [n]
        return centres[labels] + 1.5 * torch.randn(n, dim, generator=gen), labels  # [n, D]

    return (*draw(n_train), *draw(n_test))


def knn_speed(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
              test_labels: torch.Tensor, repeats: int = 2,
              device: torch.device = torch.device("cpu"), retrieval: bool = False) -> KnnSpeed:
    """Time the FAISS k-NN and the torch brute force alternately, best of ``repeats`` each,
    with the protocol's default ks (10, 20, 100, 200); ``retrieval`` adds recall@K and mAP@R
    (a search of 1,000 neighbours)."""
    best_f = best_t = None
    for _ in range(repeats):
        f = knn_evaluate(train, train_labels, test, test_labels, ks=DEFAULT_KS,
                         retrieval=retrieval)
        t = knn_torch(train, train_labels, test, test_labels, ks=DEFAULT_KS,
                      retrieval=retrieval, device=device)
        best_f = f if best_f is None or f.total_seconds < best_f.total_seconds else best_f
        best_t = t if best_t is None or t.total_seconds < best_t.total_seconds else best_t
    same = sum(int((best_f.predictions[k] == best_t.predictions[k]).sum()) for k in DEFAULT_KS)
    agreement = 100.0 * same / (len(test_labels) * len(DEFAULT_KS))
    return KnnSpeed(best_f.total_seconds, best_t.total_seconds, best_f.search_seconds,
                    best_t.search_seconds, agreement, best_f.accuracy[20]["top1"],
                    best_t.accuracy[20]["top1"], best_f.backend)


def probe_seconds(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                  test_labels: torch.Tensor, device: torch.device = torch.device("cpu")
                  ) -> tuple[float, float]:
    """Wall time of one ``fast_linear_probe`` with its default grid, and its top-1 (percent)."""
    start = time.perf_counter()
    result = fast_linear_probe(train, train_labels, test, test_labels, device=device)
    return time.perf_counter() - start, result["top1"]


@torch.no_grad()
def extraction_speed(encoder: VisionTransformer, images: torch.Tensor, mean: tuple[float, ...],
                     std: tuple[float, ...], device: torch.device, precision: str,
                     batch_size: int = 256, repeats: int = 3, pool: str = "cls") -> float:
    """Images per second of frozen-feature extraction: uint8 batch -> device -> normalise ->
    encoder (all patches) -> pooled feature, best of ``repeats`` passes over ``images``."""
    encoder = encoder.to(device).eval()
    norm = BatchViews(ViewSpec(img_size=images.shape[-1]), mean, std)
    best = float("inf")
    for i in range(repeats + 1):  # the first pass warms up
        _sync(device)
        start = time.perf_counter()
        for lo in range(0, len(images), batch_size):
            x = norm.normalize(images[lo:lo + batch_size].to(device).float())  # [B, C, H, W]
            with autocast(device, precision):
                pool_tokens(encoder.forward_features(x), pool)  # [B, D]
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return len(images) / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
