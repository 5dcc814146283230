"""Tests for mae_bench/results.py: the append-only store, aggregation over seeds, tables."""

from __future__ import annotations

import json
import math
import multiprocessing
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from mae_bench import results
from mae_bench.errors import ConfigError
from mae_bench.results import (
    COLUMNS,
    RESULTS_FILE,
    aggregate,
    append_rows,
    export_table,
    make_row,
    pivot_table,
    read_results,
)

T_975_DF2 = 4.302652729911275  # Student-t 0.975 quantile, 2 degrees of freedom (tables)


def row(value: float | None = 70.0, **fields) -> dict:
    base = dict(run_id="mae-s0", method="mae", arch="vit_micro", dataset="digits")
    base |= dict(protocol="knn", metric="top1", value=value)
    return make_row(**(base | fields))


def seeds(values, **fields) -> list[dict]:
    # Like evals/run.py: a pretraining seed, an evaluation seed and a run id per repeat.
    return [
        row(v, seed=s, eval_seed=s, run_id=f"run-s{s}", checkpoint=f"runs/s{s}", **fields)
        for s, v in enumerate(values)
    ]


# ---------------------------------------------------------------------------------- make_row


def test_make_row_fills_provenance():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    r = row(71.5, k=20, seed=3, pool="cls", eval_seconds=1.5, custom_knob=True)
    stamp = datetime.fromisoformat(r["timestamp"])
    assert stamp.utcoffset().total_seconds() == 0 and stamp >= before
    assert r["git_sha"] == results.git_sha()
    assert r["git_sha"] is None or len(r["git_sha"]) == 40
    assert (r["value"], r["status"], r["k"], r["custom_knob"]) == (71.5, "ok", 20, True)
    assert row(None, status="failed")["value"] is None
    assert row(1, timestamp="2020-01-01T00:00:00+00:00")["timestamp"].startswith("2020")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": ""}, "result field 'method' must be a non-empty string, got ''"),
        ({"metric": None}, "result field 'metric' must be a non-empty string, got None"),
        ({"value": None}, "value is None but status is 'ok'"),
        ({"value": math.nan}, "value must be finite, got nan"),
        ({"value": math.nan, "status": "failed"}, "value must be finite, got nan"),
        ({"value": True}, "value must be a real number, got bool"),
        ({"value": "71.2"}, "value must be a real number, got str"),
        ({"status": "done"}, "status must be one of ok, failed, got 'done'"),
        ({"k": [20]}, "result field 'k' must be a str, int, float, bool or None, got list"),
        ({"lr": math.inf}, "result field 'lr' must be finite, got inf"),
        ({"top1@k20": 1}, "result field name 'top1@k20' must be a Python-style identifier"),
        ({"mean": 1.0}, "result field name 'mean' is reserved"),
    ],
)
def test_make_row_rejects(fields, message):
    with pytest.raises(ValueError) as info:
        row(**({"value": 70.0} | fields))
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------------- the store


