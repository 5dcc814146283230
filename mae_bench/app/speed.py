"""Training cost of a method: FLOPs per image per step (counted by torch.utils.flop_counter),
measured images per second, achieved FLOP/s against a matmul peak measured on the same
machine, peak memory, and how fast the in-memory data path alone delivers batches.

``compare`` and ``sweep`` use :func:`measure_training` for their cost columns and budgets;
``mae-bench speed`` measures several configurations side by side with
:func:`measure_side_by_side`: round-robin rounds, so that machine noise hits them alike.

Every measured step is the engine's own step (``mae_bench.methods.engine.build_train_step``, the one
``mae_bench.training.step.TrainStep``) after batched augmentation of uint8 images already in memory:
forward under autocast, backward (through the grad scaler in fp16), the method's
``before_optimizer_step`` hook, gradient clipping when the config asks for it, AdamW (foreach on
CPU, fused on GPU), the method's step-end hook (EMA teachers). One measured step is one
micro-batch and its update (accumulation changes only how often the update runs); the learning
rate is held at the run's peak, and logging is left out.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_bench.config import RunConfig, peak_lr, validate
from mae_bench.data import DatasetInfo, load_dataset
from mae_bench.data.augment import BatchViews
from mae_bench.methods.engine import build_optimizer, build_train_step
from mae_bench.methods.registry import Batch, Method, build_method, resolve_config
from mae_bench.models.attention import attention_layers, choose_attention, set_attention
from mae_bench.models.backbones import is_vit
from mae_bench.training.runtime import resolve_device, resolve_precision, seed_everything
from mae_bench.training.step import grad_scaler

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSpeed:
    """One configuration's measured training cost.

    Attributes:
        images_per_second: training throughput (median over the timed steps).
        seconds_per_step: median wall time of one step at ``batch_size``.
        gflops_per_image: forward + backward GFLOPs per image per step (all views, teachers
            included; the optimizer update is not counted).
        batch_size: images per measured step.
        device: where it ran.
        precision: fp32 | bf16 | fp16.
        attention: the kernel the encoder ran on the whole image ("fused" or "math"): the
            rule's (``mae_bench.models.attention.rule_path``) unless the configuration forced one.
        peak_memory_mb: memory the configuration added at its peak (model, optimizer state,
            activations): on CUDA the allocator's peak, on Linux CPUs the rise of the process's
            peak resident set; None where neither can be read.
        loader_images_per_second: the data path alone (index the uint8 images in memory, move
            them to the device, build every view); None when not measured.
        step_seconds: every timed step, for spread.
    """

    images_per_second: float
    seconds_per_step: float
    gflops_per_image: float
    batch_size: int
    device: str
    precision: str
    attention: str = "fused"
    peak_memory_mb: float | None = None
    loader_images_per_second: float | None = None
    step_seconds: tuple[float, ...] = field(default=(), repr=False)

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s: counted FLOPs per image x images per second."""
        return self.gflops_per_image * self.images_per_second / 1e3

    @property
    def spread(self) -> float | None:
        """How far the timed steps scatter: the slowest over the fastest quarter's edge
        (75th over 25th percentile of the step times); None with fewer than 4 steps. A quiet
        machine gives about 1.0-1.1."""
        if len(self.step_seconds) < 4:
            return None
        q = statistics.quantiles(self.step_seconds, n=4)
        return q[2] / q[0]

    @property
    def loader_ratio(self) -> float | None:
        """How many times the training throughput the data path alone delivers."""
        if not self.loader_images_per_second:
            return None
        return self.loader_images_per_second / self.images_per_second

    def mfu(self, peak_flops: float) -> float:
        """Model FLOP utilisation in percent of ``peak_flops`` (FLOP/s)."""
        return 100 * self.tflops * 1e12 / peak_flops


