"""``mae-bench eval`` end to end on digits: every protocol through the CLI, the reference rows,
precomputed features, the results store, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cli_helpers import run_cli

from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain

TINY = RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 8},
                           train={"epochs": 1, "batch_size": 64})

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "mae-micro"
    pretrain(TINY, path, max_steps=3, progress=False)
    return path


def rows(results_dir):
    return [json.loads(line) for line in (results_dir / "results.jsonl").read_text().splitlines()]


def evaluate(monkeypatch, capsys, tmp_path, *args):
    code, out, err = run_cli(monkeypatch, capsys, "eval", *args, "--no-progress",
                             "--results-dir", str(tmp_path / "res"),
                             "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    return out, err


def test_knn_on_a_run_then_the_references(monkeypatch, capsys, tmp_path, run_dir):
    out, err = evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn",
                        "--checkpoint", str(run_dir), "--k", "5,20")
    assert "extracted" in err and "rows appended" in out
    got = rows(tmp_path / "res")
    assert {(r["metric"], r.get("k")) for r in got} == {
        ("top1", 5), ("top5", 5), ("top1", 20), ("top5", 20), ("recall@1", None),
        ("recall@5", None), ("recall@10", None), ("map@r", None)}
    first = got[0]
    assert (first["method"], first["arch"], first["dataset"], first["pool"]) == (
        "mae", "vit_micro_patch2", "digits", "cls")
    assert first["mask_ratio"] == 0.75 and first["status"] == "ok"
    # Forced again: features read from the cache, same numbers, rows appended (never rewritten).
    before = (tmp_path / "res" / "results.jsonl").read_bytes()
    _, err = evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn",
                      "--checkpoint", str(run_dir), "--k", "5,20", "--force")
    assert "cache" in err
    after = (tmp_path / "res" / "results.jsonl").read_bytes()
    assert after.startswith(before) and len(rows(tmp_path / "res")) == 16
    again = rows(tmp_path / "res")[8:]
    assert [r["value"] for r in again] == [r["value"] for r in got]
    # The floors: raw pixels (k-NN on digits pixels is strong) and a random encoder.
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint", "pixels",
             "--k", "5")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--checkpoint", "random",
             "--arch", "vit_micro_patch2", "--k", "5")
    df = pd.read_json(tmp_path / "res" / "results.jsonl", lines=True)
    top1 = df[(df.metric == "top1") & (df.k == 5)].groupby("method").value.first()
    assert top1["pixels"] > 90 and 20 < top1["random"] < top1["pixels"]


def test_linear_fewshot_and_finetune(monkeypatch, capsys, tmp_path, run_dir):
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "linear", "--checkpoint", "pixels")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "fewshot", "--checkpoint", "pixels",
             "--label-fraction", "0.1")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "linear", "--checkpoint",
             str(run_dir), "--probe", "mae", "--epochs", "1", "--batch-size", "128")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "finetune", "--checkpoint",
             str(run_dir), "--epochs", "1", "--batch-size", "128")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "finetune", "--checkpoint",
             str(run_dir), "--epochs", "1", "--batch-size", "128", "--init", "random")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "partial-finetune", "--checkpoint",
             str(run_dir), "--epochs", "1", "--batch-size", "128", "--blocks", "1")
    df = pd.read_json(tmp_path / "res" / "results.jsonl", lines=True)
    top1 = df[df.metric == "top1"].reset_index(drop=True)
    assert list(top1.protocol) == ["linear", "fewshot", "linear", "finetune", "finetune",
                                   "partial-finetune"]
    assert top1.value[0] > 90  # pixels + softmax regression on digits
    assert top1.value[1] < top1.value[0]  # 10 % of the labels
    assert top1.label_fraction[1] == 0.1 and top1.probe[0] == "fast" and top1.probe[2] == "mae"
    assert list(top1.init[3:5]) == ["pretrained", "random"] and top1.blocks[5] == 1
    assert all(np.isfinite(top1.value))
    # --init random: the run lends its architecture only, not its pretraining's description
    assert top1.method[4] == "random" and top1.method[3] == "mae"
    assert np.isfinite(top1.pretrain_epochs[3]) and np.isnan(top1.pretrain_epochs[4])
    assert np.isnan(top1.mask_ratio[4]) and np.isnan(top1.pretrain_seconds[4])


def write_features(folder, n_train=60, n_test=20, dim=8, **override):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, dim)) * 4
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 3
        arrays[f"{split}_features"] = centers[labels] + rng.normal(size=(n, dim))
        arrays[f"{split}_labels"] = labels
    arrays |= override
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", value)
    return folder


def test_precomputed_features(monkeypatch, capsys, tmp_path):
    folder = write_features(tmp_path / "emb")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--features", str(folder),
             "--k", "1,5")
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "linear", "--features", str(folder))
    got = rows(tmp_path / "res")
    assert {r["method"] for r in got} == {"features"} and {r["checkpoint"] for r in got} == {
        str(folder)}
    assert all(r["value"] == 100.0 for r in got if r["metric"] == "top1")


def test_feature_rows_and_eval_keys_are_pinned(monkeypatch, capsys, tmp_path):
    """--features rows, field by field, and their eval_key, as the code gave them before
    --features became a source class (FeaturesSource): the rows of a store stay comparable,
    and an evaluation stored then is still recognised (not run again) now."""
    folder = write_features(tmp_path / "emb")
    fp32 = ("--precision", "fp32")  # "auto" resolves per machine, and the key holds it
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--features", str(folder),
             "--k", "1,5", *fp32)
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "linear", "--features", str(folder),
             *fp32)
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "fewshot", "--features", str(folder),
             "--label-fraction", "0.5", "--dataset", "digits", *fp32)
    got = rows(tmp_path / "res")
    for r in got:  # what changes from run to run
        assert r.pop("eval_seconds") >= 0 and r.pop("timestamp") and "git_sha" in r
        del r["git_sha"]
    commands = [r.pop("command") for r in got]
    assert commands[0].startswith(f"mae-bench eval --protocol knn --features {folder} --k 1,5")
    assert commands[10].startswith("mae-bench eval --protocol fewshot")
    identity = {"run_id": "features-emb", "method": "features", "arch": "-",
                "checkpoint": str(folder), "status": "ok", "eval_seed": 0, "seed": 0,
                "precision": "fp32", "value": 100.0}
    knn = identity | {"dataset": "emb", "protocol": "knn", "eval_key": "5830d81a89aa0303"}
    assert got[:8] == [
        knn | {"metric": "top1", "k": 1, "temperature": 0.07},
        knn | {"metric": "top5", "k": 1, "temperature": 0.07},
        knn | {"metric": "top1", "k": 5, "temperature": 0.07},
        knn | {"metric": "top5", "k": 5, "temperature": 0.07},
        knn | {"metric": "recall@1"}, knn | {"metric": "recall@5"},
        knn | {"metric": "recall@10"}, knn | {"metric": "map@r"}]
    linear = identity | {"dataset": "emb", "protocol": "linear", "probe": "fast",
                         "eval_key": "ac2050c3ed342235"}
    fewshot = identity | {"dataset": "digits", "protocol": "fewshot", "probe": "fast",
                          "label_fraction": 0.5, "eval_key": "cf1e7bfdc19ec751"}
    for row, expected in ((got[8], linear), (got[9], linear), (got[10], fewshot),
                          (got[11], fewshot)):
        chosen = {k: row.pop(k) for k in ("chosen_lr", "chosen_weight_decay")}
        assert row == expected | {"metric": row["metric"]} and chosen["chosen_lr"] > 0
    assert [r["metric"] for r in got[8:]] == ["top1", "top5"] * 2
    # Stored under the same key: the same evaluation again is recognised and not run.
    out, _ = evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--features",
                      str(folder), "--k", "1,5", *fp32)
    assert out.startswith("already in") and len(rows(tmp_path / "res")) == 12


@pytest.mark.parametrize("override, message", [
    ({"train_labels": np.arange(59) % 3}, "train_features.npy has 60 rows but "
                                          "train_labels.npy has 59 labels"),
    ({"test_features": np.zeros((20, 7))}, "train features have 8 dimensions, test features 7"),
    ({"train_features": np.zeros(60)}, "train_features.npy must be a non-empty numeric [N, D]"),
    ({"test_labels": np.zeros(20)}, "test_labels.npy must be a 1-D integer array"),
])
def test_bad_feature_folders(monkeypatch, capsys, tmp_path, override, message):
    folder = write_features(tmp_path / "emb", **override)
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--features",
                           str(folder), "--results-dir", str(tmp_path / "res"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("args, message", [
    (["--protocol", "svm", "--checkpoint", "pixels"], "unknown protocol 'svm'; valid: knn"),
    (["--protocol", "knn"], "give exactly one of --checkpoint"),
    (["--protocol", "knn", "--checkpoint", "random"], "--checkpoint random needs --arch"),
    (["--protocol", "knn", "--checkpoint", "random", "--arch", "vit_giant"],
     "unknown architecture 'vit_giant'"),
    (["--protocol", "knn", "--checkpoint", "random", "--arch", "vit_tiny_patch16"],
     "unknown architecture"),
    (["--protocol", "knn", "--checkpoint", "random", "--arch", "vit_small_patch16"],
     "16-px patches, which do not divide digits's 8-px images"),
    (["--protocol", "knn", "--checkpoint", "pixels", "--k", "5000"],
     "--k 5000 is more neighbours than the 1437 training images"),
    (["--protocol", "knn", "--checkpoint", "pixels", "--k", "a,b"], "--k takes comma-separated"),
    (["--protocol", "knn", "--checkpoint", "pixels", "--dataset", "mnist12"],
     "unknown dataset 'mnist12'"),
    (["--protocol", "finetune", "--checkpoint", "pixels"], "pixels reference has no encoder"),
    (["--protocol", "partial-finetune", "--checkpoint", "pixels"], "needs --blocks"),
    (["--protocol", "fewshot", "--checkpoint", "pixels"], "fewshot needs --label-fraction"),
    (["--protocol", "linear", "--checkpoint", "pixels", "--label-fraction", "0"],
     "--label-fraction must be in (0, 1], got 0.0"),
    (["--protocol", "knn", "--checkpoint", "no/such/run"], "no such run folder or file"),
    (["--protocol", "knn", "--checkpoint", "pixels", "--pool", "max"], "unknown pool 'max'"),
])
def test_eval_usage_errors(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "eval", *args, "--no-progress",
                           "--results-dir", str(tmp_path / "res"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not (tmp_path / "res").exists()


def test_checkpoint_of_another_architecture(monkeypatch, capsys, tmp_path, run_dir):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "knn", "--checkpoint",
                           str(run_dir), "--arch", "vit_tiny_patch2",
                           "--results-dir", str(tmp_path / "res"))
    assert code == 2 and "holds a vit_micro_patch2 encoder" in err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--protocol", "partial-finetune",
                           "--checkpoint", str(run_dir), "--blocks", "3",
                           "--results-dir", str(tmp_path / "res"))
    assert code == 2 and "--blocks 3 is more than the encoder's 2 blocks" in err
    assert not (tmp_path / "res").exists()


def test_results_command_tables_and_exports(monkeypatch, capsys, tmp_path):
    folder = write_features(tmp_path / "emb")
    for seed in (0, 1):
        evaluate(monkeypatch, capsys, tmp_path, "--protocol", "linear", "--features",
                 str(folder), "--seed", str(seed))
    evaluate(monkeypatch, capsys, tmp_path, "--protocol", "knn", "--features", str(folder),
             "--k", "3")
    res = str(tmp_path / "res")
    exports = [tmp_path / f"t.{ext}" for ext in ("md", "csv", "tex")]
    code, out, err = run_cli(monkeypatch, capsys, "results", "--results-dir", res,
                             *(a for p in exports for a in ("--export", str(p))))
    assert code == 0, err
    assert "10 rows" in out and all(f"wrote {p}" in out for p in exports)
    markdown = exports[0].read_text()
    assert "100.00 ± 0.00 (n=2)" in markdown  # two probe seeds averaged
    assert "knn top1 k=3" in markdown and "100.00 (n=1)" in markdown
    assert "100.00 ± 0.00 (n=2)" in exports[2].read_text().replace("$\\pm$", "±")
    assert "linear,top1" in exports[1].read_text() or "linear top1" in exports[1].read_text()
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--results-dir", res,
                           "--where", "protocol=knn")
    assert code == 0 and "linear" not in out and "knn" in out
    code, _, err = run_cli(monkeypatch, capsys, "results", "--results-dir", res,
                           "--where", "colour=red")
    assert code == 2 and "--where 'colour=red'" in err
    code, _, err = run_cli(monkeypatch, capsys, "results", "--results-dir", res,
                           "--export", str(tmp_path / "t.xlsx"))
    assert code == 2 and ".xlsx" in err
    code, _, err = run_cli(monkeypatch, capsys, "results", "--results-dir",
                           str(tmp_path / "empty"))
    assert code == 2 and "no results at" in err


def test_precision_is_part_of_an_evaluations_identity(monkeypatch, capsys, tmp_path, run_dir):
    """The same run in bf16, then fp32 (issue 28, item 1): the fp32 eval extracts its own
    features, and the two rows carry their precision and never average as two seeds."""
    from mae_bench.results import aggregate, read_results

    common = ("--protocol", "knn", "--checkpoint", str(run_dir), "--k", "5", "--device", "cpu")
    _, err = evaluate(monkeypatch, capsys, tmp_path, *common, "--precision", "bf16")
    assert err.count("extracted") == 2
    _, err = evaluate(monkeypatch, capsys, tmp_path, *common, "--precision", "fp32")
    assert err.count("extracted") == 2 and "cache" not in err
    got = rows(tmp_path / "res")
    assert [(r["precision"], r["attention"]) for r in got[::6]] == [("bf16", "math"),
                                                                    ("fp32", "fused")]
    agg = aggregate(read_results(tmp_path / "res"))
    top1 = agg[(agg["metric"] == "top1") & (agg["k"] == 5)]
    assert sorted(top1["precision"]) == ["bf16", "fp32"] and list(top1["n"]) == [1, 1]


def test_an_identical_eval_is_skipped_and_force_replaces_it(monkeypatch, capsys, tmp_path,
                                                           run_dir):
    """Issue 28, item 2: the same eval again is skipped with one line (no work, nothing
    written); --force runs it and its rows replace the old ones: still n=1, the newer value."""
    from mae_bench.results import aggregate, read_results

    common = ("--protocol", "knn", "--checkpoint", str(run_dir), "--k", "5", "--device", "cpu",
              "--precision", "fp32")
    evaluate(monkeypatch, capsys, tmp_path, *common)
    store = tmp_path / "res" / "results.jsonl"
    first = rows(tmp_path / "res")
    assert len(first) == 6 and len({r["eval_key"] for r in first}) == 1
    # Mark the stored numbers, so that the replacement is visible.
    store.write_text("".join(json.dumps(r | {"value": 1.0}) + "\n" for r in first))
    before = store.read_bytes()
    out, err = evaluate(monkeypatch, capsys, tmp_path, *common)
    assert out.strip() == (f"already in {store}: knn of {run_dir.name} on digits (seed 0, "
                           "fp32); --force re-runs it")
    assert "features" not in err and store.read_bytes() == before

    def top1(k: int) -> pd.DataFrame:
        agg = aggregate(read_results(tmp_path / "res"))
        return agg[(agg["metric"] == "top1") & (agg["k"] == k)]

    assert list(top1(5)["n"]) == [1] and list(top1(5)["mean"]) == [1.0]
    evaluate(monkeypatch, capsys, tmp_path, *common, "--force")
    again = rows(tmp_path / "res")
    assert len(again) == 12 and {r["eval_key"] for r in again} == {first[0]["eval_key"]}
    assert len(read_results(tmp_path / "res")) == 6  # the forced rows replace the marked ones
    assert list(top1(5)["n"]) == [1] and list(top1(5)["mean"]) == [first[0]["value"]]
    # More neighbour counts than stored: it runs; k=5 is replaced again, not counted twice.
    out, _ = evaluate(monkeypatch, capsys, tmp_path, *common[:4], "--k", "5,20",
                      *common[6:])
    assert "rows appended" in out
    assert list(top1(5)["n"]) == [1] and list(top1(20)["n"]) == [1]
