"""Projection / prediction heads of the baselines (small MLPs) and DINO's head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from mae_bench.models.backbones import has_batchnorm, pooled


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
        last_bn: bool = False, out_bias: bool = True) -> nn.Sequential:
    """Linear -> BN -> ReLU, repeated, then a Linear (SimCLR / BYOL / MoCo v3 heads).

    Args:
        in_dim: input width.
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: Linear layers in total (>= 1).
        last_bn: end with a BatchNorm without affine parameters (MoCo v3's projector and
            predictor; SimCLR v2 also uses it).
        out_bias: the output Linear has a bias (when no BatchNorm follows it); deepmind's
            BYOL heads have none.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP head needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    for i in range(num_layers):
        last = i == num_layers - 1
        # A Linear followed by BatchNorm needs no bias (the BN mean removes it).
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last and out_bias and not last_bn))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, Sec. 3.1 and App. "Projection head"): an MLP
    (GELU, no BatchNorm) to a bottleneck, L2-normalisation, then a weight-normalised Linear to
    K prototypes whose norm is fixed at 1 (``norm_last_layer``, which the paper finds stabilises
    training) or learnt (the official recipe for ViT-S: better features, less stable).

    Args:
        in_dim: the encoder width.
        out_dim: K (65,536 in the paper; far smaller suits small data sets).
        hidden_dim: hidden width of the MLP (2,048 in the paper).
        bottleneck_dim: width before the last layer (256 in the paper).
        num_layers: Linear layers of the MLP (3 in the paper).
        norm_last_layer: keep each prototype's norm at 1; when False it starts at 1 and is
            learnt, so the logits' scale can grow.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the DINO head needs at least one layer, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """[N, in_dim] -> [N, out_dim] logits."""
        x = self.mlp(x)  # [N, bottleneck]
        x = F.normalize(x, dim=-1, eps=1e-6)  # [N, bottleneck]
        return self.last_layer(x)  # [N, K]


def embed_views(backbone: nn.Module, views: list[Tensor]) -> list[Tensor]:
    """The pooled embedding of every view (a ViT's normed cls token, a CNN's average pool).

    A backbone with BatchNorm (ResNets) sees each view in its own pass, as the reference code
    runs it: the batch statistics are one view's. A ViT has no batch statistics, so how views
    are batched changes nothing but the speed: on a GPU, views of one image size go through it
    in one pass (a bigger batch fills the device); on a CPU each view gets its own pass, since
    there a concatenated 2N batch pushes the memory-bound ops (copies, GELU, LayerNorm) out of
    cache and trains slower than one pass per view (measured against lightly's two-pass
    example: results/speed-peers.md).

    Args:
        backbone: the encoder (``mae_bench.models.backbones``).
        views: [N, C, H_i, W_i] tensors (DINO's local crops are smaller than its global ones).

    Returns:
        one [N, D] tensor per view, in order.
    """
    channels_last = getattr(backbone, "channels_last", False)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    if views[0].device.type == "cpu" or has_batchnorm(backbone):
        return [pooled(backbone, v) for v in views]  # [N, D] each
    out: list[Tensor | None] = [None] * len(views)
    sizes: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        sizes.setdefault(tuple(v.shape[-2:]), []).append(i)
    for idx in sizes.values():
        feats = pooled(backbone, torch.cat([views[i] for i in idx]))  # [kN, D]
        for i, part in zip(idx, feats.chunk(len(idx)), strict=True):
            out[i] = part  # [N, D]
    return out  # type: ignore[return-value]
