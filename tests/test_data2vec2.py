"""data2vec 2.0 (baselines/data2vec2.py, baselines/data2vec2_masks.py) against hand-written
references of the official code: facebookresearch/fairseq at commit
3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99, fairseq/data/data_utils.py (compute_block_mask_2d),
examples/data2vec/models/data2vec2.py (make_targets, d2v_loss, forward, set_num_updates),
examples/data2vec/models/modalities/base.py (decoder_input, get_annealed_rate, make_maskinfo),
fairseq/criterions/model_criterion.py (sum of the losses / sample_size)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.data2vec2 import (
    Decoder2d,
    default_target_layers,
    get_annealed_rate,
    make_targets,
)
from baselines.data2vec2_masks import inverse_block_mask, num_kept
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.registry import Batch, build_method, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(arch: str = "vit_micro_patch4", img: int = 16, **mae) -> RunConfig:
    return RunConfig().replace(model={"arch": arch, "img_size": img},
                               train={"method": "data2vec2", "epochs": 1}, mae=mae)


# --- references, written from the official code ----------------------------------------------

def ref_block_mask_2d(b: int, length: int, mask_prob: float, mask_length: int = 3,
                      adjust: float = 0.07) -> torch.Tensor:
    """compute_block_mask_2d(inverse_mask=True, require_same_masks=True, mask_dropout=0,
    expand_adjcent=False, non_overlapping=False) on torch's global RNG."""
    d = int(length**0.5)
    prob = 1 - mask_prob
    grid = torch.zeros((b, d, d))
    count = int(length * ((prob + adjust) / mask_length**2))
    grid.view(b, -1).scatter_(1, torch.randint(0, length, size=(b, count)), 1)
    im, ci, cj = grid.nonzero(as_tuple=True)
    half = mask_length // 2
    for di in range(mask_length):
        for dj in range(mask_length):
            grid[im, (ci + di - half).clamp(0, d - 1), (cj + dj - half).clamp(0, d - 1)] = 1
    flat = grid.reshape(b, -1)
    have_all = flat.sum(dim=-1)
    want = int(length * prob)
    for i in range(b):
        row, have = flat[i], have_all[i]
        if have > want:
            row[torch.multinomial(row, int(have - want), replacement=False)] = 0
        elif have < want:
            row[torch.multinomial(1 - row, int(want - have), replacement=False)] = 1
    return 1 - flat


def ref_make_targets(layers: list[torch.Tensor]) -> torch.Tensor:
    """instance_norm_target_layer + layer_norm_targets, by explicit moments (eps 1e-5)."""
    total = 0
    for y in layers:  # [N, T, C]: normalise each channel over the tokens
        mu = y.mean(dim=1, keepdim=True)
        var = y.var(dim=1, unbiased=False, keepdim=True)
        total = total + (y - mu) / torch.sqrt(var + 1e-5)
    avg = total / len(layers)
    mu = avg.mean(dim=-1, keepdim=True)
    var = avg.var(dim=-1, unbiased=False, keepdim=True)
    return (avg - mu) / torch.sqrt(var + 1e-5)


def ref_annealed(start: float, end: float, step: int, total: int) -> float:
    return end if step >= total else end - (end - start) * (1 - step / total)


def ref_layer_results(vit, imgs: torch.Tensor) -> list[torch.Tensor]:
    """Every block's FFN output before its residual (the official ffn_targets), cls dropped."""
    x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    out = []
    for blk in vit.blocks:
        x = x + blk.attn(blk.norm1(x))
        ffn = blk.mlp(blk.norm2(x))
        x = x + ffn
        out.append(ffn[:, 1:])
    return out


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("b", "grid", "ratio"), [(5, 14, 0.8), (7, 8, 0.8), (6, 4, 0.8),
                                                  (4, 8, 0.6), (3, 10, 0.9)])
def test_inverse_block_mask_replays_the_official_rng_stream(b, grid, ratio):
    for seed in range(4):
        torch.manual_seed(seed)
        ref = ref_block_mask_2d(b, grid * grid, ratio)
        ours = inverse_block_mask(b, grid, ratio, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, ref)
        assert (ours.sum(dim=1) == grid * grid - num_kept(grid * grid, ratio)).all()


def test_inverse_block_mask_keeps_blocks_on_the_paper_grid():
    mask = inverse_block_mask(64, 14, 0.8, torch.Generator().manual_seed(0))
    kept = (1 - mask).reshape(64, 1, 14, 14)
    assert (kept.sum(dim=(1, 2, 3)) == 39).all()  # int(196 * 0.2)
    # a kept patch has on average far more kept 8-neighbours than independent draws would
    nbs = F.conv2d(kept, torch.ones(1, 1, 3, 3), padding=1) - kept
    mean_nbs = (nbs * kept).sum() / kept.sum()
    assert mean_nbs > 2 * 8 * 38 / 195  # independent draws: about 1.6


def test_targets_are_the_top_k_ffn_outputs_instance_and_layer_normed():
    torch.manual_seed(0)
    method = build_method(_cfg("vit_micro_patch2", target_layers=1), 3, 16)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # teacher != student
        imgs = torch.randn(3, 3, 16, 16)
        layers = ref_layer_results(method.teacher, imgs)
        assert torch.allclose(method.targets(imgs), ref_make_targets(layers[-1:]), atol=1e-5)
        method.target_layers = 2
        assert torch.allclose(method.targets(imgs), ref_make_targets(layers), atol=1e-5)
    ys = [torch.randn(2, 9, 16) * 3 + 1 for _ in range(4)]
    assert torch.allclose(make_targets(ys), ref_make_targets(ys), atol=1e-5)


