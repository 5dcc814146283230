"""``mae-bench shard``: write an image folder as WebDataset-style tar shards, the layout the
``shards`` data set streams."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mae_bench.cli.common import Progress, close_progress, out, task_progress
from mae_bench.errors import DataError, MaeBenchError

SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}


def shard(
    data_dir: Annotated[Path, typer.Argument(
        help="An image-folder data dir: train/ and test/ (or val/), each a folder (or an "
        "uncompressed .tar) of class folders.", show_default=False)],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Folder to write SPLIT-000000.tar ... and classes.txt into (created).",
        show_default=False)],
    split: Annotated[str, typer.Option(
        help="Which split to write: train, test or all (those found).")] = "all",
    samples_per_shard: Annotated[int, typer.Option(
        help="Samples per shard, at most (a shard also stops near 256 MiB). Many shards, "
        "several per rank, let the reader permute them each epoch.")] = 5000,
    seed: Annotated[int, typer.Option(
        help="Seeds the shuffle before sharding, so that each shard mixes the classes (a "
        "reader's small shuffle buffer would otherwise see one class at a time).")] = 0,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace shards (and a different classes.txt) already in --out.")
    ] = False,
    progress: Progress = True,
) -> None:
    """Write an image folder as tar shards: per sample KEY.jpg (the original bytes, not
    re-encoded) and KEY.cls (its label), shuffled with --seed, plus classes.txt. Read them with
    --dataset shards --data-dir SHARDS (or SHARDS/train-{000000..000009}.tar).
    """
    from mae_bench.data.image_splits import _find_image_splits
    from mae_bench.data.shard_writer import (
        DEFAULT_MAX_BYTES,
        check_destination,
        class_folders,
        write_shards,
    )

    if split not in SPLITS:
        raise MaeBenchError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if samples_per_shard < 1:
        raise MaeBenchError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder; pass an image-folder data dir holding "
                        "train/ and test/ (or val/) class folders")
    found = _find_image_splits(data_dir)
    wanted = [s for s in SPLITS[split] if s in found or split != "all"]
    missing = [s for s in wanted if s not in found]
    if missing or not wanted:
        raise DataError(f"{data_dir} has no {' or '.join(missing or ['train', 'test'])} split; "
                        "expected train/ and test/ (or val/) class folders")
    indexes = {s: class_folders(found[s]) for s in wanted}
    # Labels are positions in one class list, the train split's when there is one, so that the
    # test shards' labels mean what the train shards' do.
    first = indexes["train"] if "train" in indexes else class_folders(found.get("train",
                                                                                 found["test"]))
    classes = sorted(set(first.class_names))
    for s, index in indexes.items():  # every split is checked before any is written
        check_destination(index, out_dir, s, classes, overwrite)
    with task_progress(progress) as report:
        written = {s: write_shards(index, out_dir, s, classes=classes,
                                   max_samples_per_shard=samples_per_shard,
                                   max_bytes=DEFAULT_MAX_BYTES, seed=seed, overwrite=overwrite,
                                   report=report) for s, index in indexes.items()}
        close_progress(report)
    for s, shards in written.items():
        out.print(f"{s}: {len(shards)} shard(s), {shards[0].name} .. {shards[-1].name} in "
                  f"{out_dir}", highlight=False, soft_wrap=True)
    out.print(f"read them with --dataset shards --data-dir {out_dir}", highlight=False,
              soft_wrap=True)  # a path stays on one line, to be copied
