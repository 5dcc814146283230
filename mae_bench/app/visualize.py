"""Reconstruction grids (MAE paper, Fig. 2): original, masked input, reconstruction, and the
reconstruction with the visible patches pasted back; for MAE's masked siblings (SimMIM, I-JEPA,
iBOT, data2vec 2.0) their masks as a training step draws them (``Method.display_mask``) and,
where they predict pixels (SimMIM), their reconstructions (``Method.reconstruct``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.data.augment import BatchViews, ViewSpec, eval_resize
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.methods.method import Method
from mae_bench.methods.registry import MAE, build_method, method_from_checkpoint
from mae_bench.models.mae import MaskedAutoencoder, masking_noise, validate_mask_ratio
from mae_bench.training.checkpoint import load_checkpoint


def draws_masks(method: Method) -> bool:
    """The method draws masks ``visualize`` can show: it overrides ``display_mask``."""
    return type(method).display_mask is not Method.display_mask


def load_masked_run(checkpoint: str | Path, trust: bool = False) -> tuple[RunConfig, Method]:
    """The config and method of a mae-bench run of a masked method (MAE or a sibling), weights
    loaded, eval mode. ``trust`` allows full unpickling (only for files the user trusts)."""
    ckpt = load_checkpoint(checkpoint, trust=trust)
    if "config" not in ckpt or "format_version" not in ckpt:
        raise CheckpointError(f"{checkpoint} is not a mae-bench run checkpoint")
    cfg, method = method_from_checkpoint(ckpt, str(checkpoint))
    if not draws_masks(method):
        raise ConfigError(f"{checkpoint} holds a '{cfg.train.method}' run, which draws no mask; "
                          "visualize needs a run of a masked method (mae, simmim, ijepa, ibot, "
                          "data2vec2)")
    return cfg, method.eval()


def load_mae_run(checkpoint: str | Path, trust: bool = False) -> tuple[RunConfig, MAE]:
    """The config and MAE method of a mae-bench MAE checkpoint, weights loaded, eval mode."""
    cfg, method = load_masked_run(checkpoint, trust)
    if not isinstance(method, MAE):
        raise ConfigError(f"{checkpoint} holds a '{cfg.train.method}' run; reconstructions "
                          "need an MAE run")
    return cfg, method


def with_mask_ratio(cfg: RunConfig, method: Method, ratio: float, channels: int
                    ) -> Method:
    """The sibling ``method`` rebuilt for another mask ratio, its weights kept (the ratio
    changes no parameter). Raises ConfigError for a method without a mask ratio."""
    if "mae.mask_ratio" not in method.own_knobs:
        raise ConfigError(f"--mask-ratio: a '{cfg.train.method}' run has no mask ratio (its "
                          "masks are blocks of its own knobs); leave it out")
    other = build_method(cfg.replace(mae={"mask_ratio": ratio}), channels, method.img_size)
    other.load_state_dict(method.state_dict())
    return other.eval()


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
    (``trust``: allow full unpickling of the checkpoint). A sibling's run (SimMIM, I-JEPA,
    iBOT, data2vec 2.0) draws its training mask instead (``_sibling_grid``)."""
    cfg, method = load_masked_run(checkpoint, trust)
    if not isinstance(method, MAE):
        return _sibling_grid(cfg, method, checkpoint, out_path, num_images=num_images,
                             split=split, mask_ratio=mask_ratio, seed=seed, data_dir=data_dir)
    mae = method.mae
    ratio = cfg.mae.mask_ratio if mask_ratio is None else mask_ratio
    validate_mask_ratio(mae.num_patches, ratio)
    imgs, views, g = _draw_images(cfg, method, split, num_images, seed, data_dir, checkpoint)
    noise = masking_noise(cfg.mae.mask_strategy, len(imgs), method.grid_size, ratio, generator=g)
    mask_img, recon, pasted = reconstruct(mae, imgs, ratio, noise)

    def pixels(x: Tensor) -> Tensor:
        return (x * views.std + views.mean).clamp(0, 1)  # [N, C, H, W] in [0, 1]

    removed = torch.where(mask_img > 0, torch.full_like(imgs, 0.5), pixels(imgs))  # grey
    columns = [("original", pixels(imgs)), (f"masked {ratio:.0%}", removed),
               ("reconstruction", pixels(recon)), ("reconstruction + visible", pixels(pasted))]
    note = " (norm-pix: each patch's mean/std taken from the original)" if mae.norm_pix_loss \
        else ""
    return _save_grid(columns, f"MAE {cfg.model.arch} on {cfg.data.dataset}/{split}{note}",
                      checkpoint, out_path, "reconstructions.png")


