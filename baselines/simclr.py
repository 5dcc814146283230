"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, arXiv 2002.05709) on the shared ViT.

Two strongly augmented views of each image (``views.simclr_views``) go through the encoder; the
normed cls token goes through a 2-layer MLP projector (SimCLR v1: hidden width, ReLU, 128-d
output); NT-Xent pulls the two views of an image together against every other sample of the
batch (of all processes under torchrun).

Numbers taken: projection to 128-d (paper Sec. 4.2), temperature 0.5 (its best on CIFAR-10,
App. B.9). The paper optimises a ResNet with LARS; for the ViT we use the engine's AdamW with
MoCo v3's ViT recipe (blr 1.5e-4, weight decay 0.1, Chen, Xie, He 2021), as MoCo v3 did for its
SimCLR ViT baseline. Hidden width 2,048 (the paper's equals the ResNet width).
"""

from __future__ import annotations

from torch import Tensor

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import nt_xent
from baselines.views import simclr_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch


class SimCLR(BackboneMethod):
    """SimCLR: encoder + projector, NT-Xent over two views.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/simclr.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them."""

    name = "simclr"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"temperature": 0.5, "proj_hidden_dim": 2048, "proj_dim": 128}}
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.4, 1e-4),
                    "ssl": {"temperature": 0.2, "proj_hidden_dim": 2048, "proj_dim": 256}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        self.temperature = s.temperature
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim, num_layers=2)

    def view_specs(self) -> list[ViewSpec]:
        return simclr_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        # The projector's BatchNorm sees each view on its own, as in two forward passes.
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, P] each
        return {"loss": nt_xent(z1, z2, self.temperature)}
