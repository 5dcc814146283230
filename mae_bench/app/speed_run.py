"""``mae-bench speed``: every method's training cost and the evaluation protocols' speed,
measured side by side in one process and reported as absolute numbers and ratios.

Configurations measured (``SpeedSpec.methods`` chooses the methods):

* each method at the main precision, attention kernel by the rule (``auto``,
  ``mae_bench.models.attention.rule_path``);
* ``mae [M]``: MAE with mask tokens in the encoder (every token encoded, the paper's Table 1c):
  its time against MAE's is the speedup MAE exists for, shown beside the FLOP ratio;
* ``mae attn=<other>``: MAE forced onto the kernel the rule did not choose, to check the rule;
* ``mae <precision>`` for each further precision (bf16 against fp32).

Training runs on random uint8 images of the preset's size held in memory (content does not
change the cost); k-NN and the probe on synthetic 50,000 x 10,000 features of the encoder's
width. MFU is achieved FLOP/s over the best square-matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from mae_bench.app.speed import TrainSpeed, matmul_peak, measure_side_by_side
from mae_bench.config import RunConfig, validate
from mae_bench.data import DatasetInfo
from mae_bench.errors import ConfigError
from mae_bench.methods.registry import METHODS, method_class, resolve_config
from mae_bench.models.vit import get_preset
from mae_bench.results import make_row
from mae_bench.training.host_memory import describe as host_allocator
from mae_bench.training.runtime import (
    cpu_has_fast_bf16,
    device_name,
    resolve_device,
    resolve_precision,
)

MASK_TOKENS = "mae [M]"  # the case name of MAE with mask tokens in the encoder


@dataclass(frozen=True)
class SpeedSpec:
    """What ``mae-bench speed`` measures (see the module docstring)."""

    methods: tuple[str, ...] = ("mae", "simclr", "mocov3", "byol", "dino")
    arch: str = "vit_tiny_patch4"
    img_size: int | None = None  # None: the preset's
    batch_size: int = 128
    precisions: tuple[str, ...] = ("auto",)  # the first for every method, the rest MAE only
    device: str = "auto"
    mask_ratio: float | None = None  # None: each masked method's own (MAE 0.75, SimMIM 0.6, ...)
    steps: int = 3
    warmup: int = 1
    rounds: int = 2
    train_images: int = 2048  # random uint8 images held in memory
    eval_images: int = 1024  # images timed through frozen-feature extraction
    knn_train: int = 50_000
    knn_test: int = 10_000
    probe: bool = True
    command: str = ""


@dataclass
class SpeedOutcome:
    """Everything measured, the result rows and a Markdown table."""

    train: dict[str, TrainSpeed]
    peaks: dict[str, float]  # precision -> matmul FLOP/s
    ratios: dict[str, float]
    evals: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)
    machine: str = ""
    markdown: str = ""
    configs: dict[str, RunConfig] = field(default_factory=dict)  # what each row trained


def validate_spec(spec: SpeedSpec) -> None:
    """Check the request before anything runs. Raises ConfigError naming the bad value."""
    get_preset(spec.arch)
    for m in spec.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method '{m}'; valid: {', '.join(METHODS)}")
    if not spec.methods:
        raise ConfigError("--methods is empty; name at least one of " + ", ".join(METHODS))
    for name, value, low in (("--batch-size", spec.batch_size, 2), ("--steps", spec.steps, 1),
                             ("--warmup", spec.warmup, 0), ("--rounds", spec.rounds, 1),
                             ("--train-images", spec.train_images, 2),
                             ("--eval-images", spec.eval_images, 0),
                             ("--knn-train", spec.knn_train, 0), ("--knn-test", spec.knn_test, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    validate(RunConfig().replace(mae={"mask_ratio": spec.mask_ratio}))  # the config's check
    owners = [m for m in spec.methods if "mae.mask_ratio" in method_class(m).own_knobs]
    if spec.mask_ratio is not None and not owners:
        raise ConfigError(f"--mask-ratio: none of {', '.join(spec.methods)} has a mask ratio")
    if (spec.knn_train == 0) != (spec.knn_test == 0):
        raise ConfigError("--knn-train and --knn-test must both be 0 (skip k-NN) or both > 0")
    device = resolve_device(spec.device)
    for p in spec.precisions:
        resolve_precision(p, device)  # ConfigError for fp16 on a CPU, unknown names


def cases(spec: SpeedSpec) -> dict[str, RunConfig]:
    """The configurations to measure, by display name."""
    device = resolve_device(spec.device)
    main, *others = [resolve_precision(p, device) for p in spec.precisions]
    base = RunConfig().replace(
        model={"arch": spec.arch, "img_size": spec.img_size},
        train={"batch_size": spec.batch_size, "device": spec.device, "precision": main},
    )
    out: dict[str, RunConfig] = {}
    for m in spec.methods:
        out[m] = base.replace(train={"method": m})
        if spec.mask_ratio is not None and "mae.mask_ratio" in method_class(m).own_knobs:
            out[m] = out[m].replace(mae={"mask_ratio": spec.mask_ratio})
    if "mae" in spec.methods:
        mae = out["mae"]
        out[MASK_TOKENS] = mae.replace(mae={"encoder_mask_tokens": True})
        for p in dict.fromkeys(others):
            if p != main:
                out[f"mae {p}"] = mae.replace(train={"precision": p})
    return out


def run_speed(spec: SpeedSpec, log: Callable[[str], None] = lambda _: None) -> SpeedOutcome:
    """Measure everything ``spec`` asks for; nothing is written (the caller stores the rows)."""
    validate_spec(spec)
    device = resolve_device(spec.device)
    preset = get_preset(spec.arch)
    img_size = spec.img_size or preset.img_size
    if img_size % preset.patch_size:
        raise ConfigError(f"--img-size {img_size} is not divisible by {spec.arch}'s patch size "
                          f"{preset.patch_size}; use a multiple of it")
    info = DatasetInfo(name="synthetic", description="random uint8 images", channels=3,
                       img_size=img_size, num_classes=10, mean=(0.5, 0.5, 0.5),
                       std=(0.25, 0.25, 0.25), splits=("train",), needs_data_dir=False,
                       formats="-", how_to_get="generated")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (spec.train_images, 3, img_size, img_size), generator=gen,
                           dtype=torch.uint8)  # [N, 3, S, S]
    labels = torch.randint(0, 10, (spec.train_images,), generator=gen)
    configs = cases(spec)
    if "mae" in configs:  # the attention path auto does not choose, measured beside it
        configs = _with_other_attention(configs, img_size, preset.patch_size, device)

    precisions = dict.fromkeys(resolve_precision(c.train.precision, device)
                               for c in configs.values())
    log("measuring the matmul peak: " + ", ".join(precisions))
    peaks = {p: matmul_peak(device, p) for p in precisions}
    started = time.perf_counter()
    train = measure_side_by_side(configs, images, labels, info, steps=spec.steps,
                                 warmup=spec.warmup, rounds=spec.rounds, progress=log)
    log(f"training measured in {time.perf_counter() - started:.0f} s")
    ratios = _ratios(train)
    evals = _measure_evals(spec, configs, info, images, device, log)
    outcome = SpeedOutcome(train, peaks, ratios, evals, machine=describe_machine(device),
                           configs=configs)
    outcome.rows = _rows(spec, outcome, device)
    outcome.markdown = to_markdown(spec, outcome)
    return outcome


def _with_other_attention(configs: dict[str, RunConfig], img_size: int, patch: int,
                          device: torch.device) -> dict[str, RunConfig]:
    from mae_bench.models.attention import choose_attention

    cfg = configs["mae"]
    chosen = choose_attention(nn.Identity(), cfg.train.attention or "auto",
                              1 + (img_size // patch) ** 2, device,
                              resolve_precision(cfg.train.precision, device))
    other = "math" if chosen == "fused" else "fused"
    out = dict(configs)
    out[f"mae attn={other}"] = cfg.replace(train={"attention": other})
    return out


def _ratios(train: dict[str, TrainSpeed]) -> dict[str, float]:
    r: dict[str, float] = {}
    if "mae" in train and MASK_TOKENS in train:
        mae, full = train["mae"], train[MASK_TOKENS]
        r["mae_speedup_vs_mask_tokens"] = mae.images_per_second / full.images_per_second
        r["mae_flop_ratio_vs_mask_tokens"] = full.gflops_per_image / mae.gflops_per_image
        r["mae_speedup_share_of_flop_ratio"] = (r["mae_speedup_vs_mask_tokens"]
                                                / r["mae_flop_ratio_vs_mask_tokens"])
    for name, s in train.items():
        if name.startswith("mae ") and name not in (MASK_TOKENS,) and "attn=" not in name:
            r[f"{s.precision}_speedup_vs_{train['mae'].precision}"] = (
                s.images_per_second / train["mae"].images_per_second)
        if "attn=" in name:
            r[f"attention_{s.attention}_speedup_vs_{train['mae'].attention}"] = (
                s.images_per_second / train["mae"].images_per_second)
    return r


def _measure_evals(spec: SpeedSpec, configs: dict[str, RunConfig], info: DatasetInfo,
                   images: torch.Tensor, device: torch.device,
                   log: Callable[[str], None]) -> dict[str, float]:
    from mae_bench.app.speed_eval import (
        extraction_speed,
        knn_speed,
        probe_seconds,
        synthetic_features,
    )
    from mae_bench.models.vit import build_vit

    out: dict[str, float] = {}
    main = resolve_precision(next(iter(configs.values())).train.precision, device)
    if spec.eval_images:
        log(f"feature extraction: {spec.eval_images} images")
        encoder = build_vit(spec.arch, info.img_size, 3)
        out["extract_img_per_s"] = extraction_speed(
            encoder, images[:spec.eval_images], info.mean, info.std, device, main)
    if spec.knn_train:
        dim = get_preset(spec.arch).embed_dim
        log(f"k-NN: {spec.knn_train} x {spec.knn_test} features of width {dim}, faiss vs torch")
        feats = synthetic_features(spec.knn_train, spec.knn_test, dim)
        k = knn_speed(*feats, device=device)
        out |= {"knn_faiss_seconds": k.faiss_seconds, "knn_torch_seconds": k.torch_seconds,
                "knn_faiss_search_seconds": k.faiss_search_seconds,
                "knn_torch_search_seconds": k.torch_search_seconds,
                "knn_speedup": k.speedup, "knn_agreement": k.agreement}
        if spec.probe:
            log("fast linear probe on the same features")
            out["probe_seconds"], _ = probe_seconds(*feats, device=device)
    return out


def describe_machine(device: torch.device) -> str:
    """One line naming the machine: the GPU, or the CPU model (from /proc/cpuinfo, as ``lscpu``
    shows it) with torch's thread count, whether it has bf16 matrix instructions and the host
    allocator; then torch's version and the platform."""
    extra = ""
    if device.type == "cpu":
        extra = (f" (torch uses {torch.get_num_threads()} threads; bf16 matrix instructions: "
                 f"{'yes' if cpu_has_fast_bf16() else 'no, bf16 is emulated'}; host allocator: "
                 f"{host_allocator()})")
    return (f"{device_name(device)}{extra}; torch {torch.__version__}, "
            f"{platform.system()} {platform.machine()}")


