"""BYOL (Grill et al. 2020, arXiv 2006.07733) on the shared ViT.

An online network (ViT + projector + predictor) regresses the projection that an EMA target
network (ViT + projector) gives the other view: 2 - 2 cos(p, z'), symmetrised over the two
views; the target gets no gradient and follows tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.

What follows the reference code (deepmind-research/byol) exactly:
- the target moves right after optimizer step k (counted from 0) with tau(k / K), as
  ``byol_experiment``'s ``target_ema(global_step)``: the first update uses tau_base itself and the
  last one still moves the target (``ema.momentum_after_step``);
- the projector and predictor are ``networks.MLP``: Linear -> BatchNorm -> ReLU -> Linear, the
  output Linear without a bias (``ssl.head_output_bias``, default off; lightly's
  ``BYOLProjectionHead`` keeps one). A run made before this knob existed has it unset and its
  heads have the bias: its checkpoint still loads (``load_state_dict`` gives the heads that
  bias back, so its encoder can be evaluated), but it cannot be resumed, since the options
  resolve to the new heads now.

Numbers taken: tau_base 0.996 (Sec. 3.3), 2-layer MLPs with BatchNorm, 256-d projections, the
asymmetric augmentations of Table 6 (``views.byol_views``). (CIFAR recipes often start at 0.99;
in a short CIFAR-10 run it made no difference, results/compare-cifar10.md, so the paper's value
stays.)
The paper's hidden width is 4,096 and its optimiser LARS for a ResNet; here the hidden width
defaults to 2,048 and the ViT trains with the engine's AdamW and MoCo v3's ViT recipe (blr
1.5e-4, weight decay 0.1), as MoCo v3 did for its BYOL ViT baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.losses import byol_loss
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.methods.method import Batch


class BYOL(BackboneMethod):
    """BYOL: online network with predictor, EMA target, normalised MSE, symmetric.

    On ResNets ``cnn_defaults`` is solo-learn's CIFAR ResNet-18 recipe (vturrisi/solo-learn,
    scripts/pretrain/cifar/byol.yaml); its 10 warm-up epochs of 1,000 are set in
    configs/reference/, where a shortened run scales them."""

    name = "byol"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"proj_hidden_dim": 2048, "proj_dim": 256, "momentum": 0.996,
                        "head_output_bias": False}}
    # the heads whose output Linear had a bias in runs made before ``ssl.head_output_bias``
    heads = ("projector", "predictor", "target_projector")
    cnn_defaults = {"train": solo_learn_cifar("lars", 1.0, 1e-5),
                    "ssl": {"proj_hidden_dim": 4096, "proj_dim": 256, "momentum": 0.99,
                            "head_output_bias": True}}

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        bias = s.head_output_bias is not False  # unset: a run from before the knob
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim,
                             out_bias=bias)
        self.predictor = mlp(s.proj_dim, s.proj_hidden_dim, s.proj_dim, out_bias=bias)
        self.add_teacher("backbone", "target_backbone")
        self.add_teacher("projector", "target_projector")

    def view_specs(self) -> list[ViewSpec]:
        return byol_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # [N, P]
        with torch.no_grad():
            g1, g2 = self.embed(batch.views, self.target_backbone)  # [N, D] each
            z1, z2 = self.target_projector(g1), self.target_projector(g2)  # [N, P] each
        return {"loss": byol_loss(p1, z2) + byol_loss(p2, z1)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint; one made before ``ssl.head_output_bias`` existed has an output
        bias on each head, which these heads then get back (zeros, overwritten by the load),
        so an old run's weights load whole instead of failing on three unexpected keys."""
        for name in self.heads:
            out = getattr(self, name)[-1]  # the output Linear
            key = f"{name}.{len(getattr(self, name)) - 1}.bias"
            if key in state_dict and out.bias is None:
                bias = torch.zeros(out.out_features, device=out.weight.device)
                out.bias = nn.Parameter(bias, requires_grad=out.weight.requires_grad)
        return super().load_state_dict(state_dict, strict, assign)
