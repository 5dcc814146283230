"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny 2021, arXiv 2103.03230) on the shared ViT.

Two views of each image go through the encoder and a 3-layer projector (Linear -> BN -> ReLU
twice, then a Linear); the cross-correlation matrix of the two views' projections, each
dimension standardised over the batch, is pushed to the identity (``losses.BarlowTwinsLoss``):
the diagonal to 1 (invariance to the augmentations), the off-diagonal to 0 (no redundancy
between dimensions). No negatives, no teacher, no predictor.

Numbers taken: lambda = 5e-3 on the off-diagonal terms (paper Sec. 2; the official main.py's
default is 0.0051; ``ssl.redundancy_weight``), the correlation of eq. 2 (biased std, as the
official BatchNorm), BYOL's asymmetric augmentations (the paper follows BYOL's; the
official code blurs view 1 always, view 2 with p 0.1, and solarizes view 2; ``byol_views``),
the last Linear without bias (the official projector's; the loss's standardisation would remove
one anyway).

Changed for small data and for the ViT presets:
- the projector is 2,048 wide with a 2,048-d output (``ssl.proj_hidden_dim``, ``ssl.proj_dim``)
  instead of the paper's 8,192-8,192-8,192 for a ResNet-50, as solo-learn's CIFAR recipe;
  the paper's ablation of the projector's width finds wider better, so raise both where
  memory allows;
- the paper trains with LARS (lr 0.2 for weights at batch 2,048, weight decay 1.5e-6); the ViT
  trains with the engine's AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096, weight
  decay 0.1, carried to the run's batch by the square-root rule), like SimCLR and BYOL here.
  AdamW is blind to the loss's scale, so solo-learn's CIFAR loss scale (0.1) is not needed.
"""

from __future__ import annotations

from torch import Tensor

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import BarlowTwinsLoss
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch


class BarlowTwins(BackboneMethod):
    """Barlow Twins: encoder + projector, cross-correlation pushed to the identity.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/barlow.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them."""

    name = "barlowtwins"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 2048, "redundancy_weight": 5e-3}}
    own_knobs = frozenset({"ssl.redundancy_weight"})
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.3, 1e-4),
                    "ssl": {"proj_hidden_dim": 2048, "proj_dim": 2048, "redundancy_weight": 0.0051}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        # the official projector's last Linear has no bias: the loss standardises it away
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim,
                             num_layers=3, out_bias=False)
        self.loss = BarlowTwinsLoss(s.redundancy_weight)

    def view_specs(self) -> list[ViewSpec]:
        return byol_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, P] each
        return {"loss": self.loss(z1, z2)}
