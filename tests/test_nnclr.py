"""NNCLR (``baselines/nnclr.py``): the nearest-neighbour lookup and the support set's update
against lightly 1.6.0's ``NNMemoryBankModule`` on identical tensors, the heads against
``NNCLRProjectionHead`` / ``NNCLRPredictionHead``, the loss against a loop transcription of the
paper's eq. 2 (solo-learn's ``nnclr_loss_func``; lightly's example uses SimCLR's NT-Xent
instead, whose extra within-view negatives make it another loss: shown below), the recipe, and a
pretraining on digits that resumes with its support set."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.losses import nnclr_infonce
from baselines.queue import FeatureQueue, nearest_neighbours
from baselines.views import byol_views
from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import Batch, build_method, resolve_config
from mae_bench.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 24, "queue_size": 64}


def _cfg(arch: str = "vit_micro_patch2", **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": arch}, train={"method": "nnclr"},
                               ssl={**SMALL, **ssl})


def _views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)]


def _ref_nnclr(nn_z: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2, one anchor at a time: -log exp(NN_i . p_i / t) / sum_k exp(NN_i . p_k / t)."""
    total = p.new_zeros(())
    for i in range(len(p)):
        a = nn_z[i] / nn_z[i].norm()
        logits = torch.stack([a @ (p[k] / p[k].norm()) / temperature for k in range(len(p))])
        total = total - torch.log_softmax(logits, dim=0)[i]
    return total / len(p)


def test_nearest_neighbours_equal_lightlys_nn_memory_bank():
    from lightly.models.modules import NNMemoryBankModule

    support = FeatureQueue(20, 6, seed=4)
    theirs = NNMemoryBankModule((20, 6))
    theirs.bank.copy_(support.features)
    z = torch.randn(7, 6) * 3
    torch.testing.assert_close(nearest_neighbours(z, support.features), theirs(z))
    # a stored vector is its own nearest neighbour, whatever its scale
    assert torch.equal(nearest_neighbours(support.features[[3, 11]] * 5, support.features),
                       support.features[[3, 11]])


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
def test_loss_equals_the_papers_eq2_and_not_simclrs_ntxent(temperature):
    from lightly.loss import NTXentLoss

    g = torch.Generator().manual_seed(1)
    nn_z = torch.randn(6, 5, generator=g)
    p = torch.randn(6, 5, generator=g, requires_grad=True)
    ours = nnclr_infonce(nn_z, p, temperature)
    (grad,) = torch.autograd.grad(ours, p)
    p_ref = p.detach().double().requires_grad_()
    ref = _ref_nnclr(nn_z.double(), p_ref, temperature)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref)
    torch.testing.assert_close(grad.double(), p_ref.grad, rtol=1e-5, atol=1e-6)
    assert not math.isclose(ours.item(), NTXentLoss(temperature)(nn_z, p).item(), rel_tol=1e-3)


def test_heads_equal_lightlys_nnclr_heads():
    """Strict state-dict loads (every Linear followed by BatchNorm in the projector, the
    output's affine too; the predictor's output Linear with a bias) and equal outputs."""
    from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead

    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 8).train()
    for ours, theirs in ((method.projector, NNCLRProjectionHead(method.feature_dim, 32, 16)),
                         (method.predictor, NNCLRPredictionHead(16, 24, 16))):
        ours.load_state_dict({k.removeprefix("layers."): v
                              for k, v in theirs.state_dict().items()})
        x = torch.randn(5, ours[0].in_features)
        torch.testing.assert_close(ours(x), theirs.train()(x))


def test_a_step_equals_lightlys_nn_bank_with_the_papers_loss():
    """The neighbours come from lightly's NNMemoryBankModule holding the same support set;
    the loss and every gradient equal eq. 2 symmetrised on them; afterwards the support set
    equals lightly's bank updated with the first view's (normalised) projections."""
    from lightly.models.modules import NNMemoryBankModule

    torch.manual_seed(0)
    method = build_method(_cfg(temperature=0.3), 3, 8).train()
    bank = NNMemoryBankModule((64, 16))
    bank.bank.copy_(method.support.features)
    views = _views()
    params = [p for p in method.parameters() if p.requires_grad]
    loss = method(Batch(views, torch.zeros(8), torch.Generator()))["loss"]
    ours = torch.autograd.grad(loss, params)

    z1, z2 = (method.projector(h) for h in method.embed(views))
    p1, p2 = method.predictor(z1), method.predictor(z2)
    nn2 = bank(z2.detach(), update=False)
    nn1 = bank(torch.nn.functional.normalize(z1.detach(), dim=1), update=True)
    ref = _ref_nnclr(nn1, p2, 0.3) / 2 + _ref_nnclr(nn2, p1, 0.3) / 2
    theirs = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(method.support.features, bank.bank)
    assert int(method.support.ptr) == int(bank.bank_ptr) == 8


def test_no_support_set_is_one_error_line_and_eval_leaves_it_alone():
    with pytest.raises(ConfigError, match=r"^nnclr needs a support set: ssl.queue_size must be "
                                          r">= 1 \(default 65536\), got 0$"):
        build_method(_cfg(queue_size=0), 3, 8)
    method = build_method(_cfg(), 3, 8).eval()
    before = method.support.snapshot()
    with torch.no_grad():
        method(Batch(_views(), torch.zeros(8), torch.Generator()))
    assert torch.equal(method.support.features, before)


@pytest.mark.parametrize("arch, optimizer, blr, wd, scaling, ref_batch", [
    ("vit_micro_patch2", "adamw", 1.5e-4, 0.1, "sqrt", 4096),  # MoCo v3's ViT recipe
    ("resnet18", "lars", 0.4, 1e-5, "linear", 256),  # solo-learn cifar/nnclr.yaml
])
def test_recipe(arch, optimizer, blr, wd, scaling, ref_batch):
    cfg = resolve_config(RunConfig().replace(model={"arch": arch}, train={"method": "nnclr"}))
    t, s = cfg.train, cfg.ssl
    assert (t.optimizer, t.blr, t.weight_decay, t.lr_scaling, t.lr_ref_batch) == (
        optimizer, blr, wd, scaling, ref_batch)
    assert (s.temperature, s.proj_hidden_dim, s.proj_dim, s.pred_hidden_dim, s.queue_size) == (
        0.2, 2048, 256, 4096, 65536)
    assert build_method(_cfg(), 3, 8).view_specs() == byol_views(8)


@pytest.mark.parametrize("arch", ["resnet18", "vit_micro_patch2"])
def test_pretrains_on_digits_and_resumes_with_its_support_set(tmp_path, arch):
    cfg = RunConfig().replace(model={"arch": arch},
                              train={"method": "nnclr", "epochs": 1, "batch_size": 32},
                              ssl={**SMALL, "queue_size": 256})
    full = pretrain(cfg, tmp_path / "full", max_steps=3, progress=False)
    pretrain(cfg, tmp_path / "part", max_steps=2, progress=False)
    part = pretrain(cfg, tmp_path / "part", max_steps=3, progress=False)  # resumes
    assert full.step == part.step == 3 and math.isfinite(full.final_loss)
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "part")["model"]
    assert int(a["support.ptr"]) == 3 * 32
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
