"""THE training loop, shared by every method.

AdamW(0.9, 0.95) with weight decay except on biases / norms / tokens / position embeddings;
lr = blr x effective batch / 256 or the square-root rule (``config.peak_lr``), linear warmup
then cosine, set every optimizer step; gradient accumulation; bf16 autocast where the hardware
runs it fast, fp16 + grad scaler on GPU, or fp32; a non-finite loss stops the run naming the
step (the last good checkpoint stays); JSONL metrics (and TensorBoard when installed); atomic
checkpoints; automatic resume.

Everything random in a step (crops, flips, masking) comes from a generator seeded by the global
micro-batch index, and the data order from (seed, epoch): a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from mae_bench import __version__
from mae_bench.attention import choose_attention
from mae_bench.augment import BatchViews
from mae_bench.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    PREVIOUS,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mae_bench.config import RunConfig, validate, warmup_epochs
from mae_bench.config import peak_lr as config_peak_lr
from mae_bench.data import cache_writes_held, load_dataset
from mae_bench.distributed import (
    all_reduce_mean,
    join_process_group,
    sync_batchnorm,
    wait_for_main,
)
from mae_bench.errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from mae_bench.loader import TrainBatches
from mae_bench.methods import Batch, Method, build_method, resolve_config
from mae_bench.results import git_sha, make_row
from mae_bench.vit import get_preset

METRICS = "metrics.jsonl"


# --- device, precision, seeds ----------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; "
                          "use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX). Without them torch
    emulates bf16 matmuls, which is far slower than fp32 (measured: ~360x on an AVX2 EPYC)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def device_name(device: torch.device) -> str:
    """A readable name: the GPU's, or the CPU model with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> bf16 where the hardware runs it fast, else fp32. fp16 needs a GPU."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (it uses a grad scaler); "
                          "use bf16 or fp32 on CPU")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --- optimizer and schedule ------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_names: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two AdamW groups: weight decay on weight matrices, none on biases, norm parameters,
    tokens and position embeddings (``no_decay_names``, plus anything with ndim <= 1)."""
    skip = set(no_decay_names)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(method: Method, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    groups = param_groups(method, weight_decay, method.no_weight_decay())
    # fused AdamW: one kernel for all parameters on GPU; foreach (multi-tensor) on CPU.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), **fast)


def lr_at(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, peak_lr: float,
          min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_epochs`` then half-cycle cosine to ``min_lr`` at the end of ``epochs``."""
    t = step / steps_per_epoch  # position in epochs
    if t < warmup_epochs:
        return peak_lr * t / warmup_epochs
    progress = (t - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    step: int
    total_steps: int
    epoch: int
    final_loss: float | None
    train_seconds: float
    images_per_second: float | None
    device: str
    precision: str
    finished: bool


def pretrain(cfg: RunConfig, run_dir: str | Path, *, resume: bool = True,
             max_steps: int | None = None, progress: bool = True,
             console: Console | None = None) -> PretrainResult:
    """Pretrain ``cfg.train.method`` on ``cfg.data`` into ``run_dir``.

    Args:
        cfg: the run's configuration (validated here).
        run_dir: the run folder (config.yaml, metrics.jsonl, checkpoint.pt, summary.json).
        resume: continue from the folder's checkpoint if it has one. When False and the folder
            already holds a checkpoint, this is an error (nothing is overwritten).
        max_steps: stop after this many optimizer steps in total (a checkpoint is saved; the
            run can be resumed later). For quick checks and tests.
        progress: show a rich progress bar.
        console: where to print (default: stderr).

    Raises:
        ConfigError / DataError: bad configuration or data (nothing is written).
        TrainingError: a non-finite loss (the last good checkpoint is kept).
    """
    console = console or Console(stderr=True)
    validate(cfg)
    cfg = resolve_config(cfg)  # the method's lr / weight decay / knobs, recorded in config.yaml
    run_dir = Path(run_dir)
    t_cfg = cfg.train
    device = join_process_group(resolve_device(t_cfg.device))  # torchrun: gloo / NCCL
    precision = resolve_precision(t_cfg.precision, device)
    rank, world_size = world()
    is_main = rank == 0

    ckpt = _checkpoint_to_resume(cfg, run_dir, resume, console)

    # Everything that can fail on user input happens before anything is written.
    # (A decoded image folder's cache file, too, is written only once the checks pass.)
    with cache_writes_held():
        dataset = load_dataset(cfg.data.dataset, cfg.data.split, cfg.data.data_dir)
        info = dataset.info
        img_size = cfg.model.img_size or info.img_size
        seed_everything(t_cfg.seed + rank, t_cfg.deterministic)
        method = sync_batchnorm(build_method(cfg, info.channels, img_size).to(device), device)
        views = [BatchViews(spec, info.mean, info.std) for spec in method.view_specs()]
        # A resumed run keeps the kernel it started with (the two differ in rounding, so a new
        # timing could break exact replay); under torchrun every process takes rank 0's choice.
        attention = t_cfg.attention or "auto"
        if attention == "auto" and ckpt is not None:
            attention = ckpt.get("extra", {}).get("attention", "auto")
        attention = choose_attention(method, attention,
                                     1 + (img_size // get_preset(cfg.model.arch).patch_size) ** 2,
                                     t_cfg.batch_size, device, precision)
        if world_size > 1:
            shared = [attention]
            dist.broadcast_object_list(shared, src=0)
            attention = choose_attention(method, shared[0], 0, 0, device, precision)

        micro_per_epoch = len(dataset) // world_size // t_cfg.batch_size
        micro_per_epoch -= micro_per_epoch % t_cfg.accum_iter
        if micro_per_epoch == 0:
            raise ConfigError(
                f"{cfg.data.dataset}/{cfg.data.split} has {len(dataset)} images, fewer than one "
                f"optimizer step needs ({t_cfg.batch_size} x {t_cfg.accum_iter} accumulation x "
                f"{world_size} processes); lower --batch-size"
            )
    steps_per_epoch = micro_per_epoch // t_cfg.accum_iter
    warm_epochs = warmup_epochs(t_cfg, steps_per_epoch)
    total_steps = max(1, round(steps_per_epoch * t_cfg.epochs))  # epochs may be fractional
    eff_batch = t_cfg.batch_size * t_cfg.accum_iter * world_size
    peak_lr = config_peak_lr(t_cfg, eff_batch)

    optimizer = build_optimizer(method, t_cfg.weight_decay, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        elapsed_before = float(ckpt.get("extra", {}).get("train_seconds", 0.0))

    train_module: nn.Module = method
    if world_size > 1:
        train_module = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        _write_text_atomic(run_dir / "run.json", json.dumps(_provenance(
            cfg, device, precision, img_size, peak_lr, eff_batch, total_steps)
            | {"attention": attention, "warmup_epochs": warm_epochs}, indent=2))
        _truncate_metrics(run_dir / METRICS, step)

    batches = TrainBatches(dataset, t_cfg.batch_size, micro_per_epoch, t_cfg.seed,
                           cfg.data.num_workers, method.view_specs(),
                           pin_memory=device.type == "cuda", rank=rank, world_size=world_size)
    logger = _MetricLogger(run_dir, is_main, console)
    logger.last_loss = _last_logged_loss(run_dir / METRICS) if ckpt is not None else None
    start_step = step
    stop_at = min(total_steps, max_steps) if max_steps is not None else total_steps
    gen = torch.Generator(device=device)

    def state(epoch: int, train_seconds: float) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "method": t_cfg.method, "config": cfg.to_dict(),
            "model": method.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step, "micro_step": step * t_cfg.accum_iter, "epoch": epoch,
            "rng": rng_state(), "extra": {"train_seconds": train_seconds,
                                          "total_steps": total_steps, "img_size": img_size,
                                          "channels": info.channels, "attention": attention},
        }

    method.train()
    t_start = time.perf_counter()
    micro = step * t_cfg.accum_iter  # global micro-batch index
    bar = _progress(console, progress and is_main)
    stop = _StopSignals()
    with bar, stop:
        task = bar.add_task(f"{t_cfg.method} {cfg.data.dataset}", total=total_steps,
                            completed=step, loss="-", lr="-", ips="-")
        while step < stop_at:
            epoch = micro // micro_per_epoch
            for images, labels in batches.epoch(epoch, micro % micro_per_epoch):
                gen.manual_seed(t_cfg.seed * 1_000_003 + micro * 7919 + rank)
                micro += 1
                if batches.streaming:  # cropped in the workers: one uint8 batch per view
                    batch_views = [v.finish(x.to(device, non_blocking=True), gen)
                                   for v, x in zip(views, images, strict=True)]
                else:
                    images = images.to(device, non_blocking=True)
                    batch_views = [v(images, gen) for v in views]
                boundary = micro % t_cfg.accum_iter == 0
                sync = nullcontext() if boundary or world_size == 1 else train_module.no_sync()
                with sync, autocast(device, precision):
                    out = train_module(Batch(batch_views, labels.to(device), gen, step,
                                             total_steps))
                loss = out["loss"] / t_cfg.accum_iter
                (scaler.scale(loss) if scaler is not None else loss).backward()
                logger.add_micro(out, labels.shape[0] * world_size)
                if not boundary:
                    continue
                lr = lr_at(step, steps_per_epoch, t_cfg.epochs, warm_epochs,
                           peak_lr, t_cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                method.before_optimizer_step(step, total_steps)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if t_cfg.clip_grad is not None:
                    nn.utils.clip_grad_norm_(method.parameters(), t_cfg.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                method.on_step_end(step, total_steps)
                logger.end_step(lr)
                if step % t_cfg.log_every == 0 or step == stop_at:
                    row = logger.flush(step, step / steps_per_epoch)  # raises if non-finite
                    bar.update(task, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                               ips=f"{row['img_per_s']:.0f}")
                    if progress and is_main and not console.is_terminal:
                        # no live bar in a log file (nohup, a cluster job): plain lines instead
                        console.print(f"step {step}/{total_steps} epoch {row['epoch']:.2f} "
                                      f"loss {row['loss']:.4f} lr {lr:.2e} "
                                      f"{row['img_per_s']:.0f} img/s", highlight=False)
                    if batches.streaming:
                        dataset.check_bad_fraction()
                bar.update(task, completed=step)
                if stop.requested(world_size):  # SIGTERM / SIGINT: save here, then stop
                    logger.flush(step, step / steps_per_epoch)
                    if is_main:
                        seconds = elapsed_before + time.perf_counter() - t_start
                        save_checkpoint(run_dir, state(step // steps_per_epoch, seconds))
                    logger.close()
                    raise RunInterrupted(stop.signum, step, str(run_dir))
                if step >= stop_at:
                    break
            epoch_done = micro % micro_per_epoch == 0
            if step >= stop_at or (epoch_done and (epoch + 1) % t_cfg.save_every == 0):
                logger.flush(step, step / steps_per_epoch)
                if is_main:
                    seconds = elapsed_before + time.perf_counter() - t_start
                    save_checkpoint(run_dir, state(step // steps_per_epoch, seconds))

    if step == start_step and ckpt is not None:  # nothing left to do: keep the run's record
        train_seconds = elapsed_before
    else:
        train_seconds = elapsed_before + time.perf_counter() - t_start
    result = PretrainResult(
        run_dir=run_dir, step=step, total_steps=total_steps, epoch=step // steps_per_epoch,
        final_loss=logger.last_loss, train_seconds=train_seconds,
        images_per_second=logger.overall_ips(), device=str(device), precision=precision,
        finished=step >= total_steps)
    if is_main and step > start_step:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        _write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    logger.close()
    wait_for_main()  # every rank returns once rank 0's checkpoint and summary are on disk
    return result


def failed_pretrain_row(cfg: RunConfig, run_dir: str | Path, error: TrainingError
                        ) -> dict[str, Any]:
    """The results-store row that records a pretraining stopped by ``error``: protocol
    ``pretrain``, status ``failed``, the message and the step, so that tables and reports show
    the run as failed instead of silently missing."""
    fields: dict[str, Any] = {"seed": cfg.train.seed, "checkpoint": Path(run_dir).name,
                              "pretrain_epochs": cfg.train.epochs}
    if error.step is not None:
        fields["step"] = error.step
    if cfg.train.method == "mae":
        fields["mask_ratio"] = cfg.mae.mask_ratio
    return make_row(run_id=Path(run_dir).name, method=cfg.train.method, arch=cfg.model.arch,
                    dataset=cfg.data.dataset, protocol="pretrain", metric="loss", value=None,
                    status="failed", error=str(error), **fields)


def _checkpoint_to_resume(cfg: RunConfig, run_dir: Path, resume: bool,
                          console: Console) -> dict | None:
    if find_checkpoint(run_dir) is None:
        return None
    if not resume:
        raise ConfigError(f"run folder {run_dir} already holds a checkpoint; resume it "
                          "(drop --no-resume) or choose another --out")
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError as exc:
        latest, previous = run_dir / LATEST, run_dir / PREVIOUS
        if not (latest.is_file() and previous.is_file()):
            raise
        # Keep the damaged file for inspection (never delete a user's file), fall back.
        kept = latest.with_name(f"checkpoint.damaged-{int(time.time())}.pt")
        ckpt = load_checkpoint(previous)
        os.replace(latest, kept)
        console.print(f"warning: {exc}; moved it to {kept.name} and resumed from {PREVIOUS}",
                      markup=False, highlight=False)
    saved = RunConfig.from_dict(ckpt["config"])
    if saved.replace(train={"epochs": cfg.train.epochs}) != cfg:
        diffs = _config_diff(saved, cfg)
        raise ConfigError(f"run folder {run_dir} holds a run with another config ({diffs}); "
                          "resume it with the same options or choose another --out")
    return ckpt


def _config_diff(a: RunConfig, b: RunConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    out = [f"{s}.{k}: {da[s][k]!r} -> {db[s][k]!r}" for s in da for k in da[s]
           if da[s][k] != db[s][k] and (s, k) != ("train", "epochs")]
    return "; ".join(out)


# --- logging ---------------------------------------------------------------------------------


class _MetricLogger:
    """Collects per-step losses as device tensors (no sync per step) and writes one JSONL line
    per flush; a non-finite loss raises TrainingError naming the exact step."""

    def __init__(self, run_dir: Path, is_main: bool, console: Console):
        self.path = run_dir / METRICS
        self.is_main = is_main
        self.console = console
        self.micro: dict[str, list[torch.Tensor]] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}
        self.images = 0
        self.total_images = 0
        self.total_time = 0.0
        self.t0 = time.perf_counter()
        self.last_step = 0
        self.last_loss: float | None = None
        self.lr = 0.0
        self.tb = _tensorboard(run_dir) if is_main else None

    def add_micro(self, out: dict[str, torch.Tensor], n_images: int) -> None:
        for k, v in out.items():
            if v.ndim == 0:
                self.micro.setdefault(k, []).append(v.detach())
        self.images += n_images

    def end_step(self, lr: float) -> None:
        for k, vs in self.micro.items():
            self.steps.setdefault(k, []).append(torch.stack(vs).float().mean())
        self.micro = {}
        self.lr = lr

    def flush(self, step: int, epoch: float) -> dict[str, Any]:
        if not self.steps:
            return {"loss": self.last_loss or float("nan"), "img_per_s": 0.0}
        # the mean over processes (identical on every rank, so all stop on a bad loss together)
        dev = self.steps["loss"][0].device  # NCCL reduces device tensors only
        values = {k: all_reduce_mean(torch.stack(v).to(dev)).cpu() for k, v in self.steps.items()}
        losses = values["loss"]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = step - len(losses) + 1 + int(bad[0])
            raise TrainingError(f"non-finite loss ({float(losses[bad[0]])}) at step {first}; "
                                "the last good checkpoint was kept: lower the learning rate or "
                                "use --precision fp32, then resume", step=first)
        now = time.perf_counter()
        dt = now - self.t0
        self.total_time += dt
        self.total_images += self.images
        row = {"step": step, "epoch": round(epoch, 4), "lr": self.lr,
               **{k: float(v.mean()) for k, v in values.items()},
               "img_per_s": self.images / dt if dt > 0 else 0.0, "time": time.time()}
        self.last_loss = row["loss"]
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.tb is not None:
                for k, v in row.items():
                    if k not in ("step", "time"):
                        self.tb.add_scalar(f"train/{k}", v, step)
        self.steps, self.images, self.t0, self.last_step = {}, 0, now, step
        return row

    def overall_ips(self) -> float | None:
        return self.total_images / self.total_time if self.total_time > 0 else None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _StopSignals:
    """Within ``with``: SIGTERM and SIGINT set a flag instead of killing the run, so the loop
    stops at the next optimizer-step boundary with a checkpoint (a second signal acts at once,
    as usual). Under torchrun the flag is all-reduced each step, so every process stops at the
    same step. Outside the main thread (no signal handlers there) it never fires."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        for sig, handler in self._previous.items():  # a second signal is not deferred
            signal.signal(sig, handler)

    def requested(self, world_size: int) -> bool:
        if world_size == 1:
            return self.signum != 0
        flag = torch.tensor([float(self.signum)],
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum != 0


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _last_logged_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step so a resumed run never logs a step twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    _write_text_atomic(path, "".join(f"{k}\n" for k in kept))


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
    )


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _provenance(cfg: RunConfig, device: torch.device, precision: str, img_size: int,
                peak_lr: float, eff_batch: int, total_steps: int) -> dict[str, Any]:
    return {
        "mae_bench": __version__, "git_sha": git_sha(), "config_hash": cfg.digest(),
        "torch": torch.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "device": str(device),
        "device_name": device_name(device),
        "precision": precision, "img_size": img_size, "peak_lr": peak_lr,
        "effective_batch": eff_batch, "total_steps": total_steps,
        "command": " ".join(sys.argv),
    }
