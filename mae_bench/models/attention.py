"""Which attention kernel a model runs: chosen by a rule on every call, never by timing.

A ViT block can compute attention two ways (timm's ``Attention.fused_attn``):

* ``fused``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs, a
  flash-attention kernel on CPUs);
* ``math``: the explicit ``softmax(q k^T / sqrt(d)) v`` with two batched matmuls.

Which is faster depends on the device and the dtype, and barely on anything else
(``benchmarks/attention_kernels.py``; the tables are in ``results/speed-cpu.md``). On CPUs under
bf16 / fp16 autocast the flash-attention kernel's backward is several times slower than the two
matmuls, so math wins at every length a ViT uses; in fp32 on CPUs the two are within a few
percent, and on GPUs the fused kernels win. ``rule_path`` encodes that table.

Every attention layer of mae-bench's models is a ``RuleAttention``: with its ``path`` at "auto"
(the default) it applies the rule to each call's device, active autocast dtype and sequence
length, so a model is fast under any training loop, a user's own included, and under any
precision it is later moved to. Before, a start-up timing of one layer decided a whole run, and
on a busy machine that timing flipped (bf16 at 0.25x fp32). The rule is a pure function of the
run's settings, so a resumed run replays the same kernels. ``--attention fused|math`` forces one
path. Both compute the same function up to float rounding: the choice never changes what is
learnt.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from mae_bench.config import ATTENTION_PATHS
from mae_bench.errors import ConfigError

# CPU, bf16 / fp16: math up to this many tokens (measured up to it; past it the explicit
# [B, H, T, T] score matrix grows quadratically and the memory-saving fused kernel is kept).
MATH_MAX_TOKENS = 1025


def rule_path(device_type: str, dtype: torch.dtype, tokens: int) -> str:
    """The kernel for one attention call: "math" or "fused".

    Args:
        device_type: "cpu", "cuda", ... (``tensor.device.type``).
        dtype: the dtype the matmuls run in (autocast's, else the input's).
        tokens: the sequence length.
    """
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "math" if tokens <= MATH_MAX_TOKENS else "fused"
    return "fused"


class RuleAttention(Attention):
    """timm's ``Attention`` (same parameters, same state-dict keys) whose kernel is picked per
    call: ``path`` "auto" applies ``rule_path``; "fused" / "math" force one."""

    path: str = "auto"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x: [B, T, D]
        if self.path == "auto":
            kind = x.device.type
            dtype = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
                     else x.dtype)
            self.fused_attn = rule_path(kind, dtype, x.shape[1]) == "fused"
        else:
            self.fused_attn = self.path == "fused"
        return super().forward(x, *args, **kwargs)


def attention_layers(model: nn.Module) -> list[Attention]:
    """Every timm attention layer inside ``model`` (encoder and decoder blocks alike)."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_attention(model: nn.Module, path: str) -> None:
    """Make every attention layer of ``model`` use ``path``: "auto" (the rule, per call),
    "fused" or "math". A plain timm ``Attention`` (a model built elsewhere) becomes a
    ``RuleAttention`` in place: the same module, parameters and state dict."""
    if path not in ATTENTION_PATHS:
        raise ConfigError(f"unknown attention path '{path}'; valid: {', '.join(ATTENTION_PATHS)}")
    for layer in attention_layers(model):
        if not isinstance(layer, RuleAttention):
            layer.__class__ = RuleAttention
        layer.path = path
        if path != "auto":
            layer.fused_attn = path == "fused"


def choose_attention(model: nn.Module, path: str, tokens: int, device: torch.device,
                     precision: str) -> str:
    """Set ``model``'s attention path and return the kernel its encoder runs: the forced one, or
    for "auto" the rule's at ``tokens`` (the whole image's 1 + L) on ``device`` in ``precision``
    (fp32 | bf16 | fp16). Other lengths (MAE's visible tokens) follow the same rule per call."""
    set_attention(model, path)
    if path != "auto":
        return path
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return rule_path(device.type, dtype, tokens)
