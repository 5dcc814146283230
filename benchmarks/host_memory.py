"""What keeping freed memory (``mae_bench/training/host_memory.py``) buys, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/host_memory.py --rounds 4 \
        --markdown results/speed/host-memory-zen5-cpu.md
    python benchmarks/host_memory.py --tasks simclr --precisions fp32 --impls engine,lightly

The allocator is a setting of the whole process and cannot be undone in it, so this cannot
interleave steps in one process as ``benchmarks/peers.py`` does. Each arm (an implementation,
task, precision and ``MAE_BENCH_MALLOC`` mode) runs in a fresh process instead: it builds the
configuration of ``peers.py`` (same tensors, same AdamW), takes ``--warmup`` untimed steps and
``--steps`` timed ones and reports their median img/s. A round runs every arm once, the order
rotated each round; an arm's figure is the median of its rounds.

Implementations (``--impls``): ``mae-bench`` (the model class in a plain loop), ``engine`` (the
engine's TrainStep, what ``mae-bench pretrain`` runs) and ``lightly`` (its example, when
lightly 1.6.0 is installed). The table gives each arm, the retain / default ratio per
implementation and, as users run them, mae-bench's engine in its default mode (retain) over
lightly's example in glibc's default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = {"mae-bench": "mae-bench", "engine": "mae-bench engine step",
         "lightly": "lightly 1.6.0 example"}  # --impls name -> peers.py case name
MODES = ("retain", "default")


def load_peers():
    spec = importlib.util.spec_from_file_location("peers_benchmark", HERE / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def child(arch: str, batch: int, impl: str, task: str, precision: str, warmup: int,
          steps: int) -> dict:
    """One arm in this (fresh) process: its median img/s over ``steps`` timed steps."""
    from mae_bench.training.host_memory import keep_freed_memory

    applied = keep_freed_memory()  # MAE_BENCH_MALLOC decides, before anything is allocated
    import torch

    peers = load_peers()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    p = peers.get_preset(arch)
    args = Namespace(arch=arch, batch_size=batch, precisions=[precision])
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 3, p.img_size, p.img_size)
    images, view2 = [(torch.randint(0, 256, shape, generator=gen).float() / 255 - 0.5) / 0.25
                     for _ in range(2)]
    noise = torch.rand(batch, (p.img_size // p.patch_size) ** 2, generator=gen)
    have = {"lightly"} if impl == "lightly" else set()
    if task == "mae":
        cases = peers.mae_cases(args, p, images, noise, None, have)[0]
    else:
        cases = peers.simclr_cases(args, p, [images, view2], have)[0]
    case = next(c for c in cases if c.name == IMPLS[impl] and c.precision == precision)
    for _ in range(warmup):
        case.step()
    ips = []
    for _ in range(steps):
        start = time.perf_counter()
        case.step()
        ips.append(batch / (time.perf_counter() - start))
    return {"ips": statistics.median(ips), "applied": applied}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch4")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tasks", default="mae,simclr", help="mae and/or simclr")
    ap.add_argument("--precisions", default="bf16,fp32", help="fp32 and/or bf16 (autocast)")
    ap.add_argument("--impls", default="engine,lightly",
                    help=f"implementations: {', '.join(IMPLS)}")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds of one fresh process per arm; an arm's figure is the median")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per process: the first step allocates everything")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the report here")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "TASK", "PRECISION"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.arch, args.batch_size, *args.child, args.warmup,
                               args.steps)))
        return

    peers = load_peers()  # its quantile, fail, busy threshold and CPU summary
    fail, quantile = peers.fail, peers.quantile
    tasks, precisions, impls = (args.tasks.split(","), args.precisions.split(","),
                                args.impls.split(","))
    bad = ([t for t in tasks if t not in ("mae", "simclr")]
           + [q for q in precisions if q not in ("fp32", "bf16")]
           + [i for i in impls if i not in IMPLS])
    if bad:
        fail(f"unknown task, precision or implementation {bad}; valid: mae, simclr / fp32, "
             f"bf16 / {', '.join(IMPLS)}")
    if min(args.rounds, args.steps) < 1 or args.warmup < 1:
        fail("--rounds, --steps and --warmup must be >= 1")
    if "lightly" in impls and importlib.util.find_spec("lightly") is None:
        fail("lightly is not installed: pip install lightly==1.6.0 (or leave it out of --impls)")

    arms = [(i, t, q, m) for t in tasks for q in precisions for i in impls for m in MODES]
    got: dict[tuple[str, str, str, str], list[float]] = {a: [] for a in arms}
    applied: dict[str, bool] = {}
    started = time.perf_counter()
    for r in range(args.rounds):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            impl, task, q, mode = arm
            env = dict(os.environ, MAE_BENCH_MALLOC=mode)
            env.setdefault("OMP_NUM_THREADS", "1")
            out = subprocess.run(
                [sys.executable, __file__, "--child", impl, task, q, "--arch", args.arch,
                 "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
                 "--steps", str(args.steps)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                fail(f"arm {arm} failed: {out.stderr.strip().splitlines()[-1:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            got[arm].append(res["ips"])
            applied[mode] = res["applied"]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    med = {a: statistics.median(v) for a, v in got.items()}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Keeping freed memory (`MAE_BENCH_MALLOC`): training speed, fresh processes", "",
             f"- **When:** {now}, by `benchmarks/host_memory.py`; measured in "
             f"{elapsed / 60:.1f} min.",
             f"- **Machine:** {peers.cpu_summary()}; OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', '1')}.",
             f"- **Setup:** {args.arch}, batch {args.batch_size}, the configurations of "
             f"`benchmarks/peers.py`; one fresh process per arm and round, {args.warmup} "
             f"untimed + {args.steps} timed steps each; {args.rounds} rounds, order rotated; "
             "img/s = median over rounds of each process's median; spread = p75 / p25 over "
             f"rounds. retain in force: {applied.get('retain')}.", "",
             "```bash", " ".join(["python", *sys.argv]), "```", "",
             "| implementation | task | precision | MAE_BENCH_MALLOC | img/s | spread | "
             "retain / default |", "|---|---|---|---|---|---|---|"]
    spreads = []
    for arm in arms:
        impl, task, q, mode = arm
        xs = got[arm]
        spread = quantile(xs, .75) / quantile(xs, .25)
        spreads.append(spread)
        ratio = (f"{med[arm] / med[(impl, task, q, 'default')]:.2f}x" if mode == "retain"
                 else "-")
        lines.append(f"| {IMPLS[impl]} | {task} | {q} | {mode} | {med[arm]:.1f} | "
                     f"{spread:.2f} | {ratio} |")
    if "engine" in impls and "lightly" in impls:
        lines += ["", "As users run them: mae-bench's engine step with its default (retain) over "
                  "lightly's example with glibc's default, and both at equal settings:", "",
                  "| task | precision | engine (retain) / lightly (default) | engine / lightly, "
                  "both retain | both default |", "|---|---|---|---|---|"]
        for t in tasks:
            for q in precisions:
                e = {m: med[("engine", t, q, m)] for m in MODES}
                ly = {m: med[("lightly", t, q, m)] for m in MODES}
                lines.append(f"| {t} | {q} | {e['retain'] / ly['default']:.2f}x | "
                             f"{e['retain'] / ly['retain']:.2f}x | "
                             f"{e['default'] / ly['default']:.2f}x |")
    if max(spreads) > peers.BUSY_SPREAD:
        lines += ["", f"**Warning: the machine was busy (spread up to {max(spreads):.2f}); "
                  "ratios within that scatter of 1.0 are ties.**"]
    peers.publish("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
