"""Baseline losses (SimCLR NT-Xent, MoCo v3 InfoNCE, BYOL regression, DINO self-distillation,
Barlow Twins, VICReg; the last two also against lightly 1.6.0 on identical tensors):
values and gradients against per-sample loop references written from the papers, invariances,
closed-form cases, and the DINO center update."""

import math

import pytest
import torch

from baselines.losses import (
    BarlowTwinsLoss,
    DINOLoss,
    VICRegLoss,
    byol_loss,
    infonce,
    mocov3_loss,
    nt_xent,
)

TEMPERATURES = [0.05, 0.2, 0.5, 1.0]


def _rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


def _log_softmax(v: torch.Tensor) -> torch.Tensor:
    shifted = v - v.max()
    return shifted - torch.log(torch.exp(shifted).sum())


# ---------------------------------------------------------------- loop references (float64)


def _ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. 1: 2N anchors, positive = the other view, denominator over all k != i."""
    n = z1.shape[0]
    z = [z1[i] for i in range(n)] + [z2[i] for i in range(n)]
    total = z1.new_zeros(())
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        denom = z1.new_zeros(())
        for j in range(2 * n):
            if j != a:
                denom = denom + torch.exp(_cos(z[a], z[j]) / temperature)
        total = total - torch.log(torch.exp(_cos(z[a], z[pos]) / temperature) / denom)
    return total / (2 * n)


def _ref_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 Algorithm 1 ctr(q, k): keys of the other samples are the negatives, times 2*tau."""
    n = q.shape[0]
    total = q.new_zeros(())
    for i in range(n):
        logits = torch.stack([_cos(q[i], k[j]) / temperature for j in range(n)])
        total = total - _log_softmax(logits)[i]
    return total / n * 2 * temperature


def _ref_byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    n = p.shape[0]
    return sum(2 - 2 * _cos(p[i], z[i]) for i in range(n)) / n


def _ref_dino(student, teacher, center, student_temp, teacher_temp):
    """DINO eq. 2 over all (teacher global crop i, student crop j != i) pairs, averaged."""
    pairs = []
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if j == i:
                continue
            per_sample = []
            for n in range(t.shape[0]):
                p_t = torch.exp(_log_softmax((t[n] - center[0]) / teacher_temp))
                per_sample.append(-(p_t * _log_softmax(s[n] / student_temp)).sum())
            pairs.append(sum(per_sample) / len(per_sample))
    return sum(pairs) / len(pairs), len(pairs)


def _ref_center(teacher, center, momentum):
    rows = [row for t in teacher for row in t]
    batch_mean = sum(rows) / len(rows)  # [K]
    return momentum * center + (1 - momentum) * batch_mean[None]


def _close(actual, expected, rtol=1e-6, atol=1e-7):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,d", [(3, 4), (5, 8), (6, 6)])
def test_nt_xent_matches_loop_reference(n, d, temperature):
    z1, z2 = _rand(n * d, n, d), _rand(n * d + 1, n, d)
    loss = nt_xent(z1, z2, temperature)
    assert loss.shape == ()
    _close(loss, _ref_nt_xent(z1, z2, temperature))


def test_nt_xent_gradient_matches_reference():
    z1, z2 = _rand(0, 4, 5).requires_grad_(), _rand(1, 4, 5).requires_grad_()
    nt_xent(z1, z2, 0.3).backward()
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    _ref_nt_xent(r1, r2, 0.3).backward()
    _close(z1.grad, r1.grad)
    _close(z2.grad, r2.grad)


