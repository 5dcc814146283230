"""The measurements behind the attention rule (``mae_bench.models.attention.rule_path``): one
attention layer's forward + backward on each path, fused (``F.scaled_dot_product_attention``)
and math (two batched matmuls), per precision and sequence length, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/attention_kernels.py              # this CPU, Markdown
    python benchmarks/attention_kernels.py --device cuda --precisions fp32,bf16

Each cell is the median of ``--repeats`` timed calls (after one warm-up) with the spread
(max / min) beside it, so a busy machine shows as a wide spread rather than as a wrong ratio.
The last column is what the rule picks for that row, and whether the measurement agrees.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from timm.layers import Attention

from mae_bench.models.attention import rule_path
from mae_bench.training.runtime import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_path(layer: Attention, x: torch.Tensor, path: str, dtype: torch.dtype,
              repeats: int) -> list[float]:
    """Seconds of ``repeats`` forward + backward calls of ``layer`` on ``x`` with ``path``."""
    layer.fused_attn = path == "fused"
    device = x.device
    out = []
    for i in range(repeats + 1):  # the first call warms the kernels up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)  # [B, T, D]
        y.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            out.append(time.perf_counter() - start)
    return out


def cpu_name() -> str:
    """The CPU model and its bf16 flags (amx_bf16, avx512_bf16), from /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown CPU")
    family = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                   if ln.startswith("cpu family")), "?")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in text]
    return f"{model} (family {family}; {', '.join(flags) or 'no bf16 instructions'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--tokens", default="17,50,65,197,257,577,1025",
                    help="sequence lengths (1 + patches): MAE's visible tokens, digits, CIFAR, "
                         "ImageNet /16, ...")
    ap.add_argument("--widths", default="192:3,384:6", help="dim:heads pairs (ViT-Tiny, -Small)")
    ap.add_argument("--tokens-per-batch", type=int, default=8192,
                    help="batch = this / tokens (at least 1)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    where = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"# attention kernels on {where}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}\n")
    print("| precision | dim / heads | tokens | batch | fused ms | math ms | math / fused "
          "| spread (max/min) | faster | rule |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.precisions.split(","):
        dtype = DTYPES[name]
        for width in args.widths.split(","):
            dim, heads = (int(v) for v in width.split(":"))
            layer = Attention(dim, heads, qkv_bias=True).to(device)
            for tokens in (int(t) for t in args.tokens.split(",")):
                batch = max(1, args.tokens_per_batch // tokens)
                x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
                got = {p: time_path(layer, x, p, dtype, args.repeats) for p in ("fused", "math")}
                med = {p: statistics.median(v) for p, v in got.items()}
                spread = max(max(v) / min(v) for v in got.values())
                faster = "math" if med["math"] < med["fused"] else "fused"
                rule = rule_path(device.type, dtype, tokens)
                agree = "" if rule == faster or abs(med["math"] / med["fused"] - 1) < 0.05 \
                    else " (differs)"
                print(f"| {name} | {dim} / {heads} | {tokens} | {batch} | "
                      f"{1e3 * med['fused']:.2f} | {1e3 * med['math']:.2f} | "
                      f"{med['math'] / med['fused']:.2f} | {spread:.2f} | {faster} | "
                      f"{rule}{agree} |", flush=True)


if __name__ == "__main__":
    main()
