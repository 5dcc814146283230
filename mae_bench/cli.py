"""The ``mae-bench`` command line: parse, validate, call library functions, render with rich.

Bad input (an unknown name, a missing folder, an invalid value) prints one line starting with
``error:`` and exits with code 2; nothing is written. A run that fails while training (e.g. a
non-finite loss) prints one line and exits with code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mae_bench.config import RunConfig
from mae_bench.distributed import leave_process_group
from mae_bench.errors import MaeBenchError, RunInterrupted, TrainingError

try:  # recent typer releases vendor click; older ones use click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, UsageError

app = typer.Typer(
    name="mae-bench",
    help="Benchmark self-supervised ViT representations: pretrain MAE and contrastive / "
    "self-distillation baselines (SimCLR, MoCo v3, BYOL, DINO) on one shared ViT, evaluate, "
    "compare. Runs on a laptop CPU or GPUs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()
_D = RunConfig()  # defaults, shown in the help texts
TrustCheckpoint = Annotated[  # one option, shared by the commands that load checkpoints
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unpickling a checkpoint that is not plain tensors (only for files you trust: "
        "unpickling can run code).",
    ),
]


@app.command()
def pretrain(
    method: Annotated[
        str,
        typer.Option(help="mae | simclr | mocov3 | byol | dino (default mae)."),
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
        float,
        typer.Option(help="Pretraining epochs, may be fractional; schedules follow it "
                     f"(default {_D.train.epochs:g})."),
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
        float,
        typer.Option(help="Base lr; lr = blr x effective batch / 256 (default: the method's: "
                     "MAE, SimCLR, MoCo v3, BYOL 1.5e-4; DINO 5e-4)."),
    ] = None,
    lr: Annotated[float, typer.Option(help="Absolute lr; overrides --blr.")] = None,
    min_lr: Annotated[
        float, typer.Option(help=f"Floor of the cosine schedule (default {_D.train.min_lr}).")
    ] = None,
    weight_decay: Annotated[
        float,
        typer.Option(
            help="AdamW weight decay on weight matrices, not on biases, norms, tokens "
            "(default: the method's: MAE 0.05, SimCLR / MoCo v3 / BYOL 0.1, DINO 0.04)."
        ),
    ] = None,
    warmup_epochs: Annotated[
        float, typer.Option(help="Linear lr warmup length in epochs (default: 5 % of --epochs, "
                            "lengthened to --warmup-min-steps).")
    ] = None,
    warmup_min_steps: Annotated[
        int, typer.Option(help="Without --warmup-epochs: warm up for at least this many "
                          "optimizer steps, at most half the run (default: the method's: DINO "
                          "250, its teacher's EMA horizon; the others none).")
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
    temperature: Annotated[
        float, typer.Option(help="SimCLR / MoCo v3 softmax temperature (0.5 / 0.2).")
    ] = None,
    momentum: Annotated[
        float,
        typer.Option(help="MoCo v3 / BYOL / DINO: teacher EMA momentum at the start, rising to "
                     "1 (0.99 / 0.996 / 0.996, the papers' values)."),
    ] = None,
    proj_dim: Annotated[
        int, typer.Option(help="Projector output width (SimCLR 128, MoCo v3 / BYOL 256).")
    ] = None,
    out_dim: Annotated[
        int, typer.Option(help="DINO prototypes K (default 4096; the paper's 65536).")
    ] = None,
    local_crops: Annotated[
        int, typer.Option(help="DINO multi-crop: small crops per image (default 0: off).")
    ] = None,
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
    attention: Annotated[
        str, typer.Option(help="Attention kernel: auto (time fused and math on this device, "
                          "dtype and shape at start; keep the faster) | fused | math.")
    ] = None,
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
    results_dir: Annotated[
        Path,
        typer.Option(help="Results store: a run stopped by a non-finite loss is recorded in "
                     "DIR/results.jsonl as a failed row."),
    ] = Path("results"),
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
            "warmup_min_steps": warmup_min_steps,
            "seed": seed,
            "precision": precision,
            "device": device,
            "attention": attention,
            "deterministic": deterministic,
            "log_every": log_every,
            "save_every": save_every,
        },
        mae={
            "mask_ratio": mask_ratio,
            "mask_strategy": mask_strategy,
            "norm_pix_loss": norm_pix_loss,
        },
        ssl={"temperature": temperature, "momentum": momentum, "proj_dim": proj_dim,
             "out_dim": out_dim, "local_crops": local_crops},
    )
    run_dir = out_dir or Path("runs") / f"{cfg.train.method}-{cfg.data.dataset}-{cfg.model.arch}"
    try:
        result = run_pretrain(cfg, run_dir, max_steps=max_steps, progress=progress,
                              console=console)
    except TrainingError as err:
        if not _main_rank():
            raise
        from mae_bench.engine import failed_pretrain_row
        from mae_bench.methods import resolve_config
        from mae_bench.results import append_rows

        path = append_rows(results_dir, [failed_pretrain_row(resolve_config(cfg), run_dir, err)])
        raise TrainingError(f"{err} (recorded as a failed row in {path})", err.step) from None
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
    trust_checkpoint: TrustCheckpoint = False,
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
        trust=trust_checkpoint,
    )
    out.print(f"wrote {path}")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MaeBenchError(f"{option} takes comma-separated integers, got {text!r}") from None


@app.command(name="eval")
def eval_(
    protocol: Annotated[
        str,
        typer.Option(help="knn | linear | fewshot | finetune | partial-finetune."),
    ],
    checkpoint: Annotated[
        str,
        typer.Option(
            help="What to evaluate: a run folder or checkpoint file (mae-bench or an official "
            "MAE pretrain checkpoint), or a reference: 'pixels' (raw pixels as features) or "
            "'random' (a random encoder of --arch)."
        ),
    ] = None,
    features: Annotated[
        Path,
        typer.Option(
            help="Instead of --checkpoint: a folder of precomputed embeddings "
            "(train_features.npy, train_labels.npy, test_features.npy, test_labels.npy)."
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(help="Preset of the 'random' encoder; for a checkpoint, the expected one."),
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="Evaluation data set (default: the run's, else digits).")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where the data set lives.")] = None,
    pool: Annotated[
        str, typer.Option(help="Frozen features: cls (normed cls token) | mean (patch tokens).")
    ] = "cls",
    k: Annotated[
        str, typer.Option("--k", help="k-NN: neighbour counts, one search for all.")
    ] = "10,20,100,200",
    temperature: Annotated[
        float, typer.Option(help="k-NN: vote weight exp(sim / T) (DINO: 0.07).")
    ] = 0.07,
    probe: Annotated[
        str,
        typer.Option(
            help="linear / fewshot: fast (softmax regression on cached features, its weight "
            "decay chosen on a validation split of the training set) | mae (the MAE paper's "
            "protocol: BatchNorm + linear head, LARS, crops and flips through the frozen "
            "encoder; made for large batches: at small ones raise --blr)."
        ),
    ] = "fast",
    label_fraction: Annotated[
        float,
        typer.Option(help="Train on a stratified, seeded fraction of the labels (few-shot)."),
    ] = 1.0,
    blocks: Annotated[
        int, typer.Option(help="partial-finetune: train the last N blocks and the head.")
    ] = None,
    init: Annotated[
        str,
        typer.Option(help="finetune: pretrained | random (the same recipe from scratch)."),
    ] = "pretrained",
    epochs: Annotated[
        int,
        typer.Option(help="Training epochs: linear --probe mae 90, finetune 100 (the paper's)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Training batch size: linear --probe mae 256, finetune 128.")
    ] = None,
    blr: Annotated[
        float, typer.Option(help="Base lr (x batch / 256): probe mae 0.1, finetune 1e-3.")
    ] = None,
    lr: Annotated[float, typer.Option(help="finetune: absolute lr, overrides --blr.")] = None,
    weight_decay: Annotated[float, typer.Option(help="finetune: AdamW weight decay.")] = None,
    layer_decay: Annotated[
        float, typer.Option(help="finetune: layer-wise lr decay (MAE: 0.75).")
    ] = 0.75,
    drop_path: Annotated[float, typer.Option(help="finetune: stochastic depth.")] = 0.1,
    mixup: Annotated[float, typer.Option(help="finetune: mixup alpha (0 = off).")] = 0.8,
    cutmix: Annotated[float, typer.Option(help="finetune: cutmix alpha (0 = off).")] = 1.0,
    smoothing: Annotated[float, typer.Option(help="finetune: label smoothing.")] = 0.1,
    seed: Annotated[
        int, typer.Option(help="Seeds probes, subsets, and the 'random' encoder.")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: bf16 where it is fast).")
    ] = "auto",
    results_dir: Annotated[
        Path, typer.Option(help="Results store: rows are appended to DIR/results.jsonl.")
    ] = Path("results"),
    cache_dir: Annotated[
        Path,
        typer.Option(help="Feature cache (default $MAE_BENCH_CACHE or ~/.cache/mae-bench)."),
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse cached features.")
    ] = True,
    trust_checkpoint: TrustCheckpoint = False,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
    ] = True,
) -> None:
    """Evaluate an encoder (or precomputed features) with one protocol; print a table and append
    one row per number to the results store."""
    from evals.run import EvalSpec, run_eval

    spec = EvalSpec(
        protocol=protocol, checkpoint=checkpoint,
        features_dir=str(features) if features is not None else None, arch=arch,
        dataset=dataset, data_dir=str(data_dir) if data_dir is not None else None, pool=pool,
        ks=_int_list(k, "--k"), temperature=temperature, probe=probe,
        label_fraction=label_fraction, blocks=blocks, init=init, epochs=epochs,
        batch_size=batch_size, blr=blr, lr=lr, weight_decay=weight_decay,
        layer_decay=layer_decay, drop_path=drop_path, mixup=mixup, cutmix=cutmix,
        label_smoothing=smoothing, seed=seed, device=device, precision=precision,
        cache_dir=str(cache_dir) if cache_dir is not None else None, use_cache=cache,
        trust_checkpoint=trust_checkpoint, results_dir=str(results_dir),
    )
    with _task_progress(progress and _main_rank()) as report:
        outcome = run_eval(spec, report)
    if not _main_rank():  # rank 0 holds the numbers and reports them
        return
    for note in outcome.notes:
        console.print(note, highlight=False)
    out.print(_rows_table(outcome.rows))
    out.print(f"{len(outcome.rows)} rows appended to {outcome.results_file} "
              f"({outcome.seconds:.1f} s)")


def _task_progress(enabled: bool):
    """A context giving a (what, done, total) callback that drives one rich bar per task. The
    bars start with the first report, so an error before any work prints only its line."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    @contextmanager
    def bars():
        if not enabled or not console.is_terminal:
            yield None
            return
        bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=console, transient=True)
        tasks: dict[str, int] = {}

        def report(what: str, done: int, total: int) -> None:
            if not tasks:
                bar.start()
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        try:
            yield report
        finally:
            if tasks:
                bar.stop()

    return bars()


