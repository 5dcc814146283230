"""``mae-bench datasets``: every supported data set, where it is looked for, and whether it
is there."""

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
    """List every supported data set, where it is looked for, and whether it is there."""
    from mae_bench.data import DATASETS, dataset_status, default_data_dir

    table = Table(title="mae-bench data sets")
    for col in ("name", "found", "where / detail", "size", "ch", "classes", "formats"):
        table.add_column(col, overflow="fold")
    for name, info in DATASETS.items():
        where = data_dir if data_dir is not None else default_data_dir(name)
        found, detail = dataset_status(name, where)
        if found and info.num_classes is None:  # a folder of the user's: show what is in it
            info = _as_found(name, where, info)
        table.add_row(
            name,
            "[green]yes[/]" if found else "[red]no[/]",
            detail,
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


def _as_found(name: str, where: Path, info):
    """The description of a user's folder as loading it finds it (size, channels, classes);
    the registry's defaults (224 px, RGB, classes "?") when it cannot be read."""
    from mae_bench.data import load_dataset
    from mae_bench.errors import MaeBenchError

    try:
        return load_dataset(name, "train", where).info
    except (MaeBenchError, OSError):
        return info
