"""Masked Autoencoder (He et al. 2021), a drop-in for the official
``models_mae.MaskedAutoencoderViT``: same constructor keywords, same state-dict keys, same
``forward(imgs, mask_ratio) -> (loss, pred, mask)``, plus ``noise`` to replay a masking and
``mask_strategy`` ("random", "block", "grid"; paper Table 1f).

A mask strategy only produces noise [N, L]: the patches with the smallest noise are kept, so
every strategy shares one exact keep count, int(L * (1 - mask_ratio)), as in the official code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mae_bench.errors import ConfigError
from mae_bench.vit import (
    VisionTransformer,
    get_2d_sincos_pos_embed,
    get_preset,
    init_linear_and_norm,
    patchify,
    unpatchify,
)

# ---------------------------------------------------------------------------------------------
# Masking: pure functions
# ---------------------------------------------------------------------------------------------


def len_keep(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, int(L * (1 - mask_ratio)) exactly as the official code."""
    return int(num_patches * (1 - mask_ratio))


def validate_mask_ratio(num_patches: int, mask_ratio: float) -> None:
    """Raise ConfigError unless at least one patch stays visible and at least one is masked."""
    keep = len_keep(num_patches, mask_ratio) if math.isfinite(mask_ratio) else -1
    if not 1 <= keep < num_patches:
        # Rounded down so that the printed bound itself is valid.
        top = math.floor((num_patches - 1) / num_patches * 1e4) / 1e4
        raise ConfigError(
            f"mask_ratio={mask_ratio} leaves {max(keep, 0)} of {num_patches} patches visible; "
            f"with {num_patches} patches use 0 < mask_ratio <= {top} so that at least one "
            "patch is visible and at least one is masked"
        )


NoiseFn = Callable[[int, int, float, "torch.Generator | None", torch.device], torch.Tensor]


def _random_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, grid * grid, generator=gen, device=device)  # [N, L]


# BEiT's block-wise masking (Bao et al. 2021, MaskingGenerator): rectangles of 4+ patches with
# aspect ratio in [0.3, 1/0.3], added until the masked budget is used or no block fits.
_BLOCK_MIN_PATCHES, _BLOCK_MIN_ASPECT, _BLOCK_ATTEMPTS = 4, 0.3, 10


def _place_block(rng: random.Random, covered: list[list[bool]], budget: int) -> int:
    grid = len(covered)
    for _ in range(_BLOCK_ATTEMPTS):
        area = rng.uniform(min(_BLOCK_MIN_PATCHES, budget), budget)
        aspect = math.exp(rng.uniform(math.log(_BLOCK_MIN_ASPECT), -math.log(_BLOCK_MIN_ASPECT)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h < grid and 0 < w < grid):
            continue
        top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
        cells = [(r, c) for r in range(top, top + h) for c in range(left, left + w)]
        new = [(r, c) for r, c in cells if not covered[r][c]]
        if 0 < len(new) <= budget:
            for r, c in new:
                covered[r][c] = True
            return len(new)
    return 0


def _block_cover(rng: random.Random, grid: int, target: int) -> list[float]:
    covered = [[False] * grid for _ in range(grid)]
    count = 0
    while count < target:
        added = _place_block(rng, covered, target - count)
        if added == 0:
            break
        count += added
    return [float(cell) for row in covered for cell in row]  # [L], row-major


def _block_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    num_masked = grid * grid - len_keep(grid * grid, ratio)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=device))
    rng = random.Random(seed)  # python RNG: one block at a time is scalar work
    covered = torch.tensor([_block_cover(rng, grid, num_masked) for _ in range(n)])  # [N, L]
    # Covered patches sort after all uncovered ones; the exact keep count then trims or fills.
    return torch.rand(n, grid * grid, generator=gen, device=device) + covered.to(device)  # [N, L]