def test_nt_xent_view_swap_scale_and_permutation_invariant():
    z1, z2 = _rand(2, 5, 6), _rand(3, 5, 6)
    loss = nt_xent(z1, z2, 0.2)
    _close(nt_xent(z2, z1, 0.2), loss)
    # each row rescaled by its own positive factor: the loss normalises
    scale1 = torch.tensor([0.1, 2.0, 7.5, 0.3, 1.0], dtype=torch.float64)[:, None]
    scale2 = torch.tensor([3.0, 0.05, 1.0, 12.0, 0.7], dtype=torch.float64)[:, None]
    _close(nt_xent(z1 * scale1, z2 * scale2, 0.2), loss)
    # images are unordered: the same permutation of both views changes nothing
    perm = torch.tensor([3, 0, 4, 1, 2])
    _close(nt_xent(z1[perm], z2[perm], 0.2), loss)
    # but pairing view 1 of image i with view 2 of another image does
    assert abs(nt_xent(z1, z2[perm], 0.2).item() - loss.item()) > 1e-3


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_closed_forms(temperature):
    n = 4
    eye = torch.eye(n, 6, dtype=torch.float64)  # orthogonal one-hot embeddings
    # positives identical (cos 1), all 2N-2 negatives orthogonal (cos 0)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    _close(nt_xent(eye, 2.5 * eye, temperature), expected)
    # positives opposite (cos -1), negatives orthogonal
    expected = math.log(1 + (2 * n - 2) * math.exp(1 / temperature))
    _close(nt_xent(eye, -eye, temperature), expected)
    # every sample the same direction: all 2N-1 candidates tie
    same = torch.ones(n, 6, dtype=torch.float64)
    _close(nt_xent(same, 3 * same, temperature), math.log(2 * n - 1))


# ---------------------------------------------------------------- MoCo v3 InfoNCE


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("n,d", [(3, 4), (6, 8)])
def test_infonce_matches_loop_reference(n, d, temperature):
    q, k = _rand(10 + n, n, d), _rand(20 + n, n, d)
    loss = infonce(q, k, temperature)
    assert loss.shape == ()
    _close(loss, _ref_infonce(q, k, temperature))


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_infonce_closed_form(temperature):
    n = 5
    eye = torch.eye(n, 7, dtype=torch.float64)
    # cos 1 with the own key, 0 with the N-1 others; times 2*tau (MoCo v3 Algorithm 1)
    expected = 2 * temperature * math.log(1 + (n - 1) * math.exp(-1 / temperature))
    _close(infonce(eye, 4 * eye, temperature), expected)


def test_infonce_scale_invariant_and_gradient_only_to_queries():
    q, k = _rand(30, 4, 6), _rand(31, 4, 6)
    loss = infonce(q, k, 0.2)
    _close(infonce(3.0 * q, 0.01 * k, 0.2), loss)
    q_, k_ = q.clone().requires_grad_(), k.clone().requires_grad_()
    infonce(q_, k_, 0.2).backward()
    assert k_.grad is None  # keys come from the momentum encoder
    r = q.clone().requires_grad_()
    _ref_infonce(r, k, 0.2).backward()
    _close(q_.grad, r.grad)


def test_mocov3_loss_is_symmetric_sum():
    q1, q2, k1, k2 = (_rand(40 + i, 5, 4) for i in range(4))
    loss = mocov3_loss(q1, q2, k1, k2, 0.2)
    _close(loss, _ref_infonce(q1, k2, 0.2) + _ref_infonce(q2, k1, 0.2))
    _close(mocov3_loss(q2, q1, k2, k1, 0.2), loss)
    # q1 is paired with k2, not k1
    wrong = _ref_infonce(q1, k1, 0.2) + _ref_infonce(q2, k2, 0.2)
    assert abs(loss.item() - wrong.item()) > 1e-3


# ---------------------------------------------------------------- BYOL


def test_byol_loss_matches_reference_and_known_values():
    p, z = _rand(50, 6, 5), _rand(51, 6, 5)
    _close(byol_loss(p, z), _ref_byol(p, z))
    scale = torch.tensor([0.5, 2.0, 9.0, 0.1, 1.0, 3.0], dtype=torch.float64)[:, None]
    _close(byol_loss(p, scale * p), 0.0)  # same directions
    _close(byol_loss(p, -scale * p), 4.0)  # opposite directions
    half = torch.cat([scale[:3] * p[:3], -scale[3:] * p[3:]])
    _close(byol_loss(p, half), 2.0)  # mean over the batch, not sum


def test_byol_loss_gradient_only_to_prediction():
    p, z = _rand(52, 4, 6).requires_grad_(), _rand(53, 4, 6).requires_grad_()
    byol_loss(p, z).backward()
    assert z.grad is None  # the target projection is a constant
    r = p.detach().clone().requires_grad_()
    _ref_byol(r, z.detach()).backward()
    _close(p.grad, r.grad)


# ---------------------------------------------------------------- DINO


def _dino_inputs(seed, n_crops, n, k, n_global=2):
    student = [_rand(seed + c, n, k) for c in range(n_crops)]
    teacher = [_rand(seed + 100 + c, n, k) for c in range(n_global)]
    return student, teacher


