"""Tables of results: rows averaged over seeds, laid out for display, exported.

:func:`aggregate` averages over seeds, :func:`pivot_table` lays the result out for display and
:func:`export_table` writes Markdown, CSV or LaTeX.

Aggregation rule: rows fall into one group when they agree on every column except the per-run
columns (``run_id``, ``checkpoint``, ``seed`` and any ``*_seed`` such as ``eval_seed``), the
result columns (``value``, ``status``, ``error``), cost and provenance. Extra fields a caller
adds are knobs, so they split groups: rows measured differently are never averaged together.
``precision`` (the autocast an evaluation ran under) is such a knob: a bf16 and an fp32 number
are two measurements, never two seeds. Rows a ``--force`` re-run superseded are left out
(``store.drop_superseded``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mae_bench.errors import ConfigError
from mae_bench.results.store import (
    COLUMNS,
    EVAL_KNOBS,
    NOT_GROUPED,
    STAT_COLUMNS,
    drop_superseded,
)

# Shown bare in table labels ("knn top1"); every other key column as "name=value" ("k=20").
_BARE_LABELS = frozenset(("method", "arch", "dataset", "protocol", "metric"))
_TABLE_FORMATS = (".md", ".csv", ".tex")


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