def _rows(spec: SpeedSpec, o: SpeedOutcome, device: torch.device) -> list[dict[str, Any]]:
    run_id = "speed-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    common = {"run_id": run_id, "arch": spec.arch, "dataset": "synthetic", "protocol": "speed",
              "device": device.type, "device_name": device_name(device),
              "command": spec.command or None}
    rows = []
    for name, s in o.train.items():
        cfg = o.configs[name]
        method = cfg.train.method
        knobs = {"precision": s.precision, "attention": s.attention, "batch_size": s.batch_size,
                 **method_class(method).row_fields(resolve_config(cfg))}  # its mask knobs
        if name == MASK_TOKENS:
            knobs["encoder_mask_tokens"] = True
        metrics = {"train_img_per_s": s.images_per_second, "gflops_per_image": s.gflops_per_image,
                   "tflops": s.tflops, "mfu": s.mfu(o.peaks[s.precision]),
                   "peak_memory_mb": s.peak_memory_mb,
                   "loader_img_per_s": s.loader_images_per_second,
                   "loader_ratio": s.loader_ratio, "step_time_spread": s.spread}
        for metric, value in metrics.items():
            if value is not None:
                rows.append(make_row(**common, method=method, metric=metric,
                                     value=float(value), **knobs))
    for p, flops in o.peaks.items():
        rows.append(make_row(**common, method="matmul", metric="peak_tflops", value=flops / 1e12,
                             precision=p))
    for metric, value in (o.ratios | o.evals).items():
        rows.append(make_row(**common, method="mae" if metric.startswith(("mae", "bf", "fp",
                                                                          "att")) else "eval",
                             metric=metric, value=float(value)))
    return rows


