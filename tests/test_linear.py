"""Linear probes: LARS against a hand computation, the fast probe against scikit-learn (and blind
to the test set while choosing), MAE's protocol frozen, trained, seeded and subset-aware."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from recipe_helpers import run_probe as linear_probe
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from evals.fast_probe import fast_linear_probe
from evals.features import encode
from evals.lars import LARS
from evals.splits import stratified_subset
from mae_bench.data import load_dataset
from mae_bench.data.augment import BatchViews, ViewSpec, eval_resize
from mae_bench.errors import ConfigError
from mae_bench.models.vit import build_vit

SMALL_GRID = (1e-2, 1e-3, 1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _micro_vit(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_vit("vit_micro_patch2", img_size=8, in_chans=1)


@pytest.fixture(scope="module")
def features(digits):
    """name -> (train [N, D], test [M, D]): raw pixels, and random micro-ViT cls features."""
    train, test = digits
    vit = _micro_vit().eval()
    views = BatchViews(ViewSpec(8), train.info.mean, train.info.std)
    with torch.no_grad():
        vit_feats = [encode(vit, views.normalize(eval_resize(d.images, 8)), "cls")
                     for d in (train, test)]
    return {"pixels": (train.images.flatten(1).float(), test.images.flatten(1).float()),
            "vit": tuple(vit_feats)}


@pytest.fixture(scope="module")
def sklearn_top1(digits, features):
    """name -> test top-1 of scikit-learn's LogisticRegression(C=1) on standardised features,
    fitted once per feature set (it takes seconds on pixels)."""
    train, test = digits
    cache = {}

    def top1(name: str) -> float:
        if name not in cache:
            x_train, x_test = (x.numpy() for x in features[name])
            scaler = StandardScaler().fit(x_train)
            clf = LogisticRegression(C=1.0, max_iter=10_000)
            clf.fit(scaler.transform(x_train), train.labels.numpy())
            cache[name] = 100.0 * clf.score(scaler.transform(x_test), test.labels.numpy())
        return cache[name]

    return top1


# --- LARS ------------------------------------------------------------------------------------


def test_lars_two_steps_equal_hand_computation():
    w0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    b0 = np.array([0.2, -0.1])
    grads = [(np.array([[0.3, 0.1], [-0.2, 0.4]]), np.array([0.5, -1.0])),
             (np.array([[-0.1, 0.2], [0.6, 0.0]]), np.array([0.25, 0.75]))]
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    w = torch.nn.Parameter(torch.tensor(w0))
    b = torch.nn.Parameter(torch.tensor(b0))
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    ew, eb, mw, mb = w0.copy(), b0.copy(), np.zeros_like(w0), np.zeros_like(b0)
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        # by hand: the matrix gets weight decay and the trust ratio; the vector plain SGD
        u = gw + wd * ew
        mw = mom * mw + u * eta * np.linalg.norm(ew) / np.linalg.norm(u)
        mb = mom * mb + gb
        ew, eb = ew - lr * mw, eb - lr * mb
        np.testing.assert_allclose(w.detach().numpy(), ew, rtol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), eb, rtol=1e-12)


def test_lars_zero_matrix_gets_plain_sgd_step():
    w = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    w.grad = torch.ones(2, 3, dtype=torch.float64)
    LARS([w], lr=0.1).step()  # ||w|| = 0: trust ratio 1, not 0 (which would freeze it forever)
    assert torch.allclose(w.detach(), torch.full((2, 3), -0.1, dtype=torch.float64))


# --- fast probe ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pixels", "vit"])
def test_fast_probe_at_sklearns_penalty_reproduces_sklearn(digits, features, sklearn_top1, name):
    train, test = digits
    x_train, x_test = features[name]
    ours = fast_linear_probe(x_train, train.labels, x_test, test.labels,
                             weight_decays=(1.0 / len(x_train),))  # = LogisticRegression(C=1)
    sk = sklearn_top1(name)
    assert abs(ours["top1"] - sk) <= 100.0 / len(test) + 1e-9  # at most one test image apart


@pytest.mark.parametrize("name", ["pixels", "vit"])
def test_fast_probe_with_selection_within_one_point_of_sklearn(digits, features, sklearn_top1,
                                                             name):
    train, test = digits
    x_train, x_test = features[name]
    ours = fast_linear_probe(x_train, train.labels, x_test, test.labels)
    sk = sklearn_top1(name)
    assert ours["top1"] >= sk - 1.0, (ours, sk)
    assert ours["top1"] <= ours["top5"] <= 100.0
    assert ours["lr"] == 1.0 and 1e-6 <= ours["weight_decay"] <= 1e-1


def test_fast_probe_chooses_without_the_test_set(digits, features):
    train, test = digits
    x_train, x_test = features["pixels"]
    honest = fast_linear_probe(x_train, train.labels, x_test, test.labels,
                               weight_decays=SMALL_GRID)
    wrong_labels = (test.labels + 1) % 10  # every test label wrong
    noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(0))
    blind = fast_linear_probe(x_train, train.labels, noise * 100, wrong_labels,
                              weight_decays=SMALL_GRID)
    for key in ("val_top1", "lr", "weight_decay"):
        assert blind[key] == honest[key], key
    assert honest["top1"] > 90 and blind["top1"] < 30


def test_fast_probe_accepts_numpy_and_any_float_dtype(digits, features):
    train, test = digits
    x_train, x_test = features["pixels"]  # whole numbers: exact in every dtype below
    as_torch = fast_linear_probe(x_train, train.labels, x_test, test.labels,
                                 weight_decays=SMALL_GRID)
    as_numpy = fast_linear_probe(x_train.double().numpy(), train.labels.numpy(),
                                 x_test.half().numpy(), test.labels.int().numpy(),
                                 weight_decays=SMALL_GRID)
    for key in ("top1", "top5", "val_top1", "lr", "weight_decay"):
        assert as_numpy[key] == as_torch[key], key


def _bad(**kw):
    x, y = torch.randn(20, 4), torch.arange(20) % 2
    args = {"train_features": x, "train_labels": y, "test_features": x[:6],
            "test_labels": y[:6]} | kw
    return fast_linear_probe(**args, weight_decays=(1e-2, 1e-3))


@pytest.mark.parametrize("kw, message", [
    ({"train_labels": torch.arange(19) % 2}, "train features have 20 rows but train labels "
                                             "have 19"),
    ({"test_features": torch.randn(6, 5)}, "test features have 5 dims but training features "
                                           "have 4"),
    ({"train_features": torch.randn(20, 4, 1)}, r"train features must be a 2-D \[N, D\] float"),
    ({"train_labels": torch.zeros(20, dtype=torch.long)}, "the training labels hold 1 class"),
    ({"train_labels": torch.tensor([0] * 19 + [1])}, "class 1 has a single training sample"),
    ({"test_labels": torch.tensor([0, 1, 2, 0, 1, 0])}, r"test labels must lie in \[0, 2\)"),
    ({"train_features": torch.full((20, 4), float("nan"))}, "train features hold NaN"),
    ({"train_labels": torch.arange(20) % 2 * 1.0}, "train labels must be a 1-D integer array"),
])
def test_fast_probe_rejects_bad_input(kw, message):
    with pytest.raises(ConfigError, match=message):
        _bad(**kw)


def test_fast_probe_one_shot_needs_a_single_pair_grid():
    x, y = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="class 0 has a single training sample"):
        fast_linear_probe(x, y, x, y, weight_decays=(1e-2, 1e-3))
    res = fast_linear_probe(x, y, x, y, weight_decays=(1e-2,))
    assert res["top1"] == 100.0 and math.isnan(res["val_top1"]) and res["weight_decay"] == 1e-2


# --- MAE's protocol --------------------------------------------------------------------------


def _without_seconds(result):
    return {k: v for k, v in result.items() if not k.endswith("seconds")}


def test_linear_probe_frozen_encoder_seeded_and_restored(digits):
    train, test = digits
    encoder = _micro_vit()
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    calls = []
    a = linear_probe(encoder, train, test, epochs=2, batch_size=64,
                     progress=lambda done, total: calls.append((done, total)))
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), f"the frozen encoder's {k} changed"
    assert all(p.grad is None for p in encoder.parameters())
    assert encoder.training, "the encoder's train/eval mode must be restored"
    steps = 2 * (len(train) // 64)
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    assert a["steps"] == steps and a["train_samples"] == len(train)
    assert a["lr"] == pytest.approx(0.1 * 64 / 256)
    assert 0 <= a["top1"] <= a["top5"] <= 100 and math.isfinite(a["train_loss"])
    assert _without_seconds(linear_probe(encoder, train, test, epochs=2, batch_size=64)) == \
        _without_seconds(a)
    assert _without_seconds(linear_probe(encoder, train, test, epochs=2, batch_size=64,
                                         seed=1)) != _without_seconds(a)


def test_linear_probe_head_learns(digits):
    # Ten classes of flat grey images: crops and flips leave them unchanged, so any encoder
    # separates them and the probe's accuracy shows the head learning. LARS moves the weights
    # by ~lr x 0.001 of their norm per step, hence the large blr for a run of 100 steps.
    train, _ = digits
    labels = torch.arange(10).repeat_interleave(8)  # [80]
    images = (labels * 28).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    grey = dataclasses.replace(train, images=images, labels=labels)
    result = linear_probe(_micro_vit(), grey, grey, epochs=20, batch_size=16, blr=64.0)
    assert result["train_loss"] < math.log(10) - 0.3  # the loss of a constant guess is ln 10
    assert result["top1"] >= 40.0  # chance: 10


def test_linear_probe_train_indices_equal_a_subset_data_set(digits):
    train, test = digits
    idx = stratified_subset(train.labels, 0.1, seed=0)
    subset = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])
    encoder = _micro_vit()
    kw = {"epochs": 2, "batch_size": 32, "seed": 3}
    a = linear_probe(encoder, train, test, train_indices=idx, **kw)
    b = linear_probe(encoder, subset, test, **kw)
    assert a["train_samples"] == len(idx) and a["steps"] == 2 * (len(idx) // 32)
    assert _without_seconds(a) == _without_seconds(b)


@pytest.mark.parametrize("kw, message", [
    ({"img_size": 16}, "img_size 16 differs from the encoder's 8"),
    ({"pool": "max"}, "unknown pool 'max'"),
    ({"train_indices": torch.tensor([0, 5000])}, r"train_indices must lie in \[0, 1437\)"),
    ({"precision": "fp8"}, "unknown precision 'fp8'; valid: auto, bf16, fp16, fp32"),
])
def test_linear_probe_rejects_bad_arguments(digits, kw, message):
    train, test = digits
    with pytest.raises(ConfigError, match=message):
        linear_probe(_micro_vit(), train, test, epochs=1, **kw)
