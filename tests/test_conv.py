"""The convolution kernel rule (``mae_bench/models/conv.py``): what it picks per (device, dtype,
layer size), that both kernels compute F.conv2d's values and gradients, that every
convolutional backbone applies it per call, and that a run records and keeps its setting."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mae_bench.config import RunConfig
from mae_bench.errors import ConfigError
from mae_bench.methods.engine import _conv, pretrain
from mae_bench.methods.registry import build_method
from mae_bench.models.backbones import build_backbone
from mae_bench.models.conv import (
    MATMUL_MAX_POSITIONS,
    MATMUL_MIN_CHANNELS,
    MatmulConv,
    RuleConv2d,
    columns,
    fold_columns,
    rule_conv_path,
    set_conv,
)


@pytest.mark.parametrize(("device", "dtype", "cin", "positions", "expected"), [
    ("cpu", torch.bfloat16, 512, 16, "matmul"),  # ResNet-18's last stage at 32 px
    ("cpu", torch.float16, 256, 16, "matmul"),  # its first, strided, convolution
    ("cpu", torch.bfloat16, 256, 64, "native"),  # the third stage at 32 px: oneDNN wins
    ("cpu", torch.bfloat16, 64, 1024, "native"),
    ("cpu", torch.bfloat16, MATMUL_MIN_CHANNELS - 1, MATMUL_MAX_POSITIONS, "native"),
    ("cpu", torch.bfloat16, MATMUL_MIN_CHANNELS, MATMUL_MAX_POSITIONS + 1, "native"),
    ("cpu", torch.float32, 512, 16, "matmul"),  # fp32 too (a smaller gain)
    ("cpu", torch.float32, 256, 64, "native"),
    ("cuda", torch.bfloat16, 512, 16, "native"),  # GPUs: cuDNN
])
def test_rule(device, dtype, cin, positions, expected):
    assert rule_conv_path(device, dtype, cin, positions) == expected


# (in, out, kernel, stride, padding, bias, size): stride 1 and 2, 1x1 and 3x3, a 5x5 with
# padding 1 (not "same"), a non-square odd size, a bias
GEOMETRIES = [(6, 5, 3, 1, 1, False, 7), (6, 5, 3, 2, 1, False, 8), (6, 5, 1, 2, 0, False, 8),
              (4, 3, 5, 1, 1, True, 9), (4, 3, 3, 2, 1, True, 7), (4, 3, 3, 1, 0, False, 6)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_matmul_path_equals_conv2d_values_and_gradients(geometry, channels_last):
    """fp64, so that any difference is a wrong index, not rounding: output, input gradient,
    weight gradient and bias gradient equal F.conv2d's autograd."""
    cin, cout, k, s, p, bias, size = geometry
    torch.manual_seed(0)
    x = torch.randn(3, cin, size, size - 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    got, ref = [], []
    for fn, out in ((lambda *a: MatmulConv.apply(*a, (s, s), (p, p)), got),
                    (lambda xx, ww, bb: F.conv2d(xx, ww, bb, s, p), ref)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y))
        out += [y.detach(), *(t.grad for t in leaves)]
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape and torch.allclose(a, r, atol=1e-10), (a - r).abs().max()
    assert got[0].is_contiguous(memory_format=torch.channels_last)  # [N, Cout, Ho, Wo] CL


