"""``mae-bench report``: a Markdown + HTML report of a results store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mae_bench.cli.common import console, out


def report(
    results_dir: Annotated[
        Path, typer.Option(help="The results store (DIR/results.jsonl, DIR/sweeps.jsonl).")
    ] = Path("results"),
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for report.md, report.html and the figures.")
    ] = Path("report"),
    grids: Annotated[
        bool, typer.Option("--grids/--no-grids",
                           help="Draw reconstruction grids from the sweeps' MAE checkpoints.")
    ] = True,
    title: Annotated[str, typer.Option(help="The report's title.")] = "mae-bench report",
) -> None:
    """Write a Markdown + HTML report of a results store: tables (mean ± std, n, 95 %
    interval, best marked), accuracy vs. each swept knob, accuracy vs. cost, loss curves,
    reconstruction grids, and the commands and versions that made them."""
    from mae_bench.app.report import build_report

    outcome = build_report(results_dir, out_dir, grids=grids, title=title)
    for note in outcome.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    out.print(f"wrote {outcome.markdown}, {outcome.html} and {len(outcome.figures)} figure(s)")
