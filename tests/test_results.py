"""Tests for mae_bench/results.py: the append-only store, aggregation over seeds, tables."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
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


def full_disk(monkeypatch, path: Path) -> list[int]:
    """Fill the disk under ``path`` (an existing file): the first ``os.write`` to it writes half
    of its bytes (a short write), the next raises ENOSPC. Returns the list of write sizes."""
    real, inode, sizes = os.write, path.stat().st_ino, []

    def write(fd: int, data) -> int:
        if os.fstat(fd).st_ino != inode:
            return real(fd, data)
        sizes.append(len(data))
        if len(sizes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)
    return sizes


@pytest.mark.parametrize("torn", [False, True])
def test_a_failed_append_leaves_the_store_byte_identical_and_raises(tmp_path, monkeypatch, torn):
    path = append_rows(tmp_path, [row(70.0), row(71.0, metric="top5")])
    if torn:  # a writer killed mid-line: the append would close the line first
        with open(path, "ab") as fh:
            fh.write(b'{"run_id": "torn')
    before = path.read_bytes()
    sizes = full_disk(monkeypatch, path)
    with pytest.raises(OSError) as err:
        append_rows(tmp_path, [row(72.0 + i, k=i + 1) for i in range(12)])
    assert err.value.errno == errno.ENOSPC and len(sizes) == 2  # a short write, then the error
    assert path.read_bytes() == before  # all rows or none: no part of them, no torn line
    monkeypatch.undo()
    append_rows(tmp_path, [row(90.0, metric="recall@1")])  # the store still takes appends
    assert read_results_quietly(tmp_path)["value"].tolist() == [70.0, 71.0, 90.0]


def read_results_quietly(store: Path) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torn line of the parametrized case
        return read_results(store)


@pytest.mark.parametrize(("umask", "mode"), [(0o002, 0o664), (0o077, 0o600)])
def test_the_store_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = append_rows(tmp_path, [row(70.0)])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


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


# ------------------------------------------------------------------- one evaluation, one number


def test_a_forced_rerun_supersedes_and_is_not_another_seed(tmp_path):
    """Issue 28, item 2: a row appended later with the same (eval_key, metric, k) replaces the
    earlier one when read and aggregated; rows without an eval_key (older stores) all count."""
    append_rows(tmp_path, [
        row(70.0, eval_key="e1", k=20), row(90.0, eval_key="e1", metric="top5", k=20),
        row(50.0, eval_key="e1", k=5), row(66.0, eval_key="e1", metric="map@r"),
        *seeds([60.0, 62.0], method="old-store", k=20),
    ])
    append_rows(tmp_path, [row(72.0, eval_key="e1", k=20), row(67.0, eval_key="e1",
                                                                metric="map@r")])
    assert len(read_results(tmp_path, superseded=True)) == 8
    df = read_results(tmp_path)
    assert len(df) == 6
    for frame in (df, read_results(tmp_path, superseded=True),
                  pd.read_json(tmp_path / RESULTS_FILE, lines=True)):
        agg = aggregate(frame).set_index(["method", "metric", "k"], drop=False)
        assert agg.loc[("mae", "top1", 20), ["mean", "n"]].tolist() == [72.0, 1]
        assert agg.loc[("mae", "top1", 5), ["mean", "n"]].tolist() == [50.0, 1]
        assert agg.loc[("mae", "top5", 20), ["mean", "n"]].tolist() == [90.0, 1]
        assert agg.loc[("old-store", "top1", 20), ["mean", "n"]].tolist() == [61.0, 2]
        map_r = agg[agg["metric"] == "map@r"]
        assert map_r[["mean", "n"]].values.tolist() == [[67.0, 1]]


def test_precision_splits_groups_and_old_rows_group_among_themselves(tmp_path):
    """Issue 28, item 1: a bf16 and an fp32 number of one seed are two groups of n=1; rows
    from before precision was recorded still load and average among themselves."""
    append_rows(tmp_path, [*seeds([49.0, 51.0]), row(50.2, precision="bf16"),
                           row(51.1, precision="fp32")])
    frame = read_results(tmp_path)
    agg = aggregate(frame)
    assert "precision" in results.group_columns(frame)
    assert agg[["precision", "mean", "n"]].fillna("-").values.tolist() == [
        ["-", 50.0, 2], ["bf16", 50.2, 1], ["fp32", 51.1, 1]]


def test_the_count_of_skipped_images_does_not_split_seeds(tmp_path):
    """How many unreadable files a data set skipped describes how it was read; a row from cached
    features of a streamed set lacks it, and must still average with the row that has it."""
    append_rows(tmp_path, [row(70.0, seed=0, run_id="a", skipped_images=2),
                           row(72.0, seed=1, run_id="b")])
    agg = aggregate(read_results(tmp_path))
    assert agg[["mean", "n"]].values.tolist() == [[71.0, 2]]


@pytest.mark.multiprocess  # runs git
def test_git_sha_names_the_commit_of_this_checkout():
    """Rows carry the commit of the checkout the package lies in (found from the module's own
    path, which moved into mae_bench/results/); None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    expected = done.stdout.strip() if done.returncode == 0 else None
    results.git_sha.cache_clear()
    assert results.git_sha() == expected
