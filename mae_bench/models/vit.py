"""The one ViT backbone every method shares: timm Blocks, fixed 2-D sin-cos position embedding,
cls token, cls / mean pooling, patchify helpers and a registry of named architectures.

Parameter names equal the official MAE encoder (facebookresearch/mae), so its checkpoints load
unchanged. ``forward_features`` accepts ``ids_keep`` so that an MAE encoder sees only the visible
patches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from mae_bench.errors import ConfigError
from mae_bench.models.attention import RuleAttention, set_attention

# ---------------------------------------------------------------------------------------------
# Fixed sin-cos position embedding (values and layout of the official util/pos_embed.py)
# ---------------------------------------------------------------------------------------------


def _sincos_1d_numpy(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] float32 positions -> [M, embed_dim] float32, computed in numpy float32 like the
    official code so that the values match it bit for bit."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even embed_dim, got {embed_dim}")
    exponents = np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0)  # [D/2]
    omega = 1.0 / 10000**exponents  # [D/2]
    angles = np.outer(positions.reshape(-1).astype(np.float32), omega)  # [M, D/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [M, D]


def get_1d_sincos_pos_embed(
    embed_dim: int, positions: torch.Tensor | np.ndarray | Sequence[float]
) -> torch.Tensor:
    """Transformer sin-cos embedding of 1-D positions.

    Args:
        embed_dim: output width D (even); dims [0, D/2) are sin, [D/2, D) are cos.
        positions: M positions (any shape, flattened).

    Returns:
        [M, D] float32; frequency i is 1 / 10000 ** (2i / D).
    """
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    pos = np.asarray(positions, dtype=np.float32)  # [M]
    return torch.from_numpy(_sincos_1d_numpy(embed_dim, pos))  # [M, D]


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, cls_token: bool = False
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a square patch grid, as in official MAE.

    Token k = row * grid_size + col (the order of ``PatchEmbed``). Dims [0, D/2) encode the
    column, dims [D/2, D) the row (the official meshgrid puts w first), each as [sin, cos].

    Args:
        embed_dim: width D, divisible by 4.
        grid_size: patches per side.
        cls_token: prepend an all-zero row for the cls token.

    Returns:
        [grid_size**2 (+1), D] float32.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    axis = np.arange(grid_size, dtype=np.float32)  # [G]
    cols, rows = np.meshgrid(axis, axis)  # [G, G] each; cols[r, c] = c, rows[r, c] = r
    emb_cols = _sincos_1d_numpy(embed_dim // 2, cols)  # [G*G, D/2]
    emb_rows = _sincos_1d_numpy(embed_dim // 2, rows)  # [G*G, D/2]
    emb = np.concatenate([emb_cols, emb_rows], axis=1)  # [G*G, D]
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim], dtype=np.float32), emb], axis=0)
    return torch.from_numpy(emb.astype(np.float32))  # [G*G (+1), D]


# ---------------------------------------------------------------------------------------------
# Patchify (official element order 'nchpwq->nhwpqc', any channel count)
# ---------------------------------------------------------------------------------------------


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut square images into flattened non-overlapping patches.

    Args:
        imgs: [N, C, H, W] with H == W and H divisible by patch_size.
        patch_size: p.

    Returns:
        [N, L, p*p*C], L = (H/p)**2 in row-major patch order; inside a patch the element
        (dy, dx, c) sits at index (dy * p + dx) * C + c.
    """
    n, c, h, w = imgs.shape
    if h != w or h % patch_size:
        raise ValueError(f"patchify needs square images divisible by {patch_size}, got {h}x{w}")
    g = h // patch_size
    x = imgs.reshape(n, c, g, patch_size, g, patch_size)  # [N, C, g, p, g, p]
    x = torch.einsum("nchpwq->nhwpqc", x)  # [N, g, g, p, p, C]
    return x.reshape(n, g * g, patch_size * patch_size * c)  # [N, L, p*p*C]


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [N, L, p*p*C] -> [N, C, H, W] with H = W = sqrt(L) * p."""
    n, length, width = x.shape
    g = int(round(length**0.5))
    if g * g != length or width != patch_size * patch_size * channels:
        raise ValueError(
            f"cannot unpatchify [{n}, {length}, {width}] with p={patch_size}, "
            f"C={channels}: L must be a square and width p*p*C"
        )
    x = x.reshape(n, g, g, patch_size, patch_size, channels)  # [N, g, g, p, p, C]
    x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, g, p, g, p]
    return x.reshape(n, channels, g * patch_size, g * patch_size)  # [N, C, H, W]


# ---------------------------------------------------------------------------------------------
# Named architectures
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchPreset:
    """Architecture of an MAE (encoder + decoder) at its native image size."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    img_size: int


def _preset(p: int, d: int, depth: int, h: int, dec: tuple[int, int, int], img: int) -> ArchPreset:
    return ArchPreset(
        patch_size=p,
        embed_dim=d,
        depth=depth,
        num_heads=h,
        decoder_embed_dim=dec[0],
        decoder_depth=dec[1],
        decoder_num_heads=dec[2],
        img_size=img,
    )


