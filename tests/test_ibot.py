"""iBOT (baselines/ibot.py, baselines/ibot_masks.py) against hand-written references of the
official code, bytedance/ibot at commit da316d82636a7a7356835ef224b13d5f3ace0489:
loader.py ``ImageFolderMask`` (block masks), main_ibot.py ``iBOTLoss`` (both loss terms, both
centres, the temperature arrays), models/vision_transformer.py ``mask_model`` (the mask token);
and lightly's ``IBOTPatchLoss`` as a second reference for the patch term."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import IBOTPatchLoss

from baselines.ibot import IBOT, IBOTHead, MaskedPatchLoss
from baselines.ibot_masks import ibot_masks, prediction_ratio
from baselines.losses import DINOLoss
from mae_bench.config import RunConfig
from mae_bench.data.augment import BatchViews
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 16
SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "out_dim": 24}


def _cfg(epochs: float = 2, arch: str = "vit_micro_patch4", img: int = IMG, mae=None,
         **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": arch, "img_size": img},
                               train={"method": "ibot", "epochs": epochs},
                               mae=mae or {}, ssl={**SMALL, **ssl})


def _batch(method: IBOT, n: int = 4, seed: int = 0, step: int = 0, total: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)
    views = [BatchViews(s, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(images, g)
             for s in method.view_specs()]
    return Batch(views, torch.full((n,), -1), torch.Generator().manual_seed(seed + 1), step, total)


# --- the official loader.py, written out (global ``random``, numpy masks) -------------------


def _official_pred_ratio(pred_ratio: list[float], pred_ratio_var: list[float]) -> float:
    ratios = []
    for prm, prv in zip(pred_ratio, pred_ratio_var, strict=True):
        ratios.append(random.uniform(prm - prv, prm + prv) if prv > 0 else prm)
    return random.choice(ratios)


def _official_block_mask(H: int, W: int, high: float) -> np.ndarray:
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _attempt in range(10):
            low = (min(H, W) // 3) ** 2
            target_area = random.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top = random.randint(0, H - h)
                left = random.randint(0, W - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask


def _official_masks(seed: int, n: int, crops: int, grid: int, ratio: float, var: float
                    ) -> np.ndarray:
    """[crops, N, grid, grid]: __getitem__ of N images in turn, each with ``crops`` crops."""
    random.seed(seed)
    out = np.zeros((crops, n, grid, grid), dtype=bool)
    for i in range(n):
        for c in range(crops):
            high = _official_pred_ratio([0, ratio], [0, var]) * grid * grid
            out[c, i] = _official_block_mask(grid, grid, high)
    return out


@pytest.mark.parametrize(("grid", "ratio", "var"), [(4, 0.3, 0.2), (8, 0.3, 0.2),
                                                    (14, 0.3, 0.2), (14, 0.4, 0.0)])
def test_block_masks_replay_the_official_loader_on_the_same_stream(grid, ratio, var):
    for seed in range(3):
        ours = ibot_masks(random.Random(seed), 16, 2, grid, ratio, var)  # [2, N, L]
        ref = _official_masks(seed, 16, 2, grid, ratio, var)
        assert ours.any()
        assert np.array_equal(ours.view(2, 16, grid, grid).numpy(), ref)


def test_mask_statistics_follow_the_paper():
    rng = random.Random(1)
    ratios = [prediction_ratio(rng, 0.3, 0.2) for _ in range(4000)]
    drawn = [r for r in ratios if r > 0]
    assert 0.46 < 1 - len(drawn) / len(ratios) < 0.54  # ratio 0 with probability 1/2
    assert min(drawn) >= 0.1 and max(drawn) <= 0.5 and abs(np.mean(drawn) - 0.3) < 0.01
    masks = ibot_masks(random.Random(2), 1000, 1, 14, 0.3, 0.2)[0]  # [N, L]
    counts = masks.sum(1).float()
    nonzero = counts[counts > 0]
    assert 0.45 < 1 - len(nonzero) / len(counts) < 0.55
    assert nonzero.max() <= 0.5 * 196 and nonzero.min() >= 1
    assert 0.26 < (nonzero / 196).mean() < 0.31  # blocks fall a little short of the ratio
    fixed = ibot_masks(random.Random(3), 200, 1, 14, 0.3, 0.0)[0].sum(1)
    assert fixed.max() <= 0.3 * 196 and (fixed[fixed > 0] >= 0.2 * 196).all()


# --- the official iBOTLoss, written out (one process, centres start at zero) -----------------


class _OfficialIBOTLoss:
    def __init__(self, out_dim, patch_out_dim, ngcrops, nlcrops, student_temp=0.1):
        self.student_temp, self.ngcrops, self.ncrops = student_temp, ngcrops, ngcrops + nlcrops
        self.center = torch.zeros(1, out_dim)
        self.center2 = torch.zeros(1, 1, patch_out_dim)

    def __call__(self, student_output, teacher_output, student_local_cls, student_mask,
                 temp, temp2):
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])
        student_cls_c = (student_cls / self.student_temp).chunk(self.ncrops)
        student_patch_c = (student_patch / self.student_temp).chunk(self.ngcrops)
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1).chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2,
                                    dim=-1).chunk(self.ngcrops)
        loss1, n1, loss2, n2 = 0, 0, 0, 0
        for q in range(len(teacher_cls_c)):
            for v in range(len(student_cls_c)):
                if v == q:
                    lp = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], -1), -1)
                    mask = student_mask[v].flatten(-2, -1)
                    lp = torch.sum(lp * mask.float(), -1) / mask.sum(-1).clamp(min=1.0)
                    loss2, n2 = loss2 + lp.mean(), n2 + 1
                else:
                    lc = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], -1), -1)
                    loss1, n1 = loss1 + lc.mean(), n1 + 1
        cls_center = teacher_cls.sum(0, keepdim=True) / len(teacher_cls)
        self.center = self.center * 0.9 + cls_center * 0.1
        patch_center = teacher_patch.mean(1).sum(0, keepdim=True) / len(teacher_patch)
        self.center2 = self.center2 * 0.9 + patch_center * 0.1
        return loss1 / n1, loss2 / n2


@pytest.mark.parametrize("local_crops", [0, 2])
def test_loss_matches_the_official_ibot_loss_and_its_centres(local_crops):
    g = torch.Generator().manual_seed(0)
    n, grid, k, k2 = 5, 3, 11, 7
    ref = _OfficialIBOTLoss(k, k2, 2, local_crops)
    cls_loss, patch_loss = DINOLoss(k, 0.1, 0.9, "zeros"), MaskedPatchLoss(k2, 0.1, 0.9, "zeros")
    for _ in range(2):  # the second call uses the updated centres
        s_cls = [torch.randn(n, k, generator=g) for _ in range(2 + local_crops)]
        t_cls = [torch.randn(n, k, generator=g) for _ in range(2)]
        s_patch = [torch.randn(n, grid * grid, k2, generator=g) for _ in range(2)]
        t_patch = [torch.randn(n, grid * grid, k2, generator=g) for _ in range(2)]
        masks = torch.rand(2, n, grid * grid, generator=g) < 0.4  # [2, N, L]
        masks[0, 1] = False  # an image with ratio 0: it adds 0 to the mean
        want_cls, want_patch = ref(
            (torch.cat(s_cls[:2]), torch.cat(s_patch)), (torch.cat(t_cls), torch.cat(t_patch)),
            torch.cat(s_cls[2:]) if local_crops else None,
            list(masks.view(2, n, grid, grid)), 0.05, 0.06)
        got_cls = cls_loss(s_cls, t_cls, 0.05)
        got_patch = patch_loss(s_patch, t_patch, masks, 0.06)
        torch.testing.assert_close(got_cls, want_cls, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_patch, want_patch, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cls_loss.center, ref.center, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(patch_loss.center, ref.center2, rtol=1e-5, atol=1e-7)


def test_patch_loss_matches_lightly_on_the_masked_tokens():
    """lightly (after DINOv2) takes only the masked tokens and weights each by 1 / its image's
    count; its centre follows the masked tokens, ours (official) every token: compare the loss
    with both centres at zero."""
    g = torch.Generator().manual_seed(4)
    n, grid, k2 = 6, 4, 13
    teacher = torch.randn(n, grid * grid, k2, generator=g)
    student = torch.randn(n, grid * grid, k2, generator=g)
    mask = torch.rand(n, grid * grid, generator=g) < 0.3
    mask[2] = False
    ours = MaskedPatchLoss(k2, 0.1)([student], [teacher], mask[None], 0.05)
    theirs = IBOTPatchLoss(output_dim=k2, teacher_temp=0.05, student_temp=0.1)(
        teacher[mask], student[mask], mask.view(n, grid, grid))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# --- heads, mask token, schedules ------------------------------------------------------------


def test_shared_and_separate_heads():
    tokens = torch.randn(3, 1 + 16, 32)
    shared = IBOTHead(32, 24, 32, 16, True)
    cls, patch = shared.forward_tokens(tokens)
    assert cls.shape == (3, 24) and patch.shape == (3, 16, 24) and shared.last_layer2 is None
    torch.testing.assert_close(cls, shared(tokens[:, 0]))  # DINO's head on the [CLS] token
    torch.testing.assert_close(patch, torch.stack([shared(tokens[:, i]) for i in range(1, 17)], 1))
    torch.manual_seed(0)
    method = build_method(_cfg(shared_head=False, patch_out_dim=40), 3, IMG)
    cls, patch = method.head.forward_tokens(tokens)
    assert cls.shape == (3, 24) and patch.shape == (3, 16, 40)
    assert method.teacher_head.last_layer2 is not None  # the teacher mirrors the student
    assert method.patch_loss.center.shape == (1, 1, 40)
    out = method(_batch(method))
    out["loss"].backward()
    assert method.head.last_layer2.parametrizations.weight.original1.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="patch_out_dim 40 needs its own head"):
        build_method(_cfg(patch_out_dim=40), 3, IMG)


def test_masked_patches_enter_the_student_as_the_mask_token_the_teacher_sees_all():
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, IMG).train()
    with torch.no_grad():
        method.mask_token.normal_()
    batch = _batch(method, seed=3)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    hooks = [vit.blocks[0].register_forward_pre_hook(
        lambda _m, args, who=who: seen[who].append(args[0].detach()))
        for who, vit in (("student", method.backbone), ("teacher", method.teacher_backbone))]
    out = method(batch)
    for h in hooks:
        h.remove()
    masks = method.draw_masks(4, torch.Generator().manual_seed(4))  # the batch's generator
    assert masks.any() and not masks.all()
    pos = method.backbone.pos_embed[:, 1:]  # [1, L, D]
    for view, mask, tokens, t_tokens in zip(batch.views, masks, seen["student"],
                                            seen["teacher"], strict=True):
        embedded = method.backbone.patch_embed(view) + pos  # [N, L, D]
        want = torch.where(mask[..., None], method.mask_token + pos, embedded)
        torch.testing.assert_close(tokens[:, 1:], want.detach())
        torch.testing.assert_close(t_tokens[:, 1:], embedded.detach())
    out["loss"].backward()
    assert method.mask_token.grad.abs().sum() > 0
    assert out["masked"] == masks.float().mean()
    # the masked encoding without a mask is the backbone's own forward
    x = batch.views[0]
    none = torch.zeros(4, 16, dtype=torch.bool)
    torch.testing.assert_close(method.backbone.forward_features_masked(x, none, method.mask_token),
                               method.backbone.forward_features(x))


def _official_temp_schedule(warmup: float, final: float, warmup_epochs: int, nepochs: int
                            ) -> np.ndarray:
    return np.concatenate((np.linspace(warmup, final, warmup_epochs),
                           np.ones(nepochs - warmup_epochs) * final))


def test_teacher_temperatures_follow_the_official_arrays_at_whole_epochs():
    torch.manual_seed(0)
    method = build_method(_cfg(epochs=100, teacher_temp=0.07, teacher_patch_temp=0.07,
                               teacher_temp_warmup_epochs=30), 3, IMG)
    cls_ref = _official_temp_schedule(0.04, 0.07, 30, 100)  # README's recipe for the [CLS]
    patch_ref = _official_temp_schedule(0.04, 0.07, 30, 100)  # argparse defaults, patches
    with torch.no_grad():
        for epoch in (0, 1, 10, 28, 29, 30, 99):
            out = method(_batch(method, n=2, step=epoch * 5, total=500))
            assert out["teacher_temp"].item() == pytest.approx(cls_ref[epoch], abs=1e-9)
            assert out["teacher_patch_temp"].item() == pytest.approx(patch_ref[epoch], abs=1e-9)
    # the defaults: both 0.04 throughout; a patch temperature of 0.07 warms up over 30 %
    method = build_method(_cfg(epochs=10), 3, IMG)
    assert method.temps == (0.04, 0.04) and method.patch_temps == (0.04, 0.04)
    method = build_method(_cfg(epochs=10, teacher_patch_temp=0.07), 3, IMG)
    assert method.temp_warmup == 3.0 and method.patch_temps == (0.04, 0.07)


def test_defaults_row_fields_display_mask_and_config_errors():
    cfg = resolve_config(_cfg())
    assert (cfg.mae.mask_ratio, cfg.mae.mask_ratio_var) == (0.3, 0.2)
    assert (cfg.train.weight_decay, cfg.train.weight_decay_end, cfg.train.blr) == (0.04, 0.4, 5e-4)
    assert IBOT.row_fields(cfg) == {"mask_ratio": 0.3, "mask_ratio_var": 0.2}
    torch.manual_seed(0)
    method = build_method(_cfg(), 3, IMG)
    shown = method.display_mask(torch.zeros(8, 3, IMG, IMG), torch.Generator().manual_seed(7))
    drawn = method.draw_masks(8, torch.Generator().manual_seed(7))[0]
    assert shown.dtype == torch.int64 and shown.shape == (8, 4, 4)
    assert torch.equal(shown.flatten(1), drawn.long()) and set(shown.unique().tolist()) <= {0, 1}
    assert method.reconstruct(torch.zeros(2, 3, IMG, IMG), torch.Generator()) is None
    with pytest.raises(ConfigError, match="mask_ratio 0.3 with mask_ratio_var 0.4"):
        build_method(_cfg(mae={"mask_ratio_var": 0.4}), 3, IMG)
    with pytest.raises(ConfigError, match="1x1 here"):
        build_method(_cfg(img=4), 3, 4)
