"""Weighted k-NN classification (Wu et al. 2018, as in DINO's ``eval_knn.py``) and retrieval
metrics, from one exact nearest-neighbour search.

Features are L2-normalised in float32, so the inner product is the cosine similarity. Each test
feature is searched ONCE, in chunks of queries, for the ``search_k`` most similar training
features; every k of ``ks`` and every retrieval metric is read off that one ranked list:

* k-NN accuracy: each of the k nearest training samples votes for its label with weight
  ``exp(sim / temperature)``; the class with the largest summed vote is the prediction (ties go
  to the smaller class index). ``top1`` asks for the true class to be that prediction; ``top5``
  asks for it to have received at least one vote and to have fewer than 5 classes with a strictly
  larger vote (so with fewer than 5 classes it is "the true class got a vote": classes nobody
  voted for are never counted as guesses, unlike DINO's sort over zero scores).
* ``recall@K`` (K = 1, 5, 10): the percentage of queries with at least one training sample of
  their own label among their K nearest (the "Recall@K" of metric-learning papers, not the
  fraction of relevant items retrieved). K is capped at the training-set size.
* ``map@r`` (Musgrave et al. 2020, "A Metric Learning Reality Check"): for a query whose label
  has R training samples, ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)``, with P(i) the precision
  among the i nearest; averaged over queries. Train and test are disjoint sets, so no query is
  excluded from its own neighbours.

Queries whose label has no training sample count as misses everywhere (AP 0); every metric is a
percentage over all test queries.

mAP@R needs ``max R`` neighbours per query: 5,000 on CIFAR-10. A faiss-cpu search for that many
costs several times the k-NN-only one (k=200) and falls behind torch's topk, and faiss-gpu cannot
select more than 2,048 neighbours at all (the timings: results/speed-cpu.md, "The cap on mAP@R's
neighbours"). So R is capped at ``map_r_max`` (default 1000): the search stays within a small
multiple of the k-NN-only one, and every backend computes the same number. When the
cap shortens R for any query, ``KnnResult.map_r_cap`` says so (result rows carry it in their own
field, ``map_r_cap``): the number is then AP over the first ``min(R, map_r_max)`` neighbours,
normalised by that same number; ``map_r_max=None`` gives the exact metric (on a GPU only while
max R <= 2048, else the auto backend searches on the CPU).

Both backends search in float32: where two neighbours' similarities differ by less than float32
resolution (~1e-7) they may order them differently (1 prediction in 40,000 on that benchmark).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mae_bench.errors import ConfigError, DataError

DEFAULT_KS = (10, 20, 100, 200)
RECALL_AT = (1, 5, 10)
DEFAULT_MAP_R_MAX = 1000
FAISS_CHUNK = 4096  # queries per faiss search call: faiss blocks its own BLAS calls by 4096 too
# faiss-cpu's BLAS blocking for exact search: 4096 queries x FAISS_DB_BLOCK database rows per
# sgemm. Its default of 1024 rows leaves the heap merge a larger share, and 16384 was slower
# again (the timings: results/speed-cpu.md, "FAISS against torch").
FAISS_DB_BLOCK = 4096
TORCH_CHUNK_BYTES = 1 << 28  # 256 MiB similarity block per chunk on the torch path
GPU_MAX_K = 2048  # faiss-gpu's largest k-selection (without cuVS)

ArrayLike = Tensor | np.ndarray


@dataclass(frozen=True)
class KnnResult:
    """What one k-NN evaluation measured (percentages).

    Attributes:
        accuracy: ``{k: {"top1": %, "top5": %}}`` for every k asked.
        retrieval: ``{"recall@1", "recall@5", "recall@10", "map@r"}``; empty when
            ``retrieval=False``.
        map_r_cap: the cap on R when it shortened R for some query (mAP@R is then computed
            over min(R, cap) neighbours); None when mAP@R is exact.
        search_seconds: time spent in the nearest-neighbour search only.
        total_seconds: the whole call, validation and voting included.
        backend: ``"faiss-cpu"``, ``"faiss-gpu"`` or ``"torch"``.
        search_k: neighbours retrieved per query (the largest k any metric needs).
        predictions: ``{k: int64 array [M]}``, the predicted label of every test sample.
    """

    accuracy: dict[int, dict[str, float]]
    retrieval: dict[str, float]
    search_seconds: float
    total_seconds: float
    backend: str
    search_k: int
    predictions: dict[int, np.ndarray] = field(repr=False)
    map_r_cap: int | None = None


@dataclass(frozen=True)
class _Inputs:
    """Validated, normalised inputs and the search plan shared by both backends."""

    train: Tensor  # [N, D] float32, unit rows, contiguous, CPU
    train_labels: Tensor  # [N] int64
    test: Tensor  # [M, D]
    test_labels: Tensor  # [M] int64
    ks: tuple[int, ...]  # sorted, unique
    num_classes: int
    temperature: float
    retrieval: bool
    relevant: Tensor  # [M] int64, min(R, map_r_max) per query (R = train samples of its label)
    map_r_cap: int | None
    search_k: int


def knn_evaluate(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = FAISS_CHUNK,
    use_gpu: bool | None = None,
    retrieval: bool = True,
    map_r_max: int | None = DEFAULT_MAP_R_MAX,
    progress: Callable[[int, int], None] | None = None,
) -> KnnResult:
    """Weighted k-NN accuracy and retrieval metrics with an exact FAISS ``IndexFlatIP`` search.

    Args:
        train_features: [N, D] features (torch or numpy, any float dtype, any strides).
        train_labels: [N] integer labels.
        test_features: [M, D] features.
        test_labels: [M] integer labels.
        ks: neighbour counts to vote with; all answered from one search.
        temperature: vote weight ``exp(sim / temperature)`` (DINO's 0.07).
        num_classes: defaults to the largest label + 1.
        chunk_size: test queries per search call (bounds the [chunk, search_k] result memory).
        use_gpu: None picks a GPU index when CUDA and faiss-gpu are both present (and search_k
            fits the GPU's 2,048 limit); True insists; False stays on the CPU.
        retrieval: also compute recall@1/5/10 and mAP@R (may widen the search, see module doc).
        map_r_max: cap on R for mAP@R; None for the exact metric.
        progress: optional ``(done, total)`` callback after each chunk of queries.
    """
    start = time.perf_counter()
    inputs = _prepare(train_features, train_labels, test_features, test_labels, ks, temperature,
                      num_classes, chunk_size, retrieval, map_r_max)
    gpu = _want_gpu(use_gpu, inputs.search_k)
    index = faiss.IndexFlatIP(inputs.train.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(inputs.train.numpy())
    queries = inputs.test.numpy()  # [M, D]

    def search(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        sims, ids = index.search(queries[lo:hi], inputs.search_k)  # [B, K], [B, K]
        return torch.from_numpy(sims), torch.from_numpy(ids)

    with _faiss_blocks(FAISS_CHUNK, FAISS_DB_BLOCK):
        return _run(inputs, search, chunk_size, "faiss-gpu" if gpu else "faiss-cpu", start,
                    progress)


@contextlib.contextmanager
def _faiss_blocks(queries: int, database: int) -> Iterator[None]:
    """Set faiss-cpu's (process-wide) sgemm block sizes for one search, then restore them."""
    cvar = faiss.cvar
    before = cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs
    cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = (queries,
                                                                                   database)
    try:
        yield
    finally:
        cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = before


def knn_torch(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
    retrieval: bool = True,
    map_r_max: int | None = DEFAULT_MAP_R_MAX,
    progress: Callable[[int, int], None] | None = None,
) -> KnnResult:
    """The same evaluation as :func:`knn_evaluate` with a plain torch brute-force search (one
    matmul + ``topk`` per chunk of queries on ``device``): the reference and speed baseline.

    ``chunk_size`` defaults to as many queries as fit a 256 MiB float32 similarity block. The
    other arguments are those of :func:`knn_evaluate`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    inputs = _prepare(train_features, train_labels, test_features, test_labels, ks, temperature,
                      num_classes, chunk_size, retrieval, map_r_max)
    if chunk_size is None:
        chunk_size = max(1, TORCH_CHUNK_BYTES // (4 * inputs.train.shape[0]))
    train = inputs.train.to(device)  # [N, D]
    test = inputs.test.to(device)  # [M, D]

    def search(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        sims = test[lo:hi] @ train.T  # [B, N]
        top = sims.topk(inputs.search_k, dim=1)  # sorted, largest first
        if device.type == "cuda":  # so search_seconds times the kernels, not their launch
            torch.cuda.synchronize(device)
        return top.values, top.indices  # [B, K], [B, K]

    return _run(inputs, search, chunk_size, "torch", start, progress)


def _run(
    inputs: _Inputs,
    search: Callable[[int, int], tuple[Tensor, Tensor]],
    chunk_size: int,
    backend: str,
    start: float,
    progress: Callable[[int, int], None] | None,
) -> KnnResult:
    """Search the test queries chunk by chunk and tally every metric: the only code the two
    backends share besides validation, so they differ in the search alone."""
    m = inputs.test.shape[0]
    train_labels = inputs.train_labels  # [N], moved once to the search's device
    top1 = dict.fromkeys(inputs.ks, 0)
    top5 = dict.fromkeys(inputs.ks, 0)
    preds: dict[int, list[Tensor]] = {k: [] for k in inputs.ks}
    hits = dict.fromkeys(RECALL_AT, 0)
    ap_sum = 0.0
    search_seconds = 0.0
    for lo in range(0, m, chunk_size):
        hi = min(lo + chunk_size, m)
        t0 = time.perf_counter()
        sims, ids = search(lo, hi)  # [B, K] similarities (descending), [B, K] train indices
        search_seconds += time.perf_counter() - t0
        device = sims.device
        train_labels = train_labels.to(device)
        labels = inputs.test_labels[lo:hi].to(device)  # [B]
        nbr_labels = train_labels[ids]  # [B, K]
        for k in inputs.ks:
            pred, in_top5 = _vote(
                sims[:, :k], nbr_labels[:, :k], labels, inputs.num_classes, inputs.temperature
            )
            top1[k] += int((pred == labels).sum())
            top5[k] += int(in_top5.sum())
            preds[k].append(pred.cpu())
        if inputs.retrieval:
            rel = nbr_labels == labels[:, None]  # [B, K]
            for r in RECALL_AT:
                hits[r] += int(rel[:, :r].any(dim=1).sum())
            ap_sum += float(_ap_at_r(rel, inputs.relevant[lo:hi].to(device)).sum())
        if progress is not None:
            progress(hi, m)

    accuracy = {k: {"top1": 100.0 * top1[k] / m, "top5": 100.0 * top5[k] / m} for k in inputs.ks}
    metrics: dict[str, float] = {}
    if inputs.retrieval:
        metrics = {f"recall@{r}": 100.0 * hits[r] / m for r in RECALL_AT}
        metrics["map@r"] = 100.0 * ap_sum / m
    return KnnResult(
        accuracy=accuracy,
        retrieval=metrics,
        search_seconds=search_seconds,
        total_seconds=time.perf_counter() - start,
        backend=backend,
        search_k=inputs.search_k,
        predictions={k: torch.cat(p).numpy() for k, p in preds.items()},
        map_r_cap=inputs.map_r_cap if inputs.retrieval else None,
    )


def _vote(
    sims: Tensor, nbr_labels: Tensor, labels: Tensor, num_classes: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """[B, k] similarities (descending) and neighbour labels -> predicted label [B] and top-5
    hit [B] (bool)."""
    # exp((sim - max sim) / T) scales a query's votes by one constant, so the ranking is DINO's,
    # but a small T cannot overflow float32 (exp(sim / T) does for T < 0.012)
    weights = ((sims - sims[:, :1]) / temperature).exp()  # [B, k]
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)  # [B, C]
    scores.scatter_add_(1, nbr_labels, weights)
    pred = scores.argmax(dim=1)  # [B], first maximum on ties
    true_score = scores.gather(1, labels[:, None])  # [B, 1]
    n_above = (scores > true_score).sum(dim=1)  # [B]
    got_vote = (nbr_labels == labels[:, None]).any(dim=1)  # [B]
    return pred, got_vote & (n_above < 5)


def _ap_at_r(rel: Tensor, relevant: Tensor) -> Tensor:
    """AP@R per query from [B, K] relevance of the ranked neighbours and R per query [B]
    (K >= R); R = 0 gives 0."""
    rel = rel.float()  # [B, K]
    rank = torch.arange(1, rel.shape[1] + 1, device=rel.device)  # [K]
    precision = rel.cumsum(dim=1) / rank  # [B, K]
    within_r = rank[None, :] <= relevant[:, None]  # [B, K]
    return (precision * rel * within_r).sum(dim=1) / relevant.clamp(min=1)  # [B]


def _want_gpu(use_gpu: bool | None, search_k: int) -> bool:
    """Resolve ``use_gpu`` (None = auto) against what this machine and faiss build offer."""
    available = torch.cuda.is_available() and faiss.get_num_gpus() > 0
    if use_gpu is False:
        return False
    if use_gpu and not available:
        raise ConfigError(
            "use_gpu=True but no GPU is usable by faiss (torch.cuda.is_available()="
            f"{torch.cuda.is_available()}, faiss.get_num_gpus()={faiss.get_num_gpus()}); "
            "install faiss-gpu on a CUDA machine or pass use_gpu=None"
        )
    if search_k > GPU_MAX_K:
        if use_gpu:
            raise ConfigError(
                f"the search needs {search_k} neighbours per query but faiss-gpu selects at most "
                f"{GPU_MAX_K}; lower max(ks)/map_r_max or pass use_gpu=None to search on the CPU"
            )
        return False  # auto: the CPU index has no such limit (backend says "faiss-cpu")
    return available


def _prepare(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int],
    temperature: float,
    num_classes: int | None,
    chunk_size: int | None,
    retrieval: bool,
    map_r_max: int | None,
) -> _Inputs:
    """Validate the user's arguments (ConfigError naming the bad value) and plan the search."""
    train = _features(train_features, "train_features")
    test = _features(test_features, "test_features")
    y_train = _labels(train_labels, "train_labels")
    y_test = _labels(test_labels, "test_labels")
    for name, x, y in (("train", train, y_train), ("test", test, y_test)):
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"{name}_features has {x.shape[0]} rows (shape {tuple(x.shape)}) but "
                f"{name}_labels has {y.shape[0]} (shape {tuple(y.shape)}); pass one label per row"
            )
    if train.shape[1] != test.shape[1]:
        raise ConfigError(
            f"train_features {tuple(train.shape)} and test_features {tuple(test.shape)} have "
            "different feature dimensions; extract both with the same encoder and pooling"
        )
    n = train.shape[0]
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks={ks} must be a non-empty set of positive neighbour counts")
    if ks[-1] > n:
        raise ConfigError(
            f"k={ks[-1]} is larger than the training set (N={n} features); pass ks with every "
            f"k <= {n} (e.g. ks=({min(10, n)},))"
        )
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (DINO uses 0.07)")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    if map_r_max is not None and map_r_max < 1:
        raise ConfigError(f"map_r_max={map_r_max} must be >= 1, or None for the exact mAP@R")
    largest = int(max(y_train.max(), y_test.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif num_classes <= largest:
        raise ConfigError(
            f"num_classes={num_classes} but a label is {largest}; pass num_classes >= "
            f"{largest + 1} or leave it None"
        )

    per_class = torch.bincount(y_train, minlength=num_classes)  # [C]
    r_full = per_class[y_test]  # [M] R per query
    cap = n if map_r_max is None else map_r_max
    relevant = r_full.clamp(max=cap)  # [M]
    search_k = ks[-1]
    map_r_cap = None
    if retrieval:
        search_k = max(search_k, min(max(RECALL_AT), n), int(relevant.max()))
        if bool((r_full > cap).any()):
            map_r_cap = cap
    return _Inputs(
        train=train,
        train_labels=y_train,
        test=test,
        test_labels=y_test,
        ks=ks,
        num_classes=num_classes,
        temperature=float(temperature),
        retrieval=retrieval,
        relevant=relevant,
        map_r_cap=map_r_cap,
        search_k=search_k,
    )


def _features(x: ArrayLike, name: str) -> Tensor:
    """Any-dtype, any-strides [N, D] -> contiguous unit-norm float32 [N, D] on the CPU."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)  # torch cannot wrap negative strides
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError(f"{name} has shape {tuple(x.shape)}; expected a non-empty [N, D] array")
    if not x.is_floating_point():
        raise ConfigError(f"{name} has dtype {x.dtype}; expected floating-point features")
    x = x.detach().to("cpu", torch.float32)  # [N, D]
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or infinite values; check the encoder's outputs")
    return F.normalize(x, dim=1).contiguous()  # [N, D]


def _labels(y: ArrayLike, name: str) -> Tensor:
    """[N] integer labels -> int64 [N] on the CPU."""
    if isinstance(y, np.ndarray):
        y = np.ascontiguousarray(y)
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ConfigError(f"{name} has shape {tuple(y.shape)}; expected a non-empty [N] vector")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ConfigError(f"{name} has dtype {y.dtype}; expected integer class labels")
    y = y.detach().to("cpu", torch.int64)  # [N]
    if int(y.min()) < 0:
        raise ConfigError(f"{name} has a negative label ({int(y.min())}); labels are 0..C-1")
    return y
