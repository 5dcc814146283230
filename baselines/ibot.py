"""iBOT (Zhou et al. 2022, arXiv 2111.07832) on the shared ViT: DINO's self-distillation of the
[CLS] token plus masked image modeling against an online tokenizer, the EMA teacher itself.

The student sees the two global crops with blockwise masks (``ibot_masks``): a masked patch's
embedding is replaced by a learnt mask token before the position embedding is added (official
models/vision_transformer.py, ``masked_embed``, zero-initialised). The EMA teacher sees the
unmasked crops. One head (``IBOTHead``) maps every token to prototypes. The loss (official
main_ibot.py ``iBOTLoss``) is lambda1 x DINO's [CLS] cross-entropy between each teacher global
crop and every other student crop (``losses.DINOLoss``) plus lambda2 x the patch
cross-entropy between the teacher's and the student's tokens of the same crop on its masked
patches, averaged per image over its masked patches, then over images and crops
(``MaskedPatchLoss``); each term has its own centre (momentum 0.9) and teacher temperature.

Numbers taken from the official code (bytedance/ibot, main_ibot.py argparse defaults and the
README's ViT-S/16 recipe): prediction ratio 0 or U[0.1, 0.5] per crop (README: pred_ratio
0 0.3, pred_ratio_var 0 0.2; ``mae.mask_ratio`` / ``mae.mask_ratio_var``), block aspect ratio
[0.3, 1 / 0.3]; a head shared by [CLS] and patch tokens (README: shared_head true; ``ssl.
shared_head: false`` gives the patch tokens their own last layer of ``ssl.patch_out_dim``
prototypes); 3-layer head, 2,048 wide, 256-d bottleneck, last layer with its norm fixed
(the argparse default; the ViT-S recipe learns it: ``ssl.norm_last_layer: false``);
student temperature 0.1; [CLS] teacher temperature 0.04 (argparse default); lambda1 = lambda2
= 1 (``ssl.patch_loss_weight``); teacher momentum 0.996 -> 1 along a half cosine, applied
after optimizer step i (from 0) with ``momentum_schedule[i]``, as DINO
(``ema.momentum_after_step``); AdamW, lr 5e-4 x batch / 256; weight decay 0.04 -> 0.4 along a
half cosine (``train.weight_decay_end``, run by the engine).

Changed for small data and short runs, as in baselines/dino.py and for its reasons:
- 4,096 prototypes instead of 8,192 (``ssl.out_dim``);
- both centres start at the first batch's mean teacher output (``ssl.center_init: batch``;
  the official ones start at zero);
- both teacher temperatures stay 0.04 (``ssl.teacher_temp``, ``ssl.teacher_patch_temp``;
  the README warms the [CLS] one to 0.07, the argparse defaults the patch one): as dino.py
  found for the [CLS] head, a warm-up to 0.07 within a run of a few hundred steps flattens the
  shared head's outputs to the uniform solution (on digits, 88 steps: the logits' spread over
  prototypes fell tenfold with the patch warm-up, stayed as DINO's without). Set to 0.07, the
  patch temperature warms up over 30 % of the run (the official 30 of its default 100 epochs;
  ``ssl.teacher_temp_warmup_epochs``);
- lr warm-up of at least 250 steps (``train.warmup_min_steps``), the last layer not frozen in
  the first epoch (``ssl.freeze_last_layer_epochs``), no local crops (``ssl.local_crops``; the
  README's ViT-S uses 10, seen by the student unmasked, [CLS] loss only).
- when the patch tokens have their own last layer, so does the teacher (an EMA of it): the
  official default (``--shared_head_teacher true``) would give the teacher's patch tokens the
  [CLS] last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from baselines.base import BackboneMethod
from baselines.dino import teacher_temperature
from baselines.heads import DINOHead
from baselines.ibot_masks import draw_masks
from baselines.losses import DINOLoss
from baselines.views import dino_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.training.distributed import all_reduce_mean

GLOBAL_CROPS = 2


def _prototypes(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """DINO's last layer: weight-normalised Linear, norm 1, fixed unless ``norm_last_layer``."""
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    layer.parametrizations.weight.original0.data.fill_(1.0)
    layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)
    return layer


