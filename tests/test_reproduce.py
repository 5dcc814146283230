"""``mae-bench reproduce`` and the reference tables of ``configs/reference/``.

Every table parses, every setting of every row is a knob of the run config with a value of its
type, and every row's method is registered (checked against the registry at test time: a method
that is not registered fails here, it is not skipped). The published numbers are checked against
the sources' tables, written out below by hand; solo-learn's recipes against the methods'
``cnn_defaults``. Bad input is one ``error:`` line, exit 2, nothing written. A tiny table on
digits (micro ViT, a fraction of an epoch) runs end to end: measured beside published, the best
evaluation selected, rows labelled shortened, nothing appended twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from cli_helpers import run_cli

from mae_bench.app.evaluation import EvalSpec, validate_spec
from mae_bench.app.reproduce import (
    EPOCH_KNOBS,
    ReproduceSpec,
    eval_steps,
    load_table,
    plan_reproduce,
    run_config,
    table_names,
)
from mae_bench.config import knob_named
from mae_bench.errors import ConfigError
from mae_bench.methods.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

TABLES = ("lightly-cifar10-200", "lightly-cifar10-800", "solo-learn-cifar10",
          "solo-learn-cifar100")

# The published top-1, copied by hand from the sources (solo-learn README at 9187ea39; lightly
# docs/source/getting_started/benchmarks.rst at e8d317fc), independently of the YAML files.
PUBLISHED = {
    "solo-learn-cifar10": {"mocov3": 93.10, "mocov2": 92.94, "byol": 92.58, "barlowtwins": 92.10,
                           "vicreg": 92.07, "nnclr": 91.88, "simclr": 90.74, "simsiam": 90.51,
                           "dino": 89.52, "swav": 89.17},
    "solo-learn-cifar100": {"barlowtwins": 70.90, "byol": 70.46, "simclr": 65.78,
                            "dino": 66.76, "mocov2": 69.89, "mocov3": 68.83, "nnclr": 69.62,
                            "simsiam": 66.04, "swav": 64.88, "vicreg": 68.54},
    "lightly-cifar10-200": {"byol": 86.9, "simclr": 84.7, "barlowtwins": 84.2, "dino": 84.0,
                            "mocov2": 83.8, "simsiam": 81.9, "swav": 81.2, "nnclr": 83.4},
    "lightly-cifar10-800": {"byol": 91.0, "simclr": 87.9, "barlowtwins": 85.9, "dino": 84.8,
                            "mocov2": 89.9, "nnclr": 89.2, "simsiam": 90.4, "swav": 88.4},
}

TINY = """\
table: tiny-digits
title: test-only table on digits
source: {repository: example/none, file: README.md, commit: 0123456789abcdef,
         url: https://example.invalid}
data: {dataset: digits}
protocol:
  name: knn
  options: {k: 5, temperature: 0.1}
  selection: best-epoch
  eval_every: 1
  as_published: k-NN at the best epoch
tolerance: {points: 1.0, why: test}
settings: {model.arch: vit_micro_patch2, train.batch_size: 16, train.epochs: 2,
           train.warmup_epochs: 1.0}
rows:
  - {method: simclr, name: SimCLR, published: 50.0}
"""


def test_every_table_of_the_issue_is_there():
    assert set(TABLES) <= set(table_names())


@pytest.mark.parametrize("name", table_names())
def test_table_parses_and_every_row_builds(name):
    table = load_table(name)
    assert table.name == name
    assert re.fullmatch(r"[0-9a-f]{40}", table.source["commit"])
    assert table.source["commit"] in table.source["url"]
    assert table.tolerance > 0 and table.tolerance_why and table.as_published
    for knob in table.settings:
        knob_named(knob)
    for row in table.rows:
        assert row.method in METHODS, f"{name}: {row.method} is not a registered method"
        for knob in row.overrides:
            knob_named(knob)
        full = run_config(table, row)
        assert full.train.method == row.method and full.train.epochs == table.epochs
        assert full.data.dataset == table.dataset
        for knob, value in {**table.settings, **row.overrides}.items():
            section, key = knob.split(".")
            assert getattr(getattr(full, section), key) == value, knob
        run_config(table, row, epochs=table.epochs / 100)  # a shortened run builds too
        validate_spec(EvalSpec(protocol=table.protocol, checkpoint="runs/reproduce/x",
                               **{**table.options, **row.eval}))  # the protocol's options


@pytest.mark.parametrize("name", TABLES)
def test_published_numbers_are_the_sources(name):
    table = load_table(name)
    assert {r.method: r.published for r in table.rows} == PUBLISHED[name]


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3", "dino", "barlowtwins", "vicreg"])
def test_cnn_defaults_are_solo_learns_recipe(method):
    """The methods' ResNet defaults hold the recipe the solo-learn table records."""
    table = load_table("solo-learn-cifar10")
    row = table.row(method)
    recipe = {**table.settings, **row.overrides}
    defaults = METHODS[method].defaults_for("cnn")
    shared = [(f"{section}.{key}", value) for section, values in defaults.items()
              for key, value in values.items() if f"{section}.{key}" in recipe]
    assert len(shared) >= 6
    assert [(k, v) for k, v in shared if recipe[k] != v] == []


def test_a_shortened_run_scales_the_settings_in_epochs():
    table = load_table("solo-learn-cifar10")
    dino = run_config(table, table.row("dino"), epochs=100)
    assert (dino.train.epochs, dino.train.warmup_epochs) == (100, 1.0)
    assert dino.ssl.freeze_last_layer_epochs == pytest.approx(0.1)
    swav = run_config(table, table.row("swav"), epochs=100)
    assert swav.ssl.queue_start_epochs == pytest.approx(5.0)
    assert swav.ssl.freeze_last_layer_epochs == pytest.approx(0.2)
    full = run_config(table, table.row("swav"))
    assert (full.train.warmup_epochs, full.ssl.queue_start_epochs) == (10.0, 50.0)
    assert "train.warmup_epochs" in EPOCH_KNOBS


def test_evaluation_points():
    assert eval_steps(10, 25, "best-epoch", 1) == [10, 20, 25]
    assert eval_steps(10, 25, "best-epoch", 0.5) == [5, 10, 15, 20, 25]
    assert eval_steps(10, 25, "final", 1) == [25]
    assert eval_steps(10, 4, "best-epoch", 1) == [4]  # shorter than one period: the end only


def test_lightly_protocol_is_knn_k200_t01_best_epoch():
    for name in ("lightly-cifar10-200", "lightly-cifar10-800"):
        table = load_table(name)
        assert (table.protocol, table.options, table.selection) == (
            "knn", {"ks": (200,), "temperature": 0.1}, "best-epoch")


def test_a_table_with_an_unknown_option_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.replace("temperature: 0.1}", "temperature: 0.1, kk: 3}"))
    with pytest.raises(ConfigError, match=r"protocol.options: unknown option\(s\) kk; valid: k, "):
        load_table(str(path))


