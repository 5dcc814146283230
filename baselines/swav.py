"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", arXiv 2006.09882) on any backbone.

Every crop goes through the encoder and a 2-layer projector; its L2-normalised output z is
scored against K prototypes (unit vectors, a Linear without bias). For each of the two global
crops, the Sinkhorn-Knopp algorithm turns the batch's scores into soft codes that spread the
batch evenly over the prototypes (``sinkhorn``); every other crop must predict those codes
from its own scores (the "swapped" prediction, a cross-entropy at temperature tau,
``swav_loss``). With a queue, the features of previous batches join the Sinkhorn step only, so
that a small batch can still be spread over K prototypes; their codes get no loss.

Numbers taken (the paper, App. A, and the official main_swav.py): tau 0.1, epsilon 0.05, 3
Sinkhorn iterations, K 3,000 prototypes, a 2,048-wide projector to 128-d, prototypes frozen
for the first epoch (``ssl.freeze_last_layer_epochs``; the official 313 iterations of batch
4,096), a queue of 3,840 features (the official recipe at batch 256) from epoch 15
(``ssl.queue_start_epochs``), multi-crop with two global crops at scale 0.14-1 and small crops
at 0.05-0.14 (``views.swav_views``; the paper's 2 x 224 + 6 x 96 px).

What follows the official main_swav.py exactly:
- the prototypes are L2-normalised at the start of every training forward, before they score
  anything, as main_swav.py does at the start of each iteration (lightly's example too);
  solo-learn instead reparametrises them by weight norm, which also changes their gradient;
- the prototypes' gradient is dropped while frozen (``before_optimizer_step``);
- the queue is filled from ``queue_start_epochs`` on, newest first, after this batch's scores
  are taken, and is used once its oldest row is filled (main_swav.py's ``queue[i, -1]`` test);
  its length is rounded down to a multiple of batch x processes;
- under torchrun Sinkhorn spreads the global batch (and every process's queue): the total and
  each prototype's mass are all-reduced, each sample's stays local (``distributed_sinkhorn``).
  The queue is kept identical on every process (each step's features are all-gathered; each
  process reads the rows that are its own in the official per-process queues), so it is one
  buffer of the state dict, saved and resumed with the run, and DDP's buffer broadcast is
  harmless.

Where it departs, and why: Sinkhorn subtracts the global maximum score before the exponential,
a constant factor that its first normalisation removes; the official exp(scores / epsilon)
overflows float32 above scores of 88 epsilon (epsilon 0.01 on scores near 1), which the
official README names as the reason a small epsilon goes unstable. Scores and codes are
computed in float32 outside autocast: the codes amplify the scores' error by 1 / epsilon.
The projector sees each crop on its own (solo-learn), not all crops at once.

Changed for small data and the ViT presets:
- the ViT trains with AdamW and MoCo v3's ViT recipe (blr 1.5e-4 at batch 4,096, square-root
  rule, weight decay 0.1), as SimCLR here; ResNets take solo-learn's CIFAR recipe
  (scripts/pretrain/cifar/swav.yaml: LARS lr 0.6 x batch / 256, weight decay 1e-6, eta 0.02,
  the queue from epoch 50, prototypes frozen for 2 epochs);
- multi-crop is off by default (``ssl.local_crops``; solo-learn's CIFAR recipe has none);
- K stays 3,000 (solo-learn's CIFAR choice); a batch smaller than K is spread softly, which
  works (solo-learn trains 50 epochs at batch 256 before its queue starts), but on a set of a
  few thousand images lower ``ssl.num_prototypes``. A run shorter than ``queue_start_epochs``
  never uses the queue, and a queue longer than an epoch holds some images twice.

Bad input: a batch of one image per process cannot fill the Sinkhorn step (its code is always
the uniform 1/K, whatever its scores) nor the projector's BatchNorm: a ConfigError.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.base import VIT_RECIPE, BackboneMethod, solo_learn_cifar
from baselines.heads import mlp
from baselines.views import swav_views
from mae_bench.config import RunConfig
from mae_bench.data.augment import ViewSpec
from mae_bench.errors import ConfigError
from mae_bench.methods.method import Batch
from mae_bench.training.distributed import all_gather_no_grad, is_distributed, rank_and_world

N_ASSIGN = 2  # crops whose codes are computed: the two global ones (crops_for_assign [0, 1])


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``x`` reduced over processes in place (the identity in one process)."""
    if is_distributed():
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwAV's codes (the paper's eq. 3 and App. A.1; main_swav.py ``distributed_sinkhorn``).

    Q = exp(scores / epsilon), then alternately each prototype's total mass is set to 1 / K and
    each sample's to 1 / B, B the samples of all processes; the result is scaled so that each
    sample's code sums to 1. The scores are shifted by their global maximum first (see the
    module docstring): the same codes, without overflow.

    Args:
        scores: [B, K] scores of this process's samples against the K prototypes.
        iterations: Sinkhorn-Knopp iterations (3).
        epsilon: entropy regularisation (0.05); smaller gives sharper codes.

    Returns:
        [B, K] float32 codes, each row summing to 1.
    """
    with torch.autocast(scores.device.type, enabled=False):
        scores = scores.detach().float()
        shift = _all_reduce(scores.max().clone(), dist.ReduceOp.MAX)
        q = torch.exp((scores - shift) / epsilon).T  # [K, B]
        k, b = q.shape[0], q.shape[1] * rank_and_world()[1]
        q /= _all_reduce(q.sum())
        for _ in range(iterations):
            q /= _all_reduce(q.sum(dim=1, keepdim=True))  # [K, 1]: each prototype's mass
            q /= k
            q /= q.sum(dim=0, keepdim=True)  # [1, B]: each sample's mass (local)
            q /= b
        return (q * b).T  # [B, K]


def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """The swapped prediction (eq. 1-2): for the code of each assigned crop i, the mean over
    every other crop v of -sum_k q_ik log softmax(scores_v / tau)_k, averaged over the batch,
    then over the assigned crops (main_swav.py; lightly's ``SwaVLoss``).

    Args:
        scores: one [N, K] score tensor per crop, the assigned (global) crops first.
        codes: one [N, K] code tensor per assigned crop (constants).
        temperature: tau (0.1).
    """
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v != i:
                log_p = F.log_softmax(s.float() / temperature, dim=1)  # [N, K]
                total = total - (q * log_p).sum(dim=1).mean() / (len(scores) - 1)
    return total / len(codes)


class SwAV(BackboneMethod):
    """SwAV: encoder + projector + prototypes, Sinkhorn codes, swapped prediction, queue."""

    name = "swav"

    defaults = {"train": VIT_RECIPE,
                "ssl": {"temperature": 0.1, "proj_hidden_dim": 2048, "proj_dim": 128,
                        "num_prototypes": 3000, "sinkhorn_iterations": 3,
                        "sinkhorn_epsilon": 0.05, "queue_size": 3840,
                        "queue_start_epochs": 15.0, "freeze_last_layer_epochs": 1.0,
                        "local_crops": 0}}
    # solo-learn's scripts/pretrain/cifar/swav.yaml (ResNet-18 on CIFAR; eta 0.02 and
    # clip_lr are the LARS knobs' defaults, mae_bench.training.optim)
    cnn_defaults = {"train": solo_learn_cifar("lars", 0.6, 1e-6),
                    "ssl": {"queue_start_epochs": 50.0, "freeze_last_layer_epochs": 2.0}}
    own_knobs = frozenset({"ssl.num_prototypes", "ssl.sinkhorn_iterations",
                           "ssl.sinkhorn_epsilon", "ssl.queue_start_epochs", "ssl.queue_size"})

    def __init__(self, cfg: RunConfig, channels: int, img_size: int):
        batch = cfg.train.batch_size
        if batch < 2:
            raise ConfigError(
                f"swav: --batch-size {batch} cannot fill SwAV's Sinkhorn step, which needs at "
                "least 2 images per process (one image's code is always the uniform 1/K, "
                "whatever its scores, and the projector's BatchNorm needs two); use "
                "--batch-size 2 or more")
        super().__init__(cfg, channels, img_size)
        s = cfg.ssl
        self.epochs = float(cfg.train.epochs)
        self.temperature = s.temperature
        self.sinkhorn_iterations, self.sinkhorn_epsilon = s.sinkhorn_iterations, s.sinkhorn_epsilon
        self.queue_start, self.freeze_prototypes = s.queue_start_epochs, s.freeze_last_layer_epochs
        self.local_crops = s.local_crops
        patch = getattr(self.backbone, "patch_size", 1)  # a CNN takes any size
        default_local = max(patch, round(img_size * 96 / 224 / patch) * patch)
        self.local_size = s.local_crop_size or default_local
        self.projector = mlp(self.feature_dim, s.proj_hidden_dim, s.proj_dim, num_layers=2)
        self.prototypes = nn.Linear(s.proj_dim, s.num_prototypes, bias=False)
        self.batch_size = batch
        world = rank_and_world()[1]
        length = s.queue_size - s.queue_size % (batch * world)  # whole global batches
        # [2, L, P]: the global queue, newest first; the same on every process
        self.register_buffer("queue", torch.zeros(N_ASSIGN, length, s.proj_dim))

    def view_specs(self) -> list[ViewSpec]:
        return swav_views(self.img_size, self.local_crops, self.local_size)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        self.normalize_prototypes()
        epoch = batch.step * self.epochs / batch.total_steps  # whole at each epoch's first step
        feats = self.embed(batch.views)  # [N, D] per crop
        z = [F.normalize(self.projector(h).float(), dim=1) for h in feats]  # [N, P] per crop
        with torch.autocast(z[0].device.type, enabled=False):
            scores = [self.prototypes(zi) for zi in z]  # [N, K] per crop
            codes = [self._codes(i, scores[i], z[i], epoch) for i in range(N_ASSIGN)]
        return {"loss": swav_loss(scores, codes, self.temperature)}

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Each prototype to unit norm (main_swav.py, before every forward)."""
        w = self.prototypes.weight  # [K, P]
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def _codes(self, i: int, scores: Tensor, z: Tensor, epoch: float) -> Tensor:
        """[N, K] codes of assigned crop ``i``, its queue used when full, then filled."""
        n, out = scores.shape[0], scores.detach()
        if self.queue.shape[1] and epoch >= self.queue_start:
            if bool(self.queue[i, -1].any()):  # full (the same on every process)
                out = torch.cat([self.prototypes(self.own_queue(i)), out])  # [L / W + N, K]
            self._push(i, z.detach())
        return sinkhorn(out, self.sinkhorn_iterations, self.sinkhorn_epsilon)[-n:]

    def own_queue(self, i: int) -> Tensor:
        """[L / W, P]: the rows of crop ``i``'s queue that this process's own queue holds in
        main_swav.py (its features of the last L / (W x batch) steps, newest first)."""
        rank, world = rank_and_world()
        if world == 1:
            return self.queue[i]
        q = self.queue[i].view(-1, world, self.batch_size, self.queue.shape[2])  # [S, W, N, P]
        return q[:, rank].reshape(-1, self.queue.shape[2])

    def _push(self, i: int, z: Tensor) -> None:
        """This step's features of every process (rank order) in at the front of the queue."""
        new = all_gather_no_grad(z)  # [W * N, P]
        queue, k = self.queue[i], min(new.shape[0], self.queue.shape[1])
        queue[k:] = queue[:-k].clone()
        queue[:k] = new[:k]

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if step / total_steps * self.epochs < self.freeze_prototypes:
            self.prototypes.weight.grad = None

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # A queue saved by another number of processes is rounded and laid out differently:
        # start it empty (it refills within L / batch steps), as main_swav.py does without its
        # per-process queue file.
        saved = state_dict.get(prefix + "queue")
        if saved is not None and saved.shape != self.queue.shape:
            state_dict[prefix + "queue"] = torch.zeros_like(self.queue)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
