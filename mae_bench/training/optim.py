"""The optimizers of the pretraining recipes: AdamW, SGD with momentum and LARS.

ViT recipes (MAE, MoCo v3, DINO) train with AdamW(0.9, 0.95); the ResNet recipes of the
joint-embedding papers, as solo-learn runs them on CIFAR, with LARS (SimCLR, BYOL, Barlow
Twins, VICReg, ...) or SGD with momentum (MoCo v2+, SimSiam). A method names its optimizer in
its ``defaults`` / ``cnn_defaults``; ``optimizer_knobs`` gives the knobs that go with it, which
``resolve_config`` records in the run's config.yaml.

``LARS`` is the one LARS of the toolkit: with its defaults it is solo-learn's
(``solo/utils/lars.py``, from Lightning Bolts), and with ``trust_norm="update"``, ``eps=0``,
``eta=0.001`` and no clipping it is MAE's ``util/lars.py``, the optimizer of MAE's linear probe
(``evals.lars``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mae_bench.config import TrainConfig
from mae_bench.training.runtime import param_groups

__all__ = ["LARS", "LARS_CLIP_LR", "LARS_ETA", "SGD_MOMENTUM", "TRUST_NORMS", "build_optimizer",
           "optimizer_knobs"]

SGD_MOMENTUM = 0.9  # LARS and SGD: every recipe of solo-learn's CIFAR table
LARS_ETA = 0.02  # solo-learn's CIFAR configs (lars eta 0.02), not the paper's 0.001
LARS_CLIP_LR = True  # solo-learn's CIFAR configs: clip_lr on
ADAMW_BETAS = (0.9, 0.95)  # MAE's (and MoCo v3's) betas, the ViT recipes
# "sum": ||g|| + wd ||p|| (You et al. 2017, Eq. 6; solo-learn); "update": ||g + wd p|| (MAE)
TRUST_NORMS = ("sum", "update")


def optimizer_knobs(optimizer: str) -> dict[str, Any]:
    """The ``train`` knobs that go with ``optimizer``, filled where a config leaves them None.

    AdamW has none: its configs keep the knobs None, so the digest of a run made before they
    existed does not change (``config.ADDED_LATER``).
    """
    if optimizer == "sgd":
        return {"sgd_momentum": SGD_MOMENTUM}
    if optimizer == "lars":
        return {"sgd_momentum": SGD_MOMENTUM, "lars_eta": LARS_ETA, "lars_clip_lr": LARS_CLIP_LR}
    return {}


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The optimizer ``train_cfg`` names, on ``model``'s trainable parameters, lr 0 (the engine
    sets it every step, ``runtime.set_lr``).

    Weight decay goes on weight matrices only: biases, norm parameters and the names in
    ``model.no_weight_decay()`` (tokens, position embeddings) get none
    (``runtime.param_groups``). LARS also leaves them out of the trust ratio, as solo-learn's
    ``exclude_bias_n_norm_lars``. Knobs a config leaves None take ``optimizer_knobs``' values.

    Args:
        model: the method (or any module; ``no_weight_decay()`` is used when it has one).
        train_cfg: ``optimizer`` (adamw | lars | sgd; None: adamw), ``weight_decay``,
            ``sgd_momentum``, ``lars_eta``, ``lars_clip_lr``.
        device: where the parameters live (AdamW: fused on GPU, foreach on CPU).
    """
    t = train_cfg
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups(model, t.weight_decay, skip)
    name = t.optimizer or "adamw"
    knobs = optimizer_knobs(name)
    momentum = t.sgd_momentum if t.sgd_momentum is not None else knobs.get("sgd_momentum")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    if name == "lars":
        eta = t.lars_eta if t.lars_eta is not None else knobs["lars_eta"]
        clip = t.lars_clip_lr if t.lars_clip_lr is not None else knobs["lars_clip_lr"]
        return LARS(groups, lr=0.0, momentum=momentum, eta=eta, clip_lr=clip,
                    exclude_bias_n_norm=True)
    # fused AdamW: one kernel for all parameters on GPU; foreach (multi-tensor) on CPU.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=ADAMW_BETAS, **fast)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017, "Large Batch
    Training of Convolutional Networks", arXiv 1708.03888).

    Every weight matrix moves by about ``eta`` times its own norm per unit of lr, whatever the
    scale of its gradient, which keeps large batches stable. Per parameter p with gradient g,
    group lr and weight decay wd:

        trust_norm "sum":    r = eta ||p|| / (||g|| + wd ||p|| + eps)     (solo-learn)
                             when ||p|| or ||g|| is 0: no ratio and no weight decay
        trust_norm "update": r = eta ||p|| / (||g + wd p|| + eps)         (MAE)
                             when ||p|| or ||g + wd p|| is 0: r = 1 (weight decay kept)
        clip_lr:             r = min(r / lr, 1), so the layer's lr is min(eta-ratio, lr)
                             (solo-learn's clip_lars_lr; lr 0 gives r = 1)
        u = r (g + wd p);  buf = momentum buf + u;  p -= lr buf

    With ``exclude_bias_n_norm`` parameters with ndim <= 1 (biases, norm parameters) get no
    ratio and no weight decay: plain SGD with momentum, solo-learn's ``exclude_bias_n_norm_lars``
    and MAE's ``p.ndim > 1`` rule. The trust ratio stays on the device (no host sync).

    Args:
        params: parameters or parameter groups (a group may override any option).
        lr: learning rate (the engine sets it every step, times a group's ``lr_scale``).
        momentum: heavy-ball momentum (no dampening, no Nesterov).
        weight_decay: L2 added to the gradient.
        eta: the trust coefficient (solo-learn's CIFAR recipes 0.02, MAE's probe 0.001).
        clip_lr: clip each layer's adaptive lr at the global lr.
        exclude_bias_n_norm: plain SGD for parameters with ndim <= 1.
        trust_norm: "sum" (solo-learn) or "update" (MAE), the ratio's denominator above.
        eps: added to the denominator (solo-learn 1e-8, MAE 0).

    Raises:
        ValueError: a negative lr or weight decay, momentum outside [0, 1), eta <= 0, an unknown
            trust_norm, or a negative eps.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, eta: float = LARS_ETA,
                 clip_lr: bool = False, exclude_bias_n_norm: bool = True,
                 trust_norm: str = "sum", eps: float = 1e-8) -> None:
        if (lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0 or eps < 0
                or trust_norm not in TRUST_NORMS):
            raise ValueError(f"bad LARS settings: lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, eta={eta}, trust_norm={trust_norm!r}, "
                             f"eps={eps}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "clip_lr": clip_lr, "exclude_bias_n_norm": exclude_bias_n_norm,
                    "trust_norm": trust_norm, "eps": eps}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1 or not group["exclude_bias_n_norm"]:
                    update = self._scaled(p, update, group)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scaled(p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """r (g + wd p) of one parameter, or what the zero-norm rules of ``trust_norm`` give."""
        wd, lr = group["weight_decay"], group["lr"]
        decayed = grad.add(p, alpha=wd)
        p_norm = torch.linalg.vector_norm(p)
        if group["trust_norm"] == "sum":
            g_norm = torch.linalg.vector_norm(grad)
            denominator = g_norm + p_norm * wd + group["eps"]
        else:
            g_norm = torch.linalg.vector_norm(decayed)
            denominator = g_norm + group["eps"]
        ok = (p_norm > 0) & (g_norm > 0)
        ratio = group["eta"] * p_norm / torch.where(ok, denominator, torch.ones_like(p_norm))
        if group["clip_lr"]:
            # solo-learn divides by lr; at lr 0 (the first warmup step) that is inf -> 1
            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
        ratio = torch.where(ok, ratio, torch.ones_like(ratio))
        if group["trust_norm"] == "sum":  # solo-learn: no weight decay either at a zero norm
            return torch.where(ok, decayed * ratio, grad)
        return decayed * ratio
