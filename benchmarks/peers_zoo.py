"""The joint-embedding zoo on a ResNet: mae-bench's training step against lightly's example of the
same method, side by side in one process (``benchmarks/peers.py`` does MAE and SimCLR on ViTs).

    OMP_NUM_THREADS=2 python benchmarks/peers_zoo.py --threads 2 --batch-size 128 --rounds 3 \
        --markdown results/speed/peers-zoo-resnet18.md

For each method (``--methods``), in fp32 and under bf16 autocast (``--precisions``), on the same
two views given as tensors (no augmentation inside the timed step) and the same backbone
(``--arch``, default resnet18 with the CIFAR stem at 32 px):

* mae-bench: the method as ``mae-bench pretrain`` builds it for that backbone (its ``cnn_defaults``:
  heads, queue, temperature, optimizer) through the engine's ``TrainStep``: what a user runs.
  Its convolutional backbone runs in channels-last memory format (the Method's choice).
* lightly 1.6.0: the method's example as lightly documents it (``examples/pytorch/<method>.py``):
  the same backbone module in torch's default memory format with torch's own convolution
  kernels (``set_conv(.., "native")``: the rule-picked kernels are mae-bench's), lightly's
  heads of the same widths as mae-bench's, lightly's loss (and memory bank, momentum update),
  ``torch.optim.SGD`` with lightly's benchmark settings (lr 0.06, momentum 0.9, weight decay
  5e-4), one backbone call per view, as the examples run it. Where the example computes less
  than the method (lightly's MoCo example is MoCo v2's one direction: one query and one key
  pass), it is made to do the same work as mae-bench's (MoCo v2+ is symmetric: both views are
  queries and keys), so that the ratio compares implementations, not amounts of work.

The timing is peers.py's: warm-up steps, then round-robin rounds with the order rotated, the
median img/s of each row, the spread beside it. The issue's targets: mae-bench over lightly at
least 1.0x in fp32 and at least 1.5x in bf16 on CPUs with bf16 instructions (each against
lightly's example under the same autocast).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from mae_bench.config import RunConfig
from mae_bench.methods.method import Batch
from mae_bench.methods.registry import build_method, resolve_config
from mae_bench.models.backbones import build_backbone, pooled
from mae_bench.models.conv import set_conv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import (  # noqa: E402  (the sibling script: one timing and report code)
    DTYPES,
    Case,
    cpu_summary,
    engine_step,
    fail,
    iqr_ratio,
    median,
    publish,
    quantile,
    run_rounds,
)

METHODS = ("simclr", "byol", "mocov2", "barlowtwins", "vicreg", "swav", "simsiam", "nnclr",
           "dino")
MB, LIGHTLY = "mae-bench engine step", "lightly 1.6.0 example"
SGD = {"lr": 0.06, "momentum": 0.9, "weight_decay": 5e-4}  # lightly's cifar10 benchmark
TARGETS = {"fp32": 1.0, "bf16": 1.5}


class LightlyModel(nn.Module):
    """One lightly example: ``backbone`` + lightly heads; ``loss(views)`` is its training loss
    and ``before_step()`` what its loop does before the forward (momentum updates)."""

    def __init__(self, name: str, backbone: nn.Module, dim: int, s) -> None:
        import lightly.loss as L
        import lightly.models.modules as M

        super().__init__()
        self.name, self.backbone = name, backbone
        self.teacher: list[tuple[nn.Module, nn.Module]] = []
        hidden, out = s.proj_hidden_dim, s.proj_dim
        if name == "simclr":
            self.head = M.SimCLRProjectionHead(dim, hidden, out)
            self.criterion = L.NTXentLoss(temperature=s.temperature)
        elif name == "byol":
            self.head = M.BYOLProjectionHead(dim, hidden, out)
            self.predictor = M.BYOLPredictionHead(out, hidden, out)
            self.criterion = L.NegativeCosineSimilarity()
        elif name == "mocov2":
            self.head = M.MoCoProjectionHead(dim, hidden, out)
            self.criterion = L.NTXentLoss(temperature=s.temperature,
                                          memory_bank_size=(s.queue_size, out))
        elif name in ("barlowtwins", "vicreg"):
            self.head = M.BarlowTwinsProjectionHead(dim, hidden, out)
            self.criterion = L.BarlowTwinsLoss() if name == "barlowtwins" else L.VICRegLoss()
        elif name == "swav":
            self.head = M.SwaVProjectionHead(dim, hidden, out)
            self.prototypes = M.SwaVPrototypes(out, s.num_prototypes)
            self.criterion = L.SwaVLoss(temperature=s.temperature,
                                        sinkhorn_iterations=s.sinkhorn_iterations,
                                        sinkhorn_epsilon=s.sinkhorn_epsilon)
        elif name == "simsiam":
            self.head = M.SimSiamProjectionHead(dim, hidden, out)
            self.predictor = M.SimSiamPredictionHead(out, s.pred_hidden_dim, out)
            self.criterion = L.NegativeCosineSimilarity()
        elif name == "nnclr":
            self.head = M.NNCLRProjectionHead(dim, hidden, out)
            self.predictor = M.NNCLRPredictionHead(out, s.pred_hidden_dim, out)
            self.bank = M.NNMemoryBankModule(size=(s.queue_size, out))
            self.criterion = L.NTXentLoss(temperature=s.temperature)
        elif name == "dino":
            self.head = M.DINOProjectionHead(dim, hidden, s.proj_dim, s.out_dim)
            self.criterion = L.DINOLoss(output_dim=s.out_dim)
        else:
            raise ValueError(f"no lightly example for {name}")
        if name in ("byol", "mocov2", "dino"):
            self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
            # the DINO example builds its teacher head anew (a weight-normed head cannot be
            # deep-copied)
            self.teacher_head = (M.DINOProjectionHead(dim, hidden, s.proj_dim, s.out_dim)
                                 if name == "dino" else copy.deepcopy(self.head))
            self.teacher_head.requires_grad_(False)
            self.teacher = [(self.teacher_backbone, self.backbone),
                            (self.teacher_head, self.head)]

    def before_step(self) -> None:
        from lightly.models.utils import update_momentum

        for teacher, student in self.teacher:
            update_momentum(student, teacher, m=0.99)

    def loss(self, views: list[Tensor]) -> Tensor:
        f = [pooled(self.backbone, v) for v in views]  # [N, D] each, one call per view
        if self.name in ("simclr", "barlowtwins", "vicreg"):
            return self.criterion(self.head(f[0]), self.head(f[1]))
        if self.name == "byol":
            p = [self.predictor(self.head(x)) for x in f]
            with torch.no_grad():
                z = [self.teacher_head(pooled(self.teacher_backbone, v)) for v in views]
            return 0.5 * (self.criterion(p[0], z[1]) + self.criterion(p[1], z[0]))
        if self.name == "mocov2":  # symmetrised as solo-learn's v2+ (lightly's example: q0, k1)
            with torch.no_grad():
                k = [self.teacher_head(pooled(self.teacher_backbone, v)) for v in views]
            q = [self.head(x) for x in f]
            return 0.5 * (self.criterion(q[0], k[1]) + self.criterion(q[1], k[0]))
        if self.name == "swav":
            self.prototypes.normalize()
            scores = [self.prototypes(nn.functional.normalize(self.head(x), dim=1)) for x in f]
            return self.criterion(scores, [])
        if self.name == "simsiam":
            z = [self.head(x) for x in f]
            p = [self.predictor(x) for x in z]
            return 0.5 * (self.criterion(p[0], z[1].detach()) + self.criterion(p[1], z[0].detach()))
        if self.name == "nnclr":
            z = [self.head(x) for x in f]
            p = [self.predictor(x) for x in z]
            nn0 = self.bank(z[0].detach(), update=False)
            nn1 = self.bank(z[1].detach(), update=True)
            return 0.5 * (self.criterion(nn0, p[1]) + self.criterion(nn1, p[0]))
        # dino: the teacher sees the two global views
        student = [self.head(x) for x in f]
        with torch.no_grad():
            teacher = [self.teacher_head(pooled(self.teacher_backbone, v)) for v in views]
        return self.criterion(teacher, student, epoch=0)


def lightly_step(model: LightlyModel, precision: str, views: list[Tensor]) -> Callable:
    """The example's loop: momentum update, forward and loss under autocast, backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), **SGD)

    def step() -> Tensor:
        model.before_step()
        with torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32"):
            loss = model.loss(views)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def zoo_cases(args, views: list[Tensor]) -> list[Case]:
    cases = []
    labels = torch.full((args.batch_size,), -1, dtype=torch.long)
    for name in args.methods:
        cfg = resolve_config(RunConfig().replace(
            model={"arch": args.arch}, train={"method": name, "batch_size": args.batch_size}))
        if args.queue_size is not None:
            cfg = cfg.replace(ssl={"queue_size": args.queue_size})
        for q in args.precisions:
            torch.manual_seed(0)
            method = build_method(cfg, 3, args.img_size).train()
            batch = Batch(views, labels, torch.Generator().manual_seed(0), 0, 10**6)
            cases.append(Case(MB, name, q, engine_step(method, cfg, q, lambda m=method,
                                                       b=batch: m(b)), cfg.train.optimizer))
            torch.manual_seed(0)
            backbone = build_backbone(args.arch, args.img_size, 3)
            set_conv(backbone, "native")  # torchvision's plain Conv2d, as lightly's users run it
            model = LightlyModel(name, backbone, int(backbone.num_features), cfg.ssl).train()
            cases.append(Case(LIGHTLY, name, q, lightly_step(model, q, views), "sgd"))
    return cases