def _rows_table(rows: list[dict]) -> Table:
    first = rows[0]
    title = (f"{first['protocol']}: {first['method']} {first['arch']} "
             f"({first['checkpoint']}) on {first['dataset']}")
    table = Table(title=title)
    knobs = [k for k in ("k", "temperature", "pool", "probe", "label_fraction", "init", "blocks",
                         "epochs", "map_r_cap") if any(k in r for r in rows)]
    for col in ("metric", *knobs, "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        table.add_row(r["metric"], *(str(r.get(k, "")) for k in knobs), f"{r['value']:.2f}")
    return table


@app.command()
def compare(
    methods: Annotated[
        str, typer.Option(help="Methods to pretrain, comma-separated (registry names).")
    ] = "mae,simclr,mocov3,byol,dino",
    protocols: Annotated[
        str, typer.Option(help="Evaluations, comma-separated: knn, linear, fewshot, finetune.")
    ] = "knn,linear",
    dataset: Annotated[str, typer.Option(help="Data set for pretraining and evaluation.")] = (
        "digits"),
    data_dir: Annotated[Path, typer.Option(help="Where the data set lives.")] = None,
    arch: Annotated[
        str,
        typer.Option(help="The one ViT preset every method trains (vit_mini_patch4 or "
                     "vit_tiny_patch4 for 32-px images)."),
    ] = "vit_mini_patch2",
    img_size: Annotated[int, typer.Option(help="Training image size (default: the data's).")] = (
        None),
    epochs: Annotated[
        float, typer.Option(help="Same number of epochs for every method (may be fractional).")
    ] = None,
    budget_minutes: Annotated[
        float,
        typer.Option(help="Same wall-clock training time for every method: each one's epochs are "
                     "set from its throughput, measured first. Default when --epochs is not "
                     "given: 20 s."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Pretraining batch size (default 128).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds pretraining, probes and references.")] = 0,
    k: Annotated[int, typer.Option("--k", help="The k of the table's k-NN column.")] = 20,
    label_fraction: Annotated[
        float, typer.Option(help="fewshot: fraction of the labels used.")
    ] = 0.1,
    pool: Annotated[str, typer.Option(help="Frozen features: cls | mean.")] = "cls",
    references: Annotated[
        bool,
        typer.Option("--references/--no-references",
                     help="Add the pixels and random-encoder rows (the floor to beat)."),
    ] = True,
    config: Annotated[
        Path,
        typer.Option(help="YAML with more pretraining settings for every method (ssl knobs, "
                     "mae knobs, blr, ...); the options above win."),
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the run folders go.")] = Path(
        "runs/compare"),
    results_dir: Annotated[
        Path, typer.Option(help="Results store: rows are appended to DIR/results.jsonl.")
    ] = Path("results"),
    export: Annotated[
        list[Path],
        typer.Option(help="Also write the table to FILE (.md, .csv or .tex; repeatable)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32.")] = "auto",
    num_workers: Annotated[int, typer.Option(help="Loader workers for streamed data.")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress bars.")
    ] = True,
) -> None:
    """Pretrain MAE and the baselines on one ViT, evaluate each the same way, and print one
    table: rows = methods plus the pixels / random references, columns = top-1 per protocol
    and the cost (pretraining seconds, epochs, GFLOPs per image per step, images/s). Finished
    runs and evaluations already in the store are reused. With no options: every method for
    20 s on digits (a few minutes on a laptop CPU)."""
    import yaml

    from evals.compare import CompareSpec, run_compare
    from mae_bench.results import export_table

    for path in export or []:
        if path.suffix not in (".md", ".csv", ".tex"):
            raise MaeBenchError(f"--export {path}: unknown table format {path.suffix!r}; "
                                "valid: .md, .csv, .tex")
    overrides = {}
    if config is not None:
        RunConfig.from_yaml(config)  # unknown keys and bad YAML fail here, with one line
        overrides = yaml.safe_load(config.read_text()) or {}
    spec = CompareSpec(
        methods=_names(methods), protocols=_names(protocols), dataset=dataset,
        data_dir=str(data_dir) if data_dir is not None else None, arch=arch, img_size=img_size,
        epochs=epochs, budget_seconds=budget_minutes * 60 if budget_minutes is not None else None,
        batch_size=batch_size, seed=seed, references=references, k=k,
        label_fraction=label_fraction, pool=pool, device=device, precision=precision,
        num_workers=num_workers, runs_dir=str(runs_dir), results_dir=str(results_dir),
        cache_dir=str(cache_dir) if cache_dir is not None else None, overrides=overrides,
    )

    def log(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    with _task_progress(progress) as report:
        outcome = run_compare(spec, log=log, progress=progress, console=console,
                              eval_progress=report)
    table = Table(title=f"compare on {dataset}, {arch} "
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
    if outcome.failed:  # recorded as failed rows; the other methods' numbers stand
        raise TrainingError(f"{len(outcome.failed)} pretraining(s) stopped: "
                            + "; ".join(outcome.failed))


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.2f}"
    return str(value)


@app.command()
def results(
    results_dir: Annotated[
        Path, typer.Option(help="The results store (DIR/results.jsonl).")
    ] = Path("results"),
    rows: Annotated[
        str, typer.Option(help="Columns that make the table's rows, comma-separated.")
    ] = "method,arch,pool",
    columns: Annotated[
        str, typer.Option(help="Columns that make the table's columns, comma-separated.")
    ] = "protocol,metric,k",
    where: Annotated[
        list[str],
        typer.Option(
            help="Keep rows where COLUMN=VALUE (repeatable), e.g. --where protocol=knn "
            "--where k=20."
        ),
    ] = None,
    export: Annotated[
        list[Path],
        typer.Option(help="Also write the table to FILE (.md, .csv or .tex; repeatable)."),
    ] = None,
    decimals: Annotated[int, typer.Option(help="Decimals in the cells.")] = 2,
) -> None:
    """Show the results store as a pivot table: mean ± std (n) over seeds per cell; export it
    to Markdown, CSV or LaTeX."""
    from mae_bench.results import export_table, pivot_table, read_results

    for path in export or []:
        if path.suffix not in (".md", ".csv", ".tex"):
            raise MaeBenchError(f"--export {path}: unknown table format {path.suffix!r}; "
                                "valid: .md, .csv, .tex")
    df = read_results(results_dir)
    for cond in where or []:
        name, sep, value = cond.partition("=")
        if not sep or name not in df.columns:
            raise MaeBenchError(f"--where {cond!r}: expected COLUMN=VALUE with a column of the "
                                f"store ({', '.join(map(str, df.columns))})")
        df = df[df[name].astype(str) == value]
    if df.empty:
        out.print(f"no results in {results_dir}" + (" match --where" if where else ""))
        return
    table = pivot_table(df, rows=_names(rows), columns=_names(columns), decimals=decimals)
    out.print(_pivot_for_terminal(table, f"{results_dir} ({len(df)} rows; mean ± std (n) over "
                                         "seeds)"))
    for path in export or []:
        out.print(f"wrote {export_table(table, path, decimals=decimals)}")


def _pivot_for_terminal(table, title: str) -> Table:
    """A rich table of a pivot table; turned on its side when its columns would not fit the
    terminal (then each result column is a row and each table row a column)."""
    names = [str(n) for n in table.index.names]
    keys = [k if isinstance(k, tuple) else (k,) for k in table.index]
    cells = [[str(v) for v in row] for row in table.to_numpy().tolist()]
    width = sum(max(len(str(c)), *(len(r[i]) for r in cells)) + 3
                for i, c in enumerate(table.columns)) + sum(len(n) + 8 for n in names)
    shown = Table(title=title)
    if width <= out.width or len(keys) > len(table.columns):
        for name in names:
            shown.add_column(name)
        for col in table.columns:
            shown.add_column(str(col), justify="right")
        for key, row in zip(keys, cells, strict=True):
            shown.add_row(*map(str, key), *row)
        return shown
    shown.add_column(" / ".join(names))
    for key in keys:
        shown.add_column("\n".join(map(str, key)), justify="right")
    for i, col in enumerate(table.columns):
        shown.add_row(str(col), *(row[i] for row in cells))
    return shown


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# `sweep`, `report` and `speed` live in their own modules; importing them registers them.
from mae_bench import cli_speed, cli_sweep  # noqa: E402, F401


def _main_rank() -> bool:
    """Not a torchrun worker of rank > 0 (those print errors only: rank 0 reports)."""
    return int(os.environ.get("RANK", "0")) == 0


def main() -> None:
    """Console-script entry point: user errors exit 2 with one line, training failures 1."""
    out.quiet = not _main_rank()  # results and summaries: once per torchrun job, from rank 0
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
    except RunInterrupted as exc:  # SIGTERM / SIGINT: checkpoint saved at a step boundary
        console.print(Text.assemble(("stopped: ", "bold red"), str(exc)), soft_wrap=True)
        sys.exit(128 + exc.signum)  # 143 for SIGTERM, 130 for SIGINT, as the shell reports
    except (KeyboardInterrupt, typer.Abort):
        console.print("interrupted")
        sys.exit(130)
    finally:
        leave_process_group()  # a torchrun job's processes end their group cleanly
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # run the imported module's main: cli_sweep registers on that app
    from mae_bench.cli import main as _main

    _main()