def test_dino_center_buffer_at_init():
    loss_fn = DINOLoss(out_dim=7)
    assert "center" in dict(loss_fn.named_buffers())
    assert loss_fn.center.shape == (1, 7)
    assert torch.count_nonzero(loss_fn.center) == 0


@pytest.mark.parametrize("student_temp,teacher_temp,momentum", [(0.1, 0.04, 0.9), (0.3, 0.07, 0.5)])
def test_dino_loss_with_center_and_center_update(student_temp, teacher_temp, momentum):
    k = 6
    loss_fn = DINOLoss(out_dim=k, student_temp=student_temp, center_momentum=momentum).double()
    old_center = _rand(60, 1, k)
    loss_fn.center.copy_(old_center)
    student, teacher = _dino_inputs(61, n_crops=4, n=3, k=k)
    expected, n_pairs = _ref_dino(student, teacher, old_center, student_temp, teacher_temp)
    assert n_pairs == 2 * 4 - 2
    loss = loss_fn(student, teacher, teacher_temp)
    assert loss.shape == ()
    _close(loss, expected)  # computed with the old center
    new_center = _ref_center(teacher, old_center, momentum)
    _close(loss_fn.center, new_center)
    assert loss_fn.center.grad_fn is None
    # the next call uses the updated center
    student, teacher = _dino_inputs(62, n_crops=4, n=3, k=k)
    expected, _ = _ref_dino(student, teacher, new_center, student_temp, teacher_temp)
    _close(loss_fn(student, teacher, teacher_temp), expected)


def test_dino_batch_center_init_centres_the_first_step_then_follows_the_ema():
    k, tau_s, tau_t, m = 6, 0.1, 0.04, 0.9
    loss_fn = DINOLoss(out_dim=k, student_temp=tau_s, center_momentum=m,
                       center_init="batch").double()
    student, teacher = _dino_inputs(90, n_crops=2, n=5, k=k)
    first = torch.cat(teacher).mean(0, keepdim=True)  # [1, K] the first batch's mean output
    expected, _ = _ref_dino(student, teacher, first, tau_s, tau_t)
    _close(loss_fn(student, teacher, tau_t), expected)  # centred from the first step
    _close(loss_fn.center, _ref_center(teacher, first, m))  # then the usual EMA update
    # a center that is set (e.g. restored from a checkpoint) is never re-initialised
    restored = _rand(91, 1, k)
    loss_fn.center.copy_(restored)
    student, teacher = _dino_inputs(92, n_crops=2, n=5, k=k)
    expected, _ = _ref_dino(student, teacher, restored, tau_s, tau_t)
    _close(loss_fn(student, teacher, tau_t), expected)
    with pytest.raises(ValueError, match="center_init='first'"):
        DINOLoss(out_dim=k, center_init="first")


def test_dino_two_global_crops_only():
    loss_fn = DINOLoss(out_dim=5, student_temp=0.1).double()
    student, teacher = _dino_inputs(70, n_crops=2, n=4, k=5)
    expected, n_pairs = _ref_dino(student, teacher, loss_fn.center.clone(), 0.1, 0.04)
    assert n_pairs == 2
    _close(loss_fn(student, teacher, 0.04), expected)


def test_dino_multicrop_pair_count_closed_form():
    """Uniform teacher (zero logits, zero center): a pair's loss is the mean of -log_softmax.
    Global student crops have zero logits (loss log K); locals have one logit a (loss c)."""
    k, n, tau_s, a = 5, 3, 0.2, 1.0
    loss_fn = DINOLoss(out_dim=k, student_temp=tau_s).double()
    zeros = torch.zeros(n, k, dtype=torch.float64)
    local = zeros.clone()
    local[:, 0] = a
    c = math.log(math.exp(a / tau_s) + k - 1) - a / (tau_s * k)
    # pairs (0,1), (1,0) give log K; the 4 (global, local) pairs give c; (0,0), (1,1) excluded
    expected = (2 * math.log(k) + 4 * c) / 6
    _close(loss_fn([zeros, zeros, local, local.clone()], [zeros, zeros], 0.04), expected)


