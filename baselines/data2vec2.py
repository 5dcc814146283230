"""data2vec 2.0 (Baevski, Babu, Hsu, Auli 2022, arXiv 2212.07525) for images, on the shared ViT.

An EMA teacher encodes the whole image; its targets are the FFN outputs of its top K blocks
(before the residual), each instance-normed over the patches, averaged, then layer-normed.
Every image is copied ``num_masks`` times, each copy with its own inverse block mask
(``data2vec2_masks``); the student encodes only the kept patches (MAE-style dropping), a
convolutional decoder (``Decoder2d``) fills the masked positions with small noise and predicts
the targets there. Loss: L2 scaled by 1 / sqrt(D), summed over the masked tokens and divided by
their count, plus 0.01 x the same L2 between the student's cls output and the mean target,
summed over the images (and copies) of the batch.

Official code: facebookresearch/fairseq, examples/data2vec/models/data2vec2.py
(``make_targets``, ``d2v_loss``, ``forward``), models/modalities/base.py (``decoder_input``,
``get_annealed_rate``), modules.py (``AltBlock``, ``Decoder2d``); recipe
examples/data2vec/config/v2/base_images_only_task.yaml. Numbers taken from that recipe: mask_prob
0.8, mask_length 3, mask_prob_adjust 0.07, mask noise std 0.01, instance_norm_target_layer and
layer_norm_targets, cls_loss 0.01, loss_beta 0 (L2), loss_scale 1 / sqrt(D); decoder 6 conv
layers, kernel 3, 16 groups, width = the encoder's (768); AdamW lr 1e-3 at 16 x 16 = 256 images
per update (blr 1e-3 per 256, linear), betas (0.9, 0.95) (the engine's), weight decay 0.05,
gradient clipping at 4; EMA decay 0.9998 -> 0.99999 along ``get_annealed_rate`` (linear).
Targets: the recipe averages the top 10 of the ViT-B's 12 blocks (``average_top_k_layers`` 10
over ``depth`` 10, after 2 ``prenet_depth`` blocks in the modality encoder); a depth-d preset
averages round(10 d / 12), at least 1 (vit_mini 5 of 6, vit_micro 2 of 2). The official
post-LN ``AltBlock`` returns ``mlp(norm1(x))`` as its target, its pre-LN path ``mlp(norm2(x))``;
timm's pre-LN Block gives the latter, read by a hook on ``block.mlp``.

Changed for small images and short runs:
- 4 masked copies per image, not 16: on a CPU the student's cost grows with the copies, and
  at batch 64 four copies give the official 256 student rows per process (which also sets the
  cls term's weight: the official sums it over a process's rows);
- the EMA starts at 0.996 (``ssl.momentum``), not 0.9998, and reaches 0.99999 at the run's
  last step (the official anneals over 100k of 375k updates): 0.9998's 5,000-step horizon is
  longer than the runs here, so the teacher would stay at its random init;
- the lr warm-up is the engine's 5 % of the run (the recipe's 50,040 of 375,300 updates is 13 %).
- decoder width = the encoder's (as the recipe's 768 on ViT-B), groups gcd(16, widths).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.base import BackboneMethod
from baselines.data2vec2_masks import inverse_block_mask, num_kept
from baselines.ema import ema_update
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.models.mae import validate_mask_ratio
from mae_bench.models.masking import cpu_generator

EMA_END_DECAY = 0.99999
CLS_LOSS = 0.01
MASK_NOISE_STD = 0.01
DECODER_GROUPS, DECODER_KERNEL, DECODER_DEPTH = 16, 3, 6
OFFICIAL_TOP_K, OFFICIAL_DEPTH = 10, 12


def get_annealed_rate(start: float, end: float, step: int, total_steps: int) -> float:
    """fairseq's linear schedule: ``start`` at step 0, ``end`` from ``total_steps`` on."""
    if step >= total_steps:
        return end
    return end - (end - start) * (1 - step / total_steps)


def default_target_layers(depth: int) -> int:
    """The recipe's 10 of 12 blocks, scaled to a depth-``depth`` ViT."""
    return max(1, round(depth * OFFICIAL_TOP_K / OFFICIAL_DEPTH))


def make_targets(layers: list[Tensor]) -> Tensor:
    """Teacher layer outputs [N, L, D] each -> targets [N, L, D]: instance norm of each over the
    tokens (per channel), their mean, then a layer norm over D (neither norm has weights)."""
    normed = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layers]
    y = torch.stack(normed).mean(dim=0)  # [N, L, D]
    return F.layer_norm(y, y.shape[-1:])  # [N, L, D]


