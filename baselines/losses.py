"""The baselines' losses, as small typed functions (DINO's, which owns a center, is a module).

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