class IBOTHead(DINOHead):
    """iBOT's head (official models/head.py ``iBOTHead``): DINO's head applied to every token,
    the patch tokens through ``last_layer`` too (shared) or through their own ``last_layer2``
    of ``patch_out_dim`` prototypes (``patch_out_dim`` not None); the MLP is always shared."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 norm_last_layer: bool, patch_out_dim: int | None = None):
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim,
                         norm_last_layer=norm_last_layer)
        self.last_layer2 = (None if patch_out_dim is None
                            else _prototypes(bottleneck_dim, patch_out_dim, norm_last_layer))

    def forward_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """[N, 1+L, D] encoder tokens -> [CLS] logits [N, K] and patch logits [N, L, K2]."""
        x = F.normalize(self.mlp(tokens), dim=-1, eps=1e-6)  # [N, 1+L, bottleneck]
        patch_layer = self.last_layer if self.last_layer2 is None else self.last_layer2
        return self.last_layer(x[:, 0]), patch_layer(x[:, 1:])  # [N, K], [N, L, K2]


class MaskedPatchLoss(nn.Module):
    """iBOT's patch term (official ``iBOTLoss``, the ``v == q`` pairs): for each global crop,
    the cross-entropy between the centred, sharpened teacher patch distribution and the
    student's on the same position, summed over the masked positions and divided by their
    count (at least 1) per image, averaged over images, then over crops. The centre ``center2``
    moves towards the teacher's mean over every token of every crop and image.

    Args:
        out_dim: K2, the patch prototypes.
        student_temp: 0.1 officially.
        center_momentum: 0.9 officially (``center_momentum2``).
        center_init: "zeros" (official) or "batch" (the first batch's mean, as ``DINOLoss``).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_init: str = "zeros"):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.center_init = center_init
        self.register_buffer("center", torch.zeros(1, 1, out_dim))  # [1, 1, K2]

    def forward(self, student: list[Tensor], teacher: list[Tensor], masks: Tensor,
                teacher_temp: float) -> Tensor:
        """student, teacher: one [N, L, K2] logit tensor per global crop; masks [crops, N, L]
        (True = masked in the student's input)."""
        if self.center_init == "batch" and not bool(self.center.any()):
            self.center.copy_(self._batch_center(teacher))
        total = 0.0
        for s, t, mask in zip(student, teacher, masks, strict=True):
            t_probs = F.softmax((t.float() - self.center) / teacher_temp, dim=-1)  # [N, L, K2]
            s_logp = F.log_softmax(s.float() / self.student_temp, dim=-1)  # [N, L, K2]
            per_token = torch.sum(-t_probs.detach() * s_logp, dim=-1)  # [N, L]
            m = mask.float()  # [N, L]
            per_image = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [N]
            total = total + per_image.mean()
        with torch.no_grad():
            self.center.mul_(self.center_momentum).add_(self._batch_center(teacher),
                                                        alpha=1 - self.center_momentum)
        return total / len(student)

    @torch.no_grad()
    def _batch_center(self, teacher: list[Tensor]) -> Tensor:
        """[1, 1, K2]: the teacher's mean over crops, images and tokens (of all processes)."""
        return all_reduce_mean(torch.cat(teacher).float().mean(dim=(0, 1)).view(1, 1, -1))


class IBOT(BackboneMethod):
    """iBOT: DINO on the [CLS] token plus self-distillation of masked patch tokens."""

    name = "ibot"
    needs_vit = True
    defaults = {"train": {"optimizer": "adamw", "blr": 5e-4, "weight_decay": 0.04,
                          "weight_decay_end": 0.4, "lr_scaling": "linear", "lr_ref_batch": 256,
                          "warmup_min_steps": 250},
                "mae": {"mask_ratio": 0.3, "mask_ratio_var": 0.2},
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 256, "out_dim": 4096,
                        "shared_head": True, "norm_last_layer": True, "patch_loss_weight": 1.0,
                        "momentum": 0.996, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                        "teacher_patch_temp": 0.04, "student_temp": 0.1,
                        "center_momentum": 0.9, "center_init": "batch",
                        "freeze_last_layer_epochs": 0.0, "local_crops": 0}}
    own_knobs = frozenset({"mae.mask_ratio", "mae.mask_ratio_var", "ssl.patch_out_dim",
                           "ssl.shared_head", "ssl.patch_loss_weight", "ssl.teacher_patch_temp"})

    @classmethod
    def row_fields(cls, cfg: RunConfig) -> dict[str, float]:
        return {"mask_ratio": cfg.mae.mask_ratio, "mask_ratio_var": cfg.mae.mask_ratio_var}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s, m = cfg.ssl, cfg.mae
        self.mask_ratio, self.mask_ratio_var = m.mask_ratio, m.mask_ratio_var
        if not 0 <= self.mask_ratio_var <= self.mask_ratio < 1 - self.mask_ratio_var:
            raise ConfigError(f"iBOT draws each mask ratio from mask_ratio +- mask_ratio_var "
                              f"inside [0, 1): mask_ratio {self.mask_ratio} with "
                              f"mask_ratio_var {self.mask_ratio_var} does not fit; lower "
                              f"--mask-ratio-var")
        self.grid = self.backbone.grid_size
        if self.grid < 2:
            raise ConfigError(f"iBOT's mask blocks must be smaller than the patch grid, which is "
                              f"{self.grid}x{self.grid} here; use a smaller patch or larger images")
        shared = s.shared_head is not False
        if shared and s.patch_out_dim not in (None, s.out_dim):
            raise ConfigError(f"ssl.patch_out_dim {s.patch_out_dim} needs its own head: a shared "
                              f"head gives the patch tokens out_dim {s.out_dim} prototypes; set "
                              f"--no-shared-head or drop --patch-out-dim")
        patch_dim = s.out_dim if shared else s.patch_out_dim or s.out_dim
        self.head = IBOTHead(self.feature_dim, s.out_dim, s.proj_hidden_dim, s.proj_dim,
                             s.norm_last_layer is not False, None if shared else patch_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))  # [1, 1, D]
        self.add_teacher("backbone", "teacher_backbone")
        self.add_teacher("head", "teacher_head")
        self.cls_loss = DINOLoss(s.out_dim, s.student_temp, s.center_momentum,
                                 s.center_init or "zeros")
        self.patch_loss = MaskedPatchLoss(patch_dim, s.student_temp, s.center_momentum,
                                          s.center_init or "zeros")
        self.patch_weight = s.patch_loss_weight
        self.epochs = float(cfg.train.epochs)
        self.temps = (s.warmup_teacher_temp, s.teacher_temp)
        self.patch_temps = (s.warmup_teacher_temp, s.teacher_patch_temp)
        self.temp_warmup = (s.teacher_temp_warmup_epochs
                            if s.teacher_temp_warmup_epochs is not None else 0.3 * self.epochs)
        self.freeze_last_layer = s.freeze_last_layer_epochs
        self.local_crops = s.local_crops
        patch = self.backbone.patch_size
        default_local = max(patch, round(img_size * 96 / 224 / patch) * patch)
        self.local_size = s.local_crop_size or default_local

    def view_specs(self) -> list[ViewSpec]:
        return dino_views(self.img_size, self.local_crops, self.local_size)

    def draw_masks(self, n: int, generator: torch.Generator) -> Tensor:
        """[2, N, L] bool masks of the two global crops (True = masked)."""
        return draw_masks(generator, n, GLOBAL_CROPS, self.grid, self.mask_ratio,
                          self.mask_ratio_var)

    def embedding(self, features: Tensor) -> Tensor:
        """The head's l2-normalised bottleneck (before its prototype layer)."""
        return F.normalize(self.head.mlp(features), dim=-1)  # [N, bottleneck]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        epoch = batch.step * self.epochs / batch.total_steps  # whole at each epoch's first step
        temp = teacher_temperature(epoch, *self.temps, self.temp_warmup)
        patch_temp = teacher_temperature(epoch, *self.patch_temps, self.temp_warmup)
        views = batch.views[:GLOBAL_CROPS]
        masks = self.draw_masks(views[0].shape[0], batch.generator).to(views[0].device)
        student_cls, student_patch = [], []
        for view, mask in zip(views, masks, strict=True):
            tokens = self.backbone.forward_features_masked(view, mask, self.mask_token)
            cls, patch = self.head.forward_tokens(tokens)  # [N, K], [N, L, K2]
            student_cls.append(cls)
            student_patch.append(patch)
        if len(batch.views) > GLOBAL_CROPS:  # local crops: unmasked, [CLS] loss only
            student_cls += [self.head(h) for h in self.embed(batch.views[GLOBAL_CROPS:],
                                                                  record=False)]
        with torch.no_grad():
            teacher = [self.teacher_head.forward_tokens(self.teacher_backbone.forward_features(v))
                       for v in views]  # ([N, K], [N, L, K2]) per crop
        cls_loss = self.cls_loss(student_cls, [t[0] for t in teacher], temp)
        patch_loss = self.patch_loss(student_patch, [t[1] for t in teacher], masks, patch_temp)
        return {"loss": cls_loss + self.patch_weight * patch_loss, "cls_loss": cls_loss.detach(),
                "patch_loss": patch_loss.detach(), "masked": masks.float().mean(),
                "teacher_temp": torch.tensor(temp), "teacher_patch_temp": torch.tensor(patch_temp)}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step / total_steps * self.epochs < self.freeze_last_layer:  # official: "last_layer"
            for name, p in self.head.named_parameters():  # in the name: both last layers
                if name.startswith("last_layer"):
                    p.grad = None

    def display_mask(self, imgs: Tensor, generator: torch.Generator) -> Tensor:
        """The first global crop's mask, [N, gh, gw] int64 (1 = masked and predicted)."""
        mask = self.draw_masks(imgs.shape[0], generator)[0]  # [N, L]
        return mask.view(-1, self.grid, self.grid).long()  # [N, gh, gw]
