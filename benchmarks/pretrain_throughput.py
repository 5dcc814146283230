"""MAE pretraining throughput per precision, measured side by side in one run.

Runs the real training loop (``mae_bench.methods.engine.pretrain``: data, batched augmentation,
masking, forward, backward, AdamW) for a few optimizer steps per precision, interleaving the
precisions round by round so that machine noise hits them alike, and prints images/s per
precision and the ratio to fp32.

    python benchmarks/pretrain_throughput.py --dataset cifar10 \
        --data-dir ../shared/data/cifar10-jpeg75 --arch vit_tiny_patch4 --batch-size 256 \
        --precisions fp32,bf16 --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from mae_bench.config import RunConfig
from mae_bench.files import METRICS_FILE
from mae_bench.methods.engine import pretrain
from mae_bench.training.runtime import cpu_has_fast_bf16, device_name, resolve_device


def measure(cfg: RunConfig, steps: int, warmup: int) -> tuple[list[float], float]:
    """Per-step images/s after ``warmup`` steps, and the last step's loss."""
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(cfg, tmp, max_steps=warmup + steps, progress=False)
        rows = [json.loads(x) for x in (Path(tmp) / METRICS_FILE).read_text().splitlines()]
    rows = [r for r in rows if r["step"] > warmup]
    return [r["img_per_s"] for r in rows], rows[-1]["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--arch", default="vit_tiny_patch4")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="comma-separated; fp16 needs a GPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per round")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per precision")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    precisions = args.precisions.split(",")
    base = RunConfig().replace(
        model={"arch": args.arch, "img_size": args.img_size},
        data={"dataset": args.dataset, "data_dir": args.data_dir},
        # a long schedule so the measured steps sit at a realistic (non-zero) learning rate
        train={"epochs": 100, "batch_size": args.batch_size, "log_every": 1,
               "device": args.device, "warmup_epochs": 0.0},
    )
    per_step: dict[str, list[float]] = {p: [] for p in precisions}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for p in precisions:
            ips, loss = measure(base.replace(train={"precision": p}), args.steps, args.warmup)
            per_step[p].extend(ips)
            losses[p] = loss

    device = resolve_device(args.device)
    name = device_name(device)
    print(f"MAE {args.arch} on {args.dataset}, batch {args.batch_size}, device {device} ({name}),"
          f" torch {torch.__version__}, cpu bf16 instructions: {cpu_has_fast_bf16()}")
    ref = statistics.median(per_step[precisions[0]])
    print(f"{'precision':<10}{'img/s (median)':>16}{'min':>10}{'max':>10}"
          f"{'vs ' + precisions[0]:>10}{'loss':>10}")
    result = {}
    for p in precisions:
        med = statistics.median(per_step[p])
        result[p] = {"img_per_s": med, "min": min(per_step[p]), "max": max(per_step[p]),
                     "ratio": med / ref, "loss": losses[p], "n_steps": len(per_step[p])}
        print(f"{p:<10}{med:>16.1f}{min(per_step[p]):>10.1f}{max(per_step[p]):>10.1f}"
              f"{med / ref:>9.2f}x{losses[p]:>10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "device": name, "results": result}, indent=2))


if __name__ == "__main__":
    main()
