"""The results store: one JSON object per measured number, appended, never rewritten.

A store is a folder holding ``results.jsonl``; each line is one row built by :func:`make_row`::

    {"run_id": "mae-s0", "method": "mae", "arch": "vit_tiny_patch4", "dataset": "cifar10",
     "protocol": "knn", "metric": "top1", "value": 71.2, "k": 20, "seed": 0, "status": "ok",
     "timestamp": "2026-11-29T12:00:00+00:00", "git_sha": "b8e10fb...", ...}

Metric names say what was measured (``top1``, ``top5``, ``recall@5``, ``map@r``); knobs such as
``k`` live in their own fields, never inside the metric name, so tables can split or average
over them. ``pandas.read_json(path, lines=True)`` loads the file; :func:`read_results` does the
same but survives a torn last line. :func:`aggregate` averages over seeds, :func:`pivot_table`
lays the result out for display and :func:`export_table` writes Markdown, CSV or LaTeX.

Aggregation rule: rows fall into one group when they agree on every column except the per-run
columns (``run_id``, ``checkpoint``, ``seed`` and any ``*_seed`` such as ``eval_seed``), the
result columns (``value``, ``status``, ``error``), cost and provenance. Extra fields a caller
adds are knobs, so they split groups: rows measured differently are never averaged together.
``precision`` (the autocast an evaluation ran under) is such a knob: a bf16 and an fp32 number
are two measurements, never two seeds.

Replacing without rewriting: ``mae-bench eval`` gives each row an ``eval_key``, a hash of the
evaluation's identity (the encoder, the data, the protocol and its options, the seed, the
precision). An evaluation already in the store is skipped; ``--force`` runs it again and appends
its rows, which supersede the older ones: :func:`read_results` and :func:`aggregate` keep only the
latest append of each (``eval_key``, ``metric``, ``k``) (:func:`drop_superseded`), so a repeat
is never counted as another seed. Rows without an ``eval_key`` (older stores, failure records,
the Python API's callables, whose code no hash sees) are all kept, as before.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mae_bench.errors import ConfigError
from mae_bench.files import RESULTS_FILE, append_whole

IDENTITY = ("run_id", "method", "arch", "dataset", "protocol", "metric", "checkpoint")
RESULT = ("value", "status", "error")
# How a protocol was run (they tell table columns apart) and how the encoder was pretrained.
EVAL_KNOBS = ("k", "temperature", "pool", "probe", "label_fraction", "init", "blocks", "epochs",
              "precision")
PRETRAIN_KNOBS = ("mask_ratio", "pretrain_epochs", "seed")
KNOBS = EVAL_KNOBS + PRETRAIN_KNOBS
COST = ("pretrain_seconds", "eval_seconds", "gflops_per_image", "pretrain_gflops")
PROVENANCE = ("timestamp", "git_sha", "config_hash")
COLUMNS = IDENTITY + RESULT + KNOBS + COST + PROVENANCE

REQUIRED = ("run_id", "method", "arch", "dataset", "protocol", "metric")
STATUSES = ("ok", "failed")
# Averaged over (they differ between seeds of one configuration) or not a description of it.
# ``skipped_images`` describes how the data were read, not what was measured: a streamed data
# set counts its unreadable files only when it reads them, so a row from cached features lacks it.
NOT_GROUPED = frozenset(("run_id", "checkpoint", "seed", "command", "pretrain_command", "weights",
                         "eval_key", "skipped_images") + RESULT + COST + PROVENANCE)
# One measured number: a later row with the same values replaces an earlier one (a --force
# re-run). ``k`` tells apart the rows of one k-NN evaluation.
MEASUREMENT = ("eval_key", "metric", "k")
STAT_COLUMNS = ("mean", "std", "n", "ci95_low", "ci95_high", "failed")
# Shown bare in table labels ("knn top1"); every other key column as "name=value" ("k=20").
_BARE_LABELS = frozenset(("method", "arch", "dataset", "protocol", "metric"))
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TABLE_FORMATS = (".md", ".csv", ".tex")


# ------------------------------------------------------------------------------------- writing


def make_row(
    *,
    run_id: str,
    method: str,
    arch: str,
    dataset: str,
    protocol: str,
    metric: str,
    value: float | None,
    status: str = "ok",
    **fields: Any,
) -> dict[str, Any]:
    """Build one validated result row, with ``timestamp`` (UTC) and ``git_sha`` filled in.

    Args:
        run_id: The pretraining run the number belongs to.
        method, arch, dataset, protocol, metric: What was measured (``metric`` without knobs:
            ``top1``, not ``top1@k20``).
        value: The number (percent for accuracies); None only when ``status == "failed"``.
        status: ``"ok"`` or ``"failed"``.
        **fields: Knobs, cost and provenance (``k=20, seed=0, eval_seconds=3.1, ...``); unknown
            names become new columns. Values must be JSON scalars. ``timestamp`` and
            ``git_sha`` may be given to override the defaults.

    Raises:
        ValueError: A field is missing, empty, not a scalar, or not finite.
    """
    row: dict[str, Any] = {}
    for name, given in zip(
        REQUIRED, (run_id, method, arch, dataset, protocol, metric), strict=True
    ):
        if not isinstance(given, str) or not given.strip():
            raise ValueError(f"result field '{name}' must be a non-empty string, got {given!r}")
        row[name] = given
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    row["status"] = status
    row["value"] = _check_value(value, status)
    for name, given in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"result field name {name!r} must be a Python-style identifier")
        if name in STAT_COLUMNS or name in row:
            raise ValueError(f"result field name {name!r} is reserved")
        row[name] = _check_scalar(name, given)
    row.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    row.setdefault("git_sha", git_sha())
    return row


def _check_value(value: Any, status: str) -> float | None:
    if value is None:
        if status == "failed":
            return None
        raise ValueError("value is None but status is 'ok'; pass status='failed' for a failed run")
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise ValueError(f"value must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}; use status='failed', value=None")
    return value


def _check_scalar(name: str, value: Any) -> str | int | float | bool | None:
    if isinstance(value, np.generic):  # numpy scalars from metric code: plain Python values
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"result field '{name}' must be finite, got {value}")
        return value
    raise ValueError(
        f"result field '{name}' must be a str, int, float, bool or None, "
        f"got {type(value).__name__}: {value!r}"
    )


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the git checkout holding this package; None when it is not in one.

    Read once per process (sweeps and compare call it when they start), so the rows of a long
    run name the commit it started from, not one that landed while it ran."""
    package_root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package_root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    # An installed copy inside someone else's repository (a venv in a project) is not ours.
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package_root:
        return None
    return lines[1]


