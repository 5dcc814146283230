"""``mae-bench speed``: every method's training and the evaluation protocols, timed side by side
in one run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import log_line, names, out


def speed(
    methods: Annotated[
        str, typer.Option(help="Methods to time, comma-separated. With mae, also MAE with mask "
                          "tokens in the encoder and MAE on the other attention path.")
    ] = "mae,simclr,mocov3,byol,dino",
    arch: Annotated[str, typer.Option(help="ViT preset.")] = "vit_tiny_patch4",
    img_size: Annotated[int, typer.Option(help="Image side (default: the preset's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 128,
    precisions: Annotated[
        str, typer.Option(help="Comma-separated: the first for every method, the others for "
                          "MAE only (e.g. fp32,bf16 for the bf16 speedup). auto: bf16 where the "
                          "hardware runs it fast, else fp32.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    mask_ratio: Annotated[float, typer.Option(
        help="Mask ratio of every timed method that has one (default: each method's own: MAE "
        "0.75, SimMIM 0.6, data2vec 2.0 0.8, iBOT 0.3).")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per configuration and round.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed steps before them, each round.")] = 1,
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
) -> None:
    """Time every method's training and the evaluation protocols, side by side in one run.

    Per configuration: training images/s, GFLOPs per image per step (torch's FLOP counter),
    achieved TFLOP/s, MFU against a matmul peak measured in the same run, peak memory, and how
    fast the data path alone delivers batches. Ratios: MAE against MAE with mask tokens in the
    encoder (beside their FLOP ratio), each extra precision against the first, the two attention
    paths. Evaluation: feature-extraction images/s, FAISS k-NN against a torch brute force on
    the same features (time and agreement), the fast probe's time."""
    from mae_bench.app.speed_run import SpeedSpec, run_speed, validate_spec
    from mae_bench.results import append_rows, check_writable

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
