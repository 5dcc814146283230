"""MoCo v2+ (Chen, Fan, Girshick, He 2020, arXiv 2003.04297, as solo-learn's ``mocov2plus``) on
any backbone.

A query encoder (backbone + 2-layer MLP projector, no BatchNorm) and a momentum key encoder (an
EMA of both). Each view's query is matched against the other view's key of the same image (the
positive) and a queue of earlier keys of that view (the negatives): an InfoNCE at temperature
0.2 (He et al. 2020, eq. 1), symmetrised as solo-learn's v2+ does: (ctr(q1, k2, queue2) +
ctr(q2, k1, queue1)) / 2. After the loss, each view's keys (of every process under torchrun)
replace the oldest ones of its queue (``queue.FeatureQueue``; the queues are in the state dict).

What follows solo-learn (solo/methods/mocov2plus.py and scripts/pretrain/cifar/mocov2plus.yaml)
exactly: the heads (Linear 2,048 -> ReLU -> Linear 256, with biases), two queues of 32,768
unit keys, temperature 0.2, and the momentum 0.99 rising to 0.999 (not 1) along a half cosine,
the EMA following optimizer step k (counted from 0) with tau(k / K) (its ``MomentumUpdater``:
``update`` after the step, then ``update_tau(global_step)``). MoCo v2 itself: a 128-d output,
one queue of 65,536, a fixed momentum of 0.999, one direction, shuffled BatchNorm across GPUs
(not done here, nor in solo-learn; the projector has no BatchNorm).

On ResNets (``cnn_defaults``): solo-learn's CIFAR recipe: SGD (momentum 0.9), lr 0.3 per 256
images by the linear rule, weight decay 1e-4.

Changed for small data and for the ViT presets:
- a queue longer than the data set would hold the same images' keys more than once: refused
  (``check_data``): digits (1,437 training images) needs ``--set ssl.queue_size=1024``, say;
- the ViT trains with the engine's AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096,
  weight decay 0.1, square-root rule), like SimCLR and BYOL here.
The head has no BatchNorm: where a random encoder's embeddings start nearly parallel (8-px
digits), every key looks alike and the loss sits at log(K + 1) for many epochs; the BatchNorm
heads of SimCLR and MoCo v3 remove that common direction and learn sooner there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.ema import cosine_momentum, ema_update
from baselines.losses import queue_infonce
from baselines.queue import FeatureQueue, skip_in_ddp_broadcast
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch

FINAL_MOMENTUM = 0.999  # solo-learn's final_tau for MoCo v2+


def mocov2_views(img_size: int) -> list[ViewSpec]:
    """MoCo v2's augmentations (its main_moco.py ``aug_plus``; SimSiam's too; solo-learn's
    symmetric_weak.yaml): BYOL's crop, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 and grayscale
    p 0.2, blur with p 0.5 (off on small images, ``views.BLUR_MIN_SIZE``), no solarization,
    both views alike."""
    view = byol_views(img_size)[0]  # blurred always where the image is large enough
    view = replace(view, saturation=0.4, blur=view.blur * 0.5)
    return [view, view]


def mlp_no_bn(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's head: Linear -> ReLU -> Linear, with biases and no BatchNorm."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class MoCoV2(BackboneMethod):
    """MoCo v2+: query encoder, momentum key encoder, two queues of negatives, symmetric."""

    name = "mocov2"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"temperature": 0.2, "proj_hidden_dim": 2048, "proj_dim": 256,
                        "momentum": 0.99, "queue_size": 32768}}
    cnn_defaults = {"train": solo_learn_cifar("sgd", 0.3, 1e-4)}
    own_knobs = frozenset({"ssl.queue_size"})

    @classmethod
    def check_data(cls, cfg: RunConfig, n_images: int) -> None:
        """Refuse a queue longer than the ``n_images`` of the data set (ConfigError, one
        line). Called by the engine once the data set is loaded."""
        size = cfg.ssl.queue_size
        size = cls.defaults["ssl"]["queue_size"] if size is None else size
        if size > n_images:
            raise ConfigError(
                f"ssl.queue_size {size} is longer than {cfg.data.dataset}/{cfg.data.split} "
                f"({n_images} images): the queue of negatives would hold the same images' keys "
                f"more than once; set --set ssl.queue_size=N with N <= {n_images}")

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        if s.queue_size < 1:
            raise ConfigError(f"{self.name} needs a queue of negatives: ssl.queue_size must be "
                              f">= 1 (default 32768), got {s.queue_size}")
        self.temperature = s.temperature
        self.projector = mlp_no_bn(self.feature_dim, s.proj_hidden_dim, s.proj_dim)
        self.add_teacher("backbone", "momentum_backbone")
        self.add_teacher("projector", "momentum_projector")
        # queues[v]: earlier keys of view v + 1, the negatives of the other view's queries
        seed = cfg.train.seed
        self.queues = nn.ModuleList(FeatureQueue(s.queue_size, s.proj_dim, seed + v)
                                    for v in range(2))
        skip_in_ddp_broadcast(self)

    def view_specs(self) -> list[ViewSpec]:
        return mocov2_views(self.img_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        h1, h2 = self.embed(batch.views)  # [N, D] each
        q1, q2 = self.projector(h1), self.projector(h2)  # [N, P] each
        with torch.no_grad():
            g1, g2 = self.embed(batch.views, self.momentum_backbone)  # [N, D] each
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)  # [N, P] each
        neg1, neg2 = self.queues[0].snapshot(), self.queues[1].snapshot()  # [K, P] each
        t = self.temperature
        loss = (queue_infonce(q1, k2, neg2, t) + queue_infonce(q2, k1, neg1, t)) / 2
        if self.training:  # after the loss, as the reference: this batch is not a negative
            self.queues[0].push(k1)
            self.queues[1].push(k2)
        return {"loss": loss}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """EMA after optimizer step ``step`` (from 1) with tau((step - 1) / K), tau rising from
        ``ssl.momentum`` to 0.999 (solo-learn's ``MomentumUpdater``)."""
        m = cosine_momentum(step - 1, total_steps, self.base_momentum, FINAL_MOMENTUM)
        for teacher, student in self.teacher_pairs:
            ema_update(getattr(self, teacher), getattr(self, student), m)
