"""I-JEPA (baselines/ijepa.py, baselines/ijepa_masks.py) against hand-written references of the
official code (facebookresearch/ijepa, commit 52c1ae95d05f743e000e8f10a1f3a79b10cff048:
src/masks/multiblock.py, src/masks/utils.py, src/utils/tensors.py,
src/models/vision_transformer.py, src/train.py, src/utils/schedulers.py) and lightly 1.6.0's
copy of the collator (lightly/data/ijepa_collate.py, the same code)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.data.ijepa_collate import IJEPAMaskCollator

from baselines.ijepa import IJEPA, Predictor, linear_momentum
from baselines.ijepa_masks import (
    TARGET_ASPECT,
    MultiBlock,
    block_sizes,
    default_min_keep,
    multiblock_masks,
    place_blocks,
    reachable_sizes,
)
from mae_bench.config import RunConfig, peak_lr
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import build_train_step
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config
from mae_bench.training.runtime import cosine_weight_decay

pytestmark = pytest.mark.usefixtures("one_thread")


# --- hand-written reference of the official MaskCollator (multiblock.py) --------------------
class OfficialMaskCollator:
    """The official ``MaskCollator`` with its two random sources made explicit: ``size_gen`` (the
    official per-batch generator seeded by the iteration) and ``pos_gen`` (the official global
    RNG of ``torch.randint``). One change: ``.view(-1)`` where the official ``.squeeze()`` makes
    a one-patch block a 0-d tensor (on which its ``len`` fails)."""

    def __init__(self, grid, enc_scale, pred_scale, aspect, nenc, npred, min_keep):
        self.height, self.width = grid
        self.enc_scale, self.pred_scale, self.aspect = enc_scale, pred_scale, aspect
        self.nenc, self.npred, self.min_keep = nenc, npred, min_keep

    def sample_block_size(self, g, scale, aspect):
        r = torch.rand(1, generator=g).item()
        max_keep = int(self.height * self.width * (scale[0] + r * (scale[1] - scale[0])))
        ar = aspect[0] + r * (aspect[1] - aspect[0])
        h = int(round(math.sqrt(max_keep * ar)))
        w = int(round(math.sqrt(max_keep / ar)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1
        return h, w

    def sample_block_mask(self, g, size, acceptable=None):
        h, w = size
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, self.height - h, (1,), generator=g)
            left = torch.randint(0, self.width - w, (1,), generator=g)
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable is not None:
                for k in range(max(len(acceptable) - tries, 0)):
                    mask *= acceptable[k]
            mask = torch.nonzero(mask.flatten())
            if len(mask) > self.min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top:top + h, left:left + w] = 0
        return mask.view(-1), complement

    def __call__(self, n, size_gen, pos_gen):
        p_size = self.sample_block_size(size_gen, self.pred_scale, self.aspect)
        e_size = self.sample_block_size(size_gen, self.enc_scale, (1.0, 1.0))
        preds, encs = [], []
        keep_pred = keep_enc = self.height * self.width
        for _ in range(n):
            masks_p, masks_c = [], []
            for _ in range(self.npred):
                m, c = self.sample_block_mask(pos_gen, p_size)
                masks_p.append(m)
                masks_c.append(c)
                keep_pred = min(keep_pred, len(m))
            preds.append(masks_p)
            masks_e = []
            for _ in range(self.nenc):
                m, _ = self.sample_block_mask(pos_gen, e_size, acceptable=masks_c)
                masks_e.append(m)
                keep_enc = min(keep_enc, len(m))
            encs.append(masks_e)
        preds = torch.utils.data.default_collate([[m[:keep_pred] for m in ms] for ms in preds])
        encs = torch.utils.data.default_collate([[m[:keep_enc] for m in ms] for ms in encs])
        return encs, preds  # lists (nenc / npred) of [n, K]


def official_reference(spec: MultiBlock) -> OfficialMaskCollator:
    return OfficialMaskCollator(spec.grid, spec.context_scale, spec.target_scale, spec.aspect,
                                1, spec.num_targets, spec.min_keep)


def spec_for(grid: int, **kw) -> MultiBlock:
    scale = kw.pop("target_scale", (0.15, 0.2))
    return MultiBlock((grid, grid), target_scale=scale,
                      min_keep=kw.pop("min_keep", default_min_keep((grid, grid), scale)), **kw)


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_masks_replay_the_official_collator_on_one_generator(grid):
    spec = spec_for(grid)
    for seed in range(12):
        context, targets = multiblock_masks(torch.Generator().manual_seed(seed), 6, spec)
        g = torch.Generator().manual_seed(seed)
        (enc,), preds = official_reference(spec)(6, g, g)
        assert torch.equal(context, enc)
        assert torch.equal(targets, torch.stack(preds))


def test_a_context_that_lost_every_patch_lets_targets_in_as_officially():
    """On 4x4 the targets can cover the whole 3x3 context block (about 1 image in 200): the
    official retry then lets the last targets back in. Find such a batch; it replays too."""
    spec = spec_for(4)
    assert spec.min_keep == 0
    for seed in range(300):
        context, targets = multiblock_masks(torch.Generator().manual_seed(seed), 6, spec)
        overlap = [set(context[n].tolist()) & set(targets[:, n].flatten().tolist())
                   for n in range(6)]
        if any(overlap):
            break
    assert any(overlap)
    g = torch.Generator().manual_seed(seed)
    (enc,), preds = official_reference(spec)(6, g, g)
    assert torch.equal(context, enc) and torch.equal(targets, torch.stack(preds))
    assert context.shape[1] >= 1 and targets.shape[2] >= 1


def test_masks_equal_lightlys_collator_with_its_two_random_sources():
    spec = spec_for(8)
    collator = IJEPAMaskCollator(input_size=32, patch_size=4, enc_mask_scale=spec.context_scale,
                                 pred_mask_scale=spec.target_scale, aspect_ratio=spec.aspect,
                                 nenc=1, npred=spec.num_targets, min_keep=spec.min_keep)
    images = [torch.zeros(1) for _ in range(5)]
    for step in range(4):  # lightly seeds its size generator with the collator's call count
        sizes = block_sizes(torch.Generator().manual_seed(step), spec)
        torch.manual_seed(100 + step)
        context, targets = place_blocks(torch.default_generator, 5, spec, sizes)
        torch.manual_seed(100 + step)
        _, (enc,), preds = collator(images)
        assert torch.equal(context, enc) and torch.equal(targets, torch.stack(preds))


def test_mask_statistics_blocks_within_scale_and_aspect_no_overlap_truncation():
    spec, seen = spec_for(16), set()
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        (th, tw), (ch, cw) = block_sizes(gen, spec)
        context, targets = place_blocks(gen, 8, spec, ((th, tw), (ch, cw)))
        seen.add((th, tw))
        area = th * tw
        # the official rounding: area within int(L x scale) +- what rounding h, w adds
        assert int(256 * 0.15) - th - tw <= area <= int(256 * 0.2) + th + tw
        assert 0.75 * 0.5 <= th / tw <= 1.5 * 2
        assert (ch, cw) == (15, 15)  # 0.85-1 of a 16x16 grid, kept below its side
        assert targets.shape == (4, 8, area)  # every target a whole block: no truncation
        for n in range(8):
            ctx = set(context[n].tolist())
            assert not ctx & set(targets[:, n].flatten().tolist())  # allow_overlap False
            rows = {i // 16 for i in ctx} | {i // 16 for i in targets[:, n].flatten().tolist()}
            assert 15 not in rows  # the official randint bound never reaches the last row
        assert len(context[0]) > spec.min_keep
    for seed in range(40, 3000):  # sizes only: every reachable size comes up
        seen.add(block_sizes(torch.Generator().manual_seed(seed), spec)[0])
    assert seen == reachable_sizes((16, 16), (0.15, 0.2), TARGET_ASPECT)


def test_context_is_cut_to_the_batch_minimum_as_a_prefix_of_each_list():
    spec = spec_for(8)
    gen = torch.Generator().manual_seed(3)
    sizes = block_sizes(gen, spec)
    state = gen.get_state()
    context, _ = place_blocks(gen, 6, spec, sizes)
    gen.set_state(state)
    full = [place_blocks(gen, 1, spec, sizes)[0][0].tolist() for _ in range(6)]
    assert context.shape[1] == min(len(f) for f in full)
    assert any(len(f) > context.shape[1] for f in full)
    for row, f in zip(context.tolist(), full, strict=True):
        assert row == f[:len(row)]


# --- predictor and loss against the official forward ---------------------------------------
def apply_masks(x, masks):  # official src/masks/utils.py
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1)))
                      for m in masks], dim=0)


def repeat_interleave_batch(x, b, repeat):  # official src/utils/tensors.py
    n = len(x) // b
    return torch.cat([torch.cat([x[i * b:(i + 1) * b] for _ in range(repeat)], dim=0)
                      for i in range(n)], dim=0)


def official_predictor(p: Predictor, x, masks_x, masks):
    """``VisionTransformerPredictor.forward`` on ``p``'s weights."""
    b = len(x) // len(masks_x)
    x = p.predictor_embed(x)
    x = x + apply_masks(p.predictor_pos_embed.repeat(b, 1, 1), masks_x)
    n_ctxt = x.shape[1]
    pos = apply_masks(p.predictor_pos_embed.repeat(b, 1, 1), masks)
    pos = repeat_interleave_batch(pos, b, repeat=len(masks_x))
    tokens = p.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
    x = torch.cat([x.repeat(len(masks), 1, 1), tokens], dim=1)
    for blk in p.predictor_blocks:
        x = blk(x)
    return p.predictor_proj(p.predictor_norm(x)[:, n_ctxt:])


