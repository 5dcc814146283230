"""``mae-bench results``: the results store as a pivot table (mean ± std (n) over seeds),
exported on request."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import Export, check_exports, names, out
from mae_bench.errors import MaeBenchError


def results(
    results_dir: Annotated[
        Path, typer.Option(help="The results store (DIR/results.jsonl).")
    ] = Path("results"),
    rows: Annotated[
        str, typer.Option(help="Columns that make the table's rows, comma-separated.")
    ] = "method,arch,pool",
    columns: Annotated[
        str, typer.Option(help="Columns that make the table's columns, comma-separated.")
    ] = "protocol,metric,k",
    where: Annotated[
        list[str],
        typer.Option(
            help="Keep rows where COLUMN=VALUE (repeatable), e.g. --where protocol=knn "
            "--where k=20."
        ),
    ] = None,
    export: Export = None,
    decimals: Annotated[int, typer.Option(help="Decimals in the cells.")] = 2,
) -> None:
    """Show the results store as a pivot table: mean ± std (n) over seeds per cell; export it
    to Markdown or LaTeX as shown, or to CSV as numbers (one row per group: its settings, then
    mean, std, n, ci95_low, ci95_high, failed)."""
    from mae_bench.results import aggregate, export_table, pivot_table, read_results, where_equal

    check_exports(export)
    df = read_results(results_dir)
    for cond in where or []:
        name, sep, value = cond.partition("=")
        if not sep or name not in df.columns:
            raise MaeBenchError(f"--where {cond!r}: expected COLUMN=VALUE with a column of the "
                                f"store ({', '.join(map(str, df.columns))})")
        df = df[where_equal(df[name], value)]
    if df.empty:
        out.print(f"no results in {results_dir}" + (" match --where" if where else ""))
        return
    table = pivot_table(df, rows=names(rows), columns=names(columns), decimals=decimals)
    out.print(_pivot_for_terminal(table, f"{results_dir} ({len(df)} rows; mean ± std (n) over "
                                         "seeds)"))
    for path in export or []:
        # CSV is for programs: one row per group, mean / std / n / interval as numbers.
        data = aggregate(df) if path.suffix.lower() == ".csv" else table
        out.print(f"wrote {export_table(data, path, decimals=decimals)}")


def _pivot_for_terminal(table, title: str) -> Table:
    """A rich table of a pivot table; turned on its side when its columns would not fit the
    terminal (then each result column is a row and each table row a column)."""
    names = [str(n) for n in table.index.names]
    keys = [k if isinstance(k, tuple) else (k,) for k in table.index]
    cells = [[str(v) for v in row] for row in table.to_numpy().tolist()]
    width = sum(max(len(str(c)), *(len(r[i]) for r in cells)) + 3
                for i, c in enumerate(table.columns)) + sum(len(n) + 8 for n in names)
    shown = Table(title=title)
    if width <= out.width or len(keys) > len(table.columns):
        for name in names:
            shown.add_column(name)
        for col in table.columns:
            shown.add_column(str(col), justify="right")
        for key, row in zip(keys, cells, strict=True):
            shown.add_row(*map(str, key), *row)
        return shown
    shown.add_column(" / ".join(names))
    for key in keys:
        shown.add_column("\n".join(map(str, key)), justify="right")
    for i, col in enumerate(table.columns):
        shown.add_row(str(col), *(row[i] for row in cells))
    return shown
