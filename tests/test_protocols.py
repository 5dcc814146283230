"""The Protocol contract (evals/protocol.py) and its registry (evals/protocols/): names, knobs
with help, one validate, the frozen-feature question asked of the protocol, the rules of the rows,
the options of ``mae-bench eval`` generated from the knobs (``--set`` included), and an evaluation
identity that the move to objects left as it was."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from evals.distributed_eval import topk_accuracy, topk_correct
from evals.encoders import (
    FeaturesSource,
    OutsideSource,
    PixelsSource,
    RandomSource,
    RunSource,
)
from evals.protocol import EvalContext, Knobs, Numbers, Protocol
from evals.protocols import PROTOCOLS, get_protocol, knob_fields
from mae_bench.app.evaluation import _NOT_IDENTITY, EvalSpec, validate_spec
from mae_bench.errors import ConfigError

# The identity options of a default spec, as the flat 40-field EvalSpec gave them before the
# protocols were objects: eval_key hashes exactly this, so stored evaluations still match.
IDENTITY_BEFORE = (
    '{"batch_size": null, "blocks": null, "blr": null, "crop_min": null, "cutmix": null, '
    '"drop_path": null, "epochs": null, "erase": null, "extra": {}, "head_bn": null, '
    '"img_size": null, "init": "pretrained", "label_fraction": 1.0, "label_smoothing": null, '
    '"layer_decay": null, "lr": null, "mixup": null, "pool": null, "probe": "fast", '
    '"protocol": "knn", "rand_augment": null, "recipe": "auto", "seed": 0, '
    '"temperature": 0.07, "weight_decay": null}')


def test_the_registry_names_every_protocol_and_refuses_others():
    assert list(PROTOCOLS) == ["knn", "linear", "fewshot", "finetune", "partial-finetune"]
    assert all(get_protocol(name).name == name for name in PROTOCOLS)
    with pytest.raises(ConfigError, match="unknown protocol 'svm'; valid: knn, linear, fewshot, "
                                          "finetune, partial-finetune"):
        get_protocol("svm")


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_every_knob_has_a_type_a_default_and_help(name):
    options = get_protocol(name).Options
    assert issubclass(options, Knobs) and options.__dataclass_params__.frozen
    for f in dataclasses.fields(options):
        assert f.metadata["help"], f"{name}.{f.name} has no help"
        assert f.default is not dataclasses.MISSING
    get_protocol(name).Options()  # the defaults alone build (no knob left required)


@pytest.mark.multiprocess
def test_the_command_line_reads_the_knobs_without_torch():
    """``mae-bench --help`` builds eval's options from EvalSpec and the knobs: they import no
    torch nor timm (the protocols' code is imported when one runs), so the recipe names the knob
    checks are a copy of evals.recipes' (which imports torch)."""
    import subprocess
    import sys

    from evals.protocols.linear import RECIPES
    from evals.recipes import RECIPES as RECIPE_NAMES

    assert RECIPES == RECIPE_NAMES
    code = ("import sys, mae_bench.app.eval_spec; "
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_knobs_are_shared_once_and_make_the_spec():
    names = [f.name for f in knob_fields()]
    assert len(names) == len(set(names))
    assert {"ks", "temperature", "probe", "recipe", "epochs", "mixup", "blocks"} <= set(names)
    assert set(names) <= {f.name for f in dataclasses.fields(EvalSpec)}


def test_the_identity_options_are_those_of_before():
    spec = EvalSpec(protocol="knn", checkpoint="x")
    options = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
               if f.name not in _NOT_IDENTITY}
    assert json.dumps(options, sort_keys=True, default=str) == IDENTITY_BEFORE


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, r"--temperature must be > 0, got 0.0"),
    ({"ks": ()}, "--k needs positive neighbour counts, got none"),
    ({"ks": (5, 0)}, "--k needs positive neighbour counts, got 5,0"),
    ({"probe": "svm"}, "unknown probe 'svm'; valid: fast, mae"),
    ({"recipe": "x"}, "unknown recipe 'x'; valid: auto, paper"),
    ({"rand_augment": "rand-m11"}, r"RandAugment policy 'rand-m11': m must be in 0..10"),
    ({"protocol": "fewshot"}, "fewshot needs --label-fraction below 1"),
    ({"protocol": "partial-finetune"}, r"partial-finetune needs --blocks N"),
])
def test_knobs_are_checked_once_at_the_edge(kwargs, message):
    # Every protocol's knobs are checked whichever protocol runs (knn with a bad --probe too).
    with pytest.raises(ConfigError, match=message):
        validate_spec(EvalSpec(**{"protocol": "knn", "checkpoint": "pixels"} | kwargs))