# Paper sizes use the official 512-d, 8-block decoder. Small-image presets keep head width 32
# and a decoder about 2/3 of the encoder width (as ViT-B: 768 -> 512) with 4 blocks: 64 patches
# need far less decoder than 196, and the decoder is most of the pretraining cost at this size.
PRESETS: dict[str, ArchPreset] = {
    "vit_base_patch16": _preset(16, 768, 12, 12, (512, 8, 16), 224),
    "vit_large_patch16": _preset(16, 1024, 24, 16, (512, 8, 16), 224),
    "vit_huge_patch14": _preset(14, 1280, 32, 16, (512, 8, 16), 224),
    "vit_small_patch16": _preset(16, 384, 12, 6, (512, 8, 16), 224),
    "vit_tiny_patch4": _preset(4, 192, 12, 3, (128, 4, 4), 32),
    "vit_small_patch4": _preset(4, 384, 12, 6, (256, 4, 8), 32),
    "vit_tiny_patch2": _preset(2, 192, 12, 3, (128, 4, 4), 16),
    # ViT-Tiny on 16 patches of 8 x 8 px: a quarter of ViT-Tiny/4's tokens, for CPU-sized
    # sweeps on 32-px images (every pixel is still seen; a patch is a 192-d target).
    "vit_tiny_patch8": _preset(8, 192, 12, 3, (128, 4, 4), 32),
    "vit_small_patch2": _preset(2, 384, 12, 6, (256, 4, 8), 16),
    # ViT-Mini: a quarter of ViT-Tiny's compute (half the depth, 2/3 the width), for CPU-sized
    # comparisons (the default `mae-bench compare`, short CIFAR-10 benchmarks).
    "vit_mini_patch4": _preset(4, 128, 6, 4, (96, 2, 3), 32),
    "vit_mini_patch2": _preset(2, 128, 6, 4, (96, 2, 3), 16),
    "vit_micro_patch2": _preset(2, 32, 2, 2, (32, 1, 2), 16),
    "vit_micro_patch4": _preset(4, 32, 2, 2, (32, 1, 2), 32),
}


def get_preset(name: str) -> ArchPreset:
    """Look up an architecture by name; unknown names raise ConfigError listing valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown architecture {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Vision Transformer
# ---------------------------------------------------------------------------------------------


def init_linear_and_norm(module: nn.Module) -> None:
    """Official MAE init for one module: xavier-uniform Linear with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# The pooling names of every layer (the classifier's global_pool here, frozen features in
# evals.features, result rows): "cls", the cls token; "mean", the mean of the patch tokens (cls
# excluded). The classifier applies "cls" to the normed output and "mean" to the un-normed block
# output, then fc_norm -- the official models_vit.py global_pool=True path.
POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cls": lambda x: x[:, 0],  # [N, 1+K, D] -> [N, D]
    "mean": lambda x: x[:, 1:].mean(dim=1),  # [N, 1+K, D] -> [N, D]
}
POOL_ALIASES = {"avg": "mean"}  # timm's and official MAE's name for the mean pool


