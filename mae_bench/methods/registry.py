"""The methods layer: MAE's Method and the registry of every method (MAE and the baselines).

The contract a method fulfils (``Method``, ``Batch``) is in ``mae_bench.methods.method`` (core); the
baselines live in ``baselines/``, one file each. ``METHODS`` at the bottom of this file is the one
place they are registered; ``build_method`` / ``resolve_config`` look names up there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from baselines.barlowtwins import BarlowTwins
from baselines.byol import BYOL
from baselines.data2vec2 import Data2Vec2
from baselines.dino import DINO
from baselines.ibot import IBOT
from baselines.ijepa import IJEPA
from baselines.mocov2 import MoCoV2
from baselines.mocov3 import MoCoV3
from baselines.nnclr import NNCLR
from baselines.simclr import SimCLR
from baselines.simmim import SimMIM
from baselines.simsiam import SimSiam
from baselines.swav import SwAV
from baselines.vicreg import VICReg
from mae_bench.config import MAE_MASK_RATIO, RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.methods.method import Batch, Method
from mae_bench.models.backbones import check_arch, family, is_vit
from mae_bench.models.mae import build_mae, masking_indices, masking_noise, validate_mask_ratio
from mae_bench.models.vit import PRESETS, VisionTransformer, get_preset
from mae_bench.training.optim import optimizer_knobs

__all__ = ["METHODS", "Batch", "Method", "build_method", "method_class", "method_from_checkpoint",
           "register_method", "resolve_config"]


def register_method(name: str):
    """Class decorator that adds a Method subclass under ``name``: ``@register_method("mine")``
    on a class in your own code makes ``--method mine`` (or ``train.method: mine``) train it."""

    def wrap(cls):
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type[Method]:
    """The registered class of a method name.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the knobs a config leaves None with its method's defaults, then with its optimizer's
    (``optimizer_knobs``: momentum, LARS's eta and clipping; none for AdamW), so config.yaml
    records the whole recipe. A method that names no optimizer (a run from before the knob, a
    user's method) gets AdamW. A no-op on a resolved config.

    Raises:
        ConfigError: unknown method.
    """
    check_arch(cfg.model.arch)
    defaults = method_class(cfg.train.method).defaults_for(family(cfg.model.arch))
    fill = {section: {k: v for k, v in values.items() if getattr(getattr(cfg, section), k) is None}
            for section, values in defaults.items()}
    cfg = cfg.replace(**fill)
    if cfg.mae.mask_ratio is None:  # a method without a ratio records MAE's, as all did before
        cfg = cfg.replace(mae={"mask_ratio": MAE_MASK_RATIO})
    optimizer = cfg.train.optimizer or "adamw"
    knobs = {"optimizer": optimizer, **optimizer_knobs(optimizer)}
    return cfg.replace(train={k: v for k, v in knobs.items() if getattr(cfg.train, k) is None})


def build_method(cfg: RunConfig, channels: int, img_size: int) -> Method:
    """Build the configured method for images of ``channels`` x ``img_size``^2.

    Raises:
        ConfigError: unknown method or backbone, a masked method on a backbone that is not a
            ViT preset, image size not divisible by the patch size, or a mask ratio that leaves
            no visible or no masked patch.
    """
    cls = method_class(cfg.train.method)
    cfg = resolve_config(cfg)
    arch = cfg.model.arch
    if not is_vit(arch):
        if cls.needs_vit:
            raise ConfigError(f"{cls.name} needs a ViT preset (it masks a ViT's patch tokens); "
                              f"{arch} is not one: pick one of "
                              f"{', '.join(sorted(PRESETS))}")
        return cls(cfg, channels, img_size)
    preset = get_preset(arch)
    if img_size % preset.patch_size:
        raise ConfigError(
            f"image size {img_size} is not divisible by the patch size {preset.patch_size} of "
            f"{cfg.model.arch}; pick --img-size as a multiple of {preset.patch_size}"
        )
    return cls(cfg, channels, img_size)


def method_from_checkpoint(ckpt: dict[str, Any], where: str) -> tuple[RunConfig, Method]:
    """The config and method of a loaded mae-bench run checkpoint, its weights in place.

    Raises:
        CheckpointError: the checkpoint lacks what a run checkpoint records (config, weights,
            image size and channels), or its weights do not fit the model its config describes.
    """
    extra = ckpt.get("extra")
    missing = [name for name, have in (
        ("config", isinstance(ckpt.get("config"), dict)),
        ("model", isinstance(ckpt.get("model"), dict)),
        ("extra.channels", isinstance(extra, dict) and "channels" in extra),
        ("extra.img_size", isinstance(extra, dict) and "img_size" in extra)) if not have]
    if missing:
        raise CheckpointError(f"{where}: not a complete mae-bench run checkpoint (no "
                              f"{', '.join(missing)}); give the run's checkpoint.pt as written "
                              "by mae-bench pretrain")
    cfg = RunConfig.from_dict(ckpt["config"])
    method = build_method(cfg, int(extra["channels"]), int(extra["img_size"]))
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        # the first line only names the model; the next says which keys or shapes differ
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise CheckpointError(f"{where}: weights do not fit its config ({detail})") from None
    return cfg, method


class MAE(Method):
    """Masked Autoencoder (He et al. 2021): the encoder sees only the visible patches.

    AdamW with blr 1.5e-4 and weight decay 0.05 (the paper's Table 8)."""

    name = "mae"
    needs_vit = True
    defaults = {"train": {"blr": 1.5e-4, "weight_decay": 0.05, "optimizer": "adamw"},
                "mae": {"mask_ratio": MAE_MASK_RATIO}}
    # its config section and its decoder: no other method reads them
    own_knobs = frozenset({"mae.mask_ratio", "mae.mask_strategy", "mae.norm_pix_loss",
                           "mae.encoder_mask_tokens", "model.decoder_depth",
                           "model.decoder_embed_dim", "model.decoder_num_heads"})

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, Any]:
        return {"mask_ratio": cfg.mae.mask_ratio}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__()
        m = cfg.model
        self.mask_ratio = cfg.mae.mask_ratio
        self.mask_strategy = cfg.mae.mask_strategy
        self.img_size = img_size
        decoder = {"decoder_embed_dim": m.decoder_embed_dim, "decoder_depth": m.decoder_depth,
                   "decoder_num_heads": m.decoder_num_heads}
        self.mae = build_mae(
            m.arch, img_size, channels, norm_pix_loss=cfg.mae.norm_pix_loss,
            mask_strategy=cfg.mae.mask_strategy,
            encoder_mask_tokens=bool(cfg.mae.encoder_mask_tokens),
            **{k: v for k, v in decoder.items() if v is not None},
        )
        validate_mask_ratio(self.mae.num_patches, self.mask_ratio)
        # Strategy-specific checks (grid needs a lattice ratio) fail here, at build time.
        masking_noise(self.mask_strategy, 1, self.grid_size, self.mask_ratio)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.mae.patch_size

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(img_size=self.img_size)]

    @property
    def encoder(self) -> VisionTransformer:
        return self.mae

    def no_weight_decay(self) -> set[str]:
        return {f"mae.{n}" for n in self.mae.no_weight_decay()}

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        """[N, g, g] int64: 0 a visible patch, 1 a masked one (dropped, reconstructed), drawn
        from ``generator`` as ``forward`` draws it."""
        noise = masking_noise(self.mask_strategy, imgs.shape[0], self.grid_size, self.mask_ratio,
                              generator=generator, device=imgs.device)  # [N, L]
        mask = masking_indices(noise, self.mask_ratio)[1]  # [N, L], 1 = masked
        return mask.long().reshape(-1, self.grid_size, self.grid_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        imgs = batch.views[0]  # [N, C, H, W]
        noise = masking_noise(self.mask_strategy, imgs.shape[0], self.grid_size, self.mask_ratio,
                              generator=batch.generator, device=imgs.device)  # [N, L]
        # the ratio was checked when this method was built: no check per step
        loss, _, _ = self.mae.forward_masked(imgs, self.mask_ratio, noise)
        return {"loss": loss}


# The one place where methods are registered: MAE, then the baselines. ``register_method`` adds
# more at run time (a user's own Method subclass) without editing this file.
METHODS: dict[str, Callable[..., Method]] = {
    cls.name: cls for cls in (MAE, BYOL, DINO, MoCoV3, SimCLR, BarlowTwins, VICReg, SwAV,
                              SimSiam, MoCoV2, NNCLR, SimMIM, IJEPA, IBOT, Data2Vec2)
}