def grid_step(grid_size: int, mask_ratio: float) -> int:
    """Cell side s of grid masking (keep 1 of every s x s patches); ConfigError if the ratio
    does not keep exactly one patch per cell on this grid."""

    def fits(s: int, ratio: float) -> bool:
        return (
            s >= 2
            and grid_size % s == 0
            and (len_keep(grid_size**2, ratio) == (grid_size // s) ** 2)
        )

    step = round(1 / math.sqrt(1 - mask_ratio)) if 0 <= mask_ratio < 1 else 0
    if fits(step, mask_ratio):
        return step
    valid = [
        f"{1 - 1 / s**2!r} ({s}x{s})" for s in range(2, grid_size + 1) if fits(s, 1 - 1 / s**2)
    ]
    raise ConfigError(
        f"mask_strategy 'grid' keeps one patch of every s x s cell, so on a {grid_size}x"
        f"{grid_size} patch grid mask_ratio must be one of: {', '.join(valid) or 'none'}; "
        f"got {mask_ratio}"
    )


def _grid_noise(
    n: int, grid: int, ratio: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    step = grid_step(grid, ratio)
    offset = torch.randint(0, step, (n, 2), generator=gen, device=device)  # [N, 2] (row, col)
    phase = torch.arange(grid, device=device) % step  # [g]
    keep_row = phase[None, :] == offset[:, :1]  # [N, g]
    keep_col = phase[None, :] == offset[:, 1:]  # [N, g]
    keep = (keep_row[:, :, None] & keep_col[:, None, :]).flatten(1)  # [N, L]
    return torch.rand(n, grid * grid, generator=gen, device=device) + (~keep).float()  # [N, L]


MASK_STRATEGIES: dict[str, NoiseFn] = {
    "random": _random_noise,
    "block": _block_noise,
    "grid": _grid_noise,
}


def get_mask_strategy(name: str) -> NoiseFn:
    """Noise function of a mask strategy; unknown names raise ConfigError listing valid ones."""
    if name not in MASK_STRATEGIES:
        raise ConfigError(f"unknown mask_strategy {name!r}; valid: {', '.join(MASK_STRATEGIES)}")
    return MASK_STRATEGIES[name]


def masking_noise(
    strategy: str,
    batch_size: int,
    grid_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise [N, L] (L = grid_size**2) whose ascending argsort keeps the patches the strategy
    chose: the first len_keep(L, mask_ratio) are visible, the rest masked.

    Random numbers come from ``generator`` on its device (default: the global RNG on
    ``device``); the result is moved to ``device``.
    """
    noise_fn = get_mask_strategy(strategy)
    validate_mask_ratio(grid_size**2, mask_ratio)
    source = generator.device if generator is not None else torch.device(device or "cpu")
    noise = noise_fn(batch_size, grid_size, mask_ratio, generator, source)  # [N, L]
    return noise if device is None else noise.to(device)  # [N, L]


def masking_indices(
    noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official per-sample shuffle: small noise is kept, large is removed.

    Args:
        noise: [N, L].
        mask_ratio: fraction of patches to remove.

    Returns:
        ids_keep [N, K], mask [N, L] (1 = masked, 0 = kept), ids_restore [N, L].
    """
    n, length = noise.shape
    keep = len_keep(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    mask = torch.ones(n, length, device=noise.device)  # [N, L]
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # [N, L]
    return ids_shuffle[:, :keep], mask, ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the tokens with the smallest noise.

    Args:
        x: tokens [N, L, D].
        mask_ratio: fraction of tokens to remove.
        noise: [N, L].

    Returns:
        x_masked [N, K, D], mask [N, L] (1 = masked), ids_restore [N, L], ids_keep [N, K].
    """
    ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [N, K, D]
    return torch.gather(x, dim=1, index=index), mask, ids_restore, ids_keep


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

_DECODER_KEYS = ("mask_token", "decoder_")


class MaskedAutoencoder(VisionTransformer):
    """MAE: a ViT encoder on the visible patches only, a light decoder on all tokens.

    The encoder is this VisionTransformer itself (cls pooling, no head), so ``forward_features``
    / ``forward_head`` encode whole images for evaluation.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        mask_strategy: str = "random",
    ) -> None:
        """Build and initialise as official MAE (defaults: its ViT-L/16 with the 512-d decoder).

        Args:
            img_size: side of the square images.
            patch_size: side of a square patch.
            in_chans: image channels.
            embed_dim: encoder width.
            depth: encoder blocks.
            num_heads: encoder attention heads.
            decoder_embed_dim: decoder width (divisible by 4 and decoder_num_heads).
            decoder_depth: decoder blocks.
            decoder_num_heads: decoder attention heads.
            mlp_ratio: MLP hidden width / width, encoder and decoder.
            norm_layer: normalisation constructor (official presets use LayerNorm eps=1e-6).
            norm_pix_loss: regress per-patch normalised pixels (the paper's default choice).
            mask_strategy: a key of MASK_STRATEGIES, used when forward gets no ``noise``.
        """
        get_mask_strategy(mask_strategy)
        if decoder_embed_dim % decoder_num_heads or decoder_embed_dim % 4:
            raise ConfigError(
                f"decoder_embed_dim {decoder_embed_dim} must be divisible by 4 "
                f"and by decoder_num_heads {decoder_num_heads}"
            )
        encoder_kwargs: dict[str, Any] = dict(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=norm_layer,
        )
        super().__init__(**encoder_kwargs)
        self.encoder_kwargs = encoder_kwargs  # rebuilds the encoder alone (make_encoder)
        self.norm_pix_loss, self.mask_strategy = norm_pix_loss, mask_strategy

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )  # [1, 1+L, Dd], fixed sin-cos
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim,
                decoder_num_heads,
                mlp_ratio,
                qkv_bias=True,
                norm_layer=norm_layer,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        pos = get_2d_sincos_pos_embed(decoder_embed_dim, self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(pos.unsqueeze(0))  # [1, 1+L, Dd]
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_children():
            if name.startswith("decoder_"):
                module.apply(init_linear_and_norm)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return unpatchify(x, self.patch_size, self.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, then encode only the visible patches.

        Returns:
            latent [N, 1+K, D], mask [N, L] (1 = masked), ids_restore [N, L].
        """
        if noise is None:
            noise = masking_noise(
                self.mask_strategy, imgs.shape[0], self.grid_size, mask_ratio, device=imgs.device
            )  # [N, L]
        ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)  # [N, K], [N, L], [N, L]
        return self.forward_features(imgs, ids_keep), mask, ids_restore  # [N, 1+K, D]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [N, 1+K, D] and ids_restore [N, L] -> pixel predictions [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L-K, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])  # [N, L, Dd]
        x_ = torch.gather(x_, dim=1, index=index)  # [N, L, Dd], image order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        for block in self.decoder_blocks:
            x = block(x)  # [N, 1+L, Dd]
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1+L, p*p*C]
        return x[:, 1:, :]  # [N, L, p*p*C]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only.

        Args:
            imgs: [N, C, H, W].
            pred: [N, L, p*p*C].
            mask: [N, L], 1 = masked.
        """
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
            var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased as official
            target = (target - mean) / (var + 1.0e-6) ** 0.5  # [N, L, p*p*C]
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(  # type: ignore[override]
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images [N, C, H, W] -> (loss, pred [N, L, p*p*C], mask [N, L] with 1 = masked).

        ``noise`` [N, L] replays a masking exactly (argsort ascending, the first K kept).
        """
        validate_mask_ratio(self.num_patches, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors only (the keys of a VisionTransformer with cls pooling)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_DECODER_KEYS)}

    def make_encoder(
        self, global_pool: str = "cls", num_classes: int = 0, drop_path_rate: float = 0.0
    ) -> VisionTransformer:
        """A standalone VisionTransformer holding a copy of this encoder's weights.

        With global_pool "avg" the pretrained ``norm`` is dropped and ``fc_norm`` starts fresh,
        as official fine-tuning does; a head (num_classes > 0) also starts fresh.
        """
        encoder = VisionTransformer(
            **self.encoder_kwargs,
            global_pool=global_pool,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
        )
        state = {
            k: v
            for k, v in self.encoder_state_dict().items()
            if global_pool == "cls" or not k.startswith("norm.")
        }
        result = encoder.load_state_dict(state, strict=False)
        fresh = [k for k in result.missing_keys if not k.startswith(("fc_norm.", "head."))]
        if fresh or result.unexpected_keys:
            raise RuntimeError(
                f"encoder keys differ: missing {fresh}, unexpected {result.unexpected_keys}"
            )
        return encoder.to(self.cls_token.device)


def build_mae(
    preset_name: str, img_size: int | None = None, in_chans: int = 3, **kwargs: Any
) -> MaskedAutoencoder:
    """Build the MAE of a named preset (LayerNorm eps 1e-6 as the official presets).

    Args:
        preset_name: a key of mae_bench.vit.PRESETS.
        img_size: image side; None uses the preset's native size.
        in_chans: image channels.
        **kwargs: further MaskedAutoencoder arguments (norm_pix_loss, mask_strategy, ...).
    """
    p = get_preset(preset_name)
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return MaskedAutoencoder(
        img_size=p.img_size if img_size is None else img_size,
        patch_size=p.patch_size,
        in_chans=in_chans,
        embed_dim=p.embed_dim,
        depth=p.depth,
        num_heads=p.num_heads,
        decoder_embed_dim=p.decoder_embed_dim,
        decoder_depth=p.decoder_depth,
        decoder_num_heads=p.decoder_num_heads,
        mlp_ratio=p.mlp_ratio,
        **kwargs,
    )