def test_frozen_features_are_a_question_to_the_protocol():
    linear, knn, finetune = (get_protocol(n) for n in ("linear", "knn", "finetune"))
    assert knn.frozen(knn.Options()) and linear.frozen(linear.Options())
    assert not linear.frozen(linear.Options(probe="mae"))
    assert not finetune.frozen(finetune.Options())
    with pytest.raises(ConfigError, match=r"timm:resnet18 is evaluated on frozen features only "
                                          r"\(linear --probe mae trains a mae-bench ViT\); use "
                                          r"knn, linear --probe fast, fewshot --probe fast"):
        validate_spec(EvalSpec(protocol="linear", probe="mae", checkpoint="timm:resnet18"))
    with pytest.raises(ConfigError, match="--features works with knn, linear and fewshot"):
        validate_spec(EvalSpec(protocol="finetune", features_dir="x"))
    with pytest.raises(ConfigError, match="the pixels reference has no encoder to finetune; "
                                          "use knn, linear or fewshot"):
        validate_spec(EvalSpec(protocol="finetune", checkpoint="pixels"))


def test_one_rule_says_what_is_fine_tuned_from_scratch():
    # (moved from test_results_integrity.py with the rule, now Finetune.trains_from_scratch)
    run = RunSource("r", "mae", "a", {}, None, "f")
    official = SimpleNamespace(random_weights=False)
    rnd = RandomSource("random", "random", "a", {}, None, "f")

    def rule(protocol="finetune", init="pretrained", source=run):
        p = get_protocol(protocol)
        return p.trains_from_scratch(p.Options(init=init) if p.name != "knn" else p.Options(),
                                     source)

    assert not rule() and not rule(source=official)
    assert rule(init="random") and rule(init="random", source=official)
    assert rule("partial-finetune", init="random")
    assert rule(source=rnd)  # the random reference, whatever --init says
    assert not rule("knn")  # frozen features: no training


def test_sources_answer_what_kind_comparisons_used_to():
    run = RunSource("r", "mae", "a", {}, None, "f")
    pixels = PixelsSource("pixels", "pixels", "pixels", {}, None, "pixels")
    outside = OutsideSource("timm:x", "timm", "x", {}, None, "f", input_channels=3)
    assert (run.kind, pixels.kind, outside.kind) == ("run", "pixels", "outside")  # the identity
    assert run.own_weights and not pixels.own_weights and not outside.own_weights
    assert not pixels.pooled and pixels.reference and pixels.frozen_model() is None
    assert outside.takes_channels(1) and outside.takes_channels(3)  # gray replicated to RGB
    assert not outside.takes_channels(4)
    with pytest.raises(ConfigError, match="the pixels reference has no encoder"):
        pixels.build()
    with pytest.raises(ConfigError, match="timm:x is an outside model, evaluated on frozen "
                                          "features only"):
        outside.build()


def test_what_tables_and_campaigns_ask_each_protocol():
    from evals.protocols import headline

    assert [n for n, p in PROTOCOLS.items() if p.few_shot] == ["fewshot"]
    assert [n for n, p in PROTOCOLS.items() if p.trains_encoder] == ["finetune",
                                                                    "partial-finetune"]
    assert headline("knn") == {"k": 20} and headline("knn", k=5) == {"k": 5}
    assert all(headline(n, k=5) == {} for n in PROTOCOLS if n != "knn")
    assert headline("mae-linear") == {}  # a protocol of an older store: nothing to pick
    with pytest.raises(ConfigError, match="fewshot needs --label-fraction below 1"):
        get_protocol("fewshot").validate(get_protocol("fewshot").Options())


def test_a_features_folder_is_a_source_with_its_own_identity(tmp_path):
    import numpy as np

    folder = tmp_path / "emb"
    folder.mkdir()
    arrays = {"train_features": np.eye(4), "train_labels": np.arange(4) % 2,
              "test_features": np.eye(4)[:2], "test_labels": np.arange(2)}
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", value)
    src = FeaturesSource.load(str(folder))
    got = src.given_features()
    assert got["train_features"].dtype == torch.float32 and got["test_labels"].tolist() == [0, 1]
    assert (src.kind, src.run_id, src.method, src.arch) == ("features", "features-emb",
                                                            "features", "-")
    assert src.checkpoint_name == str(folder) and src.identity() == [
        "features", "emb", src.fingerprint]
    assert not src.pooled and not src.vit and not src.own_weights and src.frozen_model() is None
    assert RunSource("r", "mae", "a", {}, None, "f").given_features() is None
    np.save(folder / "test_features.npy", np.eye(4)[:2] * 2)  # other numbers: another source
    assert FeaturesSource.load(folder).fingerprint != src.fingerprint
    with pytest.raises(ConfigError, match=f"--features {folder} holds embeddings, not an "
                                          "encoder"):
        src.build()


def test_topk_counts_against_a_hand_count():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])  # [3, 3]
    labels = torch.tensor([0, 1, 2])  # top-1 hit, top-2 hit, top-3 hit only
    assert topk_correct(logits, labels, (1, 2, 5)) == [1, 2, 3]


