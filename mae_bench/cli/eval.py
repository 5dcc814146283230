"""``mae-bench eval``: one protocol on an encoder (or precomputed features); a table, and one
result row per number."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mae_bench.cli.common import (
    Progress,
    TrustCheckpoint,
    close_progress,
    console,
    main_rank,
    out,
    task_progress,
)
from mae_bench.errors import MaeBenchError


def eval_(
    protocol: Annotated[
        str,
        typer.Option(help="knn | linear | fewshot | finetune | partial-finetune."),
    ],
    checkpoint: Annotated[
        str,
        typer.Option(
            help="What to evaluate: a run folder or checkpoint file (mae-bench or an official "
            "MAE pretrain checkpoint), a reference: 'pixels' (raw pixels as features) or "
            "'random' (a random encoder of --arch), or an outside model on frozen features: "
            "timm:NAME (or a folder from mae-bench export --to timm), hf:ID_OR_DIR "
            "(transformers; pip install 'mae-bench[hf]'), hub:OWNER/REPO:ENTRY (torch.hub), "
            "python:MODULE:CALLABLE (returns an nn.Module). Outside models are resized, "
            "channel-matched and normalised as they declare."
        ),
    ] = None,
    weights: Annotated[
        Path,
        typer.Option(help="timm: / hub: / python: models: load this state dict (.safetensors, "
                     ".pth, .bin; or one under a 'model' / 'state_dict' key); every key must "
                     "fit."),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option("--pretrained", help="timm: models: timm's own pretrained weights (needs "
                     "a network or timm's cache; without it the model is randomly initialised, "
                     "seeded by --seed)."),
    ] = False,
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
        str, typer.Option(help="Frozen features: cls (normed cls token) | mean (patch tokens) | "
                          "model (an outside model's own pooled output). Default: cls for "
                          "mae-bench encoders, model for outside ones that have it.")
    ] = None,
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
    recipe: Annotated[
        str,
        typer.Option(
            help="Trained protocols (finetune, partial-finetune, linear --probe mae): paper (the "
            "official MAE recipe exactly: made for ImageNet, batches of 1,024 / 16,384) | auto "
            "(the paper's where data and schedule are ImageNet-like; on small images or data "
            "sets: no Mixup / CutMix / RandAugment / random erasing, crops from 35 % (none up "
            "to 28 px), a BatchNorm before the head, a batch that leaves >= 40 steps per epoch "
            "with the lr carried by the square-root rule, no layer decay from random init; "
            "short runs warm up for 10 % of their epochs; the probe: SGD instead of "
            "LARS, whose trust ratio barely moves the head at "
            "small batches). The chosen recipe is printed and recorded in every row; the "
            "options below override single knobs."),
    ] = "auto",
    epochs: Annotated[
        int,
        typer.Option(help="Training epochs (default: the recipe's: the paper's probe 90, "
                     "fine-tuning 100 for ViT-B and smaller, 50 for ViT-L / H)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Training batch size (default: the recipe's).")
    ] = None,
    blr: Annotated[
        float, typer.Option(help="Base lr, x batch / 256 (default: the recipe's).")
    ] = None,
    lr: Annotated[float, typer.Option(help="finetune: absolute lr, overrides --blr.")] = None,
    weight_decay: Annotated[
        float, typer.Option(help="finetune: AdamW weight decay (default: the recipe's, 0.05).")
    ] = None,
    layer_decay: Annotated[
        float, typer.Option(help="finetune: layer-wise lr decay (default: the recipe's).")
    ] = None,
    drop_path: Annotated[
        float, typer.Option(help="finetune: stochastic depth (default: the recipe's).")
    ] = None,
    mixup: Annotated[
        float, typer.Option(help="finetune: Mixup alpha, 0 = off (default: the recipe's).")
    ] = None,
    cutmix: Annotated[
        float, typer.Option(help="finetune: CutMix alpha, 0 = off (default: the recipe's).")
    ] = None,
    img_size: Annotated[
        int, typer.Option(help="Input size in pixels of the random reference (default: the "
                               "data's own, e.g. an image folder's detected size) or of an "
                               "outside model (default: its own; a timm ViT's position "
                               "embedding is resampled); images are resized to it.")
    ] = None,
    head_bn: Annotated[
        bool, typer.Option("--head-bn/--no-head-bn",
                           help="finetune: a BatchNorm without affine parameters before the head, "
                                "as MAE's linear probe (default: the recipe's).")
    ] = None,
    crop_min: Annotated[
        float, typer.Option(help="finetune: random-resized crops from this share of the image "
                                 "area to all of it; 1 = no crops (default: the recipe's).")
    ] = None,
    smoothing: Annotated[
        float, typer.Option(help="finetune: label smoothing (default: the recipe's, 0.1).")
    ] = None,
    erase: Annotated[
        float, typer.Option(help="finetune: random erasing probability: a rectangle of 2-33 % "
                                 "of the image filled with noise, after normalisation (the "
                                 "paper's recipe: 0.25; default: the recipe's).")
    ] = None,
    rand_augment: Annotated[
        str, typer.Option(help="finetune: RandAugment policy in timm's form, per image after "
                               "the crop and flip (the paper's recipe: rand-m9-mstd0.5-inc1: 2 "
                               "of 15 ops, magnitude 9 +- 0.5, each at p 0.5), or none "
                               "(default: the recipe's; the auto recipe has none on small "
                               "images or data).")
    ] = None,
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
    force: Annotated[
        bool, typer.Option("--force", help="Run an evaluation that is already in the results "
                           "store again (same encoder, data, options, seed and precision; "
                           "otherwise it is skipped); its new rows replace the old ones.")
    ] = False,
    trust_checkpoint: TrustCheckpoint = False,
    trust_repo: Annotated[
        bool, typer.Option("--trust-repo", help="hub: models: run the code of a GitHub "
                           "repository that torch.hub does not trust yet (torch then adds it to "
                           "its trusted list). hub: and python: sources run their code.")
    ] = False,
    progress: Progress = True,
) -> None:
    """Evaluate an encoder (or precomputed features) with one protocol; print a table and append
    one row per number to the results store."""
    from mae_bench.app.evaluation import EvalOutcome, EvalSpec, run_eval

    spec = EvalSpec(
        protocol=protocol, checkpoint=checkpoint,
        features_dir=str(features) if features is not None else None,
        weights=str(weights) if weights is not None else None, pretrained=pretrained, arch=arch,
        dataset=dataset, data_dir=str(data_dir) if data_dir is not None else None, pool=pool,
        ks=_int_list(k, "--k"), temperature=temperature, probe=probe,
        label_fraction=label_fraction, blocks=blocks, init=init, recipe=recipe, epochs=epochs,
        batch_size=batch_size, blr=blr, lr=lr, weight_decay=weight_decay,
        layer_decay=layer_decay, drop_path=drop_path, mixup=mixup, cutmix=cutmix,
        label_smoothing=smoothing, crop_min=crop_min, img_size=img_size, head_bn=head_bn,
        erase=erase, rand_augment=rand_augment, seed=seed,
        device=device, precision=precision,
        cache_dir=str(cache_dir) if cache_dir is not None else None, use_cache=cache,
        trust_checkpoint=trust_checkpoint, trust_repo=trust_repo, results_dir=str(results_dir),
        command=shlex.join(["mae-bench", *sys.argv[1:]]),
        force=force,
    )

    def show(outcome: EvalOutcome) -> None:  # before the rows are written: never lost
        close_progress(report)  # erased first: a live bar would be redrawn into the table
        for note in outcome.notes:
            console.print(note, highlight=False)
        out.print(_rows_table(outcome.rows))

    with task_progress(progress and main_rank()) as report:
        outcome = run_eval(spec, report, show=show)
    if not main_rank():  # rank 0 holds the numbers and reports them
        return
    if outcome.skipped:
        out.print(outcome.skipped, highlight=False, soft_wrap=True)  # one line
        return
    out.print(f"{len(outcome.rows)} rows appended to {outcome.results_file} "
              f"({outcome.seconds:.1f} s)")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MaeBenchError(f"{option} takes comma-separated integers, got {text!r}") from None


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