def pool_name(name: str) -> str:
    """The canonical pooling name ("avg" is accepted for "mean").

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    name = POOL_ALIASES.get(name, name)
    if name not in POOLS:
        raise ConfigError(f"unknown pool {name!r}; valid: {', '.join(POOLS)} "
                          f"({', '.join(f'{a} = {b}' for a, b in POOL_ALIASES.items())})")
    return name


class VisionTransformer(nn.Module):
    """ViT encoder with the official MAE parameter names and timm's model hooks.

    Keys: patch_embed.proj.*, cls_token, pos_embed (fixed, not trained), blocks.{i}.*, and
    norm.* (global_pool "cls") or fc_norm.* (global_pool "mean"), plus head.* when num_classes > 0.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        num_classes: int = 0,
        global_pool: str = "cls",
        drop_path_rate: float = 0.0,
    ) -> None:
        """Build the encoder and initialise it as official MAE does.

        Args:
            img_size: side of the square input images, divisible by patch_size.
            patch_size: side of a square patch.
            in_chans: image channels.
            embed_dim: token width D (divisible by 4 for the 2-D sin-cos embedding).
            depth: number of transformer blocks.
            num_heads: attention heads per block (must divide embed_dim).
            mlp_ratio: MLP hidden width / embed_dim.
            norm_layer: normalisation constructor, called with the width.
            num_classes: width of the linear head; 0 means no head (nn.Identity).
            global_pool: "cls" (normed cls token) or "mean" (fc_norm of the mean patch token,
                the official fine-tuning choice; no final ``norm`` then; "avg" is accepted).
            drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
        """
        super().__init__()
        global_pool = pool_name(global_pool)
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if embed_dim % num_heads or embed_dim % 4:
            raise ConfigError(
                f"embed_dim {embed_dim} must be divisible by 4 and by num_heads {num_heads}"
            )
        self.patch_size, self.in_chans, self.global_pool = patch_size, in_chans, global_pool
        self.embed_dim = self.num_features = embed_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2

        # Not strict about the input size: DINO's local crops are smaller than img_size (their
        # position embedding is interpolated, see ``pos_embed_for``).
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos values, filled in _init_encoder_weights; a Parameter (not a buffer) so
        # that the state-dict keys equal the official ones.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False
        )  # [1, 1+L, D]
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=True,
                norm_layer=norm_layer,
                drop_path=rate,
                attn_layer=RuleAttention,
            )
            for rate in rates
        )
        use_fc_norm = global_pool == "mean"
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_encoder_weights()

    def _init_encoder_weights(self) -> None:
        pos = get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)  # [1+L, D]
        self.pos_embed.data.copy_(pos.unsqueeze(0))  # [1, 1+L, D]
        # The patch-embedding conv is initialised like the Linear it is: xavier on [D, C*p*p].
        # Its bias keeps torch's default init, as in official MAE (which only zeroes Linears).
        w = self.patch_embed.proj.weight.data  # [D, C, p, p]
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers should exclude from weight decay."""
        return {"pos_embed", "cls_token"}

    def set_fused_attention(self, enabled: bool | None) -> None:
        """Force F.scaled_dot_product_attention (True) or the explicit softmax path (False);
        None: back to the per-call rule (``mae_bench.models.attention.rule_path``)."""
        set_attention(self, "auto" if enabled is None else "fused" if enabled else "math")

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The patch position embedding [1, gh*gw, D] for a gh x gw patch grid: the fixed one
        at the native size, else resized bicubically (DINO's rule for multi-crop: a smaller
        crop spans the same positions at a coarser step)."""
        pos = self.pos_embed[:, 1:, :]  # [1, L, D]
        if grid == (self.grid_size, self.grid_size):
            return pos
        d = pos.shape[-1]
        pos = pos.reshape(1, self.grid_size, self.grid_size, d).permute(0, 3, 1, 2)  # [1, D, G, G]
        pos = torch.nn.functional.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)  # [1, gh*gw, D]

    def forward_features(
        self, x: torch.Tensor, ids_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode images.

        Args:
            x: images [N, C, H, W].
            ids_keep: [N, K] indices of the patches to encode, chosen after the position
                embedding is added (so each keeps its own position); None encodes all L.

        Returns:
            [N, 1+K, D]: cls token then the kept patch tokens, after ``norm``.
        """
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed_for(grid)  # [N, L, D]
        if ids_keep is not None:
            index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [N, K, D]
            x = torch.gather(x, dim=1, index=index)  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+K, D]
        for block in self.blocks:
            x = block(x)  # [N, 1+K, D]
        return self.norm(x)  # [N, 1+K, D]

    def forward_features_masked(self, x: torch.Tensor, mask: torch.Tensor,
                                token: torch.Tensor) -> torch.Tensor:
        """Encode every patch, the masked ones as ``token``: SimMIM's and iBOT's student, MAE's
        Table 1c ablation (mask tokens in the encoder).

        Args:
            x: images [N, C, H, W].
            mask: [N, L], nonzero = masked; its patch embedding is replaced by ``token`` before
                the position embedding is added (so each keeps its position).
            token: the learnt mask token [1, 1, D].

        Returns:
            [N, 1+L, D]: cls token then every patch token, after ``norm``.
        """
        x = self.patch_embed(x)  # [N, L, D]
        x = torch.where(mask.unsqueeze(-1).bool(), token.to(x.dtype), x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]  # [N, L, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1)  # [N, 1+L, D]
        for block in self.blocks:
            x = block(x)  # [N, 1+L, D]
        return self.norm(x)  # [N, 1+L, D]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool [N, 1+K, D] tokens to [N, D] features, or [N, num_classes] logits."""
        x = self.fc_norm(POOLS[self.global_pool](x))  # [N, D]
        return x if pre_logits else self.head(x)  # [N, D] or [N, num_classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] -> head output [N, num_classes] (features [N, D] without head)."""
        return self.forward_head(self.forward_features(x))


def vit_kwargs(preset_name: str, img_size: int | None = None, in_chans: int = 3
               ) -> dict[str, Any]:
    """The VisionTransformer arguments of a named preset's encoder (img_size None: the preset's
    native size)."""
    p = get_preset(preset_name)
    return {"img_size": p.img_size if img_size is None else img_size,
            "patch_size": p.patch_size, "in_chans": in_chans, "embed_dim": p.embed_dim,
            "depth": p.depth, "num_heads": p.num_heads, "mlp_ratio": p.mlp_ratio}


def build_vit(
    preset_name: str, img_size: int | None = None, in_chans: int = 3, **kwargs: Any
) -> VisionTransformer:
    """Build the encoder of a named preset.

    Args:
        preset_name: a key of PRESETS.
        img_size: image side; None uses the preset's native size.
        in_chans: image channels.
        **kwargs: further VisionTransformer arguments (num_classes, global_pool, ...).
    """
    return VisionTransformer(**vit_kwargs(preset_name, img_size, in_chans), **kwargs)