def _listing(*folders: Path) -> list[str]:
    return sorted(str(p) for f in folders if f.exists() for p in f.rglob("*"))


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "error: unknown reference table 'nosuch'; valid: " + ", ".join(TABLES)
     + " (or a path to a table's .yaml)"),
    (["lightly-cifar10-200", "--method", "mae"],
     "error: --method mae: lightly-cifar10-200 has no row 'mae'; valid: barlowtwins, byol, dino, "
     "mocov2, nnclr, simclr, simsiam, swav"),
    (["lightly-cifar10-200", "--epochs", "300"],
     "error: --epochs must be > 0 and at most the published 200 (lightly-cifar10-200); got 300"),
])
def test_bad_input_is_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = run_cli(monkeypatch, capsys, "reproduce", *args, "--out",
                             str(tmp_path / "runs"), "--results-dir", str(tmp_path / "store"))
    assert (code, out, err.strip()) == (2, "", message)
    assert _listing(tmp_path) == []


def test_missing_data_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MAE_BENCH_DATA", str(tmp_path / "data"))
    code, _, err = run_cli(monkeypatch, capsys, "reproduce", "solo-learn-cifar100", "--method",
                           "simclr", "--epochs", "1", "--out", str(tmp_path / "runs"),
                           "--results-dir", str(tmp_path / "store"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: solo-learn-cifar100 needs cifar100, which is not here: ")
    assert _listing(tmp_path) == []


def test_help_names_the_argument_and_the_protocols(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli(monkeypatch, capsys, "reproduce", "--help")
    usage = out.splitlines()[1].strip()
    assert code == 0 and usage == "Usage: mae-bench reproduce [OPTIONS] [TABLE]"
    assert "k = 200, T = 0.1, best epoch" in out and "<bool>" not in out


def test_list_names_every_table(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(monkeypatch, capsys, "reproduce", "--list")
    assert code == 0 and all(name in out for name in TABLES)
    assert "knn (k=200, temperature=0.1), best-epoch" in out


def test_tiny_table_end_to_end(monkeypatch, capsys, tmp_path):
    """A micro ViT on digits for 0.1 of the table's 2 epochs, evaluated every 0.05 epochs:
    the printed row holds published and measured, the store the best evaluation's rows with
    the reference fields, labelled shortened; a second run trains and appends nothing."""
    monkeypatch.setenv("COLUMNS", "250")
    table = tmp_path / "tiny.yaml"
    table.write_text(TINY)
    args = ["reproduce", str(table), "--epochs", "0.1", "--eval-every", "0.05", "--out",
            str(tmp_path / "runs"), "--results-dir", str(tmp_path / "store"), "--no-progress"]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    rows = pd.read_json(tmp_path / "store" / "results.jsonl", lines=True)
    top1 = rows[rows["metric"] == "top1"]
    assert len(top1) == 1 and set(rows["reference_table"]) == {"tiny-digits"}
    best = top1.iloc[0]
    assert (best["published"], best["tolerance"], best["k"], best["temperature"]) == (
        50.0, 1.0, 5, 0.1)
    assert (best["epochs_run"], best["epochs_published"], bool(best["shortened"])) == (
        0.1, 2, True)
    assert rows["shortened"].all() and "within_tolerance" not in rows
    # the best of the evaluations kept in the run folder
    run_dir = next((tmp_path / "runs" / "tiny-digits").iterdir())
    evals = json.loads((run_dir / "reproduce.json").read_text())
    scores = [r["value"] for e in evals.values() for r in e["rows"]
              if r["metric"] == "top1" and r["k"] == 5]
    assert len(evals) == best["evaluations"] == 3 and best["value"] == max(scores)
    # the shortened run scaled the table's 1 warm-up epoch of 2 to 0.05 of 0.1
    assert "warmup_epochs: 0.05" in (run_dir / "config.yaml").read_text()
    line = next(ln for ln in out.splitlines() if "simclr" in ln)
    assert re.search(rf"50\.00 .*{best['value']:.2f} .*{best['value'] - 50:+.2f} .*n/a"
                     r" .*0\.1 of 2, shortened .*best of 3", line), line
    assert "shortened: a first look" in out
    kept = (run_dir / "reproduce.json").read_text()
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "its rows are already in" in out
    assert len(pd.read_json(tmp_path / "store" / "results.jsonl", lines=True)) == len(rows)
    assert (run_dir / "reproduce.json").read_text() == kept  # no evaluation ran again


def test_full_length_row_is_checked_against_the_tolerance(monkeypatch, capsys, tmp_path):
    """At the published length (here 0.05 epochs) the row is not shortened and gets a verdict;
    a final-epoch protocol evaluates once."""
    monkeypatch.setenv("COLUMNS", "250")
    table = tmp_path / "tiny.yaml"
    table.write_text(TINY.replace("train.epochs: 2", "train.epochs: 0.05")
                     .replace("train.warmup_epochs: 1.0", "train.warmup_epochs: 0.0")
                     .replace("selection: best-epoch", "selection: final")
                     .replace("points: 1.0", "points: 100.0"))
    code, out, err = run_cli(monkeypatch, capsys, "reproduce", str(table), "--out",
                             str(tmp_path / "runs"), "--results-dir", str(tmp_path / "store"),
                             "--no-progress")
    assert code == 0, err
    rows = pd.read_json(tmp_path / "store" / "results.jsonl", lines=True)
    top1 = rows[rows["metric"] == "top1"].iloc[0]
    assert (bool(top1["shortened"]), bool(top1["within_tolerance"]), top1["evaluations"]) == (
        False, True, 1)
    line = next(ln for ln in out.splitlines() if "simclr" in ln)
    assert re.search(r" yes .*0\.05 of 0\.05 .*final, epoch 0\.05", line), line
    assert "shortened" not in out


def test_plan_refuses_a_method_the_registry_lacks(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TINY.replace("method: simclr", "method: nosuch"))
    with pytest.raises(ConfigError, match=r"unknown method 'nosuch'; valid methods: .*simclr"):
        plan_reproduce(ReproduceSpec(table=str(path)))
