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
    for part in _pivot_for_terminal(table, f"{results_dir} ({len(df)} rows; mean ± std (n) "
                                           "over seeds)"):
        out.print(part)
    for path in export or []:
        # CSV is for programs: one row per group, mean / std / n / interval as numbers.
        data = aggregate(df) if path.suffix.lower() == ".csv" else table
        out.print(f"wrote {export_table(data, path, decimals=decimals)}")


def _pivot_for_terminal(table, title: str, width: int | None = None) -> list[Table]:
    """A pivot table as rich tables that fit ``width`` (default: the terminal's) without cutting
    a word: every column is at least as wide as its longest word (so ``knn recall@1`` and
    ``knn recall@10`` never both read ``knn recall…``), and the result columns go into as
    many tables as needed, each repeating the row labels. Turned on its side when it has fewer
    rows than result columns (then each result column is a row)."""
    width = width or out.width
    names = [str(n) for n in table.index.names]
    keys = [tuple(map(str, k)) if isinstance(k, tuple) else (str(k),) for k in table.index]
    cells = [[str(v) for v in row] for row in table.to_numpy().tolist()]
    labels = [str(c) for c in table.columns]
    if len(keys) < len(labels):  # on its side: a column per table row
        names, keys, labels, cells = (
            [" / ".join(names)], [(label,) for label in labels],
            ["\n".join(key) for key in keys], [list(col) for col in zip(*cells, strict=True)])
    columns = [[name, *(k[i] for k in keys)] for i, name in enumerate(names)] + [
        [label, *(row[j] for row in cells)] for j, label in enumerate(labels)]
    least = [max(len(w) for text in col for w in text.split() or [""]) for col in columns]
    most = [max(len(line) for text in col for line in text.splitlines() or [""])
            for col in columns]
    n_keys = len(names)
    room = width - 1 - sum(w + 3 for w in least[:n_keys])  # a column takes 3 more: │ and padding
    chunks: list[list[int]] = [[]]
    for j in range(n_keys, len(columns)):
        if chunks[-1] and sum(least[i] + 3 for i in chunks[-1]) + least[j] + 3 > room:
            chunks.append([])
        chunks[-1].append(j)
    shown = []
    for n, chunk in enumerate(chunks, 1):
        picked = [*range(n_keys), *chunk]
        widths = _share(width - 1 - 3 * len(picked), [least[i] for i in picked],
                        [most[i] for i in picked])
        part = Table(title=title if len(chunks) == 1 else f"{title} [{n}/{len(chunks)}]")
        for i, w in zip(picked, widths, strict=True):
            part.add_column(columns[i][0], width=w, justify="left" if i < n_keys else "right")
        for key, row in zip(keys, cells, strict=True):
            part.add_row(*key, *(row[j - n_keys] for j in chunk))
        shown.append(part)
    return shown


def _share(room: int, least: list[int], most: list[int]) -> list[int]:
    """Column widths from ``least`` (the longest word) towards ``most`` (the longest line) that
    add up to at most ``room``: the spare room goes to the columns that need least first."""
    widths, spare = list(least), room - sum(least)
    order = sorted(range(len(least)), key=lambda i: most[i] - least[i])
    for n, i in enumerate(order):
        give = max(0, min(most[i] - least[i], spare // (len(order) - n)))
        widths[i] += give
        spare -= give
    return widths
