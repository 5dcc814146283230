"""Tests for mae_bench/models/vit.py: sin-cos tables, patchify, the ViT encoder and the presets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from reference_mae import patchify_loops, sincos_2d
from timm.layers import Attention
from torch import nn

from mae_bench.errors import ConfigError
from mae_bench.models.vit import (
    PRESETS,
    ArchPreset,
    VisionTransformer,
    build_vit,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    get_preset,
    patchify,
    unpatchify,
)


def tiny_vit(**kwargs) -> VisionTransformer:
    base = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    return VisionTransformer(**{**base, **kwargs})


# --- patchify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip(channels: int) -> None:
    imgs = torch.randn(2, channels, 16, 16)
    x = patchify(imgs, 4)
    assert x.shape == (2, 16, 4 * 4 * channels)
    assert torch.equal(unpatchify(x, 4, channels), imgs)


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_element_order_matches_hand_indexing(channels: int) -> None:
    imgs = torch.arange(2 * channels * 8 * 8, dtype=torch.float32).reshape(2, channels, 8, 8)
    x = patchify(imgs, 2)  # 4x4 grid of 2x2 patches
    assert torch.equal(x, patchify_loops(imgs, 2))
    # patch (row 1, col 2) = token 6; inside it (dy 1, dx 0, last channel)
    ch = channels - 1
    assert x[1, 1 * 4 + 2, (1 * 2 + 0) * channels + ch] == imgs[1, ch, 1 * 2 + 1, 2 * 2 + 0]


def test_patchify_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="square images divisible by 4"):
        patchify(torch.zeros(1, 3, 16, 12), 4)
    with pytest.raises(ValueError, match="divisible by 3"):
        patchify(torch.zeros(1, 3, 16, 16), 3)
    with pytest.raises(ValueError, match="L must be a square"):
        unpatchify(torch.zeros(1, 15, 48), 4, 3)


# --- sin-cos position embedding ---------------------------------------------------------------


@pytest.mark.parametrize(("dim", "grid"), [(32, 4), (64, 8), (768, 14)])
def test_2d_sincos_matches_float64_reference(dim: int, grid: int) -> None:
    ours = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    assert ours.dtype == torch.float32 and ours.shape == (grid * grid + 1, dim)
    ref = sincos_2d(dim, grid, cls_token=True)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=5e-6)
    assert torch.equal(get_2d_sincos_pos_embed(dim, grid), ours[1:])


def test_2d_sincos_layout_column_first_then_row() -> None:
    d, g = 16, 5
    pe = get_2d_sincos_pos_embed(d, g, cls_token=True)
    assert torch.count_nonzero(pe[0]) == 0
    row, col = 3, 1
    token = pe[1 + row * g + col]
    assert torch.equal(token[: d // 2], get_1d_sincos_pos_embed(d // 2, [col])[0])
    assert torch.equal(token[d // 2 :], get_1d_sincos_pos_embed(d // 2, [row])[0])
    assert token[0].item() == pytest.approx(math.sin(1.0), abs=1e-7)  # col 1, lowest frequency 1
    assert token[d // 4].item() == pytest.approx(math.cos(1.0), abs=1e-7)
    assert token[d // 2].item() == pytest.approx(math.sin(3.0), abs=1e-7)


def test_1d_sincos_formula() -> None:
    pos = torch.tensor([0.0, 1.0, 2.5])
    pe = get_1d_sincos_pos_embed(8, pos)
    assert pe.shape == (3, 8)
    for m, p in enumerate(pos.tolist()):
        for i in range(4):
            w = 1 / 10000 ** (2 * i / 8)
            assert pe[m, i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert pe[m, 4 + i].item() == pytest.approx(math.cos(p * w), abs=1e-6)


def test_sincos_rejects_bad_widths() -> None:
    with pytest.raises(ValueError, match="divisible by 4, got 30"):
        get_2d_sincos_pos_embed(30, 4)
    with pytest.raises(ValueError, match="even embed_dim, got 7"):
        get_1d_sincos_pos_embed(7, [0.0])


# --- VisionTransformer ------------------------------------------------------------------------


def test_vit_keys_shapes_and_fixed_pos_embed() -> None:
    vit = tiny_vit()
    keys = list(vit.state_dict())
    assert keys[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"]
    assert keys[-2:] == ["norm.weight", "norm.bias"]
    assert not any(k.startswith(("fc_norm", "head")) for k in keys)
    assert vit.pos_embed.shape == (1, 17, 32) and not vit.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed[0], get_2d_sincos_pos_embed(32, 4, cls_token=True))
    assert (vit.num_patches, vit.patch_size, vit.in_chans, vit.num_features) == (16, 4, 3, 32)
    x = torch.randn(2, 3, 16, 16)
    assert vit.forward_features(x).shape == (2, 17, 32)
    assert vit(x).shape == (2, 32)


def test_vit_official_init() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=768, depth=1, num_heads=12)
    assert 0.015 < vit.cls_token.std().item() < 0.025
    w = vit.patch_embed.proj.weight  # xavier on [768, 48]; torch's conv default is far smaller
    bound = math.sqrt(6 / (48 + 768))
    assert 0.95 * bound < w.abs().max().item() <= bound
    qkv = vit.blocks[0].attn.qkv.weight
    assert 0.95 * math.sqrt(6 / (768 + 3 * 768)) < qkv.abs().max().item()
    for name, p in vit.named_parameters():
        if name.endswith("bias") and not name.startswith("patch_embed"):
            assert torch.count_nonzero(p) == 0, name
    # official MAE leaves the conv bias at torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    conv_bias = vit.patch_embed.proj.bias
    assert torch.count_nonzero(conv_bias) == 768 and conv_bias.abs().max() <= 1 / math.sqrt(48)
    assert torch.equal(vit.norm.weight, torch.ones(768))


def test_ids_keep_selects_tokens_after_position_embedding() -> None:
    vit = tiny_vit(depth=1)
    seen: list[torch.Tensor] = []
    vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(2, 3, 16, 16)
    ids_keep = torch.tensor([[5, 0, 9], [15, 3, 4]])
    out = vit.forward_features(x, ids_keep)
    vit.forward_features(x)
    assert out.shape == (2, 4, 32) and seen[0].shape == (2, 4, 32)
    full = seen[1]  # [2, 17, 32]
    expected = torch.stack([full[i, 1 + ids_keep[i]] for i in range(2)])
    assert torch.equal(seen[0][:, 1:], expected)
    assert torch.equal(seen[0][:, 0], full[:, 0])


def test_avg_pool_is_fc_norm_of_mean_unnormed_patch_tokens() -> None:
    cls_vit = tiny_vit()
    avg_vit = tiny_vit(global_pool="avg", num_classes=5)
    keys = set(avg_vit.state_dict())
    assert {"fc_norm.weight", "head.weight"} <= keys and "norm.weight" not in keys
    state = {k: v for k, v in cls_vit.state_dict().items() if not k.startswith("norm.")}
    missing, unexpected = avg_vit.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert not unexpected
    x = torch.randn(2, 3, 16, 16)
    raw = avg_vit.forward_features(x)  # no final norm with avg pooling
    assert torch.allclose(cls_vit.norm(raw), cls_vit.forward_features(x), atol=1e-6)
    pooled = avg_vit.forward_head(raw, pre_logits=True)
    assert torch.allclose(pooled, avg_vit.fc_norm(raw[:, 1:].mean(dim=1)), atol=1e-6)
    assert torch.allclose(avg_vit(x), avg_vit.head(pooled), atol=1e-6)
    cls_feats = cls_vit.forward_features(x)
    assert torch.equal(cls_vit.forward_head(cls_feats, pre_logits=True), cls_feats[:, 0])


def test_fused_attention_toggle_gives_same_output() -> None:
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    vit.set_fused_attention(True)
    fused = vit(x)
    vit.set_fused_attention(False)
    flags = [m.fused_attn for m in vit.modules() if isinstance(m, Attention)]
    assert flags == [False, False]
    assert torch.allclose(vit(x), fused, atol=1e-5)


def test_no_weight_decay_and_drop_path() -> None:
    vit = tiny_vit(depth=3, drop_path_rate=0.2)
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    rates = [blk.drop_path1.drop_prob for blk in vit.blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2])
    assert isinstance(vit.blocks[0].drop_path1, nn.Identity)


def test_vit_rejects_bad_config() -> None:
    with pytest.raises(ConfigError, match="unknown pool 'max'; valid: cls, mean"):
        tiny_vit(global_pool="max")
    with pytest.raises(ConfigError, match="img_size 18 is not divisible by patch_size 4"):
        tiny_vit(img_size=18)
    with pytest.raises(ConfigError, match="num_heads 3"):
        tiny_vit(num_heads=3)


# --- presets ----------------------------------------------------------------------------------


def test_preset_registry() -> None:
    required = {
        "vit_base_patch16",
        "vit_large_patch16",
        "vit_huge_patch14",
        "vit_small_patch16",
        "vit_tiny_patch4",
        "vit_small_patch4",
        "vit_tiny_patch2",
        "vit_small_patch2",
        "vit_micro_patch2",
        "vit_micro_patch4",
    }
    assert required <= set(PRESETS)
    base = get_preset("vit_base_patch16")
    assert (base.patch_size, base.embed_dim, base.depth, base.num_heads, base.img_size) == (
        16,
        768,
        12,
        12,
        224,
    )
    assert (base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads) == (512, 8, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.depth = 3  # type: ignore[misc]
    with pytest.raises(
        ConfigError,
        match=r"unknown architecture 'vit_gigantic'; valid: .*"
        r"vit_base_patch16.*vit_tiny_patch4",
    ):
        get_preset("vit_gigantic")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_consistent_and_builds(name: str) -> None:
    p: ArchPreset = PRESETS[name]
    assert p.embed_dim % p.num_heads == 0 and p.embed_dim % 4 == 0
    assert p.decoder_embed_dim % p.decoder_num_heads == 0 and p.decoder_embed_dim % 4 == 0
    assert p.img_size % p.patch_size == 0
    with torch.device("meta"):  # shapes only: a ViT-H costs nothing here
        vit = build_vit(name)
    assert vit.pos_embed.shape == (1, (p.img_size // p.patch_size) ** 2 + 1, p.embed_dim)
    assert len(vit.blocks) == p.depth


# Encoder parameters (fixed pos_embed included, no head): timm's vit_*_224 totals minus the
# 1000-class head: 86,567,656 - 769,000; 304,326,632 - 1,025,000; 632,045,800 - 1,281,000.
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("vit_base_patch16", 85_798_656),
        ("vit_large_patch16", 303_301_632),
        ("vit_huge_patch14", 630_764_800),
    ],
)
def test_paper_encoder_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):
        vit = build_vit(name)
    assert sum(p.numel() for p in vit.parameters()) == count


def test_build_vit_overrides_and_runs() -> None:
    vit = build_vit("vit_micro_patch2", img_size=8, in_chans=1, num_classes=3, global_pool="avg")
    assert vit.num_patches == 16 and vit.in_chans == 1
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_smaller_inputs_use_the_resized_position_embedding():
    vit = build_vit("vit_micro_patch4", img_size=16)
    assert torch.equal(vit.pos_embed_for((4, 4)), vit.pos_embed[:, 1:])
    small = vit.pos_embed_for((2, 2))  # [1, 4, D]
    assert small.shape == (1, 4, vit.embed_dim)
    # bicubic resizing of the [D, 4, 4] grid, done by hand
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(small, ref.permute(0, 2, 3, 1).reshape(1, 4, -1))
    out = vit.forward_features(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 1 + 4, vit.embed_dim)