def test_predictor_matches_the_official_forward_and_depends_on_context():
    torch.manual_seed(0)
    p = Predictor(grid=8, embed_dim=32, width=16, depth=2, num_heads=2).eval()
    context, targets = multiblock_masks(torch.Generator().manual_seed(1), 3, spec_for(8))
    ctx = torch.randn(3, context.shape[1], 32)
    out = p(ctx, context, targets)
    assert out.shape == (4 * 3, targets.shape[2], 32)
    ref = official_predictor(p, ctx, [context], list(targets))
    assert torch.allclose(out, ref, atol=1e-6)
    changed = ctx.clone()
    changed[1] += 1.0
    diff = (p(changed, context, targets) - out).abs().amax(dim=(1, 2)).view(4, 3)  # [M, N]
    assert (diff[:, 1] > 1e-4).all() and (diff[:, [0, 2]] == 0).all()
    assert p.predictor_pos_embed.requires_grad is False


def _cfg(**kw) -> RunConfig:
    return RunConfig().replace(model={"arch": "vit_micro_patch2", "img_size": 16},
                               train={"method": "ijepa", "epochs": 2}, **kw)


def test_loss_equals_the_official_formula():
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 16).train()
    with torch.no_grad():  # a teacher different from the student
        for p in method.teacher_backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    imgs = torch.randn(4, 3, 16, 16)
    batch = Batch([imgs], torch.full((4,), -1), torch.Generator().manual_seed(7))
    loss = method(batch)["loss"]
    enc, preds = method.draw_masks(4, torch.Generator().manual_seed(7))
    masks_enc, masks_pred = [enc], list(preds)
    with torch.no_grad():  # official forward_target, on a ViT without cls token output
        h = method.teacher_backbone.forward_features(imgs)[:, 1:]
        h = F.layer_norm(h, (h.size(-1),))
        h = repeat_interleave_batch(apply_masks(h, masks_pred), 4, repeat=len(masks_enc))
    z = method.backbone.forward_features(imgs, enc)[:, 1:]
    z = official_predictor(method.predictor, z, masks_enc, masks_pred)
    assert torch.allclose(loss, F.smooth_l1_loss(z, h), atol=1e-6)


