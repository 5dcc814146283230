"""Reconstruction grids (MAE paper, Fig. 2): original, masked input, reconstruction, and the
reconstruction with the visible patches pasted back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.data.augment import BatchViews, ViewSpec, eval_resize
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.methods.registry import MAE, method_from_checkpoint
from mae_bench.models.mae import MaskedAutoencoder, masking_noise, validate_mask_ratio
from mae_bench.training.checkpoint import load_checkpoint


def load_mae_run(checkpoint: str | Path, trust: bool = False) -> tuple[RunConfig, MAE]:
    """The config and MAE method of a mae-bench MAE checkpoint, weights loaded, eval mode.
    ``trust`` allows full unpickling (only for files the user trusts)."""
    ckpt = load_checkpoint(checkpoint, trust=trust)
    if "config" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{checkpoint} is not a mae-bench run checkpoint")
    if ckpt["config"].get("train", {}).get("method", "mae") != "mae":
        raise ConfigError(f"{checkpoint} holds a '{ckpt['config']['train']['method']}' run; "
                          "reconstructions need an MAE run")
    cfg, method = method_from_checkpoint(ckpt, str(checkpoint))
    return cfg, method.eval()


@torch.no_grad()
def reconstruct(mae: MaskedAutoencoder, imgs: Tensor, mask_ratio: float, noise: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Run MAE and return (mask image with 1 at masked pixels, reconstruction, reconstruction
    with the visible patches pasted back), all [N, C, H, W] in the normalised space of ``imgs``.
    With norm_pix_loss the predicted patches are mapped back with each target patch's own mean
    and std (as the official demo does)."""
    _, pred, mask = mae(imgs, mask_ratio=mask_ratio, noise=noise)  # [N, L, P], [N, L]
    if mae.norm_pix_loss:
        target = mae.patchify(imgs)  # [N, L, P]
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).expand_as(pred)  # [N, L, P], 1 = masked
    recon = mae.unpatchify(pred)  # [N, C, H, W]
    mask_img = mae.unpatchify(m.to(pred.dtype))  # [N, C, H, W]
    pasted = imgs * (1 - mask_img) + recon * mask_img
    return mask_img, recon, pasted


def reconstruction_grid(checkpoint: str | Path, out_path: str | Path | None = None, *,
                        num_images: int = 8, split: str = "test", mask_ratio: float | None = None,
                        seed: int = 0, data_dir: str | Path | None = None,
                        trust: bool = False) -> Path:
    """Draw ``num_images`` images of ``split`` through the run's MAE and save a PNG grid
    (``trust``: allow full unpickling of the checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, method = load_mae_run(checkpoint, trust)
    mae = method.mae
    ratio = cfg.mae.mask_ratio if mask_ratio is None else mask_ratio
    validate_mask_ratio(mae.num_patches, ratio)
    if num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {num_images}")
    folder = data_dir or cfg.data.data_dir
    data = load_dataset(cfg.data.dataset, split, folder)
    if data.info.channels != mae.in_chans:  # the encoder's patch projection could not take them
        where = f" in {folder}" if folder else ""
        raise ConfigError(f"{checkpoint} takes {mae.in_chans}-channel images but "
                          f"{cfg.data.dataset}{where} has {data.info.channels}; draw from "
                          f"{mae.in_chans}-channel images (--data-dir)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num_images]
    if hasattr(data, "images"):
        raw = data.images[idx]
    else:
        raw = torch.stack([data[int(i)][0] for i in idx])
    views = BatchViews(ViewSpec(img_size=method.img_size), data.info.mean, data.info.std)
    imgs = views.normalize(eval_resize(raw, method.img_size))  # [N, C, H, W]
    noise = masking_noise(cfg.mae.mask_strategy, len(idx), method.grid_size, ratio, generator=g)
    mask_img, recon, pasted = reconstruct(mae, imgs, ratio, noise)

    mean, std = views.mean, views.std
    columns = [("original", imgs), (f"masked {ratio:.0%}", imgs), ("reconstruction", recon),
               ("reconstruction + visible", pasted)]
    n = len(idx)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for col, (title, x) in enumerate(columns):
        pix = (x * std + mean).clamp(0, 1)  # [N, C, H, W] in [0, 1]
        if title.startswith("masked"):
            pix = torch.where(mask_img > 0, torch.full_like(pix, 0.5), pix)  # grey = removed
        for row in range(n):
            ax = axes[row][col]
            img = pix[row].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                      cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    note = " (norm-pix: each patch's mean/std taken from the original)" if mae.norm_pix_loss \
        else ""
    fig.suptitle(f"MAE {cfg.model.arch} on {cfg.data.dataset}/{split}{note}", fontsize=9)
    fig.tight_layout()
    ckpt_path = Path(checkpoint)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    path = Path(out_path) if out_path is not None else run_dir / "reconstructions.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
