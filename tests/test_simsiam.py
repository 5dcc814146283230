"""SimSiam (``baselines/simsiam.py``) against lightly 1.6.0 on identical tensors: the loss
(``NegativeCosineSimilarity``), the heads (``SimSiamProjectionHead``,
``SimSiamPredictionHead``), a whole step's loss and gradients with and without the
stop-gradient; the recipe; a pretraining on digits that resumes."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.losses import negative_cosine
from baselines.mocov2 import mocov2_views
from mae_bench.config import RunConfig
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import Batch, build_method, resolve_config
from mae_bench.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 8}


def _cfg(arch: str = "vit_micro_patch2", **ssl) -> RunConfig:
    return RunConfig().replace(model={"arch": arch}, train={"method": "simsiam"},
                               ssl={**SMALL, **ssl})


def _views(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)]


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_negative_cosine_equals_lightly_and_stops_the_gradient_to_z(stop_gradient):
    from lightly.loss import NegativeCosineSimilarity

    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 5, generator=g, requires_grad=True)
    z = (torch.randn(6, 5, generator=g) * 4).requires_grad_()
    ours = negative_cosine(p, z, stop_gradient)
    ours.backward()
    theirs_p, theirs_z = p.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    ref = NegativeCosineSimilarity()(theirs_p, theirs_z.detach() if stop_gradient else theirs_z)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(p.grad, theirs_p.grad)
    if stop_gradient:
        assert z.grad is None
    else:
        torch.testing.assert_close(z.grad, theirs_z.grad)
    # closed forms: -1 for parallel vectors, 0 for orthogonal ones
    e = torch.eye(2)
    assert negative_cosine(e * 3, e).item() == pytest.approx(-1.0)
    assert negative_cosine(e, e.flip(0)).item() == pytest.approx(0.0, abs=1e-7)


def test_heads_equal_lightlys_simsiam_heads():
    """Strict state-dict loads (same layers, shapes, biases and BatchNorm buffers) and equal
    outputs: 3-layer projector with BatchNorm on its output, 2-layer bottleneck predictor."""
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

    torch.manual_seed(0)
    method = build_method(_cfg(), 3, 8).train()
    for ours, theirs in ((method.projector, SimSiamProjectionHead(method.feature_dim, 32, 16)),
                         (method.predictor, SimSiamPredictionHead(16, 8, 16))):
        ours.load_state_dict({k.removeprefix("layers."): v
                              for k, v in theirs.state_dict().items()})
        x = torch.randn(5, ours[0].in_features)
        torch.testing.assert_close(ours(x), theirs.train()(x))
    assert not method.projector[-1].affine  # the output BatchNorm has no affine parameters


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_a_step_equals_lightlys_symmetric_loss_with_and_without_stop_gradient(stop_gradient):
    """D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with lightly's criterion on the method's own
    tensors: the same loss and the same gradient for every parameter; without the
    stop-gradient the gradient also flows through z (it differs from the stopped one)."""
    from lightly.loss import NegativeCosineSimilarity

    torch.manual_seed(0)
    method = build_method(_cfg(stop_gradient=stop_gradient), 3, 8).train()
    views = _views()
    params = [p for p in method.parameters() if p.requires_grad]
    loss = method(Batch(views, torch.zeros(8), torch.Generator()))["loss"]
    ours = torch.autograd.grad(loss, params)

    crit = NegativeCosineSimilarity()
    z1, z2 = (method.projector(h) for h in method.embed(views))
    p1, p2 = method.predictor(z1), method.predictor(z2)
    if stop_gradient:
        z1, z2 = z1.detach(), z2.detach()
    ref = crit(p1, z2) / 2 + crit(p2, z1) / 2
    theirs = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    if not stop_gradient:  # the ablation's gradient is another one
        method_sg = build_method(_cfg(), 3, 8).train()
        method_sg.load_state_dict(method.state_dict())
        sg_loss = method_sg(Batch(views, torch.zeros(8), torch.Generator()))["loss"]
        (sg_grad,) = torch.autograd.grad(sg_loss, [method_sg.backbone.cls_token])
        assert not torch.allclose(sg_grad, ours[params.index(method.backbone.cls_token)])


@pytest.mark.parametrize("arch, optimizer, blr, wd, scaling, ref_batch", [
    ("vit_micro_patch2", "adamw", 1.5e-4, 0.1, "sqrt", 4096),  # MoCo v3's ViT recipe
    ("resnet18", "sgd", 0.5, 1e-5, "linear", 256),  # solo-learn cifar/simsiam.yaml
])
def test_recipe(arch, optimizer, blr, wd, scaling, ref_batch):
    cfg = resolve_config(RunConfig().replace(model={"arch": arch}, train={"method": "simsiam"}))
    t, s = cfg.train, cfg.ssl
    assert (t.optimizer, t.blr, t.weight_decay, t.lr_scaling, t.lr_ref_batch) == (
        optimizer, blr, wd, scaling, ref_batch)
    assert (s.proj_hidden_dim, s.proj_dim, s.pred_hidden_dim, s.stop_gradient) == (
        2048, 2048, 512, True)
    assert build_method(_cfg(), 3, 64).view_specs() == mocov2_views(64)  # the paper's


@pytest.mark.parametrize("arch", ["resnet18", "vit_micro_patch2"])
def test_pretrains_on_digits_and_resumes(tmp_path, arch):
    cfg = RunConfig().replace(model={"arch": arch},
                              train={"method": "simsiam", "epochs": 1, "batch_size": 32},
                              ssl=SMALL)
    full = pretrain(cfg, tmp_path / "full", max_steps=3, progress=False)
    pretrain(cfg, tmp_path / "part", max_steps=2, progress=False)
    part = pretrain(cfg, tmp_path / "part", max_steps=3, progress=False)  # resumes
    assert full.step == part.step == 3 and math.isfinite(full.final_loss)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert a["config"]["ssl"]["stop_gradient"] is True
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
