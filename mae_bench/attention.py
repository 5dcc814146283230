"""Which attention kernel a model runs: chosen per device, dtype and shape by measurement.

A ViT block can compute attention two ways (timm's ``Attention.fused_attn``):

* ``fused``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs, a
  flash-attention kernel on CPUs);
* ``math``: the explicit ``softmax(q k^T / sqrt(d)) v`` with two batched matmuls.

Which is faster depends on the hardware and the dtype. A profile of MAE under bf16 autocast on
a CPU spent over half its step in the CPU flash-attention backward, while the explicit path
trains far faster there; on GPUs the fused kernels win. So ``auto`` (the default) times one
forward + backward of an attention layer of the model's width on a batch of its real shape
with both paths, and takes ``math`` only when it is clearly faster (by ``MATH_MARGIN``): on
fp32 CPUs the two are within a few percent of each other (measured: 36.6 vs 38.2 ms at 17
tokens, 165.6 vs 156.4 ms at 65 tokens, ViT-Tiny width, batch 128), and a coin flip on timing
noise should not decide. The choice is cached per (device, dtype, shape) for the process.
Both paths compute the same function (up to float rounding), so the choice never changes what
is learnt.
"""

from __future__ import annotations

import functools
import time

import torch
from timm.layers import Attention
from torch import nn

from mae_bench.config import ATTENTION_PATHS
from mae_bench.errors import ConfigError

MATH_MARGIN = 0.9  # auto takes math when it needs at most 90 % of the fused path's time


def attention_layers(model: nn.Module) -> list[Attention]:
    """Every timm attention layer inside ``model`` (encoder and decoder blocks alike)."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_attention(model: nn.Module, path: str) -> None:
    """Make every attention layer of ``model`` use ``path`` ("fused" or "math")."""
    if path not in ("fused", "math"):
        raise ConfigError(f"unknown attention path '{path}'; valid: fused, math")
    for layer in attention_layers(model):
        layer.fused_attn = path == "fused"


def time_attention_paths(dim: int, num_heads: int, tokens: int, batch: int,
                         device: torch.device, dtype: torch.dtype, repeats: int = 3
                         ) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one attention layer's forward + backward, per path.

    The layer is a fresh one of the given width (weights do not change the cost); under a
    low-precision ``dtype`` it runs in autocast, as training does.
    """
    layer = Attention(dim, num_heads, qkv_bias=True).to(device)
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)  # [B, T, D]
    enabled = dtype != torch.float32
    seconds: dict[str, float] = {}
    for path in ("fused", "math"):
        layer.fused_attn = path == "fused"
        best = float("inf")
        for i in range(repeats + 1):  # the first call warms the kernels up
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                out = layer(x)  # [B, T, D]
            out.float().sum().backward()
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - start)
        seconds[path] = best
    return seconds


@functools.lru_cache(maxsize=64)
def _fastest(dim: int, num_heads: int, tokens: int, batch: int, device: str, dtype: str) -> str:
    with torch.random.fork_rng(devices=[]):  # timing must not move the run's random stream
        seconds = time_attention_paths(dim, num_heads, tokens, batch, torch.device(device),
                                       getattr(torch, dtype))
    return "math" if seconds["math"] <= MATH_MARGIN * seconds["fused"] else "fused"


def choose_attention(model: nn.Module, path: str, tokens: int, batch: int,
                     device: torch.device, precision: str) -> str:
    """Set ``model``'s attention path and return it ("fused" or "math").

    Args:
        model: holds timm attention layers (a ViT, an MAE, a method).
        path: "fused", "math", or "auto" (time both on the first layer's shape; math when it
            is clearly faster, else fused).
        tokens: sequence length to time with (the encoder's 1 + L for the whole image).
        batch: batch size to time with (capped at 64: the ranking settles well before that).
        device, precision: where and how training runs (fp32 | bf16 | fp16).
    """
    if path not in ATTENTION_PATHS:
        raise ConfigError(f"unknown attention path '{path}'; valid: {', '.join(ATTENTION_PATHS)}")
    layers = attention_layers(model)
    if path == "auto":
        if not layers:
            return "fused"
        first = layers[0]
        path = auto_path(first.qkv.in_features, first.num_heads, tokens, batch, device,
                         precision)
    set_attention(model, path)
    return path


def auto_path(dim: int, num_heads: int, tokens: int, batch: int, device: torch.device,
              precision: str) -> str:
    """What ``auto`` picks for attention layers of this shape (timed once per process)."""
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    return _fastest(dim, num_heads, tokens, min(batch, 64), str(device), dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
