"""benchmarks/peers_zoo.py: each lightly example it times is the method it is compared with (the
same backbone, heads of the same widths, a finite loss that trains), and mae-bench's side is the
method as ``pretrain`` builds it for a ResNet."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo():
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("peers_zoo_benchmark", root / "peers_zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.modules.pop("peers", None)


def test_every_case_steps_with_a_finite_loss_and_moves_its_weights(zoo):
    args = Namespace(methods=list(zoo.METHODS), precisions=["fp32"], arch="resnet18",
                     img_size=8, batch_size=4, queue_size=64)
    views = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))
             for i in range(2)]
    cases = zoo.zoo_cases(args, views)
    assert [(c.task, c.name) for c in cases[:2]] == [("simclr", zoo.MB), ("simclr", zoo.LIGHTLY)]
    assert len(cases) == 2 * len(zoo.METHODS)
    for case in cases:
        loss = case.step()
        assert torch.isfinite(loss), (case.task, case.name)


@pytest.mark.parametrize("name", ["simclr", "swav", "nnclr"])
def test_lightly_heads_have_mae_benchs_widths(zoo, name):
    """The example's projection head maps the backbone's 512 features to the width mae-bench's
    method projects to, so both sides do the same head work."""
    from mae_bench.config import RunConfig
    from mae_bench.methods.registry import build_method, resolve_config
    from mae_bench.models.backbones import build_backbone

    cfg = resolve_config(RunConfig().replace(model={"arch": "resnet18"},
                                             train={"method": name}, ssl={"queue_size": 64}))
    method = build_method(cfg, 3, 8)
    model = zoo.LightlyModel(name, build_backbone("resnet18", 8, 3), 512, cfg.ssl)
    x = torch.randn(4, 512)
    assert model.head(x).shape[1] == method.projector(x).shape[1] == cfg.ssl.proj_dim


def test_mocov2_example_is_symmetric_like_mae_benchs(zoo):
    """Both views are queries and keys: swapping the views leaves the loss unchanged (the
    one-directional example would change). Without gradients lightly's bank is not updated
    between the two directions, so they see the same negatives."""
    from mae_bench.config import RunConfig
    from mae_bench.methods.registry import resolve_config
    from mae_bench.models.backbones import build_backbone

    cfg = resolve_config(RunConfig().replace(model={"arch": "resnet18"},
                                             train={"method": "mocov2"}, ssl={"queue_size": 64}))
    torch.manual_seed(0)
    model = zoo.LightlyModel("mocov2", build_backbone("resnet18", 8, 3), 512, cfg.ssl).eval()
    v = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        a, b = model.loss(v), model.loss(v[::-1])
        one_way = model.criterion(model.head(zoo.pooled(model.backbone, v[0])),
                                  model.teacher_head(zoo.pooled(model.teacher_backbone, v[1])))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, one_way)