def check_writable(results_dir: str | Path) -> Path:
    """Make sure rows can be appended to ``results_dir``'s store before any work starts, without
    writing anything: the store (or else the folder, or else its nearest existing parent) must
    be writable, and what is in the way must not be a file. Returns the store's path.

    Raises:
        ConfigError: the store cannot be written (one line, with the reason and the fix).
    """
    results_dir = Path(results_dir)
    path = results_dir / RESULTS_FILE
    problem = None
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            problem = f"{path} is not a writable file"
    else:
        existing = results_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"--results-dir {results_dir}: cannot write the results store "
                          f"({problem}); pick a folder you can write to")
    return path


def append_rows(results_dir: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to ``results_dir/results.jsonl`` (created if needed); returns the file.

    All rows go out in one locked, all-or-nothing append (:func:`mae_bench.files.append_whole`):
    concurrent writers never interleave, existing bytes are never touched, and a write that
    fails part-way (a full disk) is undone, so the store holds all of the rows or none of them.
    The file is created with the umask's mode, so a group can share a store.

    Raises:
        ValueError: A row lacks a required field or holds a value JSON cannot carry.
        OSError: The rows could not be written (none were).
    """
    lines = []
    for row in rows:
        missing = [name for name in REQUIRED + ("value", "status") if name not in row]
        if missing:
            raise ValueError(f"result row lacks {', '.join(missing)}; build rows with make_row")
        lines.append(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_FILE
    if lines:
        append_whole(path, "".join(lines).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------- reading


def _no_store(path: Path) -> str:
    """The error for a store that is not there, with the --results-dir that would make it
    (the folder asked for, not its parent)."""
    if path.suffix == ".jsonl":
        return (f"no results at {path}; run `mae-bench eval ...` with --results-dir "
                f"{path.parent} first")
    where = "" if path.is_dir() else f" (there is no folder {path})"
    return (f"no results at {path / RESULTS_FILE}{where}; run `mae-bench eval ...` with "
            f"--results-dir {path} first")


def read_results(path: str | Path, *, superseded: bool = False) -> pd.DataFrame:
    """Load a store (its folder or the ``.jsonl`` file) as one row per result.

    The frame has every column of :data:`COLUMNS` (NaN where a row lacks it) followed by any
    extra fields. Blank lines are skipped; unreadable lines (a torn last line, garbage, JSON
    that is not a result row) are skipped with one warning naming the file and line numbers.
    Rows a later ``--force`` re-run replaced are left out (:func:`drop_superseded`) unless
    ``superseded`` is True.

    Raises:
        ConfigError: There is no store at ``path``.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(_no_store(path))
    records, bad = [], []
    for number, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and all(name in record for name in REQUIRED):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.warn(
            f"skipped {len(bad)} unreadable line(s) in {file}: line {shown}", stacklevel=2
        )
    frame = pd.DataFrame.from_records(records)
    extra = [name for name in frame.columns if name not in COLUMNS]
    frame = frame.reindex(columns=list(COLUMNS) + extra)
    return frame if superseded else drop_superseded(frame)


def drop_superseded(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the rows a later row of the same measurement (:data:`MEASUREMENT`)
    replaced: of each (``eval_key``, ``metric``, ``k``) the last in file order stays. Rows
    without an ``eval_key`` all stay."""
    if "eval_key" not in df.columns or df.empty:
        return df
    subset = [name for name in MEASUREMENT if name in df.columns]
    keyed = df["eval_key"].notna()
    replaced = keyed & df.duplicated(subset=subset, keep="last")
    return df[~replaced].reset_index(drop=True) if replaced.any() else df


def stored_evaluation(path: str | Path, eval_key: str) -> pd.DataFrame:
    """The current ``ok`` rows of one evaluation (by ``eval_key``) in the store at ``path``;
    empty when there is no store or no such row."""
    file = Path(path) / RESULTS_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    df = read_results(file)
    return df[(df["eval_key"] == eval_key) & (df["status"] == "ok")] if "eval_key" in df \
        else df.iloc[:0]


# --------------------------------------------------------------------------------- aggregation


def group_columns(df: pd.DataFrame) -> list[str]:
    """The columns :func:`aggregate` groups by: all columns that are set somewhere except seeds
    and the per-run, result, cost and provenance ones (see the module docstring)."""
    return [c for c in df.columns if not _averaged_over(c) and df[c].notna().any()]


def _averaged_over(name: str) -> bool:
    # Any seed (``seed``, ``eval_seed``, ...) is what repeats of one configuration vary.
    # Also outputs that vary from run to run: times (``*_seconds``) and hyper-parameters a
    # protocol chose itself (``chosen_*``, e.g. the fast probe's learning rate).
    return (name in NOT_GROUPED or name.endswith(("_seed", "_seconds"))
            or name.startswith("chosen_"))


def aggregate(df: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, sample std, n and Student-t 95% interval of ``value`` per group of rows.

    Only rows with ``status == "ok"`` enter the statistics; failed rows are counted in
    ``failed``; rows a later re-run superseded are left out (:func:`drop_superseded`).
    ``std`` uses ddof=1 and, like the interval, is NaN for n < 2; all statistics are NaN for
    n = 0 (a group where every run failed). Groups keep their first-appearance order.

    Args:
        df: Rows as returned by :func:`read_results`.
        by: The group key; defaults to :func:`group_columns`.

    Returns:
        One row per group: the key columns, then mean, std, n, ci95_low, ci95_high, failed.
    """
    df = drop_superseded(df)  # a frame read some other way (pd.read_json) counts repeats once
    key = list(by) if by is not None else group_columns(df)
    absent = [name for name in key if name not in df.columns]
    if absent:
        raise ConfigError(f"cannot group results by {absent}; columns are {list(df.columns)}")
    status = df["status"].tolist() if "status" in df.columns else ["ok"] * len(df)
    key_values = (
        list(zip(*(df[name].tolist() for name in key), strict=True)) if key else [()] * len(df)
    )
    # Missing values (None, NaN) compare unequal to themselves: normalise them for the dict key,
    # and report each group with the values of its first row.
    groups: dict[tuple, dict[str, Any]] = {}
    for values, value, state in zip(key_values, df["value"].tolist(), status, strict=True):
        norm = tuple(None if _is_missing(v) else v for v in values)
        group = groups.setdefault(norm, {"key": values, "ok": [], "failed": 0})
        if state == "ok":
            group["ok"].append(float(value))
        else:
            group["failed"] += 1
    out = [
        dict(zip(key, group["key"], strict=True))
        | _stats(group["ok"])
        | {"failed": group["failed"]}
        for group in groups.values()
    ]
    return pd.DataFrame(out, columns=key + list(STAT_COLUMNS))


def where_equal(column: pd.Series, value: str) -> pd.Series:
    """Rows whose ``column`` equals ``value`` as the user typed it: numbers compare as numbers
    (``k=20`` matches a stored 20.0), anything else as text."""
    try:
        number = float(value)
    except ValueError:
        return column.astype(str) == value
    numeric = pd.to_numeric(column, errors="coerce")
    return (numeric == number) | (column.astype(str) == value)


def _stats(values: list[float]) -> dict[str, float | int]:
    n = len(values)
    mean = float(np.mean(values)) if n > 0 else math.nan
    std = half = math.nan
    if n > 1:
        from scipy import stats  # scikit-learn depends on scipy; imported late as it is slow

        std = float(np.std(values, ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half, "ci95_high": mean + half}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------------- tables


def pivot_table(
    df: pd.DataFrame,
    rows: Sequence[str] = ("method", "arch"),
    columns: Sequence[str] = ("protocol", "metric", "k"),
    *,
    numeric: bool = False,
    decimals: int = 2,
) -> pd.DataFrame:
    """A display table of results: one row per ``rows`` key, one column per ``columns`` key.

    Cells read ``"72.00 ± 2.00 (n=3)"`` (``"71.23 (n=1)"`` for one seed, ``", 1 failed"`` added
    when runs failed, ``"all 2 failed"`` when none succeeded, ``""`` when nothing was measured).
    Column labels join the key values, knobs as ``name=value`` (``"knn top1 k=20"``);
    a part that is missing for a column (``k`` of a linear probe) is left out. Names that are
    missing everywhere are dropped. A group column that varies but is named in neither ``rows``
    nor ``columns`` is added rather than averaged over: an evaluation knob (:data:`EVAL_KNOBS`,
    e.g. ``pool``) to ``columns``, anything else (a swept ``mask_ratio``) to ``rows``.

    Args:
        df: Rows as returned by :func:`read_results`.
        rows, columns: Group columns for the row and column keys.
        numeric: Return the means (NaN where empty) in the same layout, e.g. to mark the best.
        decimals: Decimals shown in the cells.

    Raises:
        ConfigError: A name is not a group column (a typo, or ``seed``, which is averaged over).
    """
    agg = aggregate(df)
    key = list(agg.columns[: -len(STAT_COLUMNS)])
    for name in (*rows, *columns):
        if _averaged_over(name) or (name not in df.columns and name not in COLUMNS):
            raise ConfigError(
                f"cannot lay out a table by {name!r}: not one of the group columns {key}"
            )
    col_key = [name for name in columns if name in key]
    row_key = [name for name in rows if name in key and name not in col_key]
    # Never average over a varying setting: give it a place in the layout. A knob set to one
    # value where it applies and missing elsewhere (k-NN's temperature) needs none.
    def place(name: str) -> None:
        (col_key if name in EVAL_KNOBS else row_key).append(name)

    for name in key:
        if name not in row_key + col_key and agg[name].nunique() > 1:
            place(name)
    for name in key:  # set in some groups only: placed when groups would otherwise collide
        layout = row_key + col_key
        if name not in layout and agg[name].nunique(dropna=False) > 1 and \
                agg[layout].astype(str).duplicated().any():
            place(name)
    if agg.empty:
        return pd.DataFrame()
    names = row_key or ["rows"]
    row_labels = [
        tuple("" if _is_missing(v) else _fmt_key(v) for v in values)
        for values in zip(*(agg[name].tolist() for name in row_key), strict=True)
    ] or [("all",)] * len(agg)
    col_labels = [_label(r, col_key) or "value" for _, r in agg.iterrows()]
    unique_rows = list(dict.fromkeys(row_labels))
    index = (
        pd.MultiIndex.from_tuples(unique_rows, names=names)
        if len(names) > 1
        else pd.Index([label for (label,) in unique_rows], name=names[0])
    )
    columns = list(dict.fromkeys(col_labels))
    cells: dict[tuple, Any] = {}
    for row_label, col_label, (_, group) in zip(
        row_labels, col_labels, agg.iterrows(), strict=True
    ):
        if (row_label, col_label) in cells:  # only when two key values print alike ("20", 20)
            raise ValueError(f"two result groups share the cell {row_label} / {col_label!r}")
        cells[row_label, col_label] = group["mean"] if numeric else format_cell(group, decimals)
    empty = np.nan if numeric else ""
    table = pd.DataFrame(
        [[cells.get((r, c), empty) for c in columns] for r in unique_rows],
        index=index,
        columns=columns,
        dtype=float if numeric else object,
    )
    return table


def _label(row: pd.Series, names: list[str]) -> str:
    parts = []
    for name in names:
        if not _is_missing(row[name]):
            text = _fmt_key(row[name])
            parts.append(text if name in _BARE_LABELS else f"{name}={text}")
    return " ".join(parts)


def _fmt_key(value: Any) -> str:
    # Knobs read back from JSON may be floats (20.0) when a column also holds NaN.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_cell(stats: Any, decimals: int = 2) -> str:
    """One aggregated cell as text, the one format of every table and report:
    ``"72.00 ± 2.00 (n=3)"``, ``"71.23 (n=1)"`` for one seed, ``", 1 failed"`` added when runs
    failed, ``"all 2 failed"`` when none succeeded, ``""`` for None (nothing measured).

    Args:
        stats: a mapping (or pandas row) with "mean", "std", "n" and "failed".
        decimals: digits after the point.
    """
    if stats is None:
        return ""
    n, failed = int(stats["n"]), int(stats["failed"])
    if n == 0:
        return f"all {failed} failed"
    note = f"n={n}" + (f", {failed} failed" if failed else "")
    if n == 1:
        return f"{stats['mean']:.{decimals}f} ({note})"
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f} ({note})"


# ---------------------------------------------------------------------------------- export


def export_table(table: pd.DataFrame, path: str | Path, decimals: int = 2) -> Path:
    """Write a table as Markdown (``.md``), CSV (``.csv``) or LaTeX (``.tex``), by suffix.

    A named index (the row key of :func:`pivot_table`) becomes the leading columns. Floats are
    shown with ``decimals`` decimals in Markdown and LaTeX; CSV keeps full precision. The LaTeX
    table uses booktabs rules.

    Raises:
        ConfigError: The suffix is not one of ``.md``, ``.csv``, ``.tex``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _TABLE_FORMATS:
        raise ConfigError(
            f"unknown table format {path.suffix or '(none)'!r} for {path}; "
            f"use one of {', '.join(_TABLE_FORMATS)}"
        )
    flat = table.reset_index() if any(n is not None for n in table.index.names) else table
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        flat.to_csv(path, index=False)
        return path
    header = [str(c) for c in flat.columns]
    body = [[_fmt_export(v, decimals) for v in r] for r in flat.itertuples(index=False)]
    text = _markdown(header, body) if suffix == ".md" else _latex(header, body)
    path.write_text(text, encoding="utf-8")
    return path


def _fmt_export(value: Any, decimals: int) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{decimals}f}"
    return str(value)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in body]) + "\n"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    "±": r"$\pm$",
}


def _latex(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return " & ".join("".join(_LATEX_SPECIAL.get(ch, ch) for ch in c) for c in cells) + r" \\"

    return (
        "\n".join(
            [
                r"% needs \usepackage{booktabs}",
                r"\begin{tabular}{" + "l" * len(header) + "}",
                r"\toprule",
                line(header),
                r"\midrule",
                *(line(r) for r in body),
                r"\bottomrule",
                r"\end{tabular}",
            ]
        )
        + "\n"
    )
