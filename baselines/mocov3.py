"""MoCo v3 (Chen, Xie, He 2021, arXiv 2104.02057) on the shared ViT.

A query encoder (ViT + 3-layer projector + 2-layer predictor, BatchNorm on every layer, the
outputs too) and a momentum key encoder (an EMA of ViT + projector, no predictor). Each view's
query is matched against the keys of the other view: ctr(q1, k2) + ctr(q2, k1), an InfoNCE over
the keys of the batch (all processes under torchrun), scaled by 2 tau (Algorithm 1).

Numbers taken from the paper's ViT recipe: temperature 0.2, momentum 0.99 rising to 1 along a
half cosine, AdamW with blr 1.5e-4 and weight decay 0.1, BYOL's augmentations, and the random
(frozen) patch projection of Sec. 4.1 that the paper uses to stabilise ViT training
(``ssl.freeze_patch_embed``). The paper's heads are 4,096 wide with 256-d outputs; here the
hidden width defaults to 2,048 (these heads run on small CPUs too; ``ssl.proj_hidden_dim``).

What follows the reference code (facebookresearch/moco-v3) exactly: the momentum encoder moves
at the start of iteration i, before its forward, with m(i / K) (``adjust_moco_momentum``, then
``_update_momentum_encoder`` in the forward), which is after i optimizer steps: here after step
k (counted from 1) with m(k / K) (``ema_before_forward``; ``ema.momentum_after_step``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import mocov3_loss
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch


class MoCoV3(BackboneMethod):
    """MoCo v3: query encoder + predictor, momentum key encoder, symmetric InfoNCE.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/mocov3.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them."""

    name = "mocov3"
    ema_before_forward = True

    defaults = {"train": VIT_RECIPE,
                "ssl": {"temperature": 0.2, "proj_hidden_dim": 2048, "proj_dim": 256,
                        "momentum": 0.99, "freeze_patch_embed": True}}
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.3, 1e-6),
                    "ssl": {"temperature": 0.2, "proj_hidden_dim": 4096, "proj_dim": 256,
                            "momentum": 0.99, "freeze_patch_embed": False}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        self.temperature = s.temperature
        if s.freeze_patch_embed:
            if not hasattr(self.backbone, "patch_embed"):
                raise ConfigError(f"ssl.freeze_patch_embed freezes a ViT's patch projection; "
                                  f"{cfg.model.arch} has none: leave it unset or false")
            self.backbone.patch_embed.requires_grad_(False)
        dim = self.feature_dim
        self.projector = mlp(dim, s.proj_hidden_dim, s.proj_dim, num_layers=3, last_bn=True)
        self.predictor = mlp(s.proj_dim, s.proj_hidden_dim, s.proj_dim, num_layers=2,
                             last_bn=True)
        self.add_teacher("backbone", "momentum_backbone")
        self.add_teacher("projector", "momentum_projector")

    def view_specs(self) -> list[ViewSpec]:
        return byol_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # [N, P]
        with torch.no_grad():
            g1, g2 = self.embed(batch.views, self.momentum_backbone)  # [N, D] each
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)  # [N, P] each
        return {"loss": mocov3_loss(q1, q2, k1, k2, self.temperature)}
