"""k-NN protocol: votes and metrics against a loop reference, FAISS vs torch, a hand-checked
retrieval case, input handling, and error messages."""

import math
import re

import faiss
import numpy as np
import pytest
import torch

from evals.knn import knn_evaluate, knn_torch
from mae_bench.errors import ConfigError


def _clustered(n_train, n_test, dim, n_classes, seed):
    """Gaussian clusters on continuous features: similarity ties have probability zero."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim))
    y_train = rng.integers(0, n_classes, n_train)
    y_test = rng.integers(0, n_classes, n_test)
    x_train = centers[y_train] + 1.5 * rng.standard_normal((n_train, dim))
    x_test = centers[y_test] + 1.5 * rng.standard_normal((n_test, dim))
    return x_train, y_train, x_test, y_test  # float64, int64


def _reference(x_train, y_train, x_test, y_test, k, temperature, map_r_max=None):
    """Straight from the definitions: float64 cosine matrix, a full sort, Python loops."""
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    b = x_test / np.linalg.norm(x_test, axis=1, keepdims=True)
    sim = b @ a.T  # [M, N]
    top1 = top5 = 0
    recall = {1: 0, 5: 0, 10: 0}
    ap_total = 0.0
    preds = []
    for q in range(len(b)):
        order = np.argsort(-sim[q], kind="stable")
        votes = {}
        for j in order[:k]:
            votes[y_train[j]] = votes.get(y_train[j], 0.0) + math.exp(sim[q, j] / temperature)
        ranked = sorted(votes, key=lambda c: (-votes[c], c))  # only classes that got a vote
        preds.append(ranked[0])
        top1 += ranked[0] == y_test[q]
        top5 += y_test[q] in ranked[:5]
        rel = [y_train[j] == y_test[q] for j in order]
        for r in recall:
            recall[r] += any(rel[:r])
        big_r = sum(y_train == y_test[q])
        if map_r_max is not None:
            big_r = min(big_r, map_r_max)
        precisions = [sum(rel[: i + 1]) / (i + 1) for i in range(big_r) if rel[i]]
        ap_total += sum(precisions) / big_r
    m = len(b)
    return {
        "top1": 100 * top1 / m,
        "top5": 100 * top5 / m,
        "preds": np.array(preds),
        "recall": {r: 100 * h / m for r, h in recall.items()},
        "map": 100 * ap_total / m,
    }


DATA = _clustered(n_train=150, n_test=60, dim=12, n_classes=8, seed=0)


@pytest.mark.parametrize(
    ("ks", "temperature", "chunk_size"),
    [((1, 10, 20), 0.07, 4096), ((3, 150), 0.5, 1), ((7, 64), 0.02, 7)],
)
def test_knn_matches_loop_reference(ks, temperature, chunk_size):
    x_train, y_train, x_test, y_test = DATA
    got = knn_evaluate(
        x_train,
        y_train,
        x_test,
        y_test,
        ks=ks,
        temperature=temperature,
        chunk_size=chunk_size,
        map_r_max=None,
        use_gpu=False,
    )
    assert got.backend == "faiss-cpu" and sorted(got.accuracy) == sorted(ks)
    for k in ks:
        ref = _reference(x_train, y_train, x_test, y_test, k, temperature)
        np.testing.assert_array_equal(got.predictions[k], ref["preds"])
        assert got.accuracy[k]["top1"] == pytest.approx(ref["top1"])
        assert got.accuracy[k]["top5"] == pytest.approx(ref["top5"])
    assert got.retrieval["recall@1"] == pytest.approx(ref["recall"][1])
    assert got.retrieval["recall@5"] == pytest.approx(ref["recall"][5])
    assert got.retrieval["recall@10"] == pytest.approx(ref["recall"][10])
    assert got.retrieval["map@r"] == pytest.approx(ref["map"], abs=1e-4)


def test_capped_map_at_r_is_named_and_matches_reference():
    x_train, y_train, x_test, y_test = DATA  # about 19 training samples per class
    got = knn_evaluate(x_train, y_train, x_test, y_test, ks=(5,), map_r_max=6, use_gpu=False)
    ref = _reference(x_train, y_train, x_test, y_test, 5, 0.07, map_r_max=6)
    assert set(got.retrieval) == {"recall@1", "recall@5", "recall@10", "map@r"}
    assert got.map_r_cap == 6
    assert got.retrieval["map@r"] == pytest.approx(ref["map"], abs=1e-4)
    assert got.search_k == 10  # recall@10 needs more than k=5 and R capped at 6


def test_dtypes_strides_and_scale_do_not_change_the_result():
    x_train, y_train, x_test, y_test = DATA
    base = knn_evaluate(x_train, y_train, x_test, y_test, ks=(1, 10, 20), use_gpu=False)
    wide = np.zeros((len(x_train), 2 * x_train.shape[1]))
    wide[:, ::2] = x_train
    scale = np.random.default_rng(1).uniform(0.1, 10.0, (len(x_test), 1))
    variants = [
        (wide[:, ::2], y_train, x_test, y_test),  # strided numpy view
        (
            torch.from_numpy(x_train).float().T.contiguous().T,
            torch.from_numpy(y_train),
            torch.from_numpy(x_test).float(),
            torch.from_numpy(y_test),
        ),  # transposed torch view
        (x_train, y_train, x_test * scale, y_test),  # cosine ignores each row's length
        (x_train[::-1], y_train[::-1], x_test, y_test),  # negative strides, same set
    ]
    for variant in variants:
        got = knn_evaluate(*variant, ks=(1, 10, 20), use_gpu=False)
        assert got.accuracy == base.accuracy
        assert got.retrieval == pytest.approx(base.retrieval)
        for k in (1, 10, 20):
            np.testing.assert_array_equal(got.predictions[k], base.predictions[k])


def test_float16_input_is_normalised_in_float32():
    x_train, y_train, x_test, y_test = DATA
    half_train, half_test = x_train.astype(np.float16), x_test.astype(np.float16)
    got = knn_evaluate(half_train, y_train, half_test, y_test, ks=(10,), use_gpu=False)
    ref = _reference(
        half_train.astype(np.float64), y_train, half_test.astype(np.float64), y_test, 10, 0.07
    )
    np.testing.assert_array_equal(got.predictions[10], ref["preds"])


def test_torch_brute_force_equals_faiss():
    x_train, y_train, x_test, y_test = _clustered(2000, 500, 32, 10, seed=2)
    fast = knn_evaluate(x_train, y_train, x_test, y_test, use_gpu=False)
    slow = knn_torch(x_train, y_train, x_test, y_test, chunk_size=128)
    assert slow.backend == "torch" and slow.search_k == fast.search_k == 217  # max R
    assert slow.accuracy == fast.accuracy
    assert slow.retrieval == pytest.approx(fast.retrieval, abs=1e-4)
    for k in (10, 20, 100, 200):
        np.testing.assert_array_equal(slow.predictions[k], fast.predictions[k])


def test_retrieval_metrics_on_hand_checked_points():
    # Unit vectors at these angles (degrees); cosine ranking = angular distance ranking.
    angles = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 170]
    labels = [0, 1, 0, 1, 1, 0, 2, 2, 1, 2, 2, 3]  # R: class 0 -> 3, 1 -> 4, 2 -> 4, 3 -> 1

    # Queries at 0 deg see labels ranked [0,1,0,1,1,0,2,2,1,2,2,3]; at 103 deg
    # [2,2,1,2,2,0,1,1,3,0,1,0]; at 172 deg [3,2,...].
    #   q  angle label | hit@1 hit@5 hit@10 | AP@R
    #   a    0     0   |  yes   yes   yes   | R=3, rel@1,3: (1 + 2/3) / 3 = 5/9
    #   b    0     1   |  no    yes   yes   | R=4, rel@2,4: (1/2 + 2/4) / 4 = 1/4
    #   c    0     2   |  no    no    yes   | R=4, none in top 4: 0
    #   d    0     3   |  no    no    no    | R=1: 0
    #   e  103     2   |  yes   yes   yes   | R=4, rel@1,2,4: (1 + 1 + 3/4) / 4 = 11/16
    #   f  172     3   |  yes   yes   yes   | R=1, rel@1: 1
    #   g    0     4   |  no    no    no    | R=0 (no training sample): 0
    # recall@1 = 3/7, recall@5 = 4/7, recall@10 = 5/7,
    # mAP@R = (5/9 + 1/4 + 11/16 + 1) / 7 = 359/1008.
    # R capped at 2: a (1)/2, b (1/2)/2, c 0, d 0, e (1+1)/2, f 1, g 0 -> 2.75 / 7.
    def unit(degrees):
        rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
        return np.stack([np.cos(rad), np.sin(rad)], axis=1)

    train = unit(angles)
    queries, query_labels = unit([0, 0, 0, 0, 103, 172, 0]), [0, 1, 2, 3, 2, 3, 4]
    expected = {
        "recall@1": 100 * 3 / 7,
        "recall@5": 100 * 4 / 7,
        "recall@10": 100 * 5 / 7,
        "map@r": 100 * 359 / 1008,
    }
    for cap in (None, 4, 1000):  # 4 = the largest R, so no query is capped: still exact
        got = knn_evaluate(train, labels, queries, query_labels, ks=(1,), map_r_max=cap)
        assert got.retrieval == pytest.approx(expected)
    assert got.accuracy[1]["top1"] == pytest.approx(100 * 3 / 7)  # a, e, f
    capped = knn_evaluate(train, labels, queries, query_labels, ks=(1,), map_r_max=2)
    assert capped.map_r_cap == 2
    assert capped.retrieval["map@r"] == pytest.approx(100 * 2.75 / 7)


def test_top5_counts_only_classes_that_got_a_vote():
    # k=2 with 3 classes: "top-5" would be every class if unvoted classes counted.
    x_train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    got = knn_evaluate(x_train, [0, 1, 2], np.array([[1.0, 0.05]]), [2], ks=(2,), retrieval=False)
    assert got.accuracy[2] == {"top1": 0.0, "top5": 0.0} and got.retrieval == {}
    assert got.search_k == 2


def test_errors_name_the_bad_values():
    x_train, y_train, x_test, y_test = DATA
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "k=200 is larger than the training set (N=150 features); pass ks with every k <= 150"
        ),
    ):
        knn_evaluate(x_train, y_train, x_test, y_test)
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "train_features has 150 rows (shape (150, 12)) but train_labels has 149 (shape (149,))"
        ),
    ):
        knn_evaluate(x_train, y_train[:-1], x_test, y_test, ks=(5,))
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "train_features (150, 12) and test_features (60, 11) have different feature dimensions"
        ),
    ):
        knn_torch(x_train, y_train, x_test[:, :11], y_test, ks=(5,))
    with pytest.raises(ConfigError, match=re.escape("test_features has shape (0, 12)")):
        knn_evaluate(x_train, y_train, x_test[:0], y_test[:0], ks=(5,))
    with pytest.raises(ConfigError, match=re.escape("train_features has shape (150, 3, 4)")):
        knn_evaluate(x_train.reshape(150, 3, 4), y_train, x_test, y_test, ks=(5,))
    with pytest.raises(ConfigError, match=re.escape("num_classes=3 but a label is 7")):
        knn_evaluate(x_train, y_train, x_test, y_test, ks=(5,), num_classes=3)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine has a GPU faiss can use")
def test_use_gpu_without_a_gpu_is_an_error():
    x_train, y_train, x_test, y_test = DATA
    with pytest.raises(ConfigError, match=re.escape("use_gpu=True but no GPU is usable by faiss")):
        knn_evaluate(x_train, y_train, x_test, y_test, ks=(5,), use_gpu=True)
