"""What the online evaluation (``evals/online.py``) costs at its default frequency, per method,
as a fraction of the training time, measured side by side in one process.

    python benchmarks/online_overhead.py --dataset cifar10 \
        --data-dir ../shared/data/cifar10-jpeg75 --threads 1 \
        --markdown results/speed/online-overhead.md

For each ``--runs`` entry (``method@arch``): the method as ``mae-bench pretrain`` builds it on the
data set, its training step through the engine's ``TrainStep`` on real augmented batches
(median of ``--steps`` steps after one warm-up), the online classifier's step on that batch's
features (``OnlineMonitor.observe``, joint-embedding methods; median), one measurement of the
online evaluation (median of ``--measures``), and the default interval between measurements for
this data set (``OnlineMonitor.start``: whole epochs holding at least 20x the monitor's
images). The cost is (measurement + interval x classifier step) / (interval x step): the share of
a run's time the monitor adds.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from evals.online import OnlineMonitor
from mae_bench.config import RunConfig
from mae_bench.data import load_dataset
from mae_bench.data.augment import BatchViews
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config
from mae_bench.training.runtime import resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import cpu_summary, engine_step, fail, publish  # noqa: E402  (one timing helper)


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure_run(spec: str, args) -> dict:
    method_name, _, arch = spec.partition("@")
    cfg = resolve_config(RunConfig().replace(
        model={"arch": arch}, data={"dataset": args.dataset, "data_dir": args.data_dir},
        train={"method": method_name, "device": "cpu", "precision": args.precision}))
    data = load_dataset(cfg.data.dataset, "train", cfg.data.data_dir)
    img_size = cfg.model.img_size or data.info.img_size
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    torch.manual_seed(0)
    method = build_method(cfg, data.info.channels, img_size).train()
    views = [BatchViews(s, data.info.mean, data.info.std) for s in method.view_specs()]
    gen = torch.Generator().manual_seed(0)
    n = cfg.train.batch_size
    images = data.images[:n] if hasattr(data, "images") else torch.stack(
        [torch.as_tensor(data[i][0]) for i in range(n)])
    labels = data.labels[:n]
    batch = Batch([v(images, gen) for v in views], labels, gen, 0, 10**6)
    step = engine_step(method, cfg, precision, lambda: method(batch))
    steps_per_epoch = len(data) // n
    monitor = OnlineMonitor(cfg)
    monitor.start(device=torch.device("cpu"), precision=precision, img_size=img_size,
                  steps_per_epoch=steps_per_epoch, images_per_epoch=steps_per_epoch * n)
    step()  # warm-up
    monitor.observe(method, labels)
    times, observes = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        monitor.observe(method, labels)  # the per-batch online classifier step (if any)
        observes.append(time.perf_counter() - t1)
        times.append(t1 - t0)
    measures = []
    for k in range(args.measures):
        t0 = time.perf_counter()
        monitor.measure(method, k + 1)
        measures.append(time.perf_counter() - t0)
    step_s, observe_s, measure_s = median(times), median(observes), median(measures)
    return {"spec": spec, "precision": precision, "batch": n, "step_s": step_s,
            "observe_s": observe_s, "measure_s": measure_s, "every": monitor.every,
            "epochs": monitor.every // steps_per_epoch, "images": monitor.images_per_measurement,
            "cost": (measure_s + monitor.every * observe_s) / (monitor.every * step_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="mae@vit_tiny_patch4,simclr@resnet18",
                    help="comma-separated method@arch")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    ap.add_argument("--measures", type=int, default=3, help="timed measurements per run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    if args.steps < 1 or args.measures < 1 or any("@" not in r for r in args.runs.split(",")):
        fail("--runs takes method@arch entries; --steps and --measures >= 1")
    torch.set_num_threads(args.threads)
    start = time.time()
    try:
        rows = [measure_run(spec, args) for spec in args.runs.split(",")]
    except Exception as exc:  # a bad name or data set: one line
        fail(str(exc).splitlines()[0])
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# What the online evaluation costs at its default frequency", "",
             f"- **When:** {now}, by `benchmarks/online_overhead.py`, in "
             f"{(time.time() - start) / 60:.1f} min.",
             f"- **Machine:** {cpu_summary()}; {torch.get_num_threads()} torch thread(s); "
             f"torch {torch.__version__}.",
             f"- **Data:** {args.dataset} (train split for the step and the interval).", "",
             "```bash", " ".join(["python", *sys.argv]), "```", "",
             "| method@arch | precision | batch | step s | classifier step ms | measurement s "
             "| monitored images | interval (steps = epochs) | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['precision']} | {r['batch']} | {r['step_s']:.3f} | "
                     f"{1e3 * r['observe_s']:.2f} | {r['measure_s']:.2f} | {r['images']} | "
                     f"{r['every']} = {r['epochs']} | {100 * r['cost']:.1f} % |")
    lines.append("")
    publish("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
