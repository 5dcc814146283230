"""``mae-bench reproduce``: run a published table's recipe and print the measured number beside
the published one (``mae_bench.app.reproduce``; the tables are ``configs/reference/*.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import Progress, log_between_bars, names, out, task_progress
from mae_bench.errors import ConfigError, TrainingError


def reproduce(
    table: Annotated[
        str, typer.Argument(help="A reference table (see --list), or a path to a table's YAML.",
                            show_default=False)
    ] = None,
    method: Annotated[
        str, typer.Option(help="Only these rows of the table (registry names, comma-separated; "
                          "default: every row).")
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Pretrain for fewer epochs than published (may be "
                            "fractional): a first look, labelled 'shortened' in every row; "
                            "warm-up and other settings in epochs shrink with it.")
    ] = None,
    eval_every: Annotated[
        float, typer.Option(help="Best-epoch tables: epochs between evaluations (default: the "
                            "table's; lightly evaluates after every epoch). A longer period is "
                            "faster and may miss the best epoch.")
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Where the table's data set lives (default: its usual "
                           "folder, else the table's local copy, e.g. CIFAR-10 as JPEG q75, "
                           "named in every row).")
    ] = None,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Run folders go to DIR/TABLE/.")
    ] = Path("runs/reproduce"),
    results_dir: Annotated[
        Path, typer.Option(help="Results store: the rows are appended to DIR/results.jsonl.")
    ] = Path("results"),
    seed: Annotated[int, typer.Option(help="Seeds pretraining and evaluation.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: bf16 where it is fast).")
    ] = "auto",
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = None,
    list_tables: Annotated[
        bool, typer.Option("--list", help="List the reference tables and their rows, then exit.")
    ] = False,
    progress: Progress = True,
) -> None:
    """Reproduce a published table: pretrain each row's recipe as its source states it
    (solo-learn's CIFAR ResNet-18 recipes, lightly's CIFAR-10 benchmark), evaluate with the
    source's protocol (lightly: k-NN, k = 200, T = 0.1, best epoch; solo-learn: a linear
    classifier on the final encoder), append the rows to the results store and print measured
    beside published with the table's tolerance. On a GPU at full length this is the
    reproduction; shorter (--epochs) or on a CPU it is a first look. Each table's source
    (repository, file, commit) and what mae-bench cannot express of its recipe are in its YAML
    and in docs/reproduce.md."""
    from mae_bench.app.reproduce import ReproduceSpec, run_reproduce

    if list_tables:
        _print_list()
        return
    if table is None:
        raise ConfigError("give a reference TABLE (mae-bench reproduce --list shows them)")
    spec = ReproduceSpec(
        table=table, methods=names(method) if method else (), epochs=epochs,
        eval_every=eval_every, data_dir=str(data_dir) if data_dir is not None else None,
        out=str(out_dir), results_dir=str(results_dir), seed=seed, device=device,
        precision=precision, cache_dir=str(cache_dir) if cache_dir is not None else None)
    with task_progress(progress) as report:
        outcome = run_reproduce(spec, log=log_between_bars(report), progress=progress,
                                eval_progress=report)
    ref = outcome.table
    grid = Table(title=f"{ref.title} ({ref.source['repository']}@{ref.source['commit'][:8]})")
    for column in ("method", "published", "measured", "delta", f"±{ref.tolerance:.1f}",
                   "epochs", "selected", "data"):
        grid.add_column(column, justify="left" if column in ("method", "selected", "data")
                        else "right")
    for row in outcome.rows:
        grid.add_row(row.method, f"{row.published:.2f}", _number(row.measured),
                     _number(row.delta, sign=True), _within(row), _epochs(row), row.selection,
                     row.data)
    out.print(grid)
    out.print(f"protocol as published: {ref.as_published}", highlight=False)
    out.print(f"tolerance ±{ref.tolerance:.1f} points (the ±{ref.tolerance:.1f} column: "
              f"|delta| within it): {ref.tolerance_why}", highlight=False)
    if any(r.shortened for r in outcome.rows):
        out.print("shortened: a first look at the recipe, not a reproduction of the number "
                  "(no tolerance check: n/a)", highlight=False)
    if not outcome.device.startswith("cuda"):
        out.print(f"on {outcome.device}: a first look; the reproduction runs on a GPU",
                  highlight=False)
    for note in outcome.notes:
        out.print(note, highlight=False)
    out.print(f"rows in {outcome.results_file}; run folders in {out_dir / ref.name}",
              highlight=False)
    failed = [r for r in outcome.rows if r.error is not None]
    if failed:
        raise TrainingError(f"{len(failed)} pretraining(s) stopped: "
                            + "; ".join(f"{r.method}: {r.error}" for r in failed))


def _number(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _within(row) -> str:
    if row.within is None:
        return "n/a" if row.shortened and row.measured is not None else "-"
    return "yes" if row.within else "no"


def _epochs(row) -> str:
    text = f"{row.epochs_run:g} of {row.epochs_published:g}"
    return text + (", shortened" if row.shortened else "")


def _print_list() -> None:
    """``--list``: every reference table, its source, protocol, length and rows."""
    from mae_bench.app.reproduce import load_table, table_names
    from mae_bench.methods.registry import METHODS

    grid = Table(title="reference tables (configs/reference/)")
    for column in ("table", "source", "data", "protocol", "epochs", "rows: method published"):
        grid.add_column(column)
    for name in table_names():
        ref = load_table(name)
        options = ", ".join(f"k={v[0]}" if k == "ks" else f"{k}={v}"
                            for k, v in ref.options.items())
        rows = ", ".join(f"{r.method}{'' if r.method in METHODS else ' (not registered)'} "
                         f"{r.published:g}" for r in ref.rows)
        grid.add_row(name, f"{ref.source['repository']}@{ref.source['commit'][:8]}",
                     ref.data_label or ref.dataset,
                     f"{ref.protocol} ({options}), {ref.selection}",
                     f"{ref.epochs:g}, batch {ref.settings.get('train.batch_size', '-')}", rows)
    out.print(grid)
