"""What the baselines share: a ``backbone`` of any kind (a ViT preset, a ResNet, a timm model;
``mae_bench.models.backbones``) that is the evaluated encoder, and (for MoCo v3, BYOL, DINO and
MoCo v2+) EMA teachers that follow their students after every optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from baselines.ema import ema_update, frozen_copy, momentum_after_step
from baselines.heads import embed_views
from mae_bench.config import RunConfig
from mae_bench.methods.method import Method
from mae_bench.models.backbones import build_backbone, is_convnet

# MoCo v3's ViT recipe (Chen, Xie, He 2021: AdamW, blr 1.5e-4 at batch 4,096, weight decay 0.1),
# which MoCo v3 used for its SimCLR and BYOL ViT baselines too: the ``train`` defaults of every
# joint-embedding method on a ViT but DINO, carried to the run's batch by the square-root rule
# (``mae_bench.config.peak_lr``; baselines/__init__.py says why).
VIT_RECIPE = {"optimizer": "adamw", "blr": 1.5e-4, "weight_decay": 0.1, "lr_scaling": "sqrt",
              "lr_ref_batch": 4096}


def solo_learn_cifar(optimizer: str, blr: float, weight_decay: float, **more: Any
                     ) -> dict[str, Any]:
    """The ``train`` part of a method's solo-learn CIFAR ResNet-18 recipe
    (scripts/pretrain/cifar/<method>.yaml): its optimizer, lr per 256 images by the linear rule,
    weight decay, and ``more`` fields. LARS's eta 0.02 and clipped lr (and SGD's momentum 0.9)
    are solo-learn's for every method; ``resolve_config`` fills them for the optimizer."""
    return {"optimizer": optimizer, "blr": blr, "weight_decay": weight_decay,
            "lr_scaling": "linear", "lr_ref_batch": 256, **more}


class BackboneMethod(Method):
    """A method whose encoder is ``self.backbone``, the configured backbone (``model.arch``),
    whose pooled embedding is ``feature_dim`` wide (``embed``). A convolutional backbone runs
    in channels-last memory format, oneDNN's and cuDNN's fast layout for it.

    Subclasses that have EMA teachers create them with ``add_teacher(student_name,
    teacher_name)``; the teachers then follow ``cosine_momentum`` from ``ssl.momentum`` to 1
    after every optimizer step, indexed as the method's reference code indexes it
    (``ema_before_forward``; ``ema.momentum_after_step``).
    """

    # True where the reference updates its teachers before the forward (MoCo v3), False where
    # after the optimizer step (BYOL, DINO): which schedule value follows optimizer step k.
    ema_before_forward: bool = False

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__()
        self.img_size = img_size
        self.base_momentum = cfg.ssl.momentum
        self.backbone = build_backbone(cfg.model.arch, img_size, channels,
                                       cifar_stem=cfg.model.cifar_stem)
        if is_convnet(self.backbone):
            self.backbone.to(memory_format=torch.channels_last)
            self.backbone.channels_last = True
        self.feature_dim = int(self.backbone.num_features)
        self.teacher_pairs: list[tuple[str, str]] = []  # (teacher, student) attribute names

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def embed(self, views: list[Tensor], backbone: nn.Module | None = None,
              record: bool = True) -> list[Tensor]:
        """One [N, feature_dim] embedding per view, from ``backbone`` (default: the student's;
        a teacher's under ``torch.no_grad``). The student's embedding of the batch's first view
        is kept, detached, as ``train_features`` for the online classifier (``record=False``
        where ``views`` does not start with it)."""
        out = embed_views(self.backbone if backbone is None else backbone, views)
        if backbone is None and record:
            self.train_features = out[0].detach()  # [N, D]
        return out

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def after_init(self) -> None:
        """Every EMA teacher starts again as a copy of its student (``--init``)."""
        for teacher, student in self.teacher_pairs:
            getattr(self, teacher).load_state_dict(getattr(self, student).state_dict())

    def embedding(self, features: Tensor) -> Tensor | None:
        """The projector's output (``self.projector``, the space the loss compares); a method
        whose head is built otherwise overrides this."""
        projector = getattr(self, "projector", None)
        return None if projector is None else projector(features)  # [N, P]

    def add_teacher(self, student: str, teacher: str) -> nn.Module:
        """Create ``self.<teacher>``: a frozen copy of ``self.<student>``, updated by EMA."""
        setattr(self, teacher, frozen_copy(getattr(self, student)))
        self.teacher_pairs.append((teacher, student))
        return getattr(self, teacher)

    def on_step_end(self, step: int, total_steps: int) -> None:
        if not self.teacher_pairs:
            return
        m = momentum_after_step(step, total_steps, self.base_momentum,
                                before_forward=self.ema_before_forward)
        for teacher, student in self.teacher_pairs:
            ema_update(getattr(self, teacher), getattr(self, student), m)