def test_append_never_rewrites_and_pandas_loads(tmp_path):
    first = [row(70.0), row(71.0, metric="top5")]
    path = append_rows(tmp_path / "store", first)
    assert path == tmp_path / "store" / RESULTS_FILE
    old = path.read_bytes()
    assert old.decode().splitlines() == [json.dumps(r, sort_keys=True) for r in first]
    append_rows(tmp_path / "store", [row(72.0, k=20)])
    append_rows(tmp_path / "store", [])
    new = path.read_bytes()
    assert new.startswith(old) and new.count(b"\n") == 3
    loaded = pd.read_json(path, lines=True)
    assert loaded["value"].tolist() == [70.0, 71.0, 72.0]
    assert loaded["metric"].tolist() == ["top1", "top5", "top1"]
    ours = read_results(tmp_path / "store")
    assert list(ours.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert ours["value"].tolist() == [70.0, 71.0, 72.0] and ours["k"].isna().tolist() == [
        True,
        True,
        False,
    ]


def test_append_rejects_rows_not_from_make_row(tmp_path):
    hand_made = {"run_id": "a", "method": "m", "arch": "a", "dataset": "d", "protocol": "knn"}
    with pytest.raises(ValueError, match="result row lacks metric, value, status"):
        append_rows(tmp_path, [hand_made])
    assert not (tmp_path / RESULTS_FILE).exists()


def test_torn_and_garbage_lines_are_skipped_with_one_warning(tmp_path):
    path = append_rows(tmp_path, [row(70.0)])
    with open(path, "ab") as fh:
        fh.write(b"not json at all\n\n   \n[1, 2]\n")
        fh.write(b'{"run_id": "torn", "meth')  # a crash mid-write: no newline
    with pytest.warns(UserWarning) as caught:
        assert read_results(path)["value"].tolist() == [70.0]
    assert len(caught) == 1
    assert str(caught[0].message) == f"skipped 3 unreadable line(s) in {path}: line 2, 5, 6"

    append_rows(tmp_path, [row(71.0), row(72.0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_results(tmp_path)["value"].tolist() == [70.0, 71.0, 72.0]
    assert [str(w.message).rsplit(": ", 1)[1] for w in caught] == ["line 2, 5, 6"]


def test_missing_and_empty_store(tmp_path):
    with pytest.raises(ConfigError, match=r"no results at .*results\.jsonl; run `mae-bench eval"):
        read_results(tmp_path)
    (tmp_path / RESULTS_FILE).write_bytes(b"\n")
    empty = read_results(tmp_path)
    assert empty.empty and list(empty.columns) == list(COLUMNS)
    assert aggregate(empty).empty and pivot_table(empty).empty


def _writer(args: tuple[str, int]) -> None:
    folder, writer = args
    pad = "x" * 3000  # rows longer than a pipe buffer page, so a torn write would show
    for i in range(200):
        append_rows(folder, [row(float(i), run_id=f"w{writer}", seed=i, pad=pad)])


@pytest.mark.multiprocess
def test_concurrent_writers_never_interleave(tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(4) as pool:
        pool.map(_writer, [(str(tmp_path), w) for w in range(4)])
    lines = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 800
    parsed = [json.loads(line) for line in lines]  # raises on a glued or torn line
    for w in range(4):
        assert [r["seed"] for r in parsed if r["run_id"] == f"w{w}"] == list(range(200))


# ------------------------------------------------------------------------------- aggregation


def test_aggregate_mean_std_and_t_interval():
    df = pd.DataFrame(seeds([70.0, 72.0, 74.0], k=20) + seeds([60.0], k=10))
    agg = aggregate(df)
    assert len(agg) == 2  # split by k, not by seed, eval_seed, run_id or checkpoint
    three = agg[agg["k"] == 20].iloc[0]
    half = T_975_DF2 * 2.0 / math.sqrt(3)
    assert (three["mean"], three["std"], three["n"], three["failed"]) == (72.0, 2.0, 3, 0)
    assert three["ci95_low"] == pytest.approx(72.0 - half, abs=1e-9)
    assert three["ci95_high"] == pytest.approx(72.0 + half, abs=1e-9)
    one = agg[agg["k"] == 10].iloc[0]
    assert one["mean"] == 60.0 and one["n"] == 1
    assert math.isnan(one["std"]) and math.isnan(one["ci95_low"])
    assert not {"seed", "eval_seed", "run_id", "checkpoint"} & set(agg.columns)


def test_aggregate_excludes_failed_rows_and_counts_them():
    rows = seeds([70.0, 74.0]) + [
        row(None, status="failed", seed=2, error="non-finite loss"),
        row(12.0, status="failed", seed=3),  # a number from a broken run: not averaged either
    ]
    agg = aggregate(pd.DataFrame(rows))
    assert len(agg) == 1
    assert agg.loc[0, ["mean", "n", "failed"]].tolist() == [72.0, 2, 2]
    every_run_failed = aggregate(pd.DataFrame([row(None, status="failed")]))
    assert every_run_failed.loc[0, "n"] == 0 and math.isnan(every_run_failed.loc[0, "mean"])


def test_aggregate_by_and_missing_knobs_group_together(tmp_path):
    append_rows(tmp_path, seeds([70.0, 72.0], protocol="linear"))
    append_rows(tmp_path, seeds([50.0, 52.0], k=20, pool="cls"))
    df = read_results(tmp_path)  # k is NaN for linear rows: they must still form one group
    agg = aggregate(df)
    assert agg["mean"].tolist() == [71.0, 51.0] and agg["n"].tolist() == [2, 2]
    assert aggregate(df, by=["method"])["n"].tolist() == [4]
    with pytest.raises(ConfigError, match=r"cannot group results by \['nope'\]"):
        aggregate(df, by=["nope"])


# ------------------------------------------------------------------------------------ tables


def _table_rows() -> list[dict]:
    return (
        seeds([70.0, 72.0, 74.0], k=20)
        + seeds([75.0, 77.0, 79.0], protocol="linear")
        + [row(60.123, method="simclr", k=20)]
        + [row(None, method="simclr", k=20, seed=1, status="failed")]
        + [row(None, method="simclr", protocol="linear", status="failed")]
    )


def test_pivot_table_formats_cells():
    table = pivot_table(pd.DataFrame(_table_rows()))
    assert list(table.columns) == ["knn top1 k=20", "linear top1"]  # no "k" for linear
    assert table.index.names == ["method", "arch"]
    assert table.loc[("mae", "vit_micro")].tolist() == ["72.00 ± 2.00 (n=3)", "77.00 ± 2.00 (n=3)"]
    assert table.loc[("simclr", "vit_micro")].tolist() == ["60.12 (n=1, 1 failed)", "all 1 failed"]
    means = pivot_table(pd.DataFrame(_table_rows()), numeric=True)
    assert means.shape == table.shape and list(means.columns) == list(table.columns)
    assert means.loc[("mae", "vit_micro")].tolist() == [72.0, 77.0]
    assert means.loc[("simclr", "vit_micro"), "knn top1 k=20"] == 60.123
    assert math.isnan(means.loc[("simclr", "vit_micro"), "linear top1"])


def test_pivot_table_places_varying_settings_instead_of_averaging():
    rows = seeds([70.0, 72.0], k=20, mask_ratio=0.75) + seeds([60.0], k=20, mask_ratio=0.5)
    rows += seeds([50.0], k=20, mask_ratio=0.5, pool="mean")
    table = pivot_table(pd.DataFrame(rows), rows=("method",))
    assert table.index.names == ["method", "mask_ratio"]  # a pretraining knob: a row
    assert list(table.columns) == ["knn top1 k=20", "knn top1 k=20 pool=mean"]  # an eval knob
    assert table.loc[("mae", "0.75"), "knn top1 k=20"] == "71.00 ± 1.41 (n=2)"
    assert table.loc[("mae", "0.5")].tolist() == ["60.00 (n=1)", "50.00 (n=1)"]
    with pytest.raises(ConfigError, match="cannot lay out a table by 'seed'"):
        pivot_table(pd.DataFrame(rows), rows=("method", "seed"))


def test_export_table_md_csv_tex(tmp_path):
    table = pivot_table(pd.DataFrame(_table_rows()))
    md = export_table(table, tmp_path / "out" / "table.md").read_text(encoding="utf-8")
    assert md.splitlines()[:3] == [
        "| method | arch | knn top1 k=20 | linear top1 |",
        "| --- | --- | --- | --- |",
        "| mae | vit_micro | 72.00 ± 2.00 (n=3) | 77.00 ± 2.00 (n=3) |",
    ]
    csv = pd.read_csv(export_table(table, tmp_path / "table.csv"))
    assert csv.columns.tolist() == ["method", "arch", "knn top1 k=20", "linear top1"]
    assert csv.loc[1, "knn top1 k=20"] == "60.12 (n=1, 1 failed)"
    tex = export_table(table, tmp_path / "table.tex").read_text(encoding="utf-8")
    assert r"mae & vit\_micro & 72.00 $\pm$ 2.00 (n=3) & 77.00 $\pm$ 2.00 (n=3) \\" in tex
    assert tex.count(r"\\") == 3 and r"\begin{tabular}{llll}" in tex
    means = pivot_table(pd.DataFrame(_table_rows()), numeric=True)
    assert "| simclr | vit_micro | 60.12 |  |" in export_table(means, tmp_path / "m.md").read_text()
    with pytest.raises(ConfigError, match=r"unknown table format '\.xlsx' .* \.md, \.csv, \.tex"):
        export_table(table, Path(tmp_path / "table.xlsx"))