# --- schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("ipe_scale", [1.0, 1.25])
def test_momentum_follows_the_official_linear_generator(ipe_scale):
    ipe, epochs, ema = 5, 3, (0.996, 1.0)
    official = list(ema[0] + i * (ema[1] - ema[0]) / (ipe * epochs * ipe_scale)
                    for i in range(int(ipe * epochs * ipe_scale) + 1))
    ours = [linear_momentum(k, ipe * epochs * ipe_scale, 0.996) for k in range(1, 16)]
    assert ours == pytest.approx(official[:15], abs=1e-15)


def test_on_step_end_moves_the_teacher_with_the_linear_momentum():
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 16)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(torch.randn_like(p))
    student = method.backbone.blocks[0].mlp.fc1.weight
    teacher = method.teacher_backbone.blocks[0].mlp.fc1.weight
    old = teacher.clone()
    method.on_step_end(4, 10)
    m = 0.996 + 3 * 0.004 / 10
    assert torch.allclose(teacher, m * old + (1 - m) * student, atol=1e-7)


def test_weight_decay_schedule_against_the_official_cosine():
    """Official ``CosineWDSchedule`` (T_max = int(ipe_scale x epochs x ipe), ipe_scale 1 in the
    released configs): train.py calls its step() at the start of iteration i (from 0), which
    advances the counter first, so iteration i decays with f((i + 1) / T), clamped at the final
    value: the engine applies exactly that array, to the decayed groups only."""
    ipe, epochs = 6, 2
    total = ipe * epochs
    cfg = resolve_config(_cfg())
    method = build_method(cfg, 3, 16)
    step = build_train_step(cfg, method, torch.optim.AdamW(method.parameters()), lambda i: 1e-3,
                            device=torch.device("cpu"), precision="fp32", total_steps=total)
    t_max = int(IJEPA.schedule_stretch * epochs * ipe)
    wd, final = 0.04, 0.4
    official = []
    for k in range(1, total + 1):
        v = final + (wd - final) * 0.5 * (1.0 + math.cos(math.pi * k / t_max))
        official.append(min(final, v))
    engine = [step.wd_schedule(i) for i in range(total)]
    assert engine == pytest.approx(official, abs=1e-12)
    assert engine[-1] == pytest.approx(0.4) and engine[0] > 0.04
    assert engine != [cosine_weight_decay(i, t_max, wd, final) for i in range(total)]


