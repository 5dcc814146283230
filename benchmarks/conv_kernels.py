"""Every convolution of a convolutional backbone timed on both kernels of
``mae_bench/models/conv.py``, side by side in one process: the table behind its rule.

    OMP_NUM_THREADS=2 python benchmarks/conv_kernels.py --threads 2 --arch resnet18 \
        --markdown results/speed/conv-kernels.md

For each distinct convolution of ``--arch`` at ``--img-size`` (its input shape at batch
``--batch-size``, recorded by a forward hook), in each precision (``--precisions``: fp32 and
bf16 autocast), one training step of that layer alone: forward, then backward to its input and
weight (the stem's input is the images: weight only), on channels-last tensors as mae-bench
runs them. ``native`` is F.conv2d (oneDNN on CPUs), ``matmul`` the im2col + matmul path; the
median of ``--rounds`` rounds, the two paths alternating in each. Beside the times: which path
the rule (``rule_conv_path``) picks and whether it is the faster one here, and the matmul
path's relative error against native (bf16: both are a bf16 rounding away from fp32).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from mae_bench.models.backbones import build_backbone
from mae_bench.models.conv import RuleConv2d, out_size, rule_conv_path, set_conv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import DTYPES, cpu_summary, fail, publish  # noqa: E402  (one machine line)


def layer_inputs(arch: str, img_size: int, batch: int) -> list[tuple[RuleConv2d, tuple]]:
    """(layer, input shape) of every distinct convolution (geometry and input shape)."""
    net = build_backbone(arch, img_size, 3).to(memory_format=torch.channels_last)
    seen: dict[tuple, tuple[RuleConv2d, tuple]] = {}

    def hook(m: nn.Module, args: tuple, _out: Tensor) -> None:
        key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
               tuple(args[0].shape))
        seen.setdefault(key, (m, tuple(args[0].shape)))

    for m in net.modules():
        if isinstance(m, RuleConv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.randn(batch, 3, img_size, img_size).contiguous(
            memory_format=torch.channels_last))
    return list(seen.values())


def layer_step(layer: nn.Module, x: Tensor, grad: Tensor, precision: str) -> Callable:
    def step() -> tuple[Tensor, ...]:
        layer.weight.grad = None
        x.grad = None
        with torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32"):
            y = layer(x)
        y.backward(grad)
        return y.detach(), layer.weight.grad
    return step


def timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def measure(layer: RuleConv2d, shape: tuple, precision: str, rounds: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(shape[1] > 4)  # the stem's input is the images
    ho = out_size(shape[2], layer.kernel_size[0], layer.stride[0], layer.padding[0])
    wo = out_size(shape[3], layer.kernel_size[1], layer.stride[1], layer.padding[1])
    grad = torch.randn(shape[0], layer.out_channels, ho, wo).to(
        torch.float32 if precision == "fp32" else DTYPES[precision]).contiguous(
        memory_format=torch.channels_last)
    steps, outs, times = {}, {}, {"native": [], "matmul": []}
    for path in times:
        steps[path] = layer_step(layer, x, grad, precision)
        set_conv(layer, path)
        y, gw = steps[path]()  # warm-up, and the values compared below
        outs[path] = (y.float(), gw.float())
    for r in range(rounds):
        for path in (("native", "matmul") if r % 2 == 0 else ("matmul", "native")):
            set_conv(layer, path)
            times[path].append(timed(steps[path]))
    set_conv(layer, "auto")
    med = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
    err = max(((a - b).norm() / b.norm()).item()
              for a, b in zip(outs["matmul"], outs["native"], strict=True))
    rule = rule_conv_path("cpu", DTYPES[precision], layer.in_channels, ho * wo)
    return {"native": med["native"], "matmul": med["matmul"], "rule": rule, "err": err,
            "out": f"{ho}x{wo}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", help="a convolutional backbone (resnet18, "
                    "resnet34, resnet50, timm:NAME)")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precisions", default="bf16,fp32", help="bf16 and/or fp32")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per path and layer")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    precisions = args.precisions.split(",")
    if any(p not in ("fp32", "bf16") for p in precisions) or args.rounds < 1:
        fail(f"--precisions takes fp32 and/or bf16, --rounds >= 1; got {args.precisions!r}, "
             f"{args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    try:
        layers = layer_inputs(args.arch, args.img_size, args.batch_size)
    except Exception as exc:  # an unknown arch: one line
        fail(str(exc).splitlines()[0])
    rows = []
    for layer, shape in layers:
        for q in precisions:
            rows.append((layer, shape, q, measure(layer, shape, q, args.rounds)))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Convolution kernels of {args.arch} at {args.img_size} px (batch "
             f"{args.batch_size})", "",
             f"- **When:** {now}, by `benchmarks/conv_kernels.py`, in "
             f"{(time.time() - start) / 60:.1f} min.",
             f"- **Machine:** {cpu_summary()}; {torch.get_num_threads()} torch thread(s); "
             f"torch {torch.__version__}.",
             "- **What:** one training step of each layer alone (forward, backward to input and "
             "weight), channels-last; median ms of "
             f"{args.rounds} rounds, the paths alternating.", "",
             "```bash", " ".join(["python", *sys.argv]), "```", "",
             "| layer (in -> out, kernel/stride) | input | output | precision | native ms | "
             "matmul ms | native / matmul | rule picks | rule's pick the faster? | "
             "max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    right = 0
    for layer, shape, q, m in rows:
        faster = "matmul" if m["matmul"] < m["native"] else "native"
        ok = m["rule"] == faster
        right += ok
        lines.append(f"| {layer.in_channels} -> {layer.out_channels}, {layer.kernel_size[0]}x"
                     f"{layer.kernel_size[1]}/{layer.stride[0]} | {shape[2]}x{shape[3]} | "
                     f"{m['out']} | {q} | {m['native']:.1f} | {m['matmul']:.1f} | "
                     f"{m['native'] / m['matmul']:.2f}x | {m['rule']} | "
                     f"{'yes' if ok else 'no'} | {m['err']:.0e} |")
    lines += ["", f"The rule picks the faster path for {right} of {len(rows)} (layer, precision) "
              "pairs on this machine.", ""]
    publish("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
