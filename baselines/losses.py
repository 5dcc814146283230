"""The baselines' losses, as small typed functions (DINO's, which owns a center, is a module;
so are Barlow Twins' and VICReg's, which check their weights when built).

Under torchrun the contrastive losses compare each process's samples with the samples of every
process: SimCLR's negatives are gathered *with* gradient, MoCo v3's keys without (they come from
the momentum encoder). In a single process both are the plain in-batch losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae_bench.training.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_mean,
    rank_and_world,
)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), averaged over the 2N anchors.

    For anchor i the positive is the other view of the same image; every other sample of both
    views (of all processes) is a negative; the anchor itself is excluded.

    Args:
        z1, z2: [N, D] projections of view 1 and view 2 of the same N images (any norm).
        temperature: tau in exp(cos / tau).
    """
    rank, world = rank_and_world()
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # [N, D]
    anchors = torch.cat([z1, z2])  # [2N, D]
    candidates = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)])  # [2WN, D]
    logits = anchors @ candidates.T / temperature  # [2N, 2WN]
    own = torch.arange(n, device=z1.device) + rank * n  # [N] this process's rows in one view
    self_idx = torch.cat([own, own + world * n])  # [2N]
    pos_idx = torch.cat([own + world * n, own])  # [2N]
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


def infonce(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3's ctr(q, k) (Chen, Xie, He 2021, Algorithm 1): cross-entropy of q against the
    keys of the batch, the positive being the key of the same image, times 2 * tau.

    Args:
        q: [N, D] queries (predictor outputs; get the gradient).
        k: [N, D] keys (momentum encoder; no gradient).
        temperature: tau.
    """
    rank, _ = rank_and_world()
    q = F.normalize(q.float(), dim=1)  # [N, D]
    k = F.normalize(all_gather_no_grad(k.detach().float()), dim=1)  # [WN, D]
    logits = q @ k.T / temperature  # [N, WN]
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]  # [N]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float) -> Tensor:
    """The symmetrised MoCo v3 loss: ctr(q1, k2) + ctr(q2, k1)."""
    return infonce(q1, k2, temperature) + infonce(q2, k1, temperature)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's normalised regression (Grill et al. 2020, eq. 2): mean of 2 - 2 cos(p, z), the
    target projection z held constant.

    Args:
        p: [N, D] online predictions.
        z: [N, D] target projections.
    """
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class DINOLoss(nn.Module):
    """DINO's cross-entropy between a centred, sharpened teacher and the student (Caron et al.
    2021, Algorithm 1 and Sec. 3.1), over every (teacher global crop, other student crop) pair.

    Args:
        out_dim: K, the width of the head's output.
        student_temp: tau_s (0.1 in the paper).
        center_momentum: m of the center's EMA (0.9 in the paper).
        center_init: "zeros" (the paper: the first steps' teacher is not centred at all) or
            "batch": the first batch's mean teacher output, so that the teacher is centred
            from step 0. A center that is still all zeros is taken as not yet set, so a resumed
            run keeps its own.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_init: str = "zeros"):
        super().__init__()
        if (out_dim < 1 or student_temp <= 0 or not 0 <= center_momentum < 1
                or center_init not in ("zeros", "batch")):
            raise ValueError(f"bad DINO loss settings: out_dim={out_dim}, student_temp="
                             f"{student_temp}, center_momentum={center_momentum}, "
                             f"center_init={center_init!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center_init = center_init
        self.register_buffer("center", torch.zeros(1, out_dim))  # [1, K]

    def forward(self, student_out: list[Tensor], teacher_out: list[Tensor],
                teacher_temp: float) -> Tensor:
        """Loss with the current center, then the center update.

        Args:
            student_out: one [N, K] logit tensor per crop, the global crops first.
            teacher_out: one [N, K] logit tensor per global crop.
            teacher_temp: tau_t for this step (warmed up by the method).
        """
        if self.center_init == "batch" and not bool(self.center.any()):
            self.center.copy_(self._batch_center(teacher_out))
        teacher_probs = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach()
                         for t in teacher_out]  # each [N, K]
        student_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1)
                        for s in student_out]  # each [N, K]
        total, pairs = 0.0, 0
        for i, t in enumerate(teacher_probs):
            for j, s in enumerate(student_logp):
                if i == j:  # the same view is never matched with itself
                    continue
                total = total + torch.sum(-t * s, dim=-1).mean()
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: list[Tensor]) -> None:
        """center = m * center + (1 - m) * the mean teacher output over every crop and sample
        (of all processes)."""
        batch_center = self._batch_center(teacher_out)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def _batch_center(self, teacher_out: list[Tensor]) -> Tensor:
        """[1, K]: the mean teacher output over every crop and sample (of all processes)."""
        return all_reduce_mean(torch.cat(teacher_out).float().mean(dim=0, keepdim=True))


def _off_diagonal(x: Tensor) -> Tensor:
    """[D, D] -> [D * (D - 1)]: every entry but the diagonal (the official repositories' trick:
    drop the last entry, view as [D - 1, D + 1], drop the first column)."""
    d = x.shape[0]
    return x.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins' redundancy reduction (Zbontar et al. 2021, eq. 1): the cross-correlation
    C of the two views' projections, each dimension standardised over the batch, is pushed to
    the identity: sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

    C is the paper's eq. 2, the correlation along the batch: each dimension minus its batch
    mean, divided by its biased standard deviation (plus ``eps`` on the variance), as the
    official main.py does with a BatchNorm without affine parameters, and lightly's
    ``BarlowTwinsLoss``. (Algorithm 1's pseudo-code divides by the unbiased std, which scales C
    by (N - 1) / N; eq. 2 bounds every C_ij by 1, the pseudo-code does not.) Under torchrun the
    projections of every process are gathered with gradient first, so C is the correlation over
    the global batch, as the official SyncBatchNorm and all-reduce of C give. Computed in fp32
    outside autocast: each of the D^2 entries sums N products, too fine for bf16.

    Args:
        redundancy_weight: lambda, the weight of the off-diagonal terms (5e-3 in the paper).
        eps: added to each dimension's variance (1e-5, BatchNorm's).
    """

    def __init__(self, redundancy_weight: float = 5e-3, eps: float = 1e-5):
        super().__init__()
        if not redundancy_weight > 0 or not eps >= 0:
            raise ValueError(f"bad Barlow Twins loss settings: redundancy_weight="
                             f"{redundancy_weight} (must be > 0), eps={eps} (must be >= 0)")
        self.redundancy_weight = redundancy_weight
        self.eps = eps

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """[N, D] projections of the two views of N images -> the scalar loss."""
        with torch.autocast(z1.device.type, enabled=False):
            z1 = all_gather_with_grad(z1.float())  # [WN, D]
            z2 = all_gather_with_grad(z2.float())  # [WN, D]
            c = self._standardise(z1).T @ self._standardise(z2) / z1.shape[0]  # [D, D]
            on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
            off_diagonal = _off_diagonal(c).pow(2).sum()
            return on_diagonal + self.redundancy_weight * off_diagonal

    def _standardise(self, z: Tensor) -> Tensor:
        """[N, D]: each dimension at batch mean 0 and (biased) variance 1."""
        centred = z - z.mean(dim=0)  # [N, D]
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + self.eps)


