"""Which kernel a 2-D convolution runs: chosen by a rule on every call, never by timing.

A ``Conv2d`` can compute its forward and both gradients two ways:

* ``native``: ``F.conv2d`` and its autograd (oneDNN on CPUs, cuDNN on GPUs);
* ``matmul``: im2col by hand on the channels-last tensor (nine shifted views of the padded
  [N, H, W, C] input stacked into [N*Ho*Wo, k*k*C] columns), then one matmul each for the
  output and the weight gradient; the input gradient is the same construction on the output
  gradient with the flipped kernel (stride 1) or a col2im of the column gradient (strided).

On CPUs the two differ most where the output is small and the channels wide: oneDNN's weight
gradient is slow there, and a ResNet's last stage at 32 px (512 -> 512 channels at 4 x 4) trains
about twice as fast on the matmul path under bf16 (a smaller gain in fp32); where the output is
large (the early stages: 32 x 32, 16 x 16, 8 x 8) the columns cost more than they save and
oneDNN is several times faster. On GPUs the native kernels are kept.
``benchmarks/conv_kernels.py`` times every layer of a backbone on both paths
(``results/speed/conv-kernels.md``); ``rule_conv_path`` encodes that table.

Every convolution of mae-bench's convolutional backbones is a ``RuleConv2d`` (``set_conv``):
with its ``path`` at "auto" (the default) it applies the rule to each call's device, input
channels and output size, so the choice is a pure function of the run's settings and a
resumed run replays the same kernels. ``--conv native|matmul`` forces one path. Both compute
the same function up to float rounding (tested against ``F.conv2d``'s values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae_bench.config import CONV_PATHS
from mae_bench.errors import ConfigError

# CPU: the matmul path where the output has at most this many positions per image and the
# input at least this many channels (measured: results/speed/conv-kernels.md).
MATMUL_MAX_POSITIONS = 16
MATMUL_MIN_CHANNELS = 256


def rule_conv_path(device_type: str, dtype: torch.dtype, in_channels: int,
                   out_positions: int) -> str:
    """The kernel for one convolution call: "matmul" or "native".

    Args:
        device_type: "cpu", "cuda", ... (``tensor.device.type``).
        dtype: the dtype the convolution runs in (autocast's, else the input's).
        in_channels: the input's channels.
        out_positions: Ho * Wo, the output's positions per image.
    """
    if (device_type == "cpu" and out_positions <= MATMUL_MAX_POSITIONS
            and in_channels >= MATMUL_MIN_CHANNELS):
        return "matmul"
    return "native"


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def columns(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """[N, H, W, C] channels-last input -> [N*Ho*Wo, kh*kw*C] im2col columns (kh, kw, C order,
    the order of ``weight.permute(0, 2, 3, 1)``)."""
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_hw
    xp = F.pad(x, (0, 0, pw, pw, ph, ph))  # [N, H+2ph, W+2pw, C]
    views = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]  # kh*kw x [N, Ho, Wo, C]
    return torch.stack(views, 3).reshape(-1, kh * kw * x.shape[-1])  # [N*Ho*Wo, kh*kw*C]


def fold_columns(cols: Tensor, shape: tuple[int, int, int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int],
                 out_hw: tuple[int, int]) -> Tensor:
    """The adjoint of ``columns``: [N*Ho*Wo, kh*kw*C] -> [N, H, W, C], each column entry added
    back where it was read from. The sums run in fp32 and are rounded once (a bf16 running sum
    of nine terms would lose bits that oneDNN's kernel keeps)."""
    (n, h, w, c), (kh, kw), (sh, sw), (ph, pw), (ho, wo) = shape, kernel, stride, padding, out_hw
    parts = cols.view(n, ho, wo, kh * kw, c)
    acc = torch.promote_types(cols.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    out = cols.new_zeros(n, h + 2 * ph, w + 2 * pw, c, dtype=acc)  # [N, H+2ph, W+2pw, C]
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        out[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] += parts[:, :, :, k]
    return out[:, ph:ph + h, pw:pw + w, :].to(cols.dtype)  # [N, H, W, C]


def input_grad(grad: Tensor, g: Tensor, wmat: Tensor, shape: tuple[int, int, int, int],
               kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               out_hw: tuple[int, int]) -> Tensor:
    """The input gradient [N, H, W, Cin] from the output gradient ``grad`` [N, Ho, Wo, Cout]
    (``g``: the same as [N*Ho*Wo, Cout]). At stride 1 it is a convolution of ``grad`` with the
    flipped, transposed kernel and padding k - 1 - p: one more im2col matmul, summed in the
    matmul's fp32 accumulator and rounded once, as oneDNN's kernel does. Strided layers fold
    the column gradient back (``fold_columns``)."""
    n, h, w, cin = shape
    (kh, kw), (ph, pw) = kernel, padding
    if stride != (1, 1):
        return fold_columns(g @ wmat, shape, kernel, stride, padding, out_hw)
    cout = wmat.shape[0]
    flipped = wmat.view(cout, kh, kw, cin).flip(1, 2).permute(1, 2, 0, 3)  # [kh, kw, Cout, Cin]
    cols = columns(grad, kernel, (1, 1), (kh - 1 - ph, kw - 1 - pw), (h, w))  # [N*H*W, k*k*Cout]
    return (cols @ flipped.reshape(kh * kw * cout, cin)).view(n, h, w, cin)


class MatmulConv(torch.autograd.Function):
    """A convolution (groups 1, dilation 1) as im2col + matmul, forward and backward; output
    and input gradient in channels-last memory format."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
        n, _, h, w = x.shape
        cout, cin, kh, kw = weight.shape
        ho, wo = out_size(h, kh, stride[0], padding[0]), out_size(w, kw, stride[1], padding[1])
        cols = columns(x.permute(0, 2, 3, 1), (kh, kw), stride, padding, (ho, wo))
        wmat = weight.permute(0, 2, 3, 1).reshape(cout, kh * kw * cin)  # [Cout, kh*kw*Cin]
        y = cols @ wmat.t() if bias is None else torch.addmm(bias, cols, wmat.t())
        ctx.save_for_backward(cols, wmat)
        ctx.geometry = ((n, h, w, cin), (kh, kw), stride, padding, (ho, wo))
        ctx.has_bias = bias is not None
        return y.view(n, ho, wo, cout).permute(0, 3, 1, 2)  # [N, Cout, Ho, Wo], channels-last

    @staticmethod
    def backward(ctx, grad: Tensor):
        cols, wmat = ctx.saved_tensors
        shape, kernel, stride, padding, out_hw = ctx.geometry
        cout = wmat.shape[0]
        g = grad.permute(0, 2, 3, 1).reshape(-1, cout)  # [N*Ho*Wo, Cout]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(grad.permute(0, 2, 3, 1), g, wmat, shape, kernel, stride,
                                padding, out_hw).permute(0, 3, 1, 2)  # [N, Cin, H, W], CL
        if ctx.needs_input_grad[1]:
            kh, kw = kernel
            grad_w = (g.t() @ cols).view(cout, kh, kw, shape[3]).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None


class RuleConv2d(nn.Conv2d):
    """torch's ``Conv2d`` (same parameters, same state-dict keys) whose kernel is picked per
    call: ``path`` "auto" applies ``rule_conv_path``; "native" / "matmul" force one. Layers the
    matmul path does not cover (groups, dilation, string or non-zero padding modes) always run
    natively."""

    path: str = "auto"

    def covered(self) -> bool:
        return (self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))

    def forward(self, x: Tensor) -> Tensor:  # x: [N, Cin, H, W]
        if self.path == "native" or not self.covered():
            return super().forward(x)
        kind = x.device.type
        autocast = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        if self.path == "auto":
            positions = (out_size(x.shape[-2], self.kernel_size[0], self.stride[0],
                                  self.padding[0])
                         * out_size(x.shape[-1], self.kernel_size[1], self.stride[1],
                                    self.padding[1]))
            if rule_conv_path(kind, dtype, self.in_channels, positions) == "native":
                return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(kind, enabled=False):
            return MatmulConv.apply(x.to(dtype), self.weight.to(dtype), bias, self.stride,
                                    self.padding)


def set_conv(model: nn.Module, path: str) -> None:
    """Make every 2-D convolution of ``model`` use ``path``: "auto" (the rule, per call),
    "native" or "matmul". A plain ``Conv2d`` becomes a ``RuleConv2d`` in place: the same
    module, parameters and state dict."""
    if path not in CONV_PATHS:
        raise ConfigError(f"unknown convolution path '{path}'; valid: {', '.join(CONV_PATHS)}")
    for layer in model.modules():
        if type(layer) in (nn.Conv2d, RuleConv2d):
            layer.__class__ = RuleConv2d
            layer.path = path