def train_step_flops(method: Method, batch: Batch) -> int:
    """FLOPs of one training step's forward and backward pass on ``batch`` (no update).

    Counted on the explicit attention path (two batched matmuls per layer), whatever path the
    model runs: the counter does not see inside every fused kernel (the CPU flash-attention
    backward), and a model's FLOPs must not depend on the kernel that computes them."""
    layers = attention_layers(method)
    paths = [getattr(layer, "path", "auto") for layer in layers]
    set_attention(method, "math")
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            method(batch)["loss"].backward()
    finally:
        for layer, was in zip(layers, paths, strict=True):
            set_attention(layer, was)
    method.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, precision: str, sizes: tuple[int, ...] | None = None,
                repeats: int = 3) -> float:
    """The best FLOP/s of a square ``n x n`` by ``n x n`` linear layer (``F.linear``, the op
    the model's layers run) in ``precision`` on ``device``, over ``sizes``: the peak that MFU
    is measured against, taken with the same library on the same machine in the same run.

    ``sizes`` defaults to (4096, 8192) on GPUs and (512, 1024, 2048) on CPUs. (A bare ``a @ b``
    is no peak for bf16 on CPUs without bf16 instructions: it takes a slower emulation path
    than ``F.linear``; results/speed-cpu.md, "bf16 on this CPU", has the numbers.)
    """
    if sizes is None:
        sizes = (4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    dtype = _DTYPES[precision]
    gen = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        w = torch.randn(n, n, device=device, generator=gen).to(dtype)
        for i in range(repeats + 1):  # the first call warms the library up
            _sync(device)
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            _sync(device)
            if i:
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


# The run length the hooks are told (schedules inside a method, e.g. DINO's teacher momentum).
_TOTAL_STEPS = 100


class _Trainer:
    """One configuration ready to step: method, views, the engine's train step (optimizer,
    scaler, clipping, hooks) and its own generator."""

    def __init__(self, cfg: RunConfig, info: DatasetInfo, img_size: int,
                 device: torch.device, precision: str):
        t = cfg.train
        seed_everything(t.seed)
        self.method = build_method(cfg, info.channels, img_size).to(device).train()
        self.views = [BatchViews(s, info.mean, info.std) for s in self.method.view_specs()]
        lr = peak_lr(t, t.batch_size * t.accum_iter)
        optimizer = build_optimizer(self.method, t, device)
        self.train_step = build_train_step(
            cfg, self.method, optimizer, lambda _: lr, device=device, precision=precision,
            total_steps=_TOTAL_STEPS, scaler=grad_scaler(precision), accum_iter=1)
        self.gen = torch.Generator(device=device).manual_seed(t.seed)
        self.device, self.precision = device, precision
        self.attention = "-" if not is_vit(cfg.model.arch) else choose_attention(
            self.method, t.attention or "auto", 1 + (img_size // _patch(cfg)) ** 2, device,
            precision)

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        images = images.to(self.device, non_blocking=True)
        return Batch([v(images, self.gen) for v in self.views], labels.to(self.device),
                     self.gen, self.train_step.step, _TOTAL_STEPS)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One timed training step (data path included); returns its seconds."""
        _sync(self.device)
        start = time.perf_counter()
        b = self.batch(images, labels)
        self.train_step.micro_batch(lambda: self.method(b))
        _sync(self.device)
        return time.perf_counter() - start

    def loader_seconds(self, images: torch.Tensor, labels: torch.Tensor,
                       index: torch.Tensor) -> float:
        """Seconds to build one batch from the in-memory set: index, move, every view."""
        _sync(self.device)
        start = time.perf_counter()
        self.batch(images.index_select(0, index), labels.index_select(0, index))
        _sync(self.device)
        return time.perf_counter() - start


def measure_training(cfg: RunConfig, steps: int = 3, warmup: int = 1,
                     flops_batch: int = 2) -> TrainSpeed:
    """Time ``steps`` training steps of ``cfg`` (after ``warmup`` untimed ones) on real batches
    of its data set, and count its FLOPs per image on a batch of ``flops_batch``.

    The method is a throwaway copy: nothing is written and no run is changed.
    """
    validate(cfg)
    cfg = resolve_config(cfg)
    dataset = load_dataset(cfg.data.dataset, cfg.data.split, cfg.data.data_dir)
    n = min(cfg.train.batch_size, len(dataset))

    def draw(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _images(dataset, torch.randint(0, len(dataset), (size,)))

    result = _measure({"run": cfg}, dataset.info, draw, n, steps, warmup, rounds=1,
                      flops_batch=flops_batch)
    return result["run"]


def measure_side_by_side(cfgs: dict[str, RunConfig], images: torch.Tensor,
                         labels: torch.Tensor, info: DatasetInfo, *, steps: int = 3,
                         warmup: int = 1, rounds: int = 2, flops_batch: int = 2,
                         progress: Callable[[str], None] | None = None
                         ) -> dict[str, TrainSpeed]:
    """Measure several configurations in one process, round-robin.

    Each round gives every configuration ``warmup`` untimed then ``steps`` timed steps, so slow
    phases of a shared machine are spread over all of them; the reported numbers are medians
    over all timed steps. Peak memory is read during each configuration's first round (built
    then, after the previous ones released theirs).

    Args:
        cfgs: name -> run config (same data shape; batch size, device, precision from each).
        images: uint8 [N, C, H, W] in memory; batches are drawn at random from it.
        labels: [N] int64.
        info: the data set's description (channels, mean / std, image size).
        steps, warmup, rounds: timed and untimed steps per round, and rounds.
        flops_batch: images in the batch the FLOP counter sees.
        progress: called with a short line before each configuration's round.
    """
    gen = torch.Generator().manual_seed(0)

    def draw(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(images), (size,), generator=gen)
        return images.index_select(0, idx), labels.index_select(0, idx)

    for cfg in cfgs.values():
        validate(cfg)
    resolved = {name: resolve_config(cfg) for name, cfg in cfgs.items()}
    n = min(min(c.train.batch_size for c in resolved.values()), len(images))
    return _measure(resolved, info, draw, n, steps, warmup, rounds, flops_batch,
                    loader_source=(images, labels), progress=progress)


def _measure(cfgs: dict[str, RunConfig], info: DatasetInfo,
             draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]], n: int, steps: int,
             warmup: int, rounds: int, flops_batch: int,
             loader_source: tuple[torch.Tensor, torch.Tensor] | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, TrainSpeed]:
    trainers: dict[str, _Trainer] = {}
    memory: dict[str, float | None] = {}
    flops: dict[str, float] = {}
    timed: dict[str, list[float]] = {name: [] for name in cfgs}
    loader_s: dict[str, list[float]] = {name: [] for name in cfgs}
    with torch.random.fork_rng(devices=[]):
        for r in range(rounds):
            for name, cfg in cfgs.items():
                if progress is not None:
                    progress(f"round {r + 1}/{rounds}: {name}")
                device = resolve_device(cfg.train.device)
                precision = resolve_precision(cfg.train.precision, device)
                img_size = cfg.model.img_size or info.img_size
                if name not in trainers:
                    base = _memory_mark(device)
                    trainers[name] = tr = _Trainer(cfg, info, img_size, device, precision)
                    imgs, labs = draw(flops_batch)
                    flops[name] = train_step_flops(tr.method, tr.batch(imgs, labs)) / flops_batch
                tr = trainers[name]
                for i in range(warmup + steps):
                    seconds = tr.step(*draw(n))
                    if i >= warmup:
                        timed[name].append(seconds)
                if name not in memory:
                    memory[name] = _memory_peak(device, base)
                if loader_source is not None:  # the data path alone, from the whole set
                    for _ in range(steps):
                        idx = torch.randint(0, len(loader_source[0]), (n,))
                        loader_s[name].append(tr.loader_seconds(*loader_source, idx))
            if rounds > 1:
                _release_memory()
    out = {}
    for name in cfgs:
        tr = trainers[name]
        per_step = statistics.median(timed[name])
        loader_ips = n / statistics.median(loader_s[name]) if loader_s[name] else None
        out[name] = TrainSpeed(n / per_step, per_step, flops[name] / 1e9, n, str(tr.device),
                               tr.precision, tr.attention, memory[name], loader_ips,
                               tuple(timed[name]))
    return out


def _patch(cfg: RunConfig) -> int:
    from mae_bench.models.vit import get_preset

    return get_preset(cfg.model.arch).patch_size


def _images(dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "images"):  # in memory
        return dataset.images.index_select(0, idx), dataset.labels.index_select(0, idx)
    from mae_bench.data.augment import eval_resize

    size = dataset.info.img_size
    pairs = [dataset[int(i)] for i in idx]
    images = torch.stack([eval_resize(img.unsqueeze(0), size)[0].to(torch.uint8)
                          for img, _ in pairs])
    return images, torch.tensor([label for _, label in pairs])


# --- memory ----------------------------------------------------------------------------------

_PROC_STATUS = Path("/proc/self/status")


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next peak counts fresh pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _memory_mark(device: torch.device) -> float | None:
    """Start a peak-memory window; returns the baseline in MiB (None: cannot measure here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    _release_memory()
    try:  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return None


def _memory_peak(device: torch.device, base: float | None) -> float | None:
    """MiB added at the peak since :func:`_memory_mark` returned ``base``."""
    if base is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    peak = _status_mib("VmHWM")
    return None if peak is None else peak - base


def _status_mib(key: str, status: Path = _PROC_STATUS) -> float | None:
    """A ``/proc/<pid>/status`` memory field in MiB (this process's by default); None where
    it cannot be read."""
    try:
        match = re.search(rf"{key}:\s+(\d+) kB", status.read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
