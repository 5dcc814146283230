"""What the baselines share: a ViT ``backbone`` that is the evaluated encoder, and (for MoCo v3,
BYOL and DINO) EMA teachers that follow their students after every optimizer step."""

from __future__ import annotations

from torch import nn

from baselines.ema import ema_update, frozen_copy, momentum_after_step
from mae_bench.config import RunConfig
from mae_bench.methods.method import Method
from mae_bench.models.vit import VisionTransformer, build_vit


class BackboneMethod(Method):
    """A method whose encoder is ``self.backbone``, one ViT of the configured preset.

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
        self.backbone = build_vit(cfg.model.arch, img_size, channels)
        self.teacher_pairs: list[tuple[str, str]] = []  # (teacher, student) attribute names

    @property
    def encoder(self) -> VisionTransformer:
        return self.backbone

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

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
