"""NNCLR (Dwibedi, Aytar, Tompson, Sermanet, Zisserman 2021, arXiv 2104.14548) on any backbone.

SimCLR with a support set: two views of each image go through the encoder, a 3-layer projector
(BatchNorm on every layer, the output too) and a 2-layer predictor. The nearest neighbour of a
view's projection in the support set Q (the projections of earlier batches; cosine similarity)
replaces it as the anchor: its positive is the other view's prediction of the same image, its
negatives the other images' predictions (eq. 2 with the predictor, Sec. 3.2), symmetrised:
L(NN(z1), p2) / 2 + L(NN(z2), p1) / 2. After the loss the first view's projections (of every
process under torchrun) replace the oldest ones in Q (``queue.FeatureQueue``, in the state
dict). The neighbour is a stored vector: no gradient reaches the support set.

What follows solo-learn (solo/methods/nnclr.py, solo/losses/nnclr.py and
scripts/pretrain/cifar/nnclr.yaml) exactly: the loss (one direction of cross-entropy per view,
the predictions of every process gathered with gradient), the heads (projector 2,048-2,048-256,
each Linear followed by BatchNorm, ReLU between; predictor 256-4,096-256, BatchNorm and ReLU
after the hidden layer), temperature 0.2, a support set of 65,536 projections that starts as
random unit vectors and takes the first view's projections. lightly's NNCLR example instead
feeds NN(z) and p to SimCLR's NT-Xent, whose 2N anchors also contrast NN(z) with NN(z) and p
with p: not the paper's eq. 2. The paper's ImageNet numbers: temperature 0.1, a support set of
98,304, LARS at base lr 0.3 with weight decay 1e-6.

On ResNets (``cnn_defaults``): solo-learn's CIFAR recipe: LARS (eta 0.02, clipped lr, biases
and norms excluded), lr 0.4 per 256 images by the linear rule, weight decay 1e-5.

Changed for small data and for the ViT presets:
- BYOL's asymmetric augmentations (``views.byol_views``), as the paper and solo-learn's
  asymmetric.yaml (which drops the blur at 32 px, as ``byol_views`` below 64 px);
- a support set longer than the data set is allowed (solo-learn's CIFAR recipe keeps 65,536
  for 50,000 images): an image's older projections are only more rows to search;
- the ViT trains with the engine's AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096,
  weight decay 0.1, square-root rule), like SimCLR and BYOL here.
"""

from __future__ import annotations

from torch import Tensor, nn

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import nnclr_infonce
from baselines.queue import FeatureQueue, nearest_neighbours, skip_in_ddp_broadcast
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch


class NNCLR(BackboneMethod):
    """NNCLR: encoder + projector + predictor, nearest neighbours from a support set."""

    name = "nnclr"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"temperature": 0.2, "proj_hidden_dim": 2048, "proj_dim": 256,
                        "pred_hidden_dim": 4096, "queue_size": 65536}}
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.4, 1e-5)}
    own_knobs = frozenset({"ssl.queue_size", "ssl.pred_hidden_dim"})

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        if s.queue_size < 1:
            raise ConfigError(f"{self.name} needs a support set: ssl.queue_size must be >= 1 "
                              f"(default 65536), got {s.queue_size}")
        self.temperature = s.temperature
        # every Linear followed by BatchNorm (affine, the output's too), ReLU between
        self.projector = nn.Sequential(
            *mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim, num_layers=3, out_bias=False),
            nn.BatchNorm1d(s.proj_dim))
        self.predictor = mlp(s.proj_dim, s.pred_hidden_dim, s.proj_dim, num_layers=2)
        self.support = FeatureQueue(s.queue_size, s.proj_dim, cfg.train.seed)
        skip_in_ddp_broadcast(self)

    def view_specs(self) -> list[ViewSpec]:
        return byol_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, P] each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [N, P] each
        nn1 = nearest_neighbours(z1, self.support.features)  # [N, P]
        nn2 = nearest_neighbours(z2, self.support.features)  # [N, P]
        t = self.temperature
        loss = nnclr_infonce(nn1, p2, t) / 2 + nnclr_infonce(nn2, p1, t) / 2
        if self.training:  # after the loss: this batch is not its own neighbour
            self.support.push(z1)
        return {"loss": loss}