def d2v_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-element official loss: squared error scaled by 1 / sqrt(D), [..., D]."""
    return F.mse_loss(pred.float(), target, reduction="none") / math.sqrt(pred.shape[-1])


class Decoder2d(nn.Module):
    """The official conv decoder: ``depth`` x (grouped conv k x k, LayerNorm over the channels
    without weights, GELU) with a residual wherever the width is unchanged, then a Linear back
    to the encoder width. Tokens [N, g*g, D] in row-major order -> predictions [N, g*g, D]."""

    def __init__(self, dim: int, width: int, depth: int, grid: int,
                 kernel: int = DECODER_KERNEL, groups: int = DECODER_GROUPS):
        super().__init__()
        self.grid = grid
        groups = math.gcd(groups, dim, width)
        self.convs = nn.ModuleList(
            nn.Conv2d(dim if i == 0 else width, width, kernel, padding=kernel // 2, groups=groups)
            for i in range(depth))
        self.proj = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        x = x.transpose(1, 2).reshape(n, d, self.grid, self.grid)  # [N, D, g, g]
        for conv in self.convs:
            y = conv(x)  # [N, W, g, g]
            y = F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2]).permute(0, 3, 1, 2)
            y = F.gelu(y)  # [N, W, g, g]
            x = y + x if y.shape[1] == x.shape[1] else y
        x = x.reshape(n, x.shape[1], length).transpose(1, 2)  # [N, L, W]
        return self.proj(x)  # [N, L, D]


class Data2Vec2(BackboneMethod):
    """data2vec 2.0: multi-mask student + conv decoder regress an EMA teacher's layer average."""

    name = "data2vec2"
    needs_vit = True
    defaults = {"train": {"optimizer": "adamw", "blr": 1e-3, "weight_decay": 0.05,
                          "lr_scaling": "linear", "lr_ref_batch": 256, "clip_grad": 4.0},
                "mae": {"mask_ratio": 0.8, "num_masks": 4},
                "ssl": {"momentum": 0.996}}
    own_knobs = frozenset({"mae.mask_ratio", "mae.num_masks", "mae.target_layers",
                           "model.decoder_embed_dim", "model.decoder_depth"})

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        return {"mask_ratio": cfg.mae.mask_ratio, "num_masks": cfg.mae.num_masks}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        vit = self.backbone
        self.grid, self.num_masks = vit.grid_size, cfg.mae.num_masks
        self.mask_ratio = cfg.mae.mask_ratio
        validate_mask_ratio(vit.num_patches, self.mask_ratio)
        depth = len(vit.blocks)
        self.target_layers = cfg.mae.target_layers or default_target_layers(depth)
        if self.target_layers > depth:
            raise ConfigError(f"mae.target_layers={self.target_layers} exceeds the {depth} "
                              f"blocks of {cfg.model.arch}; use 1 to {depth}")
        m = cfg.model
        self.decoder = Decoder2d(vit.embed_dim, m.decoder_embed_dim or vit.embed_dim,
                                 m.decoder_depth or DECODER_DEPTH, self.grid)
        self.add_teacher("backbone", "teacher")

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(img_size=self.img_size)]  # the recipe's MAE crop (0.2-1) and flip

    def draw_masks(self, n: int, generator: torch.Generator) -> Tensor:
        """[n * num_masks, L] float (1 = masked), copies of an image on adjacent rows."""
        return inverse_block_mask(n * self.num_masks, self.grid, self.mask_ratio, generator)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A step's masks [n * num_masks, L] and the noise at the masked positions
        [n * num_masks, L - K, D] (fairseq's decoder input), both drawn on the CPU."""
        gen = cpu_generator(generator)
        mask = self.draw_masks(n, gen)  # [B, L]
        keep = num_kept(mask.shape[1], self.mask_ratio)
        noise = torch.randn(mask.shape[0], mask.shape[1] - keep, self.backbone.embed_dim,
                            generator=gen) * MASK_NOISE_STD  # [B, L-K, D]
        return mask, noise

    @torch.no_grad()
    def targets(self, imgs: Tensor) -> Tensor:
        """The teacher's targets for the full images: [N, L, D]."""
        self.teacher.eval()
        outputs: list[Tensor] = []
        hooks = [blk.mlp.register_forward_hook(lambda _m, _i, out: outputs.append(out[:, 1:]))
                 for blk in self.teacher.blocks[-self.target_layers:]]
        try:
            self.teacher.forward_features(imgs)
        finally:
            for h in hooks:
                h.remove()
        return make_targets(outputs)  # [N, L, D]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        imgs = batch.views[0]  # [N, C, H, W]
        n, copies, dev = imgs.shape[0], self.num_masks, imgs.device
        mask, noise = self.draw(n, batch.generator)  # [B, L], [B, L-K, D]; B = N * copies
        keep = num_kept(mask.shape[1], self.mask_ratio)
        ids_shuffle = torch.argsort(mask, dim=1, stable=True)  # [B, L] kept first
        ids_restore = torch.argsort(ids_shuffle, dim=1).to(dev)  # [B, L]
        ids_keep = ids_shuffle[:, :keep].to(dev)  # [B, K]
        mask = mask.to(dev)

        x = self.backbone.forward_features(imgs.repeat_interleave(copies, 0), ids_keep)
        tokens = torch.cat([x[:, 1:], noise.to(device=dev, dtype=x.dtype)], dim=1)  # [B, L, D]
        index = ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # [B, L, D]
        pred = self.decoder(torch.gather(tokens, 1, index))  # [B, L, D]

        y = self.targets(imgs)  # [N, L, D]
        masked = mask.bool()  # [B, L]
        reg = d2v_loss(pred[masked], y.repeat_interleave(copies, 0)[masked])  # [M, D]
        sample_size = masked.sum()
        cls = d2v_loss(x[:, 0], y.mean(dim=1).repeat_interleave(copies, 0))  # [B, D]
        # fairseq sums every loss term and divides by sample_size; the cls term was multiplied
        # by it, so it stays a sum over the batch's rows
        reg_term = reg.sum() / sample_size
        cls_term = CLS_LOSS * cls.sum()
        return {"loss": reg_term + cls_term, "loss_regression": reg_term.detach(),
                "loss_cls": cls_term.detach(),
                "target_var": torch.sqrt(y.flatten(0, 1).var(dim=0) + 1e-6).mean()}

    def on_step_end(self, step: int, total_steps: int) -> None:
        # fairseq's set_num_updates(k) after optimizer step k: the decay at k, annealed here
        # over the whole run (ema_anneal_end_step = total_steps)
        decay = get_annealed_rate(self.base_momentum, EMA_END_DECAY, step, total_steps)
        ema_update(self.teacher, self.backbone, decay)

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        mask = self.draw_masks(imgs.shape[0], cpu_generator(generator))[::self.num_masks]
        return mask.long().reshape(-1, self.grid, self.grid)  # [N, gh, gw]
