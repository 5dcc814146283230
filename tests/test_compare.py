"""``mae-bench compare``: trains each method once, evaluates each protocol once, reuses both on a
re-run, gives every method the same budget, and rejects bad input before any work."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from cli_helpers import run_cli

from evals.encoders import load_source
from mae_bench.app.compare import (
    CompareSpec,
    _eval_spec,
    at_headline,
    column_label,
    run_compare,
    run_config,
    run_dir_for,
    takes_pixels,
)
from mae_bench.config import RunConfig
from mae_bench.errors import MaeBenchError
from mae_bench.methods.registry import METHODS, build_method
from mae_bench.results import read_results
from mae_bench.training.runtime import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(tmp_path, **kw) -> CompareSpec:
    base = {"methods": ("mae", "simclr"), "protocols": ("knn", "linear"), "arch":
            "vit_micro_patch2", "epochs": 0.1, "batch_size": 32,
            "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
            "cache_dir": str(tmp_path / "cache"),
            "overrides": {"ssl": {"proj_hidden_dim": 32, "proj_dim": 16}}}
    return CompareSpec(**(base | kw))


def test_compare_trains_evaluates_and_reuses(tmp_path):
    logs: list[str] = []
    first = run_compare(_spec(tmp_path), log=logs.append, progress=False)
    table = first.table
    assert list(table.index) == ["mae", "simclr", "pixels", "random"]
    assert list(table.columns) == ["knn top-1 (k=20)", "linear top-1", "pretrain s", "epochs",
                                   "GFLOPs/img/step", "img/s"]
    assert table[["knn top-1 (k=20)", "linear top-1"]].notna().all().all()
    assert (table.loc[["mae", "simclr"], "pretrain s"] > 0).all()
    assert table.loc["pixels", "knn top-1 (k=20)"] > 90  # raw digits pixels are a strong k-NN
    # SimCLR runs two full views through the encoder, MAE a quarter of one (plus its decoder)
    assert table.loc["simclr", "GFLOPs/img/step"] > 2 * table.loc["mae", "GFLOPs/img/step"]
    assert sorted(first.trained) == ["mae", "simclr"]
    assert len(first.evaluated) == 8
    rows = read_results(tmp_path / "results")
    summary = json.loads((first.run_dirs["mae"] / "summary.json").read_text())
    assert summary["finished"]
    # every run measured online at its last step, drawn in one figure beside the store
    assert first.online_figure == tmp_path / "results" / "compare-online-digits.png"
    assert first.online_figure.read_bytes().startswith(b"\x89PNG")

    run_json = (first.run_dirs["mae"] / "run.json").read_bytes()
    again = run_compare(_spec(tmp_path), log=logs.append, progress=False)
    assert again.trained == [] and again.evaluated == []
    assert (first.run_dirs["mae"] / "run.json").read_bytes() == run_json  # left untouched
    assert len(read_results(tmp_path / "results")) == len(rows)  # nothing duplicated
    assert again.table.equals(first.table)
    assert any("reusing the finished run" in line for line in logs)


def test_budget_plans_epochs_from_throughput_and_keeps_them(tmp_path):
    spec = _spec(tmp_path, epochs=None, budget_seconds=2.0, methods=("mae", "simclr"),
                 protocols=("knn",), references=False)
    out = run_compare(spec, log=lambda _: None, progress=False)
    epochs = out.table["epochs"]
    for m in ("mae", "simclr"):  # epochs = budget x measured images/s / training images
        cost = json.loads((out.run_dirs[m] / "compare.json").read_text())
        assert epochs[m] == pytest.approx(2.0 * cost["calibrated_img_per_s"] / 1437, rel=1e-3)
    planned = {m: run_config(spec, m) for m in ("mae", "simclr")}
    assert all(run_dir_for(spec, planned[m]) == out.run_dirs[m] for m in planned)
    again = run_compare(spec, log=lambda _: None, progress=False)
    assert again.trained == [] and again.table["epochs"].equals(epochs)


@pytest.mark.parametrize("kw, message", [
    ({"methods": ("mae", "dinov2")}, "unknown method 'dinov2'"),
    ({"methods": ("mae", "simclr@resnet19")}, "unknown architecture 'resnet19'"),
    ({"methods": ("mae", "mae")}, "lists a method twice"),
    ({"budget_seconds": 10.0}, "not both"),
    ({"protocols": ("knn", "svm")}, "unknown protocol 'svm'"),
    ({"epochs": 0.0}, "--epochs must be > 0"),
    ({"dataset": "nope"}, "nope"),
])
def test_bad_input_fails_before_any_work(tmp_path, kw, message):
    with pytest.raises(MaeBenchError, match=message):
        run_compare(_spec(tmp_path, **kw), log=lambda _: None, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--methods", "mae,foo", "--runs-dir",
                           str(tmp_path / "r"), "--results-dir", str(tmp_path / "s"))
    assert code == 2 and err.startswith("error: unknown method 'foo'")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--epochs", "1", "--budget-minutes",
                           "1", "--runs-dir", str(tmp_path / "r"))
    assert code == 2 and "not both" in err
    assert not (tmp_path / "r").exists()


def test_a_method_with_a_non_finite_loss_is_recorded_and_the_others_finish(tmp_path,
                                                                            monkeypatch):
    from mae_bench.methods.registry import MAE, METHODS

    class NanMAE(MAE):
        def forward(self, batch):
            out = super().forward(batch)
            out["loss"] = out["loss"] * float("nan")
            return out

    monkeypatch.setitem(METHODS, "nanmae", NanMAE)
    logs: list[str] = []
    spec = _spec(tmp_path, methods=("nanmae", "mae"), protocols=("knn",), references=False)
    out = run_compare(spec, log=logs.append, progress=False)
    assert len(out.failed) == 1 and out.failed[0].startswith("nanmae: non-finite loss")
    assert out.trained == ["mae"]
    assert out.table["knn top-1 (k=20)"].isna().tolist() == [True, False]  # nanmae, mae
    rows = read_results(tmp_path / "results")
    bad = rows[rows["status"] == "failed"]
    assert len(bad) == 1 and bad.iloc[0]["method"] == "nanmae"
    assert bad.iloc[0]["protocol"] == "pretrain"
    assert set(rows.loc[rows["status"] == "ok", "method"]) == {"mae"}


@pytest.mark.parametrize("seed", [0, 3])
def test_the_random_row_is_every_methods_starting_encoder(seed):
    """compare's `random` row is not just some random ViT: it is, weight for weight, the encoder
    every method starts its pretraining from at the same --seed, so "above random" reads as
    "pretraining improved its own starting point" (a paired comparison; other seeds' random
    encoders differ by about a point of CIFAR-10 k-NN)."""
    random_encoder = load_source("random", arch="vit_micro_patch4", img_size=16, channels=3,
                                 seed=seed).build(init_seed=seed).state_dict()
    for name in sorted(METHODS):
        cfg = RunConfig().replace(model={"arch": "vit_micro_patch4", "img_size": 16},
                                  train={"method": name, "seed": seed})
        seed_everything(cfg.train.seed)  # what engine.pretrain does before building
        start = build_method(cfg, 3, 16).encoder.state_dict()
        assert start.keys() >= random_encoder.keys(), name
        assert all(torch.equal(start[k], v) for k, v in random_encoder.items()), name


def test_compare_adds_a_finetune_column_with_the_scratch_baseline(tmp_path):
    spec = _spec(tmp_path, methods=("mae",), protocols=("knn", "finetune"), finetune_epochs=1)
    table = run_compare(spec, log=lambda _: None, progress=False).table
    assert list(table.index) == ["mae", "pixels", "random"]
    assert "finetune top-1" in table.columns
    assert table.loc[["mae", "random"], "finetune top-1"].notna().all()
    assert table.loc["pixels", "finetune top-1"] != table.loc["pixels", "finetune top-1"]  # NaN
    rows = read_results(tmp_path / "results")
    ft = rows[rows["protocol"] == "finetune"].set_index("run_id")
    # every row names its recipe and schedule; the random row is the from-scratch baseline
    assert set(ft["recipe"]) == {"auto"} and set(ft["epochs"]) == {1}
    assert set(ft["init"]) == {"pretrained", "random"}
    assert (ft.loc[ft["init"] == "random", "layer_decay"] == 1.0).all()
    assert (ft.loc[ft["init"] == "pretrained", "layer_decay"] < 1.0).all()
    # a second compare with another schedule fine-tunes again instead of reusing these rows
    again = run_compare(_spec(tmp_path, methods=("mae",), protocols=("finetune",),
                              finetune_epochs=2), log=lambda _: None, progress=False)
    assert len(again.evaluated) == 2


def test_protocols_are_asked_not_named():
    """What compare (and sweep) did by comparing protocol names, each protocol now answers: the
    pixels reference, the label fraction, the short schedule, the k-NN column."""
    assert [p for p in ("knn", "linear", "fewshot", "finetune", "partial-finetune")
            if takes_pixels(p)] == ["knn", "linear", "fewshot"]
    spec = CompareSpec(label_fraction=0.2, finetune_epochs=3)
    got = {p: (_eval_spec(spec, p, "random").label_fraction, _eval_spec(spec, p, "random").epochs)
           for p in ("knn", "linear", "fewshot", "finetune")}
    assert got == {"knn": (1.0, None), "linear": (1.0, None), "fewshot": (0.2, None),
                   "finetune": (1.0, 3)}
    assert column_label("knn", {"k": 5}) == "knn top-1 (k=5)"
    assert column_label("linear", {}) == "linear top-1"
    rows = pd.DataFrame({"protocol": ["knn", "knn", "knn", "linear", "mae-linear"],
                         "k": [5, 20, None, None, None], "value": [1.0, 2.0, 3.0, 4.0, 5.0]})
    # k-NN rows at the table's k only; the others (an unknown protocol of an older store too)
    assert at_headline(rows, 5)["value"].tolist() == [1.0, 4.0, 5.0]
    assert at_headline(rows, 20)["value"].tolist() == [2.0, 4.0, 5.0]
    assert at_headline(rows.drop(columns="k"), 5)["value"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_each_method_on_its_own_backbone_stands_in_one_table(tmp_path):
    """``--methods mae@vit,simclr@resnet18``: MAE on a ViT beside SimCLR on a ResNet-18, one
    random-encoder row per backbone, each evaluated with its own pool (cls / mean)."""
    spec = _spec(tmp_path, methods=("mae@vit_micro_patch2", "simclr@resnet18"),
                 protocols=("knn",))
    out = run_compare(spec, log=lambda _: None, progress=False)
    table = out.table
    assert list(table.index) == ["mae@vit_micro_patch2", "simclr@resnet18", "pixels",
                                 "random@vit_micro_patch2", "random@resnet18"]
    assert table["knn top-1 (k=20)"].notna().all()
    assert "-resnet18-" in out.run_dirs["simclr@resnet18"].name
    rows = read_results(tmp_path / "results")
    arch_pool = set(zip(rows["arch"], rows["pool"].fillna("-"), strict=True))
    assert {("vit_micro_patch2", "cls"), ("resnet18", "mean")} <= arch_pool
    # the ResNet's run recorded its CNN recipe
    cfg = RunConfig.from_yaml(out.run_dirs["simclr@resnet18"] / "config.yaml")
    assert cfg.model.arch == "resnet18"
    assert cfg.train.optimizer == METHODS["simclr"].cnn_defaults["train"]["optimizer"]


def test_a_masked_method_on_a_cnn_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compare", "--methods", "mae@resnet18,simclr",
                           "--runs-dir", str(tmp_path / "runs"),
                           "--results-dir", str(tmp_path / "res"))
    assert code == 2 and err.strip() == ("error: --methods mae@resnet18: mae needs a ViT preset,"
                                         " not resnet18; e.g. mae@vit_mini_patch4")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()
