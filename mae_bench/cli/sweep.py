"""``mae-bench sweep``: pretrain and evaluate every value x seed of one knob (the MAE paper's
ablations), resumably."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import Progress, console, log_between_bars, names, out, task_progress
from mae_bench.cli.config_options import SetOption, field_option, overrides
from mae_bench.errors import ConfigError

# The config fields sweep sets from its own options: a --set of one of them is refused.
OWN_OPTIONS = {
    "train.method": "--method", "data.dataset": "--dataset", "data.data_dir": "--data-dir",
    "model.arch": "--arch", "model.img_size": "--img-size", "train.epochs": "--epochs",
    "train.batch_size": "--batch-size", "train.seed": "--seeds", "train.device": "--device",
    "train.precision": "--precision", "data.num_workers": "--num-workers",
}


def sweep(
    knob: Annotated[
        str,
        typer.Argument(help="What to vary: mask-ratio, decoder-depth, decoder-dim, "
                       "mask-strategy, norm-pix-loss, encoder-mask-tokens, epochs or method.",
                       show_default=False),
    ],
    values: Annotated[
        str,
        typer.Option(help="Values, comma-separated (default: the MAE paper's grid, e.g. "
                     "mask-ratio 0.1,0.25,0.5,0.75,0.9; epochs needs them)."),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Pretraining seeds, comma-separated: each value runs once per "
                          "seed, so tables give mean ± std and a 95 % interval.")
    ] = "0",
    protocols: Annotated[
        str, typer.Option(help="Evaluations, comma-separated: knn, linear, fewshot, finetune, "
                          "partial-finetune.")
    ] = "knn,linear",
    method: Annotated[
        str, typer.Option(help="The method every point pretrains (MAE knobs need mae).")
    ] = "mae",
    dataset: Annotated[str, typer.Option(help="Data set for pretraining and evaluation.")] = (
        "digits"),
    data_dir: Annotated[Path, field_option("data.data_dir")] = None,
    arch: Annotated[
        str, typer.Option(help="ViT preset (vit_tiny_patch4 / vit_mini_patch4 for 32-px images).")
    ] = "vit_mini_patch2",
    img_size: Annotated[int, field_option("model.img_size")] = None,
    epochs: Annotated[
        float, typer.Option(help="Pretraining epochs of every point (may be fractional).")
    ] = 5.0,
    batch_size: Annotated[int, field_option("train.batch_size", default_in_help=True)] = None,
    k: Annotated[int, typer.Option("--k", help="The k shown in the summary (all k are kept).")
                 ] = 20,
    label_fraction: Annotated[
        float, typer.Option(help="fewshot: fraction of the labels used.")
    ] = 0.1,
    pool: Annotated[str, typer.Option(help="Frozen features: cls | mean.")] = "cls",
    config: Annotated[
        Path,
        typer.Option(help="YAML with more pretraining settings for every point; --set, the "
                     "options above and the swept knob win."),
    ] = None,
    sets: SetOption = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the run folders go.")] = Path(
        "runs/sweeps"),
    results_dir: Annotated[
        Path, typer.Option(help="Results store: rows are appended to DIR/results.jsonl, the "
                           "points to DIR/sweeps.jsonl.")
    ] = Path("results"),
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run points recorded as failed again.")
    ] = False,
    references: Annotated[
        bool,
        typer.Option("--references/--no-references",
                     help="Also evaluate a random encoder of the same architecture (once per "
                     "seed) and raw pixels (once) with the same protocols: the floor the "
                     "values must beat, shown in the table and the report."),
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the points and what is already done; run "
                           "nothing, write nothing.")
    ] = False,
    device: Annotated[str, field_option("train.device")] = "auto",
    precision: Annotated[str, field_option("train.precision")] = "auto",
    num_workers: Annotated[int, field_option("data.num_workers", default_in_help=True)] = None,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = None,
    progress: Progress = True,
) -> None:
    """Pretrain and evaluate every value x seed of one knob (the MAE paper's ablations).

    Resumable: re-running skips points whose rows are in the store (never duplicating rows) and
    resumes a half-trained run; a point that fails is recorded as failed and the sweep goes on.
    Then `mae-bench report` draws the tables and figures."""
    from mae_bench.app.sweep import SweepSpec, plan_points, point_states, run_sweep, sweep_summary
    from mae_bench.app.sweep_knobs import SWEEP_KNOBS

    own = dict(OWN_OPTIONS)
    if knob in SWEEP_KNOBS:  # an unknown knob is refused, with the valid ones, by the spec
        swept = SWEEP_KNOBS[knob]
        own[f"{swept.section}.{swept.key}"] = f"the swept knob {knob} (--values)"
    spec = SweepSpec(
        knob=knob, values=names(values) if values is not None else (),
        seeds=_ints(seeds, "--seeds"), protocols=names(protocols), method=method,
        dataset=dataset, data_dir=str(data_dir) if data_dir is not None else None, arch=arch,
        img_size=img_size, epochs=epochs, batch_size=batch_size, k=k,
        label_fraction=label_fraction, pool=pool, device=device, precision=precision,
        num_workers=num_workers, runs_dir=str(runs_dir), results_dir=str(results_dir),
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        retry_failed=retry_failed, references=references, overrides=overrides(config, sets, own),
        command=shlex.join(["mae-bench", *sys.argv[1:]]),
    )
    if dry_run:
        states = point_states(spec, plan_points(spec))
        table = Table(title=f"sweep {knob}: {len(states)} points (dry run: nothing runs)")
        for col in ("value", "seed", "status", "protocols with rows", "run folder"):
            table.add_column(col)
        for s in states:
            table.add_row(str(s.point.value), str(s.point.seed), s.status,
                          ", ".join(s.done) or "-", s.point.run_dir.name)
        out.print(table)
        if states:
            out.print(f"run folders in {states[0].point.run_dir.parent}")
        todo = sum(not s.complete or (retry_failed and bool(s.failed)) for s in states)
        out.print(f"{len(states) - todo} done, {todo} to run")
        return

    with task_progress(progress) as report:
        outcome = run_sweep(spec, log=log_between_bars(report), progress=progress,
                            console=console, eval_progress=report)
    summary = sweep_summary(spec, [s.point for s in outcome.states])
    if not summary.empty:
        shown = Table(title=f"sweep {knob} on {dataset}, {arch}: top-1 mean ± std (n seeds)")
        shown.add_column(knob)
        for col in summary.columns:
            shown.add_column(str(col), justify="right")
        for value, row in summary.iterrows():
            shown.add_row(str(value), *(str(v) if isinstance(v, str) else "" for v in row))
        out.print(shown)
    out.print(f"sweep {knob}: ran {len(outcome.ran)} point(s), {len(outcome.failed)} failed, "
              f"{len(outcome.states) - len(outcome.ran)} already done; {outcome.seconds:.0f} s; "
              f"rows in {results_dir / 'results.jsonl'}")
    for line in outcome.failed:
        out.print(f"  failed: {line}")
    out.print(f"next: mae-bench report --results-dir {results_dir}")


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in names(text))
    except ValueError:
        raise ConfigError(f"{option} takes whole numbers, comma-separated; got '{text}'") from None