def test_defaults_and_learning_rate_arithmetic():
    cfg = resolve_config(_cfg())
    assert (cfg.mae.num_targets, cfg.mae.target_scale_min, cfg.mae.target_scale_max) == \
        (4, 0.15, 0.2)
    assert (cfg.train.weight_decay, cfg.train.weight_decay_end, cfg.ssl.momentum) == \
        (0.04, 0.4, 0.996)
    assert peak_lr(cfg.train, 2048) == pytest.approx(1e-3)  # official lr at batch 2,048
    assert peak_lr(cfg.train, 128) == pytest.approx(1e-3 * (128 / 2048) ** 0.5)
    assert IJEPA.row_fields(cfg) == {"num_targets": 4, "target_scale_min": 0.15,
                                     "target_scale_max": 0.2}
    assert {"mae.num_targets", "model.decoder_depth"} <= IJEPA.own_knobs


# --- display and errors ---------------------------------------------------------------------
def test_display_mask_is_what_the_step_uses():
    method = build_method(_cfg(), 3, 16)
    imgs = torch.zeros(5, 3, 16, 16)
    shown = method.display_mask(imgs, torch.Generator().manual_seed(2))
    context, targets = method.draw_masks(5, torch.Generator().manual_seed(2))
    assert shown.shape == (5, 8, 8) and shown.dtype == torch.int64
    flat = shown.flatten(1)
    for n in range(5):
        assert (flat[n, targets[:, n].flatten()] == 1).all()
        assert set(torch.nonzero(flat[n] == 0).flatten().tolist()) == \
            set(context[n].tolist()) - set(targets[:, n].flatten().tolist())
        assert (flat[n] == 2).sum() > 0
    assert method.reconstruct(imgs, torch.Generator().manual_seed(2)) is None


@pytest.mark.parametrize(("model", "mae", "message"), [
    ({"arch": "vit_micro_patch4"}, {"num_targets": 9},
     "mae.num_targets=9 target blocks of at least 1 patches (mae.target_scale_min=0.15) cover "
     "the whole context block (9 patches) of a 4x4 patch grid"),
    ({"arch": "vit_micro_patch4"}, {"target_scale_min": 0.01, "target_scale_max": 0.02},
     "mae.target_scale_min=0.01 gives target blocks of 0 patches on a 4x4 patch grid"),
    ({"arch": "vit_micro_patch4", "img_size": 4}, {},
     "I-JEPA's blocks must be narrower than the image: a 1x1 patch grid is too small"),
    ({"arch": "vit_micro_patch2", "decoder_embed_dim": 30}, {},
     "model.decoder_embed_dim=30 must be divisible by 4 and by model.decoder_num_heads=2"),
])
def test_config_errors_name_the_value_and_the_fix(model, mae, message):
    cfg = _cfg(mae=mae).replace(model=model)
    size = cfg.model.img_size
    with pytest.raises(ConfigError) as info:
        build_method(cfg, 3, size)
    assert message in str(info.value) and "\n" not in str(info.value)
