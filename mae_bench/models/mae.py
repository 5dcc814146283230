"""Masked Autoencoder (He et al. 2021), a drop-in for the official
``models_mae.MaskedAutoencoderViT``: same constructor keywords, same state-dict keys, same
``forward(imgs, mask_ratio) -> (loss, pred, mask)``, plus ``noise`` to replay a masking and
``mask_strategy`` ("random", "block", "grid"; paper Table 1f) and ``encoder_mask_tokens``
(paper Table 1c, "encoder w/ [M]": every token goes through the encoder, a learnt mask token in
place of each masked patch; the cost MAE avoids, for ablations and ``mae-bench speed``).

Masking lives in ``mae_bench.models.masking`` (pure functions); its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mae_bench.errors import ConfigError
from mae_bench.models.attention import RuleAttention
from mae_bench.models.masking import (
    MASK_STRATEGIES,
    get_mask_strategy,
    grid_step,
    len_keep,
    masking_indices,
    masking_noise,
    random_masking,
    validate_mask_ratio,
)
from mae_bench.models.vit import (
    VisionTransformer,
    get_2d_sincos_pos_embed,
    get_preset,
    init_linear_and_norm,
    patchify,
    unpatchify,
)

__all__ = [
    "MASK_STRATEGIES",
    "MaskedAutoencoder",
    "build_mae",
    "get_mask_strategy",
    "grid_step",
    "len_keep",
    "masking_indices",
    "masking_noise",
    "random_masking",
    "validate_mask_ratio",
]

# Pretraining-only tensors: not part of the encoder a probe or fine-tuning gets.
_DECODER_KEYS = ("mask_token", "decoder_", "encoder_mask_token")


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
        encoder_mask_tokens: bool = False,
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
            encoder_mask_tokens: the paper's "encoder w/ [M]" ablation: the encoder sees all L
                patches, each masked one replaced by a shared learnt token (``encoder_mask_token``,
                width embed_dim, position embedding added); the decoder then gets all L encoded
                tokens and has no mask token of its own. About 3x the encoder cost at 75 %.
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
        self.encoder_mask_tokens = encoder_mask_tokens

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        # The shared mask token lives where the masked positions are first filled in: in the
        # decoder (MAE) or, for the "encoder w/ [M]" ablation, in the encoder.
        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
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
                attn_layer=RuleAttention,
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        pos = get_2d_sincos_pos_embed(decoder_embed_dim, self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(pos.unsqueeze(0))  # [1, 1+L, Dd]
        nn.init.normal_(self._mask_token(), std=0.02)
        for name, module in self.named_children():
            if name.startswith("decoder_"):
                module.apply(init_linear_and_norm)

    def _mask_token(self) -> nn.Parameter:
        return self.encoder_mask_token if self.encoder_mask_tokens else self.mask_token

    def no_weight_decay(self) -> set[str]:
        name = "encoder_mask_token" if self.encoder_mask_tokens else "mask_token"
        return super().no_weight_decay() | {name}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return unpatchify(x, self.patch_size, self.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, then encode only the visible patches (all L with ``encoder_mask_tokens``).

        Returns:
            latent [N, 1+K, D] ([N, 1+L, D] with encoder mask tokens, in image order),
            mask [N, L] (1 = masked), ids_restore [N, L].
        """
        if noise is None:
            noise = masking_noise(
                self.mask_strategy, imgs.shape[0], self.grid_size, mask_ratio, device=imgs.device
            )  # [N, L]
        ids_keep, mask, ids_restore = masking_indices(noise, mask_ratio)  # [N, K], [N, L], [N, L]
        if self.encoder_mask_tokens:
            return self._encode_with_mask_tokens(imgs, mask), mask, ids_restore  # [N, 1+L, D]
        return self.forward_features(imgs, ids_keep), mask, ids_restore  # [N, 1+K, D]

    def _encode_with_mask_tokens(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W], mask [N, L] -> [N, 1+L, D]: every position through the encoder,
        the masked ones as the shared token plus their position embedding."""
        return self.forward_features_masked(imgs, mask, self.encoder_mask_token)  # [N, 1+L, D]

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [N, 1+K, D] and ids_restore [N, L] -> pixel predictions [N, L, p*p*C].

        With ``encoder_mask_tokens`` the latent is already [N, 1+L, D] in image order."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        if self.encoder_mask_tokens:
            x = x + self.decoder_pos_embed  # [N, 1+L, Dd]
            return self._decode(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # [N, L-K, Dd]
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd], shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])  # [N, L, Dd]
        x_ = torch.gather(x_, dim=1, index=index)  # [N, L, Dd], image order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        return self._decode(x)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder tokens [N, 1+L, Dd] (positions added) -> predictions [N, L, p*p*C]."""
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
        A ratio given here is checked first (ConfigError unless a patch stays visible and one
        is masked): the official entry point, called from Python with any value.
        """
        validate_mask_ratio(self.num_patches, mask_ratio)
        return self.forward_masked(imgs, mask_ratio, noise)

    def forward_masked(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` for a mask ratio checked once beforehand, when its config was built (the
        training method's every step): the same computation, no check per call."""
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

        With global_pool "mean" (or "avg") the pretrained ``norm`` is dropped and ``fc_norm``
        starts fresh, as official fine-tuning does; a head (num_classes > 0) also starts fresh.
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
        preset_name: a key of mae_bench.models.vit.PRESETS.
        img_size: image side; None uses the preset's native size.
        in_chans: image channels.
        **kwargs: further MaskedAutoencoder arguments (norm_pix_loss, mask_strategy, ...);
            they override the preset's values (e.g. decoder_depth) where they overlap.
    """
    p = get_preset(preset_name)
    args: dict[str, Any] = {
        "img_size": p.img_size if img_size is None else img_size,
        "patch_size": p.patch_size,
        "in_chans": in_chans,
        "embed_dim": p.embed_dim,
        "depth": p.depth,
        "num_heads": p.num_heads,
        "decoder_embed_dim": p.decoder_embed_dim,
        "decoder_depth": p.decoder_depth,
        "decoder_num_heads": p.decoder_num_heads,
        "mlp_ratio": p.mlp_ratio,
        "norm_layer": partial(nn.LayerNorm, eps=1e-6),
    }
    return MaskedAutoencoder(**(args | kwargs))
