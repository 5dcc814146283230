"""``mae-bench pretrain``: one option per config field (generated, see ``config_options``), the
run's folder and stopping options, and a one-line summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mae_bench.cli.common import console, out
from mae_bench.cli.config_options import SetOption, config_from_options, with_config_options
from mae_bench.config import RunConfig
from mae_bench.errors import MaeBenchError
from mae_bench.files import CONFIG_FILE


@with_config_options
def pretrain(
    config: Annotated[
        Path,
        typer.Option(help="YAML config (a run's config.yaml works); the options and --set "
                     "given here override it."),
    ] = None,
    sets: SetOption = None,
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Run folder (default: runs/METHOD-DATASET-ARCH). A folder "
                     "that already holds a checkpoint is resumed."),
    ] = None,
    resume: Annotated[
        Path,
        typer.Option(help="Resume this run folder with its saved config (--epochs may be "
                     "raised)."),
    ] = None,
    max_steps: Annotated[
        int,
        typer.Option(help="Stop after this many optimizer steps in total, saving a checkpoint "
                     "(resumable)."),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")
    ] = True,
    results_dir: Annotated[
        Path,
        typer.Option(help="Results store: a run stopped by a non-finite loss is recorded in "
                     "DIR/results.jsonl as a failed row."),
    ] = Path("results"),
    **knobs: Any,
) -> None:
    """Pretrain a method (MAE by default) and write a run folder: config.yaml, metrics.jsonl,
    checkpoint.pt, summary.json. With no options: MAE on the embedded digits data set.

    Every config field is an option (grouped below, the everyday ones first; each panel names
    the YAML sections of its fields) and can be set with --set SECTION.KEY=VALUE or in a
    --config YAML file; later sources win: defaults, --config, the options."""
    from mae_bench.app.pretraining import pretrain_run

    if resume is not None:
        if config is not None or out_dir is not None:
            raise MaeBenchError(
                "--resume takes the run's own config and folder; drop --config / --out"
            )
        if not (resume / CONFIG_FILE).is_file():
            raise MaeBenchError(f"--resume {resume}: no run folder with a {CONFIG_FILE} there")
        config, out_dir = resume / CONFIG_FILE, resume
    base = RunConfig.from_yaml(config) if config is not None else RunConfig()
    cfg = config_from_options(base, knobs, sets)
    run_dir = out_dir or Path("runs") / f"{cfg.train.method}-{cfg.data.dataset}-{cfg.model.arch}"
    # a run stopped by a non-finite loss is recorded in the store as a failed row, then raised
    result = pretrain_run(cfg, run_dir, results_dir=results_dir, max_steps=max_steps,
                          progress=progress, console=console)
    state = (
        "finished"
        if result.finished
        else f"stopped at step {result.step}/{result.total_steps} (resume with --resume {run_dir})"
    )
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    ips = f", {result.images_per_second:.0f} img/s" if result.images_per_second else ""
    out.print(
        f"{cfg.train.method} on {cfg.data.dataset}: {state}; final loss {loss}; "
        f"{result.train_seconds:.1f} s training{ips} on {result.device} "
        f"({result.precision}); run folder {run_dir}"
    )