def report(args, cases: list[Case], elapsed: float) -> str:
    import lightly

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# The joint-embedding zoo against lightly's examples ({args.arch})", "",
             f"- **When:** {now}, by `benchmarks/peers_zoo.py`.",
             f"- **Machine:** {cpu_summary()}; {torch.get_num_threads()} torch thread(s).",
             f"- **Software:** torch {torch.__version__}, lightly {lightly.__version__}.",
             f"- **Setup:** {args.arch} at {args.img_size} px, batch {args.batch_size}, two views "
             f"as tensors; {args.warmup} warm-up step(s), then {args.rounds} round-robin rounds "
             f"x {args.steps} timed step(s); median img/s; measured in {elapsed / 60:.1f} min.",
             "", "```bash", " ".join(["python", *sys.argv]), "```", "",
             "| method | precision | mae-bench img/s (optimizer) | lightly img/s (SGD) | "
             "mae-bench / lightly | target | met? | spread p75/p25 (mb, lightly) |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(c.task, c.name, c.precision): c for c in cases}
    for name in args.methods:
        for q in args.precisions:
            mine, theirs = by[(name, MB, q)], by[(name, LIGHTLY, q)]
            ratio = median(mine) / median(theirs)
            bar = TARGETS[q]
            lines.append(f"| {name} | {q} | {median(mine):.1f} ({mine.attention}) | "
                         f"{median(theirs):.1f} | {ratio:.2f}x | >= {bar:.1f}x | "
                         f"{'yes' if ratio >= bar else 'no'} | {iqr_ratio(mine):.2f}, "
                         f"{iqr_ratio(theirs):.2f} |")
    lines += ["", "IQR of each row (p25-p75 img/s): " + "; ".join(
        f"{c.task} {c.name} {c.precision} {quantile(c.ips, .25):.1f}-{quantile(c.ips, .75):.1f}"
        for c in cases), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--queue-size", type=int, default=None,
                    help="override the queues (MoCo v2+ negatives, NNCLR support set) for both")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.precisions = args.precisions.split(",")
    bad = [m for m in args.methods if m not in METHODS] + [
        q for q in args.precisions if q not in DTYPES]
    if bad:
        fail(f"unknown method or precision {bad}; valid: {', '.join(METHODS)} / fp32, bf16")
    if importlib.util.find_spec("lightly") is None:
        fail("lightly is missing: pip install lightly==1.6.0")
    if min(args.rounds, args.steps, args.batch_size - 1) < 1 or args.warmup < 0:
        fail("--rounds and --steps must be >= 1, --batch-size >= 2, --warmup >= 0")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    views = [torch.randn(shape, generator=gen) for _ in range(2)]
    cases = zoo_cases(args, views)
    started = time.perf_counter()
    run_rounds(cases, args.batch_size, args.rounds, args.warmup, args.steps)
    publish(report(args, cases, time.perf_counter() - started), args.markdown)


if __name__ == "__main__":
    main()