def _save_grid(columns: list[tuple[str, Tensor]], title: str, checkpoint: str | Path,
               out_path: str | Path | None, default_name: str) -> Path:
    """One PNG: a column per (title, [N, C, H, W] pixels in [0, 1]), a row per image, 2 inches
    each at 100 dpi; written to ``out_path`` or the run folder's ``default_name``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns[0][1])
    fig, axes = plt.subplots(n, len(columns), figsize=(2 * len(columns), 2 * n), squeeze=False)
    for col, (name, x) in enumerate(columns):
        for row in range(n):
            ax = axes[row][col]
            img = x[row].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                      cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    ckpt_path = Path(checkpoint)
    run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    path = Path(out_path) if out_path is not None else run_dir / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _draw_images(cfg: RunConfig, method: Method, split: str, num_images: int, seed: int,
                 data_dir: str | Path | None, checkpoint: str | Path
                 ) -> tuple[Tensor, BatchViews, torch.Generator]:
    """``num_images`` images of ``split``, normalised as the run trains, and the generator
    (seeded) that picked them, for the masks."""
    if num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {num_images}")
    folder = data_dir or cfg.data.data_dir
    data = load_dataset(cfg.data.dataset, split, folder)
    channels = method.encoder.in_chans
    if data.info.channels != channels:
        where = f" in {folder}" if folder else ""
        raise ConfigError(f"{checkpoint} takes {channels}-channel images but "
                          f"{cfg.data.dataset}{where} has {data.info.channels}; draw from "
                          f"{channels}-channel images (--data-dir)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num_images]
    raw = data.images[idx] if hasattr(data, "images") else torch.stack(
        [data[int(i)][0] for i in idx])
    views = BatchViews(ViewSpec(img_size=method.img_size), data.info.mean, data.info.std)
    return views.normalize(eval_resize(raw, method.img_size)), views, g


@torch.no_grad()
def _sibling_grid(cfg: RunConfig, method: Method, checkpoint: str | Path,
                  out_path: str | Path | None, *, num_images: int, split: str,
                  mask_ratio: float | None, seed: int, data_dir: str | Path | None) -> Path:
    """A sibling's grid: original; what its encoder sees (grey: masked, black: neither seen
    nor predicted); what its loss predicts (the rest dimmed); its reconstruction where it
    predicts pixels."""
    imgs, views, g = _draw_images(cfg, method, split, num_images, seed, data_dir, checkpoint)
    if mask_ratio is not None:
        method = with_mask_ratio(cfg, method, mask_ratio, imgs.shape[1])
    state = g.get_state()
    mask = method.display_mask(imgs, g)  # [N, gh, gw]: 0 seen, 1 predicted, 2 neither
    g.set_state(state)
    recon = method.reconstruct(imgs, g)  # [N, C, H, W] or None
    up = mask.repeat_interleave(imgs.shape[-2] // mask.shape[-2], dim=-2)
    up = up.repeat_interleave(imgs.shape[-1] // mask.shape[-1], dim=-1)[:, None]  # [N, 1, H, W]
    pix = (imgs * views.std + views.mean).clamp(0, 1)  # [N, C, H, W]
    seen = torch.where(up == 1, torch.full_like(pix, 0.5), pix)
    seen = torch.where(up == 2, torch.zeros_like(pix), seen)
    predicted = torch.where(up == 1, pix, pix * 0.25)
    share = float((mask == 1).float().mean())
    columns = [("original", pix), ("encoder input", seen), (f"predicted {share:.0%}", predicted)]
    if recon is not None:
        rec = (recon * views.std + views.mean).clamp(0, 1)
        columns += [("reconstruction", rec), ("reconstruction + visible",
                                              torch.where(up == 1, rec, pix))]
    name = "reconstructions.png" if recon is not None else "masks.png"
    return _save_grid(columns, f"{cfg.train.method} {cfg.model.arch} on {cfg.data.dataset}/"
                      f"{split}: its training mask", checkpoint, out_path, name)
