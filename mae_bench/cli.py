"""The ``mae-bench`` command line: parse, validate, call library functions, render with rich.

Bad input (an unknown name, a missing folder, an invalid value) prints one line starting with
``error:`` and exits with code 2; nothing is written. A run that fails while training (e.g. a
non-finite loss) prints one line and exits with code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mae_bench.config import RunConfig
from mae_bench.errors import MaeBenchError, TrainingError

try:  # recent typer releases vendor click; older ones use click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError

app = typer.Typer(
    name="mae-bench",
    help="Benchmark self-supervised ViT representations: pretrain MAE (and, later, contrastive "
    "baselines) on one shared ViT, evaluate, compare. Runs on a laptop CPU or GPUs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()
_D = RunConfig()  # defaults, shown in the help texts


@app.command()
def pretrain(
    method: Annotated[
        str, typer.Option(help=f"Pretraining method (registry name; default {_D.train.method}).")
    ] = None,
    dataset: Annotated[
        str,
        typer.Option(help="Data set name; see `mae-bench datasets`. Default: digits (embedded)."),
    ] = None,
    data_dir: Annotated[
        Path,
        typer.Option(
            help="Where the data set lives (default: the location `mae-bench datasets` shows)."
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="ViT preset, e.g. vit_tiny_patch4 for 32-px images, "
            f"vit_base_patch16 for 224 px (default {_D.model.arch})."
        ),
    ] = None,
    img_size: Annotated[
        int,
        typer.Option(
            help="Training image size (default: the data set's; "
            "must be a multiple of the patch size)."
        ),
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(help=f"Pretraining epochs; schedules follow it (default {_D.train.epochs})."),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(help=f"Images per micro-batch and process (default {_D.train.batch_size})."),
    ] = None,
    accum_iter: Annotated[
        int,
        typer.Option(
            help="Micro-batches per optimizer step; the "
            "effective batch is batch x accum x processes."
        ),
    ] = None,
    blr: Annotated[
        float, typer.Option(help="Base lr; lr = blr x effective batch / 256 (MAE: 1.5e-4).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Absolute lr; overrides --blr.")] = None,
    min_lr: Annotated[
        float, typer.Option(help=f"Floor of the cosine schedule (default {_D.train.min_lr}).")
    ] = None,
    weight_decay: Annotated[
        float,
        typer.Option(
            help="AdamW weight decay on weight matrices, not on "
            f"biases, norms, tokens (default {_D.train.weight_decay})."
        ),
    ] = None,
    warmup_epochs: Annotated[
        float, typer.Option(help="Linear lr warmup length in epochs (default: 5 % of --epochs).")
    ] = None,
    mask_ratio: Annotated[
        float,
        typer.Option(
            help="Fraction of patches removed (MAE: 0.75); must leave a visible and a masked patch."
        ),
    ] = None,
    mask_strategy: Annotated[
        str, typer.Option(help="random | block | grid (paper Table 1f).")
    ] = None,
    norm_pix_loss: Annotated[
        bool,
        typer.Option(
            "--norm-pix-loss/--no-norm-pix-loss",
            help="Normalise each target patch by its own mean and variance (paper default).",
        ),
    ] = None,
    decoder_depth: Annotated[int, typer.Option(help="Override the preset's decoder depth.")] = None,
    decoder_dim: Annotated[int, typer.Option(help="Override the preset's decoder width.")] = None,
    decoder_heads: Annotated[int, typer.Option(help="Override the decoder's head count.")] = None,
    seed: Annotated[
        int, typer.Option(help=f"Seeds data order, crops and masks (default {_D.train.seed}).")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto | bf16 | fp16 | fp32. auto: bf16 where "
            "the hardware runs it fast (GPU, AMX/AVX512-BF16 "
            "CPUs), else fp32."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = None,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic/--no-deterministic",
            help="Deterministic kernels (bit-exact resume on CPU).",
        ),
    ] = None,
    num_workers: Annotated[int, typer.Option(help="Loader workers for streamed data sets.")] = None,
    log_every: Annotated[int, typer.Option(help="Optimizer steps per metrics line.")] = None,
    save_every: Annotated[int, typer.Option(help="Epochs between checkpoints.")] = None,
    config: Annotated[
        Path,
        typer.Option(
            help="YAML config (a run's config.yaml works); options given here override it."
        ),
    ] = None,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Run folder (default: "
            "runs/METHOD-DATASET-ARCH). A folder that already "
            "holds a checkpoint is resumed.",
        ),
    ] = None,
    resume: Annotated[
        Path,
        typer.Option(help="Resume this run folder with its saved config (--epochs may be raised)."),
    ] = None,
    max_steps: Annotated[
        int,
        typer.Option(
            help="Stop after this many optimizer steps in total, saving a checkpoint (resumable)."
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")
    ] = True,
) -> None:
    """Pretrain a method (MAE by default) and write a run folder: config.yaml, metrics.jsonl,
    checkpoint.pt, summary.json. With no options: MAE on the embedded digits data set."""
    from mae_bench.engine import pretrain as run_pretrain

    if resume is not None:
        if config is not None or out_dir is not None:
            raise MaeBenchError(
                "--resume takes the run's own config and folder; drop --config / --out"
            )
        if not (resume / "config.yaml").is_file():
            raise MaeBenchError(f"--resume {resume}: no run folder with a config.yaml there")
        config, out_dir = resume / "config.yaml", resume
    base = RunConfig.from_yaml(config) if config is not None else RunConfig()
    cfg = base.replace(
        model={
            "arch": arch,
            "img_size": img_size,
            "decoder_depth": decoder_depth,
            "decoder_embed_dim": decoder_dim,
            "decoder_num_heads": decoder_heads,
        },
        data={
            "dataset": dataset,
            "data_dir": str(data_dir) if data_dir else None,
            "num_workers": num_workers,
        },
        train={
            "method": method,
            "epochs": epochs,
            "batch_size": batch_size,
            "accum_iter": accum_iter,
            "blr": blr,
            "lr": lr,
            "min_lr": min_lr,
            "weight_decay": weight_decay,
            "warmup_epochs": warmup_epochs,
            "seed": seed,
            "precision": precision,
            "device": device,
            "deterministic": deterministic,
            "log_every": log_every,
            "save_every": save_every,
        },
        mae={
            "mask_ratio": mask_ratio,
            "mask_strategy": mask_strategy,
            "norm_pix_loss": norm_pix_loss,
        },
    )
    run_dir = out_dir or Path("runs") / f"{cfg.train.method}-{cfg.data.dataset}-{cfg.model.arch}"
    result = run_pretrain(cfg, run_dir, max_steps=max_steps, progress=progress, console=console)
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


@app.command()
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


@app.command()
def visualize(
    checkpoint: Annotated[Path, typer.Option(help="A run folder or checkpoint file.")],
    out_path: Annotated[
        Path, typer.Option("--out", help="PNG to write (default: RUN/reconstructions.png).")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Rows in the grid.")] = 8,
    split: Annotated[str, typer.Option(help="Data split to draw images from.")] = "test",
    mask_ratio: Annotated[float, typer.Option(help="Default: the run's mask ratio.")] = None,
    seed: Annotated[int, typer.Option(help="Picks images and masks.")] = 0,
    data_dir: Annotated[Path, typer.Option(help="Override the run's data folder.")] = None,
) -> None:
    """Write a PNG grid: original, masked input, reconstruction, and reconstruction with the
    visible patches pasted back (MAE paper, Fig. 2)."""
    from mae_bench.visualize import reconstruction_grid

    path = reconstruction_grid(
        checkpoint,
        out_path,
        num_images=num_images,
        split=split,
        mask_ratio=mask_ratio,
        seed=seed,
        data_dir=data_dir,
    )
    out.print(f"wrote {path}")


def main() -> None:
    """Console-script entry point: user errors exit 2 with one line, training failures 1."""
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:  # a mistyped option or value, found by the parser
        if not exc.format_message().strip():  # bare `mae-bench`: the help was shown
            sys.exit(0)
        name = exc.ctx.command_path if exc.ctx is not None else "mae-bench"
        console.print(
            Text.assemble(("error: ", "bold red"), exc.format_message(), f" (see '{name} --help')"),
            soft_wrap=True,
        )
        sys.exit(2)
    except ClickException as exc:
        console.print(Text.assemble(("error: ", "bold red"), exc.format_message()), soft_wrap=True)
        sys.exit(exc.exit_code)
    except MaeBenchError as exc:
        console.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(2)
    except TrainingError as exc:
        console.print(Text.assemble(("training stopped: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
