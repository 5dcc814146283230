"""``mae-bench compare``: pretrain MAE and the baselines (on one backbone, or each on its own),
evaluate each the same way, print one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import (
    Export,
    Progress,
    check_exports,
    console,
    log_between_bars,
    names,
    out,
    task_progress,
)
from mae_bench.cli.config_options import SetOption, field_option, overrides
from mae_bench.errors import TrainingError

# The config fields compare sets from its own options: a --set of one of them is refused.
OWN_OPTIONS = {
    "train.method": "--methods", "data.dataset": "--dataset", "data.data_dir": "--data-dir",
    "model.arch": "--arch", "model.img_size": "--img-size",
    "train.epochs": "--epochs / --budget-minutes", "train.batch_size": "--batch-size",
    "train.seed": "--seed", "train.device": "--device", "train.precision": "--precision",
    "data.num_workers": "--num-workers",
}


def compare(
    methods: Annotated[
        str, typer.Option(help="Methods to pretrain, comma-separated (registry names); "
                          "METHOD@ARCH trains one on its own backbone, e.g. "
                          "mae@vit_mini_patch4,simclr@resnet18.")
    ] = "mae,simclr,mocov3,byol,dino",
    protocols: Annotated[
        str, typer.Option(help="Evaluations, comma-separated: knn, linear, fewshot, finetune.")
    ] = "knn,linear",
    dataset: Annotated[str, typer.Option(help="Data set for pretraining and evaluation.")] = (
        "digits"),
    data_dir: Annotated[Path, field_option("data.data_dir")] = None,
    arch: Annotated[
        str,
        typer.Option(help="The backbone every method trains unless its entry names its own: "
                     "a ViT preset (vit_mini_patch4 or vit_tiny_patch4 for 32-px images), "
                     "resnet18 | resnet34 | resnet50 (not for mae), or timm:NAME."),
    ] = "vit_mini_patch2",
    img_size: Annotated[int, field_option("model.img_size")] = None,
    epochs: Annotated[
        float, typer.Option(help="Same number of epochs for every method (may be fractional).")
    ] = None,
    budget_minutes: Annotated[
        float,
        typer.Option(help="Same wall-clock training time for every method: each one's epochs are "
                     "set from its throughput, measured first. Default when --epochs is not "
                     "given: 20 s."),
    ] = None,
    batch_size: Annotated[int, field_option("train.batch_size", default_in_help=True)] = None,
    seed: Annotated[int, typer.Option(help="Seeds pretraining, probes and references.")] = 0,
    k: Annotated[int, typer.Option("--k", help="The k of the table's k-NN column.")] = 20,
    label_fraction: Annotated[
        float, typer.Option(help="fewshot: fraction of the labels used.")
    ] = 0.1,
    finetune_epochs: Annotated[
        int, typer.Option(help="finetune: epochs of every fine-tune (a first look; the paper "
                          "fine-tunes ViT-B for 100). The random row is the same recipe from "
                          "scratch: the baseline pretraining must beat.")
    ] = 20,
    recipe: Annotated[
        str, typer.Option(help="finetune: auto (default: the paper's recipe adapted to small "
                          "images and data, see `mae-bench eval --help`) | paper.")
    ] = "auto",
    pool: Annotated[str, typer.Option(help="Frozen features: cls | mean (default: each "
                                      "encoder's own: a ViT's cls token, a CNN's average "
                                      "pool).")] = None,
    references: Annotated[
        bool,
        typer.Option("--references/--no-references",
                     help="Add the pixels and random-encoder rows (the floor to beat)."),
    ] = True,
    config: Annotated[
        Path,
        typer.Option(help="YAML with more pretraining settings for every method (ssl knobs, "
                     "mae knobs, blr, ...); --set and the options above win."),
    ] = None,
    sets: SetOption = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the run folders go.")] = Path(
        "runs/compare"),
    results_dir: Annotated[
        Path, typer.Option(help="Results store: rows are appended to DIR/results.jsonl.")
    ] = Path("results"),
    export: Export = None,
    device: Annotated[str, field_option("train.device")] = "auto",
    precision: Annotated[str, field_option("train.precision")] = "auto",
    num_workers: Annotated[int, field_option("data.num_workers", default_in_help=True)] = None,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = None,
    progress: Progress = True,
) -> None:
    """Pretrain MAE and the baselines on one backbone (or each on its own, METHOD@ARCH),
    evaluate each the same way, and print one table: rows = methods plus the pixels / random
    references, columns = top-1 per protocol and the cost (pretraining seconds, epochs, GFLOPs
    per image per step, images/s). Finished runs and evaluations already in the store are
    reused. With no options: every method for 20 s on digits (a few minutes on a laptop
    CPU)."""
    from mae_bench.app.compare import CompareSpec, run_compare
    from mae_bench.results import export_table

    check_exports(export)
    spec = CompareSpec(
        methods=names(methods), protocols=names(protocols), dataset=dataset,
        data_dir=str(data_dir) if data_dir is not None else None, arch=arch, img_size=img_size,
        epochs=epochs, budget_seconds=budget_minutes * 60 if budget_minutes is not None else None,
        batch_size=batch_size, seed=seed, references=references, k=k,
        label_fraction=label_fraction, finetune_epochs=finetune_epochs, recipe=recipe,
        pool=pool, device=device, precision=precision,
        num_workers=num_workers, runs_dir=str(runs_dir), results_dir=str(results_dir),
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        overrides=overrides(config, sets, OWN_OPTIONS),
    )
    with task_progress(progress) as report:
        outcome = run_compare(spec, log=log_between_bars(report), progress=progress,
                              console=console, eval_progress=report)
    backbones = ", ".join(dict.fromkeys(n.partition("@")[2] or arch for n in names(methods)))
    table = Table(title=f"compare on {dataset}, {backbones} "
                  f"({'same epochs' if epochs is not None else 'same training time'})")
    table.add_column("method")
    for col in outcome.table.columns:
        table.add_column(str(col), justify="right")
    for name, row in outcome.table.iterrows():
        table.add_row(str(name), *(_cell(v) for v in row))
    out.print(table)
    out.print(f"trained {len(outcome.trained)} run(s), ran {len(outcome.evaluated)} "
              f"evaluation(s), reused the rest; {outcome.seconds:.0f} s; rows in "
              f"{results_dir / 'results.jsonl'}")
    for path in export or []:
        out.print(f"wrote {export_table(outcome.table, path)}")
    if outcome.online_figure is not None:
        out.print(f"wrote {outcome.online_figure} (online k-NN and linear top-1 while "
                  "pretraining)")
    if outcome.failed:  # recorded as failed rows; the other methods' numbers stand
        raise TrainingError(f"{len(outcome.failed)} pretraining(s) stopped: "
                            + "; ".join(outcome.failed))


def _cell(value) -> str:
    """One value of compare's table: two decimals, '-' where nothing was measured. (Not
    ``mae_bench.results.format_cell``: that one formats aggregated mean / std / n cells.)"""
    if isinstance(value, float):
        return "-" if value != value else f"{value:.2f}"
    return str(value)
