"""``mae-bench datasets``: every supported data set, where it is looked for, and whether it
can be used from there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import out


def datasets(
    data_dir: Annotated[
        Path,
        typer.Option(
            help="Check this folder instead of the default location (applies to every data set)."
        ),
    ] = None,
) -> None:
    """List every supported data set, where it is looked for, and whether it is usable there.

    A found data set's train split is loaded (image folders are decoded once, then cached), so a
    folder with the right layout but the wrong content says no, with the reason.
    """
    from mae_bench.data import DATASETS, check_dataset, default_data_dir

    table = Table(title="mae-bench data sets")
    for col in ("name", "found", "where / detail", "size", "ch", "classes", "formats"):
        table.add_column(col, overflow="fold")
    for name in DATASETS:
        where = data_dir if data_dir is not None else default_data_dir(name)
        check = check_dataset(name, where)
        info = check.info
        table.add_row(
            name,
            "[green]yes[/]" if check.usable else "[red]no[/]",
            check.detail,
            str(info.img_size),
            str(info.channels),
            str(info.num_classes or "?"),
            info.formats,
        )
    out.print(table)
    out.print(
        "Missing data: the detail column says where to get it. Point to it with "
        "--data-dir DIR, or set MAE_BENCH_DATA=DIR to look in DIR/<name>."
    )
