"""SimMIM (Xie et al. 2022, arXiv 2111.09886) on the shared ViT.

The encoder sees every patch: the embeddings of the masked ones are replaced by one learnable
mask token before the position embedding is added (official models/simmim.py,
``VisionTransformerForSimMIM``: ``x * (1 - w) + mask_token * w``), the cls token is kept, then
the blocks and the final norm. A one-layer linear head (1x1 convolution to p*p*C channels and a
PixelShuffle by the patch size p, the official ``encoder_stride``) predicts the pixels of every
patch; the loss is L1 against the normalised input on the masked pixels only, divided by the
channels (official ``SimMIM.forward``). Masks: ``baselines.simmim_masks`` (``MaskGenerator``).

Official defaults (microsoft/SimMIM, configs/vit_base__800ep/
simmim_pretrain__vit_base__img224__800ep.yaml, config.py, main_simmim.py): mask ratio 0.6 of
32-px mask units over 16-px patches; AdamW, BASE_LR 1e-4 scaled linearly by total batch / 512
(main_simmim.py) at batch 2,048 (16 GPUs x 128): lr = 1e-4 x 2048 / 512 = 4e-4, i.e. blr =
4e-4 x 256 / 2048 = 5e-5 per 256 images at the recipe's batch (lr_ref_batch 2,048), carried to
the run's batch by the square-root rule as the joint-embedding ViT recipes are (baselines/
__init__.py says why: the linear rule leaves batch 128 a 16th of the lr; ``--lr-scaling
linear`` restores main_simmim.py's rule); weight decay
0.05; 10 warm-up epochs of 800. The official betas are (0.9, 0.999) (config.py); the engine's
AdamW uses MAE's (0.9, 0.95), as for every ViT method here. Its warm-up default (5 % of the
epochs) replaces the official 1.25 %: short runs need the longer ramp. Not taken: the official
multistep lr decay (x0.1 at epoch 700; the engine's schedule is cosine), gradient clipping at 5
(``--clip-grad 5`` restores it), drop path 0.1 and the shared relative position bias (the
shared ViT has fixed sin-cos positions, as MAE). The mask token gets weight decay, as in the
official ViT (its ``no_weight_decay`` names only pos_embed and cls_token). Views: one random
resized crop, scale 0.67-1, bilinear, flip (official ``SimMIMTransform``).

Small images: the mask unit stays two ViT patches per side where such units tile the image
at least 2 x 2 (CIFAR at 32 px with 4-px patches: 8-px units, 10 of 16 masked = 62.5 %); else
one patch per unit (an odd patch grid, or a 2 x 2 grid where one 2-patch unit would be all
the image). Whole units round the ratio up: on few units the masked share exceeds 0.6.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.base import BackboneMethod
from baselines.simmim_masks import check_mask_geometry, default_mask_patch_size, simmim_masks
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch
from mae_bench.models.backbones import is_vit
from mae_bench.models.masking import cpu_generator
from mae_bench.models.vit import get_preset

SIMMIM_MASK_RATIO = 0.6


def masked_l1_loss(imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
    """The official SimMIM loss: L1 on the masked pixels, per channel.

    Args:
        imgs: [N, C, H, W] normalised input (the target).
        pred: [N, C, H, W] prediction.
        mask: [N, g, g] 1 = masked patch, H = g * p.
    """
    p = imgs.shape[-1] // mask.shape[-1]
    pixels = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # [N, 1, H, W]
    pixels = pixels.to(torch.float32)
    l1 = F.l1_loss(imgs.float(), pred.float(), reduction="none")  # [N, C, H, W]
    return (l1 * pixels).sum() / (pixels.sum() + 1e-5) / imgs.shape[1]


class SimMIM(BackboneMethod):
    """SimMIM: ViT with mask tokens in the encoder, a linear pixel head, masked L1 loss."""

    name = "simmim"
    needs_vit = True
    defaults = {"train": {"optimizer": "adamw", "blr": 5e-5, "lr_scaling": "sqrt",
                          "lr_ref_batch": 2048, "weight_decay": 0.05},
                "mae": {"mask_ratio": SIMMIM_MASK_RATIO}}
    own_knobs = frozenset({"mae.mask_ratio", "mae.mask_patch_size"})

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        """The mask ratio and the mask unit in pixels; a default unit is known here only where
        the config fixes the image size (else None: the default rule, two ViT patches)."""
        unit, img = cfg.mae.mask_patch_size, cfg.model.img_size
        if unit is None and img is not None and is_vit(cfg.model.arch):
            unit = default_mask_patch_size(img, get_preset(cfg.model.arch).patch_size)
        return {"mask_ratio": cfg.mae.mask_ratio, "mask_patch_size": unit}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        vit = self.backbone
        self.patch_size = int(vit.patch_size)
        self.mask_ratio = float(cfg.mae.mask_ratio)
        unit = cfg.mae.mask_patch_size
        self.mask_patch_size = (default_mask_patch_size(img_size, self.patch_size)
                                if unit is None else int(unit))
        check_mask_geometry(img_size, self.patch_size, self.mask_patch_size, self.mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))  # [1, 1, D]
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # official init
        p = self.patch_size
        self.decoder = nn.Sequential(nn.Conv2d(vit.embed_dim, p * p * channels, kernel_size=1),
                                     nn.PixelShuffle(p))

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(img_size=self.img_size, scale=(0.67, 1.0), interpolation="bilinear")]

    def draw_mask(self, n: int, generator: torch.Generator | None) -> Tensor:
        """[n, g, g] int64 on the CPU: 1 = masked (enters the encoder as the mask token)."""
        return simmim_masks(n, self.img_size, self.patch_size, self.mask_patch_size,
                            self.mask_ratio, cpu_generator(generator))

    def encode(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Images [N, C, H, W] and mask [N, g, g] -> [N, 1+L, D]: every patch through the ViT,
        the masked ones as the mask token plus their position embedding."""
        # official x * (1 - w) + mask_token * w: the same values for a 0 / 1 mask
        return self.backbone.forward_features_masked(imgs, mask.flatten(1),
                                                     self.mask_token)  # [N, 1+L, D]

    def predict(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Pixel predictions [N, C, H, W] for images [N, C, H, W] under mask [N, g, g]."""
        z = self.encode(imgs, mask)[:, 1:, :]  # [N, L, D]
        n, length, d = z.shape
        g = int(round(length**0.5))
        z = z.transpose(1, 2).reshape(n, d, g, g)  # [N, D, g, g]
        return self.decoder(z)  # [N, C, g*p, g*p]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        imgs = batch.views[0]  # [N, C, H, W]
        mask = self.draw_mask(imgs.shape[0], batch.generator).to(imgs.device)  # [N, g, g]
        pred = self.predict(imgs, mask)  # [N, C, H, W]
        return {"loss": masked_l1_loss(imgs, pred, mask)}

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        """[N, g, g] int64: 0 a patch the encoder sees, 1 one it sees only as the mask token
        (predicted by the loss)."""
        return self.draw_mask(imgs.shape[0], generator)

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        """Predictions [N, C, H, W] of every pixel for the mask ``display_mask`` draws with
        the same generator state (the loss uses only the masked ones)."""
        mask = self.draw_mask(imgs.shape[0], generator).to(imgs.device)  # [N, g, g]
        return self.predict(imgs, mask)  # [N, C, H, W]
