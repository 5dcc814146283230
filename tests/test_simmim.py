"""SimMIM (baselines/simmim.py, baselines/simmim_masks.py) against hand-written references of the
official code: microsoft/SimMIM at commit d3e29bcac950b83edc34ca33fe4404f38309052c,
data/data_simmim.py (``MaskGenerator``) and models/simmim.py (``SimMIM.forward``'s loss,
``VisionTransformerForSimMIM.forward``'s mask tokens)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.simmim import SimMIM, masked_l1_loss
from baselines.simmim_masks import (
    check_mask_geometry,
    default_mask_patch_size,
    mask_count,
    simmim_masks,
)
from mae_bench.config import RunConfig, peak_lr
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


class OfficialMaskGenerator:
    """data/data_simmim.py's MaskGenerator, written again; the permutation is passed in (the
    official draws np.random.permutation(token_count)) so that a stream can be replayed."""

    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int,
                 mask_ratio: float):
        assert input_size % mask_patch_size == 0
        assert mask_patch_size % model_patch_size == 0
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self, permutation: np.ndarray) -> np.ndarray:
        mask_idx = permutation[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


def official_loss(x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor, patch_size: int,
                  in_chans: int) -> torch.Tensor:
    """models/simmim.py, SimMIM.forward after the decoder (mask [N, g, g] on the patch grid)."""
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def _method(arch: str = "vit_micro_patch4", img: int = 16, channels: int = 3, **mae) -> SimMIM:
    cfg = RunConfig().replace(model={"arch": arch, "img_size": img},
                              train={"method": "simmim"}, mae=mae)
    torch.manual_seed(0)
    return build_method(cfg, channels, img)


GEOMETRIES = [(16, 4, 8, 0.6), (32, 4, 8, 0.6), (224, 16, 32, 0.6), (28, 4, 4, 0.75),
              (32, 2, 8, 0.5), (8, 2, 2, 0.3)]


@pytest.mark.parametrize(("img", "patch", "unit", "ratio"), GEOMETRIES)
def test_masks_equal_the_official_generator_on_the_same_permutations(img, patch, unit, ratio):
    n = 5
    ours = simmim_masks(n, img, patch, unit, ratio, torch.Generator().manual_seed(3))
    # replay the permutations our generator drew (one uniform draw, argsorted per image)
    units = (img // unit) ** 2
    perms = torch.rand(n, units, generator=torch.Generator().manual_seed(3)).argsort(1)
    official = OfficialMaskGenerator(img, unit, patch, ratio)
    expected = np.stack([official(perm.numpy()) for perm in perms])
    assert ours.dtype == torch.int64 and ours.shape == (n, img // patch, img // patch)
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize(("img", "patch", "unit", "ratio"), GEOMETRIES)
def test_every_image_masks_exactly_ceil_units_times_ratio_whole_units(img, patch, unit, ratio):
    n = 400
    masks = simmim_masks(n, img, patch, unit, ratio, torch.Generator().manual_seed(1))
    side, scale = img // unit, unit // patch
    count = int(np.ceil(side * side * ratio))
    assert mask_count(side * side, ratio) == count
    # each unit is a scale x scale block of equal patches; the unit mask is its top-left patch
    unit_mask = masks[:, ::scale, ::scale]  # [n, side, side]
    assert torch.equal(masks, unit_mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    assert (unit_mask.flatten(1).sum(1) == count).all()
    assert (masks.flatten(1).sum(1) == count * scale * scale).all()
    # uniform over units: every unit masked with frequency count / units
    freq = unit_mask.flatten(1).float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, count / side**2), atol=0.12)
    assert len({tuple(m.flatten().tolist()) for m in unit_mask}) > 1


def test_masks_replay_from_the_generator():
    draw = lambda seed: simmim_masks(8, 32, 4, 8, 0.6, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_default_mask_unit_is_two_patches_where_they_tile_the_image():
    assert default_mask_patch_size(224, 16) == 32  # the official setting
    assert default_mask_patch_size(32, 4) == 8
    assert default_mask_patch_size(16, 4) == 8
    assert default_mask_patch_size(28, 4) == 4  # a 7 x 7 grid: 2-patch units do not tile
    assert default_mask_patch_size(8, 4) == 4  # a 2 x 2 grid: one 2-patch unit is the image
    method = _method()
    assert (method.mask_patch_size, method.mask_ratio) == (8, 0.6)


@pytest.mark.parametrize(("geometry", "message"), [
    ((16, 4, 6, 0.6), "mae.mask_patch_size 6 is not a multiple of the ViT patch size 4; pick a "
                      "multiple of 4 that divides the image size 16"),
    ((16, 4, 12, 0.6), "mae.mask_patch_size 12 does not divide the image size 16; pick a "
                       "multiple of 4 that divides 16"),
    ((16, 4, 16, 0.6), "mae.mask_patch_size 16 makes the whole 16 px image one mask unit (all "
                       "masked or none); pick a smaller multiple of 4 that divides 16"),
    ((16, 4, 8, 0.8), "mae.mask_ratio 0.8 masks 4 of the 4 mask units of 8 px (16 px image); "
                      "it must mask at least one and leave one: pick a ratio in (0, 0.75] or "
                      "a smaller mae.mask_patch_size"),
    ((16, 4, 8, 0.0), "mae.mask_ratio 0.0 masks 0 of the 4 mask units of 8 px (16 px image); "
                      "it must mask at least one and leave one: pick a ratio in (0, 0.75] or "
                      "a smaller mae.mask_patch_size"),
])
def test_geometry_errors_name_the_value_and_the_fix(geometry, message):
    with pytest.raises(ConfigError) as err:
        check_mask_geometry(*geometry)
    assert str(err.value) == message


def test_bad_mask_unit_fails_when_the_method_is_built():
    with pytest.raises(ConfigError, match=r"^mae.mask_patch_size 6 is not a multiple"):
        _method(mask_patch_size=6)
    with pytest.raises(ConfigError, match=r"^mae.mask_ratio 0.9 masks 4 of the 4 mask units"):
        _method(mask_ratio=0.9)


def test_loss_equals_the_official_formula():
    g = torch.Generator().manual_seed(0)
    x, x_rec = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    mask = simmim_masks(4, 16, 4, 4, 0.6, g)
    expected = official_loss(x, x_rec, mask, 4, 3)
    assert torch.allclose(masked_l1_loss(x, x_rec, mask), expected, rtol=1e-6, atol=0)
    # closed form: an error of 1 everywhere costs 1 per masked pixel (up to the 1e-5)
    masked = float(mask.sum()) * 16
    ones = masked_l1_loss(x, x + 1, mask)
    assert math.isclose(float(ones), 3 * masked / (masked + 1e-5) / 3, rel_tol=1e-6)
    # the unmasked pixels do not count
    seen = (1 - mask).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    assert torch.equal(masked_l1_loss(x, x_rec + 5 * seen, mask), masked_l1_loss(x, x_rec, mask))


def test_masked_patches_enter_the_encoder_as_the_mask_token():
    method = _method().eval()
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    mask = method.draw_mask(3, g)  # [3, 4, 4]
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).bool()
    with torch.no_grad():
        z = method.encode(imgs, mask)
        # other content under the masked patches: the same output, bit for bit
        other = torch.where(pixels, torch.randn(imgs.shape, generator=g), imgs)
        assert torch.equal(method.encode(other, mask), z)
        # other content in a seen patch changes it
        assert not torch.allclose(method.encode(torch.where(pixels, imgs, 0.0), mask), z)
        # no mask: the plain ViT; another mask token: another output
        assert torch.equal(method.encode(imgs, torch.zeros_like(mask)),
                           method.backbone.forward_features(imgs))
        method.mask_token.add_(1.0)
        assert not torch.allclose(method.encode(imgs, mask), z)


@pytest.mark.parametrize(("arch", "img", "channels"), [("vit_micro_patch4", 16, 3),
                                                       ("vit_micro_patch2", 16, 1)])
def test_decoder_is_one_linear_layer_and_pixel_shuffle_to_the_image(arch, img, channels):
    method = _method(arch, img, channels)
    p, d = method.patch_size, method.backbone.embed_dim
    conv, shuffle = method.decoder
    assert conv.weight.shape == (p * p * channels, d, 1, 1) and shuffle.upscale_factor == p
    imgs = torch.randn(2, channels, img, img)
    mask = method.draw_mask(2, torch.Generator().manual_seed(0))
    assert method.predict(imgs, mask).shape == (2, channels, img, img)


def test_display_mask_and_reconstruct_draw_the_training_mask():
    method = _method().eval()
    imgs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = method.display_mask(imgs, torch.Generator().manual_seed(9))
    assert mask.dtype == torch.int64 and mask.shape == (4, 4, 4)
    assert set(mask.unique().tolist()) == {0, 1} and (mask.flatten(1).sum(1) == 12).all()
    recon = method.reconstruct(imgs, torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(recon, method.predict(imgs, mask))
        batch = Batch([imgs], torch.full((4,), -1), torch.Generator().manual_seed(9))
        loss = method(batch)["loss"]
    assert torch.equal(loss, masked_l1_loss(imgs, recon, mask))


def test_defaults_are_the_official_recipe():
    cfg = resolve_config(RunConfig().replace(train={"method": "simmim"}))
    t = cfg.train
    assert (t.optimizer, t.blr, t.lr_scaling, t.lr_ref_batch, t.weight_decay) == (
        "adamw", 5e-5, "sqrt", 2048, 0.05)
    assert cfg.mae.mask_ratio == 0.6
    # main_simmim.py: BASE_LR 1e-4 x batch / 512, at the official batch of 2,048
    assert math.isclose(peak_lr(t, 2048), 1e-4 * 2048 / 512)
    assert math.isclose(peak_lr(t, 128), 4e-4 * (128 / 2048) ** 0.5)  # square root below it
    linear = t.__class__(**{**t.__dict__, "lr_scaling": "linear"})
    assert math.isclose(peak_lr(linear, 2048), 1e-4 * 2048 / 512)  # the official rule
    spec, = _method().view_specs()
    assert spec.scale == (0.67, 1.0) and spec.interpolation == "bilinear"
    assert SimMIM.own_knobs == {"mae.mask_ratio", "mae.mask_patch_size"}
    small = RunConfig().replace(model={"arch": "vit_mini_patch4", "img_size": 32},
                                mae={"mask_ratio": 0.6})
    assert SimMIM.row_fields(small) == {"mask_ratio": 0.6, "mask_patch_size": 8}
    assert SimMIM.row_fields(small.replace(mae={"mask_patch_size": 4}))["mask_patch_size"] == 4
