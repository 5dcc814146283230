"""SimSiam (Chen, He 2021, arXiv 2011.10566) on any backbone.

Two views of each image go through one encoder, a 3-layer projector (BatchNorm on every layer,
the output too) and a 2-layer bottleneck predictor; each view's prediction regresses the other
view's projection, held constant: D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative
cosine similarity (eq. 3). No negatives, no momentum encoder: the stop-gradient is what keeps it
from collapsing (``ssl.stop_gradient``, default on; off, the gradient flows through both
branches, the paper's Fig. 2 ablation, which collapses to a constant output).

Numbers taken: projector 2,048 wide with a 2,048-d output, predictor hidden width 512 (the
paper's bottleneck, Sec. 3; ``ssl.pred_hidden_dim``), MoCo v2's augmentations, which the paper
uses (``mocov2.mocov2_views``).

On ResNets (``cnn_defaults``): solo-learn's CIFAR recipe, scripts/pretrain/cifar/simsiam.yaml:
SGD (momentum 0.9), lr 0.5 per 256 images by the linear rule, weight decay 1e-5, the same
heads; its ``temperature`` key is unused by SimSiam. The paper's ImageNet recipe is SGD at
0.05 per 256 with weight decay 1e-4.

Changed for small data and for the ViT presets:
- the ViT trains with the engine's AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096,
  weight decay 0.1, square-root rule), like SimCLR and BYOL here;
- the paper (and solo-learn) keep the predictor's lr fixed while the rest follows the cosine
  schedule (Sec. 4.4: slightly better); here the engine's one schedule drives every parameter.
"""

from __future__ import annotations

from torch import Tensor

from baselines.base import BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import negative_cosine
from baselines.mocov2 import mocov2_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch

VIT_RECIPE = {"optimizer": "adamw", "blr": 1.5e-4, "weight_decay": 0.1, "lr_scaling": "sqrt",
              "lr_ref_batch": 4096}


class SimSiam(BackboneMethod):
    """SimSiam: encoder + projector + predictor, symmetric negative cosine, stop-gradient."""

    name = "simsiam"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 2048, "pred_hidden_dim": 512,
                        "stop_gradient": True}}
    cnn_defaults = {"train": solo_learn_cifar("sgd", 0.5, 1e-5)}
    own_knobs = frozenset({"ssl.stop_gradient", "ssl.pred_hidden_dim"})

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        self.stop_gradient = bool(s.stop_gradient)
        # Linear -> BN -> ReLU twice, Linear -> BN without affine (the official builder.py)
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim, num_layers=3,
                             last_bn=True)
        # the bottleneck: Linear -> BN -> ReLU -> Linear (with bias)
        self.predictor = mlp(s.proj_dim, s.pred_hidden_dim, s.proj_dim, num_layers=2)

    def view_specs(self) -> list[ViewSpec]:
        return mocov2_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, P] each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [N, P] each
        sg = self.stop_gradient
        loss = negative_cosine(p1, z2, sg) / 2 + negative_cosine(p2, z1, sg) / 2
        return {"loss": loss}
