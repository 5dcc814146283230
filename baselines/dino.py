"""DINO (Caron et al. 2021, arXiv 2104.14294) on the shared ViT.

A student (ViT + DINO head) matches the output distribution of an EMA teacher of the same
architecture. The teacher sees the two global crops; the student every crop (global and, with
multi-crop, the small local ones). The teacher's output is centred (an EMA of its batch means,
all-reduced under torchrun) and sharpened by a low temperature; the loss is the cross-entropy
over every (teacher crop, other student crop) pair (``losses.DINOLoss``).

Numbers taken (the paper and the defaults of its official main_dino.py): student temperature
0.1; teacher temperature 0.04 throughout (main_dino.py's default; its 0.04 -> 0.07 warm-up over 30
epochs belongs to 300-epoch ViT-S runs, and a warm-up compressed into the 10 % of a run of a few
hundred steps took the teacher to 0.07 while it was still a random network, after which every
output flattened to the uniform solution); center momentum 0.9; teacher momentum 0.996 rising to
1 along a half cosine; head of 3 layers, 2,048 wide, 256-d bottleneck, weight-normalised last
layer with its norm fixed at 1 (``ssl.norm_last_layer: false`` learns it, the official recipe's
choice for ViT-S); AdamW with lr 5e-4 x batch / 256 (the official linear rule) and weight decay
0.04.

What follows the reference code (facebookresearch/dino, main_dino.py) exactly:
- the teacher moves right after optimizer step i (counted from 0) with
  ``momentum_schedule[it]``, the cosine from 0.996 to 1 over the run's K steps: the first update
  uses 0.996 itself and the last one still moves the teacher (``ema.momentum_after_step``);
- the teacher temperature at each whole epoch is the official per-epoch array's value (its
  warm-up reaches the final value at epoch W - 1); within an epoch it moves linearly to the next
  epoch's value (``teacher_temperature``).

Changed for small data and short runs:
- K = 4,096 prototypes instead of 65,536 (``ssl.out_dim``);
- the center starts at the first batch's mean teacher output (``ssl.center_init: batch``); the
  paper starts it at zeros, so for its first few steps the teacher is not centred and gives every
  image nearly the same target, and with a short warm-up the head's outputs then aligned to one
  direction within a few steps and never recovered (the diagnosis: results/compare-cifar10.md,
  "Why DINO went uniform");
- multi-crop off by default (``ssl.local_crops``; local crops are 96/224 of the image side,
  rounded to the patch size);
- the learning rate warms up for at least 250 optimizer steps (``train.warmup_min_steps``), the
  teacher's EMA horizon 1 / (1 - 0.996), but never for more than half the run. The official
  10 epochs are thousands of steps; the engine's 5 % of a run of a few hundred steps is a dozen,
  and at full learning rate the student then fits a teacher that is still its random
  initialisation, so the head's outputs align again (results/compare-cifar10.md, "Fourth
  pass"). On runs longer than 5,000 steps the floor changes nothing;
- the last layer is not frozen during the first epoch (``ssl.freeze_last_layer_epochs``; the
  paper uses 1, which on a run of a few epochs would freeze it for much of training);
- the paper's weight-decay schedule (0.04 to 0.4) is not applied: the engine keeps it constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.base import BackboneMethod, solo_learn_cifar
from baselines.heads import DINOHead
from baselines.losses import DINOLoss
from baselines.views import dino_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch


def teacher_temperature(epoch: float, start: float, end: float, warmup_epochs: float) -> float:
    """The teacher temperature at ``epoch`` (fractional): main_dino.py's schedule, joined
    linearly between whole epochs.

    The official schedule is per epoch: ``np.linspace(start, end, W)`` for the first W warm-up
    epochs, then ``end``, so epoch 0 has ``start`` and epoch W - 1 already ``end`` (0.04 -> 0.07
    over 30 epochs: 0.07 at epoch 29). This returns that value at every whole epoch; within an
    epoch, where the official code holds its epoch's value, it moves linearly towards the next
    epoch's, so a run of a few epochs (or less than one: W may be fractional here) still warms
    up smoothly. The ramp lasts W - 1 epochs for W >= 2, one epoch for 1 <= W <= 2 (W = 1 and 2
    both give ``start`` at epoch 0 and ``end`` from epoch 1 on, as the official arrays do) and
    W epochs below that; W <= 0 means no warm-up.
    """
    if warmup_epochs <= 0:
        return end
    ramp = warmup_epochs - 1 if warmup_epochs >= 2 else min(warmup_epochs, 1.0)
    if epoch >= ramp:
        return end
    return start + (end - start) * epoch / ramp


class DINO(BackboneMethod):
    """DINO: student / EMA teacher, centring and sharpening, optional multi-crop.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/dino.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them."""

    name = "dino"

    defaults = {"train": {"optimizer": "adamw", "blr": 5e-4, "weight_decay": 0.04,
                          "lr_scaling": "linear", "lr_ref_batch": 256, "warmup_min_steps": 250},
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 256, "out_dim": 4096,
                        "momentum": 0.996, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                        "student_temp": 0.1, "center_momentum": 0.9, "center_init": "batch",
                        "freeze_last_layer_epochs": 0.0, "local_crops": 0}}
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.3, 1e-6),
                    "ssl": {"proj_hidden_dim": 2048, "proj_dim": 256, "out_dim": 4096,
                            "momentum": 0.9995, "teacher_temp": 0.07,
                            "warmup_teacher_temp": 0.07, "teacher_temp_warmup_epochs": 0.0,
                            "student_temp": 0.1, "center_momentum": 0.9,
                            "center_init": "zeros", "norm_last_layer": True,
                            "freeze_last_layer_epochs": 1.0, "local_crops": 0}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        self.epochs = float(cfg.train.epochs)
        self.temps = (s.warmup_teacher_temp, s.teacher_temp)
        self.temp_warmup = (s.teacher_temp_warmup_epochs
                            if s.teacher_temp_warmup_epochs is not None else 0.1 * self.epochs)
        self.freeze_last_layer = s.freeze_last_layer_epochs
        self.local_crops = s.local_crops
        patch = getattr(self.backbone, "patch_size", 1)  # a CNN takes any size
        default_local = max(patch, round(img_size * 96 / 224 / patch) * patch)
        self.local_size = s.local_crop_size or default_local
        self.head = DINOHead(self.feature_dim, s.out_dim, s.proj_hidden_dim, s.proj_dim,
                             norm_last_layer=s.norm_last_layer is not False)
        self.add_teacher("backbone", "teacher_backbone")
        self.add_teacher("head", "teacher_head")
        self.loss = DINOLoss(s.out_dim, s.student_temp, s.center_momentum,
                             s.center_init or "zeros")

    def view_specs(self) -> list[ViewSpec]:
        return dino_views(self.img_size, self.local_crops, self.local_size)

    def embedding(self, features: Tensor) -> Tensor:
        """The head's l2-normalised bottleneck (before its prototype layer)."""
        return F.normalize(self.head.mlp(features), dim=-1)  # [N, bottleneck]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        epoch = batch.step * self.epochs / batch.total_steps  # whole at each epoch's first step
        temp = teacher_temperature(epoch, *self.temps, self.temp_warmup)
        student = [self.head(h) for h in self.embed(batch.views)]  # [N, K]
        with torch.no_grad():
            teacher = [self.teacher_head(h)
                       for h in self.embed(batch.views[:2], self.teacher_backbone)]  # [N, K]
        loss = self.loss(student, teacher, temp)
        return {"loss": loss, "teacher_temp": torch.tensor(temp)}

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step / total_steps * self.epochs < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None
