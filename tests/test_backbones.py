"""Backbones (mae_bench/models/backbones.py): the ResNets equal torchvision's apart from the
CIFAR stem and its rule, timm models build at any size they take, the Encoder hooks agree with
each other, and every joint-embedding method trains every kind of backbone while MAE refuses a
CNN in one line."""

from __future__ import annotations

import pytest
import torch
import torchvision
from cli_helpers import run_cli
from torch import nn

from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import pretrain
from mae_bench.methods.registry import METHODS, build_method, resolve_config
from mae_bench.models.backbones import (
    ResNet,
    build_backbone,
    check_arch,
    family,
    has_batchnorm,
    pooled,
    use_cifar_stem,
    vit_layer_id,
)
from mae_bench.models.conv import set_conv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cifar_stem_rule_follows_solo_learn():
    assert use_cifar_stem(32, None) and use_cifar_stem(64, None)
    assert not use_cifar_stem(96, None) and not use_cifar_stem(224, None)
    assert use_cifar_stem(224, True) and not use_cifar_stem(32, False)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_with_the_imagenet_stem_is_torchvisions(name):
    """Above 64 px the ResNet is torchvision's: the same keys and shapes, and with the same
    weights the same pooled features as torchvision's model without its fc."""
    ours = build_backbone(name, 96, 3).eval()
    ref = getattr(torchvision.models, name)(weights=None).eval()
    ref.fc = nn.Identity()
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 96, 96)
    # the last stage (3 x 3) runs im2col + matmul on CPUs (tests/test_conv.py): the same sums in
    # another order; natively, torchvision's exact function
    torch.testing.assert_close(pooled(ours, x), ref(x), rtol=1e-4, atol=1e-4)
    set_conv(ours, "native")
    torch.testing.assert_close(pooled(ours, x), ref(x))
    assert pooled(ours, x).shape == (2, ours.num_features)


def test_cifar_stem_keeps_the_image_size_and_has_no_maxpool():
    net = build_backbone("resnet18", 32, 1)
    assert net.cifar_stem and isinstance(net.maxpool, nn.Identity)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    # 32 px: 32 -> 32 (stem) -> 32, 16, 8, 4 (stages); the ImageNet stem would end at 1 x 1
    assert net.forward_features(torch.randn(2, 1, 32, 32)).shape == (2, 512, 4, 4)
    assert build_backbone("resnet18", 32, 3, cifar_stem=False).forward_features(
        torch.randn(2, 3, 32, 32)).shape == (2, 512, 1, 1)


def test_classifier_head_and_layer_groups():
    net = build_backbone("resnet18", 32, 3, num_classes=7)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    groups = {name.split(".")[0]: net.layer_id(name) for name, _ in net.named_parameters()}
    assert groups == {"conv1": 0, "bn1": 0, "layer1": 1, "layer2": 2, "layer3": 3,
                      "layer4": 4, "fc": 5}
    assert net.num_layer_groups == 6
    assert vit_layer_id("patch_embed.proj.weight", 2) == 0
    assert vit_layer_id("blocks.1.mlp.fc1.weight", 2) == 2 and vit_layer_id("norm.weight", 2) == 3


def test_timm_backbones_build_at_small_sizes():
    cnn = build_backbone("timm:resnet18", 32, 3)
    assert pooled(cnn, torch.randn(2, 3, 32, 32)).shape == (2, 512)
    vit = build_backbone("timm:vit_tiny_patch16_224", 32, 3)  # its position embedding: 2 x 2
    assert pooled(vit, torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert family("timm:vit_tiny_patch16_224") == "vit" and family("timm:resnet18") == "cnn"
    assert family("resnet50") == "cnn" and family("vit_micro_patch2") == "vit"
    assert has_batchnorm(cnn) and not has_batchnorm(vit)
    # timm's own layer-decay groups: the stem first, the last stage last
    assert cnn.layer_id("model.conv1.weight") == 0
    assert cnn.layer_id("model.layer4.1.conv2.weight") == cnn.num_layer_groups - 1


def test_unknown_names_give_close_ones():
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet19' \(close: resnet18"):
        check_arch("resnet19")
    with pytest.raises(ConfigError, match="unknown timm model 'resnt18'; close names: resnet18"):
        check_arch("timm:resnt18")


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18"])
def test_resnet_runs_resolve_to_the_cnn_recipe(arch):
    """A method's ``cnn_defaults`` apply on a CNN, its ViT ``defaults`` on a ViT."""
    for name, cls in METHODS.items():
        if cls.needs_vit:
            continue
        cfg = RunConfig().replace(model={"arch": arch}, train={"method": name})
        expected = cls.defaults_for("cnn")["train"].get("optimizer", "adamw")
        assert resolve_config(cfg).train.optimizer == expected, name
        vit = resolve_config(cfg.replace(model={"arch": "vit_micro_patch2"}))
        assert vit.train.optimizer == cls.defaults["train"]["optimizer"], name


def test_mae_refuses_a_cnn_in_one_line(monkeypatch, capsys, tmp_path):
    cfg = RunConfig().replace(model={"arch": "resnet18"}, train={"method": "mae"})
    with pytest.raises(ConfigError, match="mae needs a ViT preset"):
        build_method(cfg, 3, 16)
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--method", "mae", "--arch",
                           "resnet18", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: mae needs a ViT preset")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18"])
def test_joint_embedding_method_trains_a_cnn_and_its_bn_statistics_move(arch, tmp_path):
    """One epoch of SimCLR on digits trains the ResNet: its weights and BatchNorm running
    statistics change, and the run's config records the CNN recipe."""
    cfg = RunConfig().replace(model={"arch": arch},
                              train={"method": "simclr", "epochs": 1, "batch_size": 64,
                                     "device": "cpu", "precision": "fp32"},
                              ssl={"proj_hidden_dim": 32, "proj_dim": 16})
    first = build_method(cfg, 1, 8)
    before = {k: v.clone() for k, v in first.backbone.state_dict().items()}
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.finished and result.step == result.total_steps
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    means = [k for k in before if k.endswith("running_mean")]
    assert means and all(not torch.equal(state[f"backbone.{k}"], before[k]) for k in means)
    saved = RunConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.model.arch == arch
    assert saved.train.optimizer == resolve_config(cfg).train.optimizer


def test_a_cnn_backbone_runs_channels_last():
    cfg = RunConfig().replace(model={"arch": "resnet18"}, train={"method": "simclr"},
                              ssl={"proj_hidden_dim": 32, "proj_dim": 16})
    method = build_method(cfg, 3, 16)
    assert method.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(method.backbone, ResNet) and method.feature_dim == 512
