"""I-JEPA (Assran et al. 2023, arXiv 2301.08243) on the shared ViT.

From one context block of an image, a narrow ViT predictor predicts the features that an EMA
target encoder gives the patches of a few target blocks of the same image; no pixels, no views.
The context encoder (the backbone, the evaluated encoder) sees only the context patches
(``forward_features(x, ids_keep)``); the target encoder, an EMA copy, sees the whole image, its
patch outputs layer-normed over the features (no affine) and gathered at each target block. The
predictor (official ``VisionTransformerPredictor``) maps the context tokens to its width, adds
their fixed 2-D sin-cos positions, appends one mask token per target patch (plus that patch's
position), runs its blocks and a norm and projects the mask tokens back to the encoder width.
Loss: smooth L1 (beta 1) averaged over every target patch of every block. Masks:
``baselines.ijepa_masks`` (the official multi-block collator).

Official defaults (facebookresearch/ijepa, commit 52c1ae9: configs/in1k_vith14_ep300.yaml,
src/train.py, src/helper.py, src/utils/schedulers.py): 4 target blocks of scale 0.15-0.2 and
aspect 0.75-1.5, one context block of scale 0.85-1, min_keep 10, no overlap; AdamW, lr 1e-3 at
batch 2,048 (16 GPUs x 128), i.e. blr = 1e-3 x 256 / 2048 = 1.25e-4 per 256 images at that batch
(lr_ref_batch 2,048), carried to the run's batch by the square-root rule as the joint-embedding
ViT recipes are (baselines/__init__.py; ``--lr-scaling linear`` gives the official linear
rule); weight decay 0.04 -> 0.4 along a cosine; EMA momentum 0.996 -> 1 LINEARLY over the run
(``on_step_end``); predictor 384 wide and 12 deep for ViT-H/14; views: random resized crop
scale 0.3-1, no flip, no colour. ``ipe_scale`` is 1.0 in every released config (``schedule_
stretch`` 1), although ``init_opt``'s unused default is 1.25.

Not taken: the official warm-up (40 of 300 epochs from 2e-4 to 1e-3) and its final lr 1e-6
(the engine warms up from 0 over 5 % of the run and decays to ``train.min_lr``); bfloat16
(``--precision``). Differences of the shared ViT: it has a cls token (I-JEPA's has none; here it
takes part in attention and its output is dropped), MAE's xavier init (I-JEPA's: truncated
normal 0.02, as the predictor here) and the engine's AdamW betas (0.9, 0.95) (I-JEPA's 0.9,
0.999). Predictor size: ``model.decoder_*``, by default the preset's decoder (vit_mini: 96 wide,
2 deep). Small images: min_keep is lowered to one patch less than the smallest target block can
have (``ijepa_masks.default_min_keep``; 0 on a 4x4 grid, where a target may be one patch), since
the official sampler never relaxes a target block and would loop forever; on 4x4 a context that
loses every patch to targets is redrawn, then lets the targets in one by one, as officially.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from baselines.base import BackboneMethod
from baselines.ema import ema_update
from baselines.ijepa_masks import MultiBlock, check_multiblock, default_min_keep, multiblock_masks
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.models.attention import RuleAttention
from mae_bench.models.vit import get_2d_sincos_pos_embed, get_preset


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Tokens [N, L, D] at indices [N, K] -> [N, K, D] (official ``apply_masks`` of one mask)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def linear_momentum(step: int, total_steps: float, base: float, final: float = 1.0) -> float:
    """Official I-JEPA momentum after optimizer step ``step`` (from 1): its generator's value
    ``base + i (final - base) / total_steps`` for i = step - 1."""
    return base + (step - 1) * (final - base) / total_steps


class Predictor(nn.Module):
    """I-JEPA's predictor: a narrow ViT from context tokens to the features of target patches.

    Args:
        grid: patches per side of the square grid.
        embed_dim: encoder width D.
        width, depth, num_heads: the predictor's (official pred_emb_dim 384, pred_depth 12).
    """

    def __init__(self, grid: int, embed_dim: int, width: int, depth: int, num_heads: int):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = get_2d_sincos_pos_embed(width, grid).unsqueeze(0)  # [1, L, Dp]
        self.predictor_pos_embed = nn.Parameter(pos, requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.predictor_blocks = nn.ModuleList(
            Block(width, num_heads, 4.0, qkv_bias=True, norm_layer=norm, attn_layer=RuleAttention)
            for _ in range(depth))
        self.predictor_norm = norm(width)
        self.predictor_proj = nn.Linear(width, embed_dim)
        # official init_model: truncated normal 0.02 on every Linear (it overwrites the
        # predictor's own depth rescaling), zero biases, LayerNorm 1 / 0; mask token N(0, 0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, ctx: Tensor, ctx_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        """Context tokens [N, Kc, D] at patches [N, Kc], targets [M, N, Kt] -> predictions
        [M*N, Kt, D], block-major (row m*N + n: block m of image n), as the official output."""
        m, n, kt = tgt_ids.shape
        pos = self.predictor_pos_embed.expand(n, -1, -1)  # [N, L, Dp]
        x = self.predictor_embed(ctx) + gather_tokens(pos, ctx_ids)  # [N, Kc, Dp]
        kc = x.shape[1]
        pos = self.predictor_pos_embed.expand(m * n, -1, -1)  # [M*N, L, Dp]
        queries = self.mask_token + gather_tokens(pos, tgt_ids.flatten(0, 1))  # [M*N, Kt, Dp]
        x = torch.cat([x.repeat(m, 1, 1), queries], dim=1)  # [M*N, Kc+Kt, Dp]
        for block in self.predictor_blocks:
            x = block(x)  # [M*N, Kc+Kt, Dp]
        return self.predictor_proj(self.predictor_norm(x)[:, kc:])  # [M*N, Kt, D]


class IJEPA(BackboneMethod):
    """I-JEPA: context encoder + predictor against an EMA target encoder, multi-block masks."""

    name = "ijepa"
    needs_vit = True
    defaults = {"train": {"optimizer": "adamw", "blr": 1.25e-4, "lr_scaling": "sqrt",
                          "lr_ref_batch": 2048, "weight_decay": 0.04, "weight_decay_end": 0.4},
                "mae": {"num_targets": 4, "target_scale_min": 0.15, "target_scale_max": 0.2},
                "ssl": {"momentum": 0.996}}
    own_knobs = frozenset({"mae.num_targets", "mae.target_scale_min", "mae.target_scale_max",
                           "model.decoder_embed_dim", "model.decoder_depth",
                           "model.decoder_num_heads"})
    schedule_stretch = 1.0  # official ipe_scale of every released config

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        m = cfg.mae
        return {"num_targets": m.num_targets, "target_scale_min": m.target_scale_min,
                "target_scale_max": m.target_scale_max}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        vit, mae, model = self.backbone, cfg.mae, cfg.model
        grid = (vit.grid_size, vit.grid_size)
        scale = (float(mae.target_scale_min), float(mae.target_scale_max))
        self.spec = MultiBlock(grid, int(mae.num_targets), scale,
                               min_keep=default_min_keep(grid, scale))
        check_multiblock(self.spec)
        preset = get_preset(model.arch)
        width = model.decoder_embed_dim or preset.decoder_embed_dim
        heads = model.decoder_num_heads or preset.decoder_num_heads
        if width % heads or width % 4:
            raise ConfigError(f"model.decoder_embed_dim={width} must be divisible by 4 and by "
                              f"model.decoder_num_heads={heads}; pick e.g. {heads * 4 * 8}")
        self.predictor = Predictor(vit.grid_size, vit.embed_dim, width,
                                   model.decoder_depth or preset.decoder_depth, heads)
        self.add_teacher("backbone", "teacher_backbone")

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(img_size=self.img_size, scale=(0.3, 1.0), hflip=0.0,
                         interpolation="bilinear")]

    def draw_masks(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Context [n, Kc] and targets [M, n, Kt] patch indices on the CPU: one seed drawn from
        ``generator`` (on any device) seeds a CPU generator for the official sampler."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        return multiblock_masks(torch.Generator().manual_seed(seed), n, self.spec)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        imgs = batch.views[0]  # [N, C, H, W]
        ctx_ids, tgt_ids = (t.to(imgs.device) for t in self.draw_masks(len(imgs), batch.generator))
        with torch.no_grad():
            h = self.teacher_backbone.forward_features(imgs)[:, 1:]  # [N, L, D]
            h = F.layer_norm(h, (h.shape[-1],))  # [N, L, D]
            target = gather_tokens(h.repeat(len(tgt_ids), 1, 1), tgt_ids.flatten(0, 1))
        z = self.backbone.forward_features(imgs, ctx_ids)[:, 1:]  # [N, Kc, D], cls dropped
        pred = self.predictor(z, ctx_ids, tgt_ids)  # [M*N, Kt, D]
        loss = F.smooth_l1_loss(pred.float(), target.float())  # target [M*N, Kt, D]
        return {"loss": loss}

    def weight_decay_at(self, step: int, total_steps: int, start: float, end: float) -> float:
        """The official ``CosineWDSchedule``: its ``step()`` advances its counter before it
        computes, so optimizer step i (from 0) gets the cosine at (i + 1) / T, with
        T = int(ipe_scale x steps), held at ``end`` once past it."""
        t_max = max(int(self.schedule_stretch * total_steps), 1)
        value = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * (step + 1) / t_max))
        return max(end, value) if end <= start else min(end, value)

    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA with the official linear schedule over ``schedule_stretch`` x the run's steps."""
        m = linear_momentum(step, total_steps * self.schedule_stretch, self.base_momentum)
        ema_update(self.teacher_backbone, self.backbone, m)

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        """[N, g, g] int64: 0 context, 1 in a target block (over the context where a relaxed
        context overlaps one), 2 neither; the index lists as a step uses them (cut)."""
        ctx_ids, tgt_ids = self.draw_masks(imgs.shape[0], generator)
        n, g = imgs.shape[0], self.backbone.grid_size
        out = torch.full((n, g * g), 2, dtype=torch.int64)
        out.scatter_(1, ctx_ids, 0)
        out.scatter_(1, tgt_ids.transpose(0, 1).flatten(1), 1)
        return out.view(n, g, g)
