"""``mae-bench speed``: every method's training and the evaluation protocols, timed side by side
in one run; with ``--data-only``, the streamed data path alone against torchvision's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import log_line, names, out
from mae_bench.errors import ConfigError

DATA_PANEL = "Data path alone (--data-only)"
# options that only one of the two modes reads: naming one in the other mode is an error
TRAINING_ONLY = ("methods", "arch", "precisions", "mask_ratio", "steps", "train_images",
                 "eval_images", "knn_train", "knn_test", "probe", "results_dir")
DATA_ONLY = ("dataset", "data_dir", "baseline_dir", "workers", "images", "pipeline")


def speed(
    ctx: typer.Context,
    methods: Annotated[
        str, typer.Option(help="Methods to time, comma-separated. With mae, also MAE with mask "
                          "tokens in the encoder and MAE on the other attention path.")
    ] = "mae,simclr,mocov3,byol,dino",
    arch: Annotated[str, typer.Option(help="ViT preset.")] = "vit_tiny_patch4",
    img_size: Annotated[int, typer.Option(
        help="Image side (default: the preset's; --data-only: 224).")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Batch size (default 128; --data-only: 64).")] = None,
    precisions: Annotated[
        str, typer.Option(help="Comma-separated: the first for every method, the others for "
                          "MAE only (e.g. fp32,bf16 for the bf16 speedup). auto: bf16 where the "
                          "hardware runs it fast, else fp32.")
    ] = "auto",
    device: Annotated[str, typer.Option(
        help="auto | cpu | cuda (--data-only: where the batches are finished).")] = "auto",
    mask_ratio: Annotated[float, typer.Option(
        help="Mask ratio of every timed method that has one (default: each method's own: MAE "
        "0.75, SimMIM 0.6, data2vec 2.0 0.8, iBOT 0.3).")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per configuration and round.")] = 3,
    warmup: Annotated[int, typer.Option(
        help="Untimed steps before them, each round (--data-only: batches per worker).")] = 1,
    rounds: Annotated[
        int, typer.Option(help="Round-robin rounds: every configuration runs once per round, "
                          "so a busy spell of a shared machine hits all of them.")
    ] = 2,
    train_images: Annotated[
        int, typer.Option(help="Random uint8 images held in memory for training.")
    ] = 2048,
    eval_images: Annotated[
        int, typer.Option(help="Images timed through feature extraction (0: skip).")
    ] = 1024,
    knn_train: Annotated[
        int, typer.Option(help="k-NN benchmark: training features (0: skip k-NN and probe).")
    ] = 50_000,
    knn_test: Annotated[int, typer.Option(help="k-NN benchmark: test features.")] = 10_000,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Time the fast linear probe too.")
    ] = True,
    results_dir: Annotated[
        Path, typer.Option(help="Results store: rows (protocol 'speed') are appended to "
                           "DIR/results.jsonl.")
    ] = Path("results"),
    markdown: Annotated[
        Path, typer.Option(help="Also write the table, ratios, command, machine and date here "
                           "as Markdown.")
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Print a line as each part starts.")
    ] = True,
    data_only: Annotated[bool, typer.Option(
        "--data-only", rich_help_panel=DATA_PANEL,
        help="Time the streamed data path alone (decode, crop, resize; per loading core) "
        "against torchvision's ImageFolder + RandomResizedCrop; writes no rows.")] = False,
    dataset: Annotated[str, typer.Option(
        rich_help_panel=DATA_PANEL, help="A streamed data set.")] = "imagefolder",
    data_dir: Annotated[Path, typer.Option(
        rich_help_panel=DATA_PANEL, help="Its folder (default for imagefolder: ImageNet-sized "
        "JPEGs generated once in the cache, $MAE_BENCH_CACHE).")] = None,
    baseline_dir: Annotated[Path, typer.Option(
        rich_help_panel=DATA_PANEL, help="Image folder (DIR/train/<class>/) for torchvision's "
        "path (default: --data-dir when it is one).")] = None,
    workers: Annotated[str, typer.Option(
        rich_help_panel=DATA_PANEL,
        help="DataLoader workers; a comma list times each (0: in-process).")] = "1",
    images: Annotated[int, typer.Option(
        rich_help_panel=DATA_PANEL, help="Images timed per round and path.")] = 512,
    pipeline: Annotated[str, typer.Option(
        rich_help_panel=DATA_PANEL, help="mae-bench's split of the work: device-resize (auto) "
        "| device-decode | workers | dali (see pretrain --pipeline).")] = "auto",
) -> None:
    """Time every method's training and the evaluation protocols, side by side in one run.

    Per configuration: training images/s, GFLOPs per image per step (torch's FLOP counter),
    achieved TFLOP/s, MFU against a matmul peak measured in the same run, peak memory, and how
    fast the data path alone delivers batches. Ratios: MAE against MAE with mask tokens in the
    encoder (beside their FLOP ratio), each extra precision against the first, the two attention
    paths. Evaluation: feature-extraction images/s, FAISS k-NN against a torch brute force on
    the same features (time and agreement), the fast probe's time.

    --data-only: the streamed data path alone, mae-bench's against torchvision's, per worker
    count: images/s, loading CPU per image and images/s per loading core, the device-side time
    per image, cores per 1,000 images/s, peak memory, and the ratios."""
    given = [n for n in ctx.params if getattr(ctx.get_parameter_source(n), "name", "DEFAULT")
             not in ("DEFAULT", "DEFAULT_MAP")]
    wrong = [n for n in given if n in (TRAINING_ONLY if data_only else DATA_ONLY)]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise ConfigError(f"{flag} does not apply to --data-only (it times the data path alone)"
                          if data_only else f"{flag} is an option of --data-only; add it")
    if data_only:
        _data_only(dataset, data_dir, baseline_dir, img_size, workers, batch_size, images, warmup,
                   rounds, device, markdown, progress, pipeline)
        return
    from mae_bench.app.speed_run import SpeedSpec, run_speed, validate_spec
    from mae_bench.results import append_rows, check_writable

    batch_size = 128 if batch_size is None else batch_size
    spec = SpeedSpec(
        methods=names(methods), arch=arch, img_size=img_size, batch_size=batch_size,
        precisions=names(precisions) or ("auto",), device=device, mask_ratio=mask_ratio,
        steps=steps, warmup=warmup, rounds=rounds, train_images=train_images,
        eval_images=eval_images, knn_train=knn_train, knn_test=knn_test, probe=probe,
        command=shlex.join(["mae-bench", *sys.argv[1:]]),
    )
    validate_spec(spec)
    check_writable(results_dir)

    outcome = run_speed(spec, log=log_line if progress else lambda _: None)
    table = Table(title=f"training speed: {arch}, batch {batch_size} ({outcome.machine})")
    for col in ("configuration", "precision", "attention", "img/s", "spread", "GFLOP/img",
                "TFLOP/s", "MFU %", "peak MiB", "loader x train"):
        table.add_column(col, justify="left" if col in ("configuration", "precision",
                                                         "attention") else "right")
    for name, s in outcome.train.items():
        mfu = s.mfu(outcome.peaks[s.precision])
        table.add_row(
            name, s.precision, s.attention, f"{s.images_per_second:.1f}",
            f"{s.spread:.2f}" if s.spread is not None else "-", f"{s.gflops_per_image:.3f}",
            f"{s.tflops:.4f}", f"{mfu:.1f}",
            f"{s.peak_memory_mb:.0f}" if s.peak_memory_mb is not None else "-",
            f"{s.loader_ratio:.1f}" if s.loader_ratio is not None else "-")
    out.print(table)
    for line in outcome.markdown.splitlines():
        if line.startswith(("- ", "**warning")):
            out.print(line.replace("**", ""), highlight=False)
    path = append_rows(results_dir, outcome.rows)
    out.print(f"{len(outcome.rows)} rows appended to {path}")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(outcome.markdown)
        out.print(f"wrote {markdown}")


def _data_only(dataset: str, data_dir: Path | None, baseline_dir: Path | None,
               img_size: int | None, workers: str, batch_size: int | None, images: int,
               warmup: int, rounds: int, device: str, markdown: Path | None,
               progress: bool, pipeline: str = "auto") -> None:
    """``speed --data-only``: measure, print the table and the ratio lines, write Markdown."""
    from mae_bench.app.speed_data import (
        TABLE_COLUMNS,
        DataSpeedSpec,
        busy_warning,
        ratio_lines,
        run_data_speed,
        table_rows,
    )

    try:
        counts = tuple(int(w) for w in names(workers))
    except ValueError:
        raise ConfigError(f"--workers takes whole numbers, comma-separated (e.g. 1,2), got "
                          f"{workers!r}") from None
    spec = DataSpeedSpec(
        dataset=dataset, data_dir=data_dir, baseline_dir=baseline_dir,
        img_size=224 if img_size is None else img_size, workers=counts,
        batch_size=64 if batch_size is None else batch_size, images=images, warmup=warmup,
        rounds=rounds, device=device, pipeline=pipeline,
        command=shlex.join(["mae-bench", *sys.argv[1:]]))
    outcome = run_data_speed(spec, log=log_line if progress else lambda _: None)
    table = Table(title=f"data path at {spec.img_size} px, batch {spec.batch_size} "
                        f"({outcome.machine})")
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col == "path" else "right", overflow="fold")
    for row in table_rows(outcome):
        table.add_row(*row)
    out.print(table)
    made = outcome.generated
    lines = [f"data: {made.train_images} JPEGs of ImageNet sizes generated from scikit-learn's "
             f"sample photos in {made.root} (no --data-dir given)" if made else None,
             busy_warning(outcome), *[x for r in outcome.results for x in ratio_lines(r)],
             outcome.baseline_note]
    for line in filter(None, lines):  # one line each, never wrapped: scripts read "N.NNx" ends
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(outcome.markdown)
        out.print(f"wrote {markdown}")
