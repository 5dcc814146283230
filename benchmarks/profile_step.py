"""Where a training step's time goes: torch.profiler over a few steps of one method, ops
grouped into matrix work (matmuls, attention kernels, convolutions) and the rest.

    python benchmarks/profile_step.py --method mae --arch vit_tiny_patch4 --batch-size 128
    python benchmarks/profile_step.py --precision bf16 --attention fused   # the old bf16 lead

Prints the share of matrix work and the top ops by self time; ``--trace FILE`` also writes a
Chrome trace (open in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mae_bench.config import RunConfig, peak_lr
from mae_bench.data.augment import BatchViews
from mae_bench.methods.engine import build_optimizer, build_train_step
from mae_bench.methods.registry import Batch, build_method, resolve_config
from mae_bench.models.attention import set_attention
from mae_bench.models.vit import get_preset
from mae_bench.training.host_memory import describe as host_allocator
from mae_bench.training.host_memory import keep_freed_memory
from mae_bench.training.runtime import resolve_device, resolve_precision
from mae_bench.training.step import grad_scaler

MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear",
              "aten::_scaled_dot_product", "aten::convolution", "aten::mkldnn_convolution",
              "aten::convolution_backward", "aten::_flash_attention", "aten::_efficient_attention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="mae")
    ap.add_argument("--arch", default="vit_tiny_patch4")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--attention", default="auto", choices=("auto", "fused", "math"))
    ap.add_argument("--encoder-mask-tokens", action="store_true",
                    help="MAE with every token through the encoder")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first: the first allocates everything")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="keep freed memory as the mae-bench command does (retain), or glibc's "
                         "own (default: fresh pages each step)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--trace", type=Path, default=None)
    args = ap.parse_args()
    if args.malloc == "retain":
        keep_freed_memory()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    cfg = resolve_config(RunConfig().replace(
        model={"arch": args.arch}, train={"method": args.method, "batch_size": args.batch_size},
        mae={"encoder_mask_tokens": args.encoder_mask_tokens or None}))
    img = get_preset(args.arch).img_size
    method = build_method(cfg, 3, img).to(device).train()
    set_attention(method, args.attention)
    views = [BatchViews(s, (0.5,) * 3, (0.25,) * 3) for s in method.view_specs()]
    lr = peak_lr(cfg.train, args.batch_size)
    # the engine's own step: autocast, scaler (fp16), hooks, clipping when configured, AdamW
    optimizer = build_optimizer(method, cfg.train, device)
    train_step = build_train_step(cfg, method, optimizer, lambda _: lr, device=device,
                                  precision=precision, total_steps=100,
                                  scaler=grad_scaler(precision), accum_iter=1)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, img, img), dtype=torch.uint8,
                           device=device)
    labels = torch.zeros(args.batch_size, dtype=torch.long, device=device)

    def step() -> None:
        batch = Batch([v(images, gen) for v in views], labels, gen, train_step.step, 100)
        train_step.micro_batch(lambda: method(batch))

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    use_cuda = device.type == "cuda"

    def self_time(e) -> float:
        return e.self_device_time_total if use_cuda else e.self_cpu_time_total

    total = sum(self_time(e) for e in events)
    matrix = sum(self_time(e) for e in events if e.key.startswith(MATRIX_OPS))
    print(f"{args.method} {args.arch} batch {args.batch_size} {precision} attention "
          f"{args.attention} on {device}: {total / 1e3 / args.steps:.0f} ms of op self time per "
          f"step, {100 * matrix / total:.1f} % matrix work; host allocator: {host_allocator()}")
    top = max((e for e in events if not e.key.startswith(MATRIX_OPS)), key=self_time)
    print(f"largest op other than matrix work: {top.key}, {100 * self_time(top) / total:.1f} %")
    print(events.table(sort_by="self_cuda_time_total" if use_cuda else "self_cpu_time_total",
                       row_limit=args.top))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
