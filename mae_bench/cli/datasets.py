"""``mae-bench datasets``: every supported data set, where it is looked for, and whether it
can be used from there; ``mae-bench datasets NAME``: one data set in full."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import out


def datasets(
    name: Annotated[
        str,
        typer.Argument(help="Show this data set in full: its layout, how to get it, its "
                       "normalisation and the published recipes that use it.",
                       show_default=False),
    ] = None,
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

    if name is not None:
        _show_one(name, data_dir)
        return
    table = Table(title="mae-bench data sets")
    for col in ("name", "found", "where / detail", "size", "ch", "classes", "formats"):
        table.add_column(col, overflow="fold")
    for key in DATASETS:
        where = data_dir if data_dir is not None else default_data_dir(key)
        check = check_dataset(key, where)
        info = check.info
        table.add_row(
            key,
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
        "--data-dir DIR, or set MAE_BENCH_DATA=DIR to look in DIR/<name>. "
        "'mae-bench datasets NAME' shows one data set in full: how to get it, its "
        "normalisation, the recipes that use it."
    )


def _show_one(name: str, data_dir: Path | None) -> None:
    """One data set as a two-column sheet: what the registry knows, whether it is usable at
    ``data_dir`` (or its default folder), then its notes (``topic: text`` each)."""
    from rich.markup import escape

    from mae_bench.data import check_dataset, default_data_dir, get_dataset_info

    info = get_dataset_info(name)  # an unknown name: DataError listing the valid ones
    check = check_dataset(name, data_dir if data_dir is not None else default_data_dir(name))
    loaded = check.info  # an image folder's own size, channels and statistics once loaded
    sheet = Table.grid(padding=(0, 2))
    sheet.add_column(style="bold", no_wrap=True)
    sheet.add_column(overflow="fold")
    rows = [
        ("found", ("[green]yes[/]: " if check.usable else "[red]no[/]: ") + escape(check.detail)),
        ("classes", str(loaded.num_classes or "taken from the folder")),
        ("image size", f"{loaded.img_size} px, {loaded.channels} channel(s)"),
        ("mean, std", f"{_numbers(loaded.mean)}, {_numbers(loaded.std)}"),
        ("splits", ", ".join(info.splits)),
        ("formats", info.formats),
        ("get it", info.how_to_get),
        *(tuple(note.split(": ", 1)) for note in info.notes),
    ]
    for topic, text in rows:
        sheet.add_row(topic, text if topic == "found" else escape(text))
    out.print(f"[bold]{info.name}[/]: {escape(info.description)}", highlight=False)
    out.print(sheet, highlight=False)


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