def test_loss_equals_the_official_d2v_loss_and_criterion():
    torch.manual_seed(0)
    method = build_method(_cfg("vit_micro_patch2"), 3, 16).train()
    imgs = torch.randn(3, 3, 16, 16)
    seed = 11
    out = method(Batch([imgs], torch.full((3,), -1), torch.Generator().manual_seed(seed)))
    # replay: masks then decoder noise from the same RNG stream
    torch.manual_seed(seed)
    copies, length, d = 4, 64, 32
    mask = ref_block_mask_2d(3 * copies, length, 0.8)
    keep = int(length - mask[0].sum())
    ids_shuffle = mask.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    noise = torch.randn(3 * copies, length - keep, d) * 0.01
    with torch.no_grad():
        x = method.backbone.forward_features(imgs.repeat_interleave(copies, 0),
                                             ids_shuffle[:, :keep])
        dec_in = torch.gather(torch.cat([x[:, 1:], noise], dim=1), 1,
                              ids_restore.unsqueeze(-1).expand(-1, -1, d))
        pred = method.decoder(dec_in)
        y = ref_make_targets(ref_layer_results(method.teacher, imgs)[-2:])
    masked = mask.bool()
    reg = (pred[masked] - y.repeat_interleave(copies, 0)[masked]) ** 2 / math.sqrt(d)
    sample_size = masked.sum()
    cls = (x[:, 0] - y.mean(dim=1).repeat_interleave(copies, 0)) ** 2 / math.sqrt(d)
    losses = {"regression": reg, "cls": cls * (0.01 * sample_size)}
    expected = sum(v.sum() for v in losses.values()) / sample_size
    assert torch.allclose(out["loss"], expected, rtol=1e-5)
    assert torch.allclose(out["loss_regression"], reg.sum() / sample_size, rtol=1e-5)


def test_ema_follows_the_official_annealed_rate():
    for step, total in [(0, 10), (1, 10), (7, 10), (10, 10), (12, 10)]:
        assert get_annealed_rate(0.9998, 0.99999, step, total) == pytest.approx(
            ref_annealed(0.9998, 0.99999, step, total), abs=1e-15)
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 16)
    assert method.teacher_pairs == [("teacher", "backbone")]
    with torch.no_grad():
        for p in method.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    old = [p.clone() for p in method.teacher.parameters()]
    method.on_step_end(3, 10)
    decay = ref_annealed(0.996, 0.99999, 3, 10)
    for t_old, t, s in zip(old, method.teacher.parameters(), method.backbone.parameters(),
                           strict=True):
        expected = decay * t_old + (1 - decay) * s if s.requires_grad else t_old
        assert torch.allclose(t, expected, atol=1e-6)
    assert not any(n.startswith("teacher.") for n, p in method.named_parameters()
                   if p.requires_grad)
    assert not hasattr(method.teacher, "convs")  # the teacher has no decoder


def test_decoder_shapes_groups_and_residual():
    dec = Decoder2d(32, 48, 3, grid=4)
    assert dec(torch.randn(5, 16, 32)).shape == (5, 16, 32)
    assert [c.groups for c in dec.convs] == [16, 16, 16]
    assert [c.kernel_size for c in dec.convs] == [(3, 3)] * 3
    odd = Decoder2d(36, 36, 2, grid=2)  # 36: groups gcd(16, 36) = 4
    assert odd.convs[0].groups == 4
    # residual from the first layer on when the widths agree: a zero conv passes x through
    for c in odd.convs:
        torch.nn.init.zeros_(c.weight)
        torch.nn.init.zeros_(c.bias)
    x = torch.randn(2, 4, 36)
    assert torch.allclose(odd(x), odd.proj(x), atol=1e-6)


def test_defaults_display_mask_and_row_fields():
    cfg = resolve_config(_cfg())
    assert (cfg.mae.mask_ratio, cfg.mae.num_masks, cfg.train.blr) == (0.8, 4, 1e-3)
    method = build_method(_cfg(), 3, 16)
    assert method.target_layers == 2 and len(method.decoder.convs) == 6
    assert [default_target_layers(d) for d in (1, 2, 6, 12, 24)] == [1, 2, 5, 10, 20]
    imgs = torch.zeros(3, 3, 16, 16)
    shown = method.display_mask(imgs, torch.Generator().manual_seed(4))
    full = method.draw_masks(3, torch.Generator().manual_seed(4))
    assert shown.dtype == torch.int64 and shown.shape == (3, 4, 4)
    assert torch.equal(shown.reshape(3, 16), full[::4].long())
    assert ((shown == 0).sum(dim=(1, 2)) == 3).all()  # int(16 * 0.2) kept
    assert method.reconstruct(imgs, torch.Generator()) is None
    assert type(method).row_fields(cfg) == {"mask_ratio": 0.8, "num_masks": 4}


def test_config_errors():
    with pytest.raises(ConfigError, match=r"mae.target_layers=3 exceeds the 2 blocks"):
        build_method(_cfg(target_layers=3), 3, 16)
    with pytest.raises(ConfigError, match=r"mask_ratio=0.95 leaves 0 of 16 patches visible"):
        build_method(_cfg(mask_ratio=0.95), 3, 16)