def test_dino_gradient_flows_to_student():
    k = 4
    loss_fn = DINOLoss(out_dim=k, student_temp=0.1).double()
    loss_fn.center.copy_(_rand(80, 1, k))
    center = loss_fn.center.clone()
    student, teacher = _dino_inputs(81, n_crops=3, n=3, k=k)
    student = [s.requires_grad_() for s in student]
    loss_fn(student, teacher, 0.05).backward()
    ref_student = [s.detach().clone().requires_grad_() for s in student]
    _ref_dino(ref_student, teacher, center, 0.1, 0.05)[0].backward()
    for s, r in zip(student, ref_student, strict=True):
        _close(s.grad, r.grad)


# ---------------------------------------------------------------- Barlow Twins and VICReg


def _ref_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float, unbiased: bool) -> torch.Tensor:
    """Barlow Twins' Algorithm 1, entry by entry: standardise each dimension over the batch
    (``unbiased``: the pseudo-code's torch.std; else eq. 2's correlation), C = z1n^T z2n / N,
    sum (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / z.std(0, unbiased=unbiased)

    a, b = standardise(z1), standardise(z2)
    total = z1.new_zeros(())
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total = total + ((1 - c_ij) ** 2 if i == j else lam * c_ij ** 2)
    return total


def _ref_vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4):
    """The paper's eq. 1-5, per dimension and entry: s(Z, Z') = 1/n sum_b ||z_b - z'_b||^2,
    v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(z^j) + eps)), c(Z) = 1/d sum_{i != j} C(Z)_ij^2."""
    n, d = z1.shape
    s = sum(((z1[b] - z2[b]) ** 2).sum() for b in range(n)) / n

    def v(z: torch.Tensor) -> torch.Tensor:
        return sum(torch.relu(1 - torch.sqrt(z[:, j].var() + eps)) for j in range(d)) / d

    def c(z: torch.Tensor) -> torch.Tensor:
        zc = z - z.mean(0)
        total = z.new_zeros(())
        for i in range(d):
            for j in range(d):
                if i != j:
                    total = total + (sum(zc[b, i] * zc[b, j] for b in range(n)) / (n - 1)) ** 2
        return total / d

    return s, v(z1) + v(z2), c(z1) + c(z2)


@pytest.mark.parametrize("n, d, lam", [(4, 3, 5e-3), (7, 5, 0.1), (16, 8, 1.0)])
def test_barlow_twins_matches_algorithm_1_with_eq_2s_correlation(n, d, lam):
    z1, z2 = _rand(0, n, d), _rand(1, n, d) + 0.5 * _rand(0, n, d)
    got = BarlowTwinsLoss(lam, eps=0.0)(z1, z2)
    assert torch.allclose(got.double(), _ref_barlow(z1, z2, lam, unbiased=False), rtol=1e-5)
    # the pseudo-code's unbiased std is another number: C shrinks by (N - 1) / N
    assert not torch.allclose(got.double(), _ref_barlow(z1, z2, lam, unbiased=True), rtol=1e-3)


def test_barlow_twins_closed_form_and_invariances():
    # two samples: each standardised dimension is (+1, -1) or (-1, +1), so C = [[1, -1], [-1, 1]]
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert BarlowTwinsLoss(0.25, eps=0.0)(z, z).item() == pytest.approx(2 * 0.25)
    # the pseudo-code's unbiased std would give C = 0.5 [[1, -1], [-1, 1]]: 2 x 0.25 + 2 x 0.25 / 4
    assert _ref_barlow(z.double(), z.double(), 0.25, unbiased=True).item() == pytest.approx(0.625)
    # perfectly correlated, decorrelated dimensions: the identity, loss 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert BarlowTwinsLoss(eps=0.0)(z, 3 * z + 2).item() == pytest.approx(0.0, abs=1e-6)
    # a positive scale and a shift of any dimension of either view change nothing
    z1, z2 = _rand(2, 8, 4).float(), _rand(3, 8, 4).float()
    scale, shift = torch.tensor([0.5, 2.0, 7.0, 1.0]), torch.tensor([1.0, -3.0, 0.0, 9.0])
    loss = BarlowTwinsLoss(eps=0.0)
    assert torch.allclose(loss(z1, z2), loss(z1 * scale + shift, z2), rtol=1e-5)
    # swapping the views transposes C: the same loss
    assert torch.allclose(loss(z1, z2), loss(z2, z1), rtol=1e-6)


def test_barlow_twins_gradient_matches_reference():
    z1, z2 = _rand(4, 6, 3).requires_grad_(), _rand(5, 6, 3).requires_grad_()
    BarlowTwinsLoss(0.3, eps=0.0)(z1, z2).backward()
    got = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    _ref_barlow(z1, z2, 0.3, unbiased=False).backward()
    assert torch.allclose(got[0].double(), z1.grad, atol=1e-5)
    assert torch.allclose(got[1].double(), z2.grad, atol=1e-5)


@pytest.mark.parametrize("n, d, lam", [(8, 4, 5e-3), (32, 16, 0.05)])
def test_barlow_twins_equals_lightly(n, d, lam):
    """lightly 1.6.0 standardises each view with a training-mode batch_norm (biased variance,
    eps 1e-5), divides C by N and weights the off-diagonal by lambda_param: our convention."""
    from lightly.loss import BarlowTwinsLoss as LightlyBarlowTwins

    z1, z2 = _rand(6, n, d).float(), _rand(7, n, d).float()
    ours = BarlowTwinsLoss(lam)(z1, z2)
    theirs = LightlyBarlowTwins(lambda_param=lam)(z1, z2)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, d", [(4, 3), (9, 5)])
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_matches_the_papers_terms_with_the_official_scales(n, d, weights):
    """The official code (whose scales the paper's weights were tuned for) averages the
    invariance over dimensions too (eq. 2's s over D) and halves the two views' variance sum."""
    lam, mu, nu = weights
    z1, z2 = 0.3 * _rand(8, n, d), 0.3 * _rand(9, n, d)  # std below 1: the hinge is active
    s, v, c = _ref_vicreg_terms(z1, z2)
    assert v > 0
    expected = lam * s / d + mu * v / 2 + nu * c
    got = VICRegLoss(lam, mu, nu)(z1, z2)
    assert torch.allclose(got.double(), expected, rtol=1e-5)


def test_vicreg_closed_forms():
    loss = VICRegLoss(1.0, 1.0, 1.0, eps=1e-4)
    # two samples at +-1 on every dimension: Var = 2, std above 1 (no hinge); both dimensions
    # move together, Cov = 2 off the diagonal: c = 2 x 2^2 / 2 = 4 per view; equal views
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert loss(z, z).item() == pytest.approx(2 * 4.0)
    # every sample equal (collapse): std = sqrt(eps), hinge 1 - 0.01 per view, no covariance;
    # views 1 apart on each dimension: invariance 1
    z1, z2 = torch.zeros(4, 3), torch.ones(4, 3)
    assert loss(z1, z2).item() == pytest.approx(1.0 + (1 - 1e-2))
    # a shift of both views together changes nothing
    a, b = _rand(10, 8, 4).float(), _rand(11, 8, 4).float()
    assert torch.allclose(VICRegLoss()(a, b), VICRegLoss()(a + 5, b + 5), rtol=1e-5)


def test_vicreg_gradient_matches_reference():
    z1, z2 = (0.5 * _rand(12, 6, 3)).requires_grad_(), (0.5 * _rand(13, 6, 3)).requires_grad_()
    VICRegLoss(2.0, 3.0, 4.0)(z1, z2).backward()
    got = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    s, v, c = _ref_vicreg_terms(z1, z2)
    (2.0 * s / 3 + 3.0 * v / 2 + 4.0 * c).backward()
    assert torch.allclose(got[0].double(), z1.grad, atol=1e-5)
    assert torch.allclose(got[1].double(), z2.grad, atol=1e-5)


@pytest.mark.parametrize("n, d", [(8, 4), (32, 16)])
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (5.0, 10.0, 2.0)])
def test_vicreg_equals_lightly(n, d, weights):
    from lightly.loss import VICRegLoss as LightlyVICReg

    z1, z2 = 0.5 * _rand(14, n, d).float(), 0.5 * _rand(15, n, d).float()
    ours = VICRegLoss(*weights)(z1, z2)
    theirs = LightlyVICReg(*weights)(z1, z2)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_barlow_twins_and_vicreg_refuse_non_positive_settings():
    with pytest.raises(ValueError, match="redundancy_weight=0 "):
        BarlowTwinsLoss(0)
    with pytest.raises(ValueError, match="redundancy_weight=-0.1 "):
        BarlowTwinsLoss(-0.1)
    for bad in ((0.0, 25.0, 1.0), (25.0, -1.0, 1.0), (25.0, 25.0, 0.0)):
        with pytest.raises(ValueError, match="all must be > 0"):
            VICRegLoss(*bad)