class VICRegLoss(nn.Module):
    """VICReg (Bardes, Ponce, LeCun 2022, eq. 1-6): lambda * invariance + mu * variance + nu *
    covariance, with the scales of the official main_vicreg.py (and lightly's ``VICRegLoss``),
    for which the paper's weights were tuned:

    - invariance: the squared difference of the two views' projections, averaged over samples
      *and dimensions* (``F.mse_loss``; the paper's s(Z, Z') sums over dimensions, D times more);
    - variance: the hinge relu(1 - sqrt(Var + eps)) on each dimension's unbiased batch
      variance, the mean over dimensions, *averaged* over the two views (the paper's loss sums
      v(Z) + v(Z'), twice this);
    - covariance: each view's squared off-diagonal covariance entries (unbiased), summed and
      divided by D, summed over the two views.

    As the official code: the invariance term uses this process's samples, the variance and
    covariance terms the projections of every process, gathered with gradient. Computed in fp32
    outside autocast, like ``BarlowTwinsLoss``.

    Args:
        invariance_weight: lambda (25 in the paper).
        variance_weight: mu (25).
        covariance_weight: nu (1).
        eps: added to the variance under the square root (1e-4).
    """

    def __init__(self, invariance_weight: float = 25.0, variance_weight: float = 25.0,
                 covariance_weight: float = 1.0, eps: float = 1e-4):
        super().__init__()
        weights = (invariance_weight, variance_weight, covariance_weight)
        if not all(w > 0 for w in weights) or not eps > 0:
            raise ValueError(f"bad VICReg loss settings: invariance_weight={invariance_weight}, "
                             f"variance_weight={variance_weight}, covariance_weight="
                             f"{covariance_weight}, eps={eps} (all must be > 0)")
        self.weights = weights
        self.eps = eps

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """[N, D] projections of the two views of N images (N >= 2) -> the scalar loss."""
        with torch.autocast(z1.device.type, enabled=False):
            z1, z2 = z1.float(), z2.float()  # [N, D] each
            invariance = F.mse_loss(z1, z2)
            z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)  # [WN, D] each
            variance = (self._std_hinge(z1) + self._std_hinge(z2)) / 2
            covariance = self._covariance(z1) + self._covariance(z2)
            lam, mu, nu = self.weights
            return lam * invariance + mu * variance + nu * covariance

    def _std_hinge(self, z: Tensor) -> Tensor:
        """mean over dimensions of relu(1 - sqrt(Var + eps)), Var unbiased over the batch."""
        return F.relu(1 - torch.sqrt(z.var(dim=0) + self.eps)).mean()

    @staticmethod
    def _covariance(z: Tensor) -> Tensor:
        """sum of the squared off-diagonal entries of the [D, D] covariance, divided by D."""
        centred = z - z.mean(dim=0)  # [N, D]
        cov = centred.T @ centred / (z.shape[0] - 1)  # [D, D]
        return _off_diagonal(cov).pow(2).sum() / z.shape[1]