def test_columns_and_fold_are_adjoint():
    """<columns(x), c> == <x, fold(c)> for any x, c: fold is exactly columns' transpose."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6, 3, dtype=torch.float64)  # [N, H, W, C]
    for kernel, stride, padding, out_hw in (((3, 3), (2, 2), (1, 1), (4, 3)),
                                            ((3, 3), (1, 1), (1, 1), (7, 6))):
        cols = columns(x, kernel, stride, padding, out_hw)
        c = torch.randn_like(cols)
        lhs = (cols * c).sum()
        rhs = (x * fold_columns(c, tuple(x.shape), kernel, stride, padding, out_hw)).sum()
        assert torch.allclose(lhs, rhs)


def test_bf16_matmul_path_is_as_close_to_conv2d_as_bf16_allows():
    """ResNet-18's last-stage shape under bf16 autocast: both kernels within bf16 rounding of the
    fp32 result, and of each other."""
    torch.manual_seed(0)
    conv = nn.Conv2d(512, 512, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 512, 4, 4).contiguous(memory_format=torch.channels_last)
    results = {}
    for path in ("native", "matmul", "fp32"):
        set_conv(conv, "native" if path == "fp32" else path)
        xx = x.clone().requires_grad_()
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "fp32"):
            y = conv(xx)
        assert y.dtype == (torch.float32 if path == "fp32" else torch.bfloat16)
        y.float().square().mean().backward()
        results[path] = [y.float(), xx.grad.float(), conv.weight.grad.clone()]
    for path in ("native", "matmul"):
        for got, ref in zip(results[path], results["fp32"], strict=True):
            assert (got - ref).norm() / ref.norm() < 1e-2, path


def test_every_backbone_convolution_applies_the_rule_per_call(monkeypatch):
    """A ResNet's convolutions are RuleConv2d (same state dict as a plain Conv2d); under bf16
    autocast on the CPU the last stage's run the matmul path, the rest natively; the same in
    fp32; at 64 px (the last stage at 8 x 8) every layer runs natively."""
    net = build_backbone("resnet18", 32, 3).to(memory_format=torch.channels_last)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is RuleConv2d and m.path == "auto" for m in convs)
    calls = []
    real = MatmulConv.apply
    monkeypatch.setattr(MatmulConv, "apply", lambda *a: calls.append(a[1].shape) or real(*a))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.forward_features(x).float().sum().backward()
    # layer4: its first block's strided 3x3 and 1x1 shortcut (256 in), then three 512 -> 512
    assert sorted(tuple(s) for s in calls) == sorted(
        [(512, 256, 3, 3), (512, 256, 1, 1)] + [(512, 512, 3, 3)] * 3)
    first = sorted(tuple(s) for s in calls)
    calls.clear()
    net.forward_features(x).sum().backward()
    assert sorted(tuple(s) for s in calls) == first
    calls.clear()
    big = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.forward_features(big).float().sum().backward()
    assert calls == []
    plain = build_backbone("resnet18", 32, 3)
    set_conv(plain, "native")
    assert plain.state_dict().keys() == net.state_dict().keys()


def test_set_conv_converts_plain_layers_and_refuses_unknown_paths():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 3))
    set_conv(model, "matmul")
    assert type(model[0]) is RuleConv2d and model[0].path == "matmul"
    assert type(model[1]) is nn.Conv1d  # only 2-D convolutions
    with pytest.raises(ConfigError, match="unknown convolution path 'fast'; valid: auto, "
                                          "native, matmul"):
        set_conv(model, "fast")


def test_uncovered_layers_run_natively_even_when_forced():
    """Grouped and dilated convolutions have no matmul path: forced, they still compute."""
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, dilation=2),
                 nn.Conv2d(4, 4, 3, padding="same")):
        x = torch.randn(2, 4, 8, 8)
        expected = conv(x)
        set_conv(conv, "matmul")
        assert not conv.covered() and torch.equal(conv(x), expected)


def _cnn_cfg(**train) -> RunConfig:
    return RunConfig().replace(
        model={"arch": "resnet18"}, ssl={"proj_hidden_dim": 32, "proj_dim": 16},
        train={"method": "simclr", "batch_size": 64, "device": "cpu", "precision": "fp32",
               **train})


def test_a_run_records_its_conv_setting_in_the_checkpoint_and_every_segment(tmp_path):
    run = tmp_path / "run"
    first = pretrain(_cnn_cfg(epochs=1, conv="matmul"), run, progress=False)
    assert first.finished
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["extra"]["conv"] == "matmul"
    pretrain(_cnn_cfg(epochs=2, conv="matmul"), run, progress=False)  # resumed
    info = json.loads((run / "run.json").read_text())
    assert info["conv"] == "matmul"
    assert [(s["start_step"] > 0, s["conv"]) for s in info["segments"]] == [
        (False, "matmul"), (True, "matmul")]


def test_a_checkpoint_from_before_the_rule_resumes_natively():
    """Such a run ran every convolution through F.conv2d; resuming it the same way replays its
    rounding exactly. One that recorded "auto" keeps the rule; a forced setting wins."""
    cfg = _cnn_cfg(epochs=1)
    method = build_method(cfg, 3, 16)
    assert _conv(cfg, method, {"extra": {"train_seconds": 1.0}}) == "native"
    assert {m.path for m in method.modules() if isinstance(m, RuleConv2d)} == {"native"}
    assert _conv(cfg, method, None) == "auto"
    assert _conv(cfg, method, {"extra": {"conv": "auto"}}) == "auto"
    forced = cfg.replace(train={"conv": "matmul"})
    assert _conv(forced, method, {"extra": {}}) == "matmul"