def test_topk_accuracy_reads_every_image_once(digits_small):
    data = digits_small
    seen = []

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    top1, top5 = topk_accuracy(logits_of, data, img_size=8, batch_size=7,
                               device=torch.device("cpu"))
    assert sum(seen) == len(data) and max(seen) == 7
    assert top1 == pytest.approx(100.0 * int((data.labels == 0).sum()) / len(data))
    assert top1 <= top5


@pytest.fixture(scope="module")
def digits_small():
    from mae_bench.data import load_dataset

    test = load_dataset("digits", "test")
    return dataclasses.replace(test, images=test.images[:30], labels=test.labels[:30])


# --- adding a protocol: one class and one registry line (docs/protocols.md) -------------------


@dataclasses.dataclass(frozen=True)
class CentroidOptions(Knobs):
    pass


class Centroid(Protocol):
    """Nearest class mean on frozen features: the example of docs/protocols.md."""

    name = "centroid"
    Options = CentroidOptions
    frozen_usage = "centroid"
    uses_pool = True

    def run(self, options: CentroidOptions, context: EvalContext) -> Numbers:
        from evals.frozen import frozen_splits

        splits = frozen_splits(context, options.label_fraction)
        if splits is None:
            return []
        means = torch.stack([splits.train_x[splits.train_y == c].mean(0)
                             for c in range(splits.num_classes)])  # [C, D]
        pred = torch.cdist(splits.test_x, means).argmin(1)  # [M]
        return [("top1", 100.0 * float((pred == splits.test_y).float().mean()), {})]


def test_a_new_protocol_is_one_class_and_one_registry_line(monkeypatch, tmp_path):
    from mae_bench.app.evaluation import run_eval

    monkeypatch.setitem(PROTOCOLS, "centroid", Centroid())  # the registry line
    rng = torch.Generator().manual_seed(0)
    feats = tmp_path / "feats"
    feats.mkdir()
    import numpy as np

    for split, n in (("train", 40), ("test", 20)):
        y = np.arange(n) % 2
        x = torch.randn(n, 4, generator=rng).numpy() + 5 * y[:, None]  # two far clusters
        np.save(feats / f"{split}_features.npy", x.astype(np.float32))
        np.save(feats / f"{split}_labels.npy", y.astype(np.int64))
    out = run_eval(EvalSpec(protocol="centroid", features_dir=str(feats), results_dir=None))
    assert [(r["protocol"], r["metric"], r["value"]) for r in out.rows] == [
        ("centroid", "top1", 100.0)]
    key = out.rows[0]["eval_key"]  # it has an identity like any other protocol's rows
    assert len(key) == 16 and int(key, 16) >= 0


# --- the generated options of `mae-bench eval` -------------------------------------------------


def _spec_of(monkeypatch, capsys, *args):
    """The EvalSpec `mae-bench eval ARGS` builds (run_eval stubbed: nothing runs)."""
    from cli_helpers import run_cli

    from mae_bench.app import evaluation

    seen = []

    def stub(spec, progress=None, show=None):
        seen.append(spec)
        return evaluation.EvalOutcome([], None, 0.0, [], skipped="stub")

    monkeypatch.setattr(evaluation, "run_eval", stub)
    code, _, err = run_cli(monkeypatch, capsys, "eval", *args, "--no-progress")
    return code, err, (seen[0] if seen else None)


def test_old_option_names_and_set_give_the_same_spec(monkeypatch, capsys):
    base = ("--protocol", "finetune", "--checkpoint", "pixels")
    _, _, by_option = _spec_of(monkeypatch, capsys, *base, "--smoothing", "0.2", "--k", "5,7",
                               "--no-head-bn", "--features", "F", "--no-cache")
    assert (by_option.label_smoothing, by_option.ks, by_option.head_bn) == (0.2, (5, 7), False)
    assert (by_option.features_dir, by_option.use_cache) == ("F", False)
    _, _, by_set = _spec_of(monkeypatch, capsys, *base, "--set", "finetune.label_smoothing=0.2",
                            "--set", "finetune.head_bn=false")
    assert (by_set.label_smoothing, by_set.head_bn) == (0.2, False)
    _, _, defaults = _spec_of(monkeypatch, capsys, *base)
    assert dataclasses.replace(defaults, command=None) == EvalSpec(
        protocol="finetune", checkpoint="pixels")  # every default as EvalSpec's own


@pytest.mark.parametrize("setting, message", [
    ("knn.temperature=0.1", r"knn is not the protocol run \(--protocol finetune\)"),
    ("finetune.mixups=1", "finetune has no knob 'mixups'; valid: label_fraction, recipe"),
    ("finetune.mixup", "expected PROTOCOL.KNOB=VALUE"),
])
def test_a_bad_set_is_refused_with_the_fix(monkeypatch, capsys, setting, message):
    import re

    code, err, spec = _spec_of(monkeypatch, capsys, "--protocol", "finetune", "--checkpoint",
                               "pixels", "--set", setting)
    assert code != 0 and spec is None and re.search(message, " ".join(err.split()))