def negative_cosine(p: Tensor, z: Tensor, stop_gradient: bool = True) -> Tensor:
    """SimSiam's D(p, z) (Chen, He 2021, eq. 1 and 3): minus the mean cosine similarity of the
    prediction p and the other view's projection z, z held constant (stop-gradient) unless
    ``stop_gradient`` is False (the paper's ablation, Fig. 2: it collapses).

    Args:
        p: [N, D] predictions (get the gradient).
        z: [N, D] projections of the other view.
        stop_gradient: no gradient to z.
    """
    z = z.detach() if stop_gradient else z
    return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()


def queue_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1; solo-learn's ``mocov2plus_loss_func``): each
    query against its own key (the positive, logit 0) and every key of the queue (negatives).
    Each process scores its own queries against its own keys; the queue is shared.

    Args:
        q: [N, D] queries (get the gradient).
        k: [N, D] keys of the same images' other view (momentum encoder; no gradient).
        queue: [K, D] earlier keys (unit rows).
        temperature: tau.
    """
    q = F.normalize(q.float(), dim=1)  # [N, D]
    k = F.normalize(k.detach().float(), dim=1)  # [N, D]
    pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    neg = q @ queue.detach().float().T  # [N, K]
    logits = torch.cat([pos, neg], dim=1) / temperature  # [N, 1 + K]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def nnclr_infonce(nn_z: Tensor, p: Tensor, temperature: float) -> Tensor:
    """NNCLR's loss for one direction (Dwibedi et al. 2021, eq. 2 with the predictor, Sec. 3.2;
    solo-learn's ``nnclr_loss_func``): the nearest neighbour NN(z_i) of image i's projection in
    one view is the anchor; the other view's prediction p_i is its positive, the other images'
    predictions (of every process under torchrun, gathered with gradient) its negatives.

    Args:
        nn_z: [N, D] nearest neighbours from the support set (no gradient).
        p: [N, D] predictions of the other view (get the gradient).
        temperature: tau.
    """
    rank, _ = rank_and_world()
    nn_z = F.normalize(nn_z.detach().float(), dim=1)  # [N, D]
    p_all = all_gather_with_grad(F.normalize(p.float(), dim=1))  # [WN, D]
    logits = nn_z @ p_all.T / temperature  # [N, WN]
    labels = torch.arange(p.shape[0], device=p.device) + rank * p.shape[0]  # [N]
    return F.cross_entropy(logits, labels)