BUSY_SPREAD = 1.25  # step-time interquartile ratio above which the machine was not quiet


def busy_warning(train: dict[str, TrainSpeed]) -> str | None:
    """A one-line warning when some configuration's step times scattered as on a busy machine
    (``TrainSpeed.spread`` above ``BUSY_SPREAD``), else None. The rows were interleaved, so
    their ratios stay fair; the absolute images/s are low."""
    busy = {n: s.spread for n, s in train.items() if s.spread and s.spread > BUSY_SPREAD}
    if not busy:
        return None
    worst = max(busy, key=busy.__getitem__)
    return (f"warning: the machine was busy: step times scattered by up to {busy[worst]:.2f}x "
            f"(75th / 25th percentile, '{worst}'); ratios between rows stay fair (the rounds "
            "were interleaved), absolute img/s are low; rerun on a quiet machine for those")


def to_markdown(spec: SpeedSpec, o: SpeedOutcome) -> str:
    """The measured table and ratios as a Markdown section (command, machine, date first)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Measured {now} on {o.machine}.", ""]
    ratio = "each method's own" if spec.mask_ratio is None else spec.mask_ratio
    if spec.command:
        lines += ["```", spec.command, "```", ""]
    lines += [f"Training: {spec.arch} at {spec.img_size or get_preset(spec.arch).img_size} px, "
              f"batch {spec.batch_size}, mask ratio {ratio}; median of "
              f"{spec.steps * spec.rounds} timed steps per row ({spec.rounds} interleaved rounds)."
              " Matmul peak: " + ", ".join(f"{p} {v / 1e12:.3f} TFLOP/s"
                                           for p, v in o.peaks.items()) + ".", ""]
    lines += ["| configuration | precision | attention | img/s | spread | GFLOP/img/step | "
              "TFLOP/s | MFU % | peak MiB | loader img/s (x train) |", "|" + "---|" * 10]
    for name, s in o.train.items():
        mfu = s.mfu(o.peaks[s.precision])
        mem = f"{s.peak_memory_mb:.0f}" if s.peak_memory_mb is not None else "-"
        loader = "-"
        if s.loader_ratio is not None:
            loader = f"{s.loader_images_per_second:.0f} ({s.loader_ratio:.1f}x)"
        spread = f"{s.spread:.2f}" if s.spread is not None else "-"
        lines.append(f"| {name} | {s.precision} | {s.attention} | {s.images_per_second:.1f} | "
                     f"{spread} | {s.gflops_per_image:.3f} | {s.tflops:.4f} | {mfu:.1f} | {mem} "
                     f"| {loader} |")
    lines.append("")
    if busy := busy_warning(o.train):
        lines += [f"**{busy}**", ""]
    r = o.ratios
    if "mae_speedup_vs_mask_tokens" in r:
        lines.append(f"- MAE vs. mask tokens in the encoder: "
                     f"**{r['mae_speedup_vs_mask_tokens']:.2f}x** faster; FLOP ratio "
                     f"{r['mae_flop_ratio_vs_mask_tokens']:.2f}x; the "
                     f"speedup is **{100 * r['mae_speedup_share_of_flop_ratio']:.0f} %** of it.")
    for key, value in r.items():
        if "_speedup_vs_" in key and not key.startswith("mae_"):
            lines.append(f"- {key.replace('_', ' ')}: {value:.2f}x (MAE training)")
    e = o.evals
    if "extract_img_per_s" in e:
        lines.append(f"- Feature extraction: {e['extract_img_per_s']:.0f} img/s.")
    if "knn_speedup" in e:
        lines.append(
            f"- k-NN on {spec.knn_train:,} x {spec.knn_test:,} features (ks 10/20/100/200): FAISS "
            f"{e['knn_faiss_seconds']:.2f} s vs. torch {e['knn_torch_seconds']:.2f} s, "
            f"**{e['knn_speedup']:.2f}x**; search alone {e['knn_faiss_search_seconds']:.2f} s vs. "
            f"{e['knn_torch_search_seconds']:.2f} s; predictions agree on "
            f"{e['knn_agreement']:.3f} %.")
    if "probe_seconds" in e:
        lines.append(f"- Fast linear probe (11-value weight-decay grid, L-BFGS) on the same "
                     f"features: {e['probe_seconds']:.1f} s.")
    return "\n".join(lines) + "\n"
