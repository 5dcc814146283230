"""``mae-bench export``: a run's encoder as a timm or Hugging Face model folder, or (a ResNet or
timm backbone) a plain torch state dict with its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mae_bench.cli.common import TrustCheckpoint, out


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A run folder or checkpoint file (any method), or an official "
                                  "MAE pretrain checkpoint.", show_default=False)
    ],
    to: Annotated[
        str, typer.Option(help="timm (model.safetensors + timm's config.json: "
                               "timm.create_model('local-dir:DIR', pretrained=True); a ViT, a "
                               "timm backbone, a ResNet with the ImageNet stem) | hf "
                               "(a transformers ViTModel / ViTMAEModel folder: "
                               "from_pretrained(DIR); ViTs) | torch (model.pt, a plain state "
                               "dict, and load.py, which builds it with torchvision or timm "
                               "alone; ResNets, CIFAR stem included, and timm backbones).")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="A new (or empty) folder to write.")
    ],
    pool: Annotated[
        str, typer.Option(help="The embedding the timm model returns: cls (normed cls token, "
                               "as eval's default) | mean (mean of the normed patch tokens). "
                               "hf: the README names the tokens to take. A ResNet or timm "
                               "backbone returns its own pooling (a CNN: mean, the average "
                               "pool).", show_default="cls for a ViT")
    ] = None,
    hf_class: Annotated[
        str, typer.Option(help="--to hf: vit (ViTModel) | vit_mae (ViTMAEModel, mask ratio 0; "
                               "it still shuffles patches unless given ordered noise).")
    ] = "vit",
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Write the encoder of a run as model.safetensors plus the config timm or transformers
    needs (or a ResNet's state dict and the loader that builds it), and a README with the lines
    that load it. The exported model is loaded back and its features compared with mae-bench's
    before the folder is put in place."""
    from mae_bench.app.export import export_encoder

    result = export_encoder(checkpoint, to, out_dir, pool=pool, hf_class=hf_class,
                            trust=trust_checkpoint)
    # soft_wrap: no newline inserted at the terminal's width into a path or the line to copy
    out.print(f"wrote {result.out}: {', '.join(result.files)} (features match mae-bench's to "
              f"{result.max_abs_diff:.2g})", highlight=False, soft_wrap=True)
    out.print(f"load: {result.load}", highlight=False, markup=False, soft_wrap=True)
