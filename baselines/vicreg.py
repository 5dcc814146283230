"""VICReg (Bardes, Ponce, LeCun 2022, arXiv 2105.04906) on the shared ViT.

Two views of each image go through the encoder and a 3-layer projector (the "expander": Linear
-> BN -> ReLU twice, then a Linear); the loss (``losses.VICRegLoss``) keeps the two views'
projections close (invariance), each dimension's batch std at or above 1 (variance: what keeps
the embeddings from collapsing) and the dimensions decorrelated (covariance). No negatives, no
teacher, no predictor; each branch is regularised on its own.

Numbers taken: lambda = mu = 25 and nu = 1 (the paper's and main_vicreg.py's;
``ssl.invariance_weight``, ``ssl.variance_weight``, ``ssl.covariance_weight``), eps 1e-4
inside the variance's square root and the hinge at std 1 (eq. 1), BYOL's augmentations (as the
official augmentations.py, ``views.byol_views``), the last Linear without bias (the official
projector's; the loss subtracts every dimension's mean, so one would get no gradient).

Changed for small data and for the ViT presets:
- the expander is 2,048 wide with a 2,048-d output (``ssl.proj_hidden_dim``, ``ssl.proj_dim``)
  instead of the paper's 8,192 x 3 for a ResNet-50, as solo-learn's CIFAR recipe; the paper's
  ablation of the expander's width finds wider better, so raise both where memory allows;
- the paper trains with LARS (base lr 0.2 x batch / 256, weight decay 1e-6); the ViT trains
  with the engine's AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096, weight decay
  0.1, square-root rule), like SimCLR and BYOL here.
"""

from __future__ import annotations

from torch import Tensor

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import VICRegLoss
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch


class VICReg(BackboneMethod):
    """VICReg: encoder + expander, invariance + variance + covariance terms.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/vicreg.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them. Outside those tables the lr warms up
    for at least 500 optimizer steps (at most half the run, ``train.warmup_min_steps``): with
    the engine's 5 % warm-up, a 3-minute CIFAR-10 run reached solo-learn's lr after 6 steps and
    its loss went to inf at step 9, in fp32 as in bf16 (the bias and BatchNorm parameters, which
    LARS leaves out of its trust ratio, take the 25-weighted loss's raw gradient); warmed up over
    half of the same run it trained (results/compare-cifar10-resnet18.md)."""

    name = "vicreg"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 2048, "invariance_weight": 25.0,
                        "variance_weight": 25.0, "covariance_weight": 1.0}}
    own_knobs = frozenset({"ssl.invariance_weight", "ssl.variance_weight",
                           "ssl.covariance_weight"})
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.3, 1e-4, warmup_min_steps=500),
                    "ssl": {"proj_hidden_dim": 2048, "proj_dim": 2048, "invariance_weight": 25.0,
                            "variance_weight": 25.0, "covariance_weight": 1.0}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        # the official expander's last Linear has no bias: the loss centres it away
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim,
                             num_layers=3, out_bias=False)
        self.loss = VICRegLoss(s.invariance_weight, s.variance_weight, s.covariance_weight)

    def view_specs(self) -> list[ViewSpec]:
        return byol_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, P] each
        return {"loss": self.loss(z1, z2)}
