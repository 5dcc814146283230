"""``mae-bench visualize``: a PNG grid of MAE reconstructions (the paper's Fig. 2), or of a masked
sibling's masks (and SimMIM's reconstructions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mae_bench.cli.common import TrustCheckpoint, out


def visualize(
    checkpoint: Annotated[Path, typer.Option(help="A run folder or checkpoint file.")],
    out_path: Annotated[
        Path, typer.Option("--out", help="PNG to write (default: RUN/reconstructions.png).")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Rows in the grid.")] = 8,
    split: Annotated[str, typer.Option(help="Data split to draw images from.")] = "test",
    mask_ratio: Annotated[float, typer.Option(
        help="Default: the run's mask ratio (MAE, SimMIM, iBOT, data2vec 2.0).")] = None,
    seed: Annotated[int, typer.Option(help="Picks images and masks.")] = 0,
    data_dir: Annotated[Path, typer.Option(help="Override the run's data folder.")] = None,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Write a PNG grid: original, masked input, reconstruction, and reconstruction with the
    visible patches pasted back (MAE paper, Fig. 2). For a SimMIM, I-JEPA, iBOT or data2vec 2.0
    run: the original, what its encoder sees and what its loss predicts under the mask a
    training step draws (RUN/masks.png), plus SimMIM's reconstructions."""
    from mae_bench.app.visualize import reconstruction_grid

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
