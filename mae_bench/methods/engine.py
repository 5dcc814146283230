"""THE training loop, shared by every method.

AdamW(0.9, 0.95) with weight decay except on biases / norms / tokens / position embeddings;
lr = blr x effective batch / 256 or the square-root rule (``config.peak_lr``), linear warmup
then cosine, set every optimizer step; gradient accumulation; bf16 autocast where the hardware
runs it fast, fp16 + grad scaler on GPU, or fp32; a non-finite loss stops the run naming the
step (the last good checkpoint stays); JSONL metrics (and TensorBoard when installed); atomic
checkpoints; automatic resume.

The step itself (autocast, accumulation, scaler, clipping, hooks, update) is
``mae_bench.training.step.TrainStep``; this module builds a run around it (``_Pretraining``: build,
restore, step, log, save, stop, finish).

Everything random in a step (crops, flips, masking) comes from a generator seeded by the global
micro-batch index, and the data order from (seed, epoch): a resumed run replays exactly.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text
from torch import Tensor, nn

from mae_bench.config import RunConfig, validate, warmup_epochs
from mae_bench.config import peak_lr as config_peak_lr
from mae_bench.data import cache_writes_held, load_dataset
from mae_bench.data.augment import BatchViews
from mae_bench.data.loader import TrainBatches
from mae_bench.errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from mae_bench.files import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    FolderLock,
    write_text_atomic,
)
from mae_bench.methods.registry import Batch, Method, build_method, resolve_config
from mae_bench.models.attention import choose_attention
from mae_bench.models.vit import get_preset
from mae_bench.results import git_sha, make_row
from mae_bench.training.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    PREVIOUS,
    CheckpointSaveError,
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mae_bench.training.distributed import (
    join_process_group,
    rank_and_world,
    sync_batchnorm,
    wait_for_main,
)
from mae_bench.training.runtime import (
    device_name,
    lr_at,
    param_groups,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from mae_bench.training.step import TrainStep, grad_scaler
from mae_bench.version import __version__

METRICS = METRICS_FILE  # the old name, still importable
# What a non-finite loss tells the user (the run stops; its last checkpoint is kept).
NON_FINITE_ADVICE = ("the last good checkpoint was kept: lower the learning rate or use "
                     "--precision fp32, then resume")


# --- optimizer and step ----------------------------------------------------------------------


def build_optimizer(method: Method, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    groups = param_groups(method, weight_decay, method.no_weight_decay())
    # fused AdamW: one kernel for all parameters on GPU; foreach (multi-tensor) on CPU.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), **fast)


def build_train_step(cfg: RunConfig, method: Method, optimizer: torch.optim.Optimizer,
                     lr_schedule: Callable[[int], float], *, device: torch.device,
                     precision: str, total_steps: int, module: nn.Module | None = None,
                     scaler: torch.amp.GradScaler | None = None, step: int = 0,
                     accum_iter: int | None = None) -> TrainStep:
    """The engine's training step for ``method``: ``cfg.train``'s accumulation and gradient
    clipping, the method's ``before_optimizer_step`` / ``on_step_end`` hooks, the grad scaler.
    ``mae-bench speed`` times this same step.

    Args:
        cfg: the resolved run config.
        method: the method (its hooks; its parameters are clipped).
        optimizer: from ``build_optimizer``.
        lr_schedule: optimizer step (0-based) -> learning rate.
        device, precision: where and how the forward runs (precision resolved).
        total_steps: the run's optimizer steps (passed to the hooks).
        module: what the forward runs: the method or its DDP wrapper (default: the method).
        scaler: the fp16 grad scaler (``mae_bench.training.step.grad_scaler``), or None.
        step: optimizer steps already done (a resumed run).
        accum_iter: micro-batches per step; None: ``cfg.train.accum_iter``.
    """
    t = cfg.train
    return TrainStep(module if module is not None else method, optimizer, lr_schedule,
                     device=device, precision=precision,
                     accum_iter=t.accum_iter if accum_iter is None else accum_iter,
                     scaler=scaler, clip_grad=t.clip_grad, hooks=method,
                     total_steps=total_steps, step=step, advice=NON_FINITE_ADVICE)


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
    run = _Pretraining(cfg, Path(run_dir), resume, console)  # nothing written yet
    return run.run(max_steps, progress)


class _Pretraining:
    """One call of ``pretrain``. Building it checks everything that can fail on user input and
    writes nothing; ``run`` restores, trains step by step, logs, saves and stops."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool, console: Console) -> None:
        t = cfg.train
        self.cfg, self.run_dir, self.console = cfg, run_dir, console
        self.device = join_process_group(resolve_device(t.device))  # torchrun: gloo / NCCL
        self.precision = resolve_precision(t.precision, self.device)
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        # One trainer per run folder. An existing folder is locked before its checkpoint is read
        # (no other process may be writing it); a new one when training starts.
        self.lock = FolderLock(run_dir)
        if self.is_main and run_dir.is_dir():
            self.lock.acquire()
        try:
            self._check_and_build(resume)
        except BaseException:
            self.lock.release()
            raise

    def _check_and_build(self, resume: bool) -> None:
        cfg, t, run_dir, console = self.cfg, self.cfg.train, self.run_dir, self.console
        _check_out_folder(run_dir, console if self.is_main else None)
        self.ckpt = _checkpoint_to_resume(cfg, run_dir, resume, console)
        # Everything that can fail on user input happens before anything is written.
        # (A decoded image folder's cache file, too, is written only once the checks pass.)
        with cache_writes_held():
            self._build_data_and_method()
        self.steps_per_epoch = self.micro_per_epoch // t.accum_iter
        self.warm_epochs = warmup_epochs(t, self.steps_per_epoch)
        self.total_steps = max(1, round(self.steps_per_epoch * t.epochs))  # fractional epochs
        self.eff_batch = t.batch_size * t.accum_iter * self.world_size
        self.peak_lr = config_peak_lr(t, self.eff_batch)
        self.optimizer = build_optimizer(self.method, t.weight_decay, self.device)
        self.scaler = grad_scaler(self.precision)

    # --- build -----------------------------------------------------------------------------

    def _build_data_and_method(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.dataset = load_dataset(cfg.data.dataset, cfg.data.split, cfg.data.data_dir)
        info = self.dataset.info
        self.channels = info.channels
        self.img_size = cfg.model.img_size or info.img_size
        seed_everything(t.seed + self.rank, t.deterministic)
        self.method = sync_batchnorm(
            build_method(cfg, info.channels, self.img_size).to(self.device), self.device)
        self.views = [BatchViews(spec, info.mean, info.std) for spec in self.method.view_specs()]
        self.attention = self._choose_attention()
        micro = len(self.dataset) // self.world_size // t.batch_size
        self.micro_per_epoch = micro - micro % t.accum_iter
        if self.micro_per_epoch == 0:
            raise ConfigError(
                f"{cfg.data.dataset}/{cfg.data.split} has {len(self.dataset)} images, fewer "
                f"than one optimizer step needs ({t.batch_size} x {t.accum_iter} accumulation x "
                f"{self.world_size} processes); lower --batch-size"
            )

    def _choose_attention(self) -> str:
        """The attention setting ("auto": the rule, per call; or a forced path). A resumed run
        keeps the setting it started with: a checkpoint from before the rule recorded the
        kernel its start-up timing picked, and replaying exactly needs that same kernel. The
        rule is a pure function of the run's settings, so every process agrees without a
        broadcast. ``self.kernel`` is what the encoder runs on the whole image."""
        t = self.cfg.train
        attention = t.attention or "auto"
        if attention == "auto" and self.ckpt is not None:
            attention = self.ckpt.get("extra", {}).get("attention", "auto")
        tokens = 1 + (self.img_size // get_preset(self.cfg.model.arch).patch_size) ** 2
        self.kernel = choose_attention(self.method, attention, tokens, self.device,
                                       self.precision)
        return attention

    # --- restore ---------------------------------------------------------------------------

    def _restore(self) -> int:
        """Load the checkpoint being resumed (if any); returns the optimizer steps it did."""
        self.elapsed_before = 0.0
        ckpt = self.ckpt
        if ckpt is None:
            return 0
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.elapsed_before = float(ckpt.get("extra", {}).get("train_seconds", 0.0))
        return int(ckpt["step"])

    def _prepare(self, step: int) -> None:
        """DDP wrapper, the train step, the run folder's files, the batches, the logger."""
        cfg, t, device = self.cfg, self.cfg.train, self.device
        self.train_module: nn.Module = self.method
        if self.world_size > 1:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_step = build_train_step(
            cfg, self.method, self.optimizer, self._lr, device=device, precision=self.precision,
            total_steps=self.total_steps, module=self.train_module, scaler=self.scaler,
            step=step)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / CONFIG_FILE, cfg.to_yaml())
            now = _provenance(cfg, device, self.precision, self.img_size, self.peak_lr,
                              self.eff_batch, self.total_steps) | {
                "attention": self.attention, "attention_kernel": self.kernel,
                "warmup_epochs": self.warm_epochs}
            write_text_atomic(self.run_dir / RUN_FILE, json.dumps(
                _with_history(self.run_dir / RUN_FILE, now, step), indent=2))
            _truncate_metrics(self.run_dir / METRICS_FILE, step)
        self.batches = TrainBatches(
            self.dataset, t.batch_size, self.micro_per_epoch, t.seed, cfg.data.num_workers,
            self.method.view_specs(), pin_memory=device.type == "cuda", rank=self.rank,
            world_size=self.world_size)
        self.logger = _MetricLogger(self.run_dir, self.is_main, self.console)
        if self.ckpt is not None:
            self.logger.last_loss = _last_logged_loss(self.run_dir / METRICS_FILE)
        self.gen = torch.Generator(device=device)

    def _lr(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, self.steps_per_epoch, t.epochs, self.warm_epochs, self.peak_lr,
                     t.min_lr)

    # --- run -------------------------------------------------------------------------------

    def run(self, max_steps: int | None, progress: bool) -> PretrainResult:
        if self.is_main:
            self.lock.claim()
            _remove_stale_temp_files(self.run_dir)  # the lock: no live writer made them
        try:
            return self._run(max_steps, progress)
        finally:
            self.lock.release()

    def _run(self, max_steps: int | None, progress: bool) -> PretrainResult:
        start_step = self._restore()
        self._prepare(start_step)
        self.resumed, self.ckpt = self.ckpt is not None, None  # the weights are loaded: drop
        stop_at = min(self.total_steps, max_steps) if max_steps is not None else self.total_steps
        self.method.train()
        self.t_start = time.perf_counter()
        bar = _progress(self.console, progress and self.is_main)
        stop = _StopSignals()
        with bar, stop:
            task = bar.add_task(f"{self.cfg.train.method} {self.cfg.data.dataset}",
                                total=self.total_steps, completed=start_step, loss="-", lr="-",
                                ips="-")
            self._train(stop_at, lambda: self._after_step(stop_at, bar, task, stop, progress))
        return self._finish(start_step)

    def _train(self, stop_at: int, after_step: Callable[[], bool]) -> None:
        """Epoch by epoch until ``stop_at`` steps; ``after_step`` returns True to stop."""
        t, step = self.cfg.train, self.train_step
        micro = step.step * t.accum_iter  # global micro-batch index
        while step.step < stop_at:
            epoch = micro // self.micro_per_epoch
            for images, labels in self.batches.epoch(epoch, micro % self.micro_per_epoch):
                forward = self._forward(images, labels, micro)
                micro += 1
                stepped = step.micro_batch(forward)
                self.logger.images += labels.shape[0] * self.world_size
                if stepped and after_step():
                    break
            epoch_done = micro % self.micro_per_epoch == 0
            if step.step >= stop_at or (epoch_done and (epoch + 1) % t.save_every == 0):
                self._save()

    def _forward(self, images: Tensor | list[Tensor], labels: Tensor,
                 micro: int) -> Callable[[], dict[str, Tensor]]:
        """Micro-batch ``micro``'s views (its generator seeded by the index) and forward."""
        device, gen = self.device, self.gen
        gen.manual_seed(self.cfg.train.seed * 1_000_003 + micro * 7919 + self.rank)
        if self.batches.streaming:  # cropped in the workers: one uint8 batch per view
            views = [v.finish(x.to(device, non_blocking=True), gen)
                     for v, x in zip(self.views, images, strict=True)]
        else:
            images = images.to(device, non_blocking=True)  # [N, C, H, W] uint8
            views = [v(images, gen) for v in self.views]  # each [N, C, S, S]
        batch = Batch(views, labels.to(device), gen, self.train_step.step, self.total_steps)
        return lambda: self.train_module(batch)

    def _after_step(self, stop_at: int, bar: Progress, task: TaskID, stop: _StopSignals,
                    progress: bool) -> bool:
        """Log, show progress, honour a signal; True when the run has reached ``stop_at``."""
        step = self.train_step.step
        if step % self.cfg.train.log_every == 0 or step == stop_at:
            self._log(bar, task, progress)
        bar.update(task, completed=step)
        if stop.requested(self.world_size):  # SIGTERM / SIGINT: save here, then stop
            self._stop(stop.signum)
        return step >= stop_at

    # --- log, save, stop, finish -----------------------------------------------------------

    def _log(self, bar: Progress, task: TaskID, progress: bool) -> None:
        step, lr = self.train_step.step, self.train_step.lr
        row = self.logger.flush(self.train_step, step / self.steps_per_epoch)  # non-finite: raises
        bar.update(task, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                   ips=f"{row['img_per_s']:.0f}")
        if progress and self.is_main and not self.console.is_terminal:
            # no live bar in a log file (nohup, a cluster job): plain lines instead
            self.console.print(f"step {step}/{self.total_steps} epoch {row['epoch']:.2f} "
                               f"loss {row['loss']:.4f} lr {lr:.2e} "
                               f"{row['img_per_s']:.0f} img/s", highlight=False)
        if self.batches.streaming:
            self.dataset.check_bad_fraction()

    def _save(self) -> None:
        """Log what is pending, then (rank 0) write a checkpoint at this step."""
        step = self.train_step.step
        self.logger.flush(self.train_step, step / self.steps_per_epoch)
        if self.is_main:
            seconds = self.elapsed_before + time.perf_counter() - self.t_start
            try:
                save_checkpoint(self.run_dir, self._state(step // self.steps_per_epoch, seconds))
            except CheckpointSaveError as exc:  # a full disk: one line, not torch's tracebacks
                raise CheckpointSaveError(f"{exc}, then resume with: mae-bench pretrain "
                                          f"--resume {self.run_dir}", step) from None

    def _stop(self, signum: int) -> None:
        """A signal arrived: save at this step boundary and stop the run."""
        self._save()
        self.logger.close()
        raise RunInterrupted(signum, self.train_step.step, str(self.run_dir))

    def _state(self, epoch: int, train_seconds: float) -> dict[str, Any]:
        t, step = self.cfg.train, self.train_step.step
        return {
            "format_version": FORMAT_VERSION, "method": t.method, "config": self.cfg.to_dict(),
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": step, "micro_step": step * t.accum_iter, "epoch": epoch,
            "rng": rng_state(), "extra": {"train_seconds": train_seconds,
                                          "total_steps": self.total_steps,
                                          "img_size": self.img_size, "channels": self.channels,
                                          "attention": self.attention},
        }

    def _finish(self, start_step: int) -> PretrainResult:
        step = self.train_step.step
        if step == start_step and self.resumed:  # nothing left to do: keep the run's record
            train_seconds = self.elapsed_before
        else:
            train_seconds = self.elapsed_before + time.perf_counter() - self.t_start
        result = PretrainResult(
            run_dir=self.run_dir, step=step, total_steps=self.total_steps,
            epoch=step // self.steps_per_epoch, final_loss=self.logger.last_loss,
            # over the whole run (every segment), like train_seconds
            train_seconds=train_seconds,
            images_per_second=step * self.eff_batch / train_seconds if train_seconds else 0.0,
            device=str(self.device), precision=self.precision,
            finished=step >= self.total_steps)
        if self.is_main and step > start_step:
            summary = {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in result.__dict__.items()}
            summary["segment_images_per_second"] = self.logger.overall_ips()  # this one only
            write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        self.logger.close()
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


# What a trainer leaves in its run folder when it dies mid-write: ``atomic_file``'s temporaries.
_TRAINER_FILES = (LATEST, CONFIG_FILE, RUN_FILE, METRICS_FILE, SUMMARY_FILE)


def _is_leftover(name: str) -> bool:
    """A file a killed trainer can leave behind: its pid file or a partly written temporary."""
    return name == LOCK_FILE or any(name.startswith(f".{f}-") and name.endswith(".tmp")
                                    for f in _TRAINER_FILES)


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Delete the partly written ``.checkpoint.pt-*.tmp`` (and other) temporaries of killed
    saves: a SIGKILL mid-save leaves one, tens of MB each, that nothing else would ever remove.
    Only called while this process holds the run-folder lock, so no live writer owns them."""
    for path in run_dir.glob(".*.tmp"):
        if _is_leftover(path.name):
            path.unlink(missing_ok=True)


def _is_run_folder(run_dir: Path) -> bool:
    """True for a folder ``pretrain`` wrote: a checkpoint, or the ``run.json`` it writes before
    its first step (a run killed before its first checkpoint)."""
    if find_checkpoint(run_dir) is not None:
        return True
    try:
        run = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and "mae_bench" in run and "config_hash" in run


def _check_out_folder(run_dir: Path, console: Console | None) -> None:
    """Refuse a run folder that would overwrite someone's files: an existing folder must be empty
    (but for a killed trainer's leftovers) or a mae-bench run. A symbolic link is followed only
    to a folder, and said so (on ``console``, None: silently, the other torchrun processes).

    Raises:
        ConfigError: a file, a link to nothing, or a non-empty folder that is not a run.
    """
    if run_dir.is_symlink():
        target = run_dir.resolve()
        if not target.is_dir():
            raise ConfigError(f"{run_dir} is a symbolic link to {target}, which is not a folder; "
                              "give a folder for the run")
        if console is not None:
            console.print(f"note: {run_dir} is a symbolic link: the run is in {target}",
                          markup=False, highlight=False)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder; give a new or empty folder")
    if not run_dir.is_dir() or _is_run_folder(run_dir):
        return
    names = sorted(p.name for p in run_dir.iterdir() if not _is_leftover(p.name))
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(f"{run_dir} is not empty and is not a mae-bench run folder (it holds "
                          f"{shown}, but no run.json or checkpoint); pretraining there would "
                          "overwrite files: give a new or empty folder")


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
    """Writes one JSONL line (and TensorBoard scalars) per flush of the train step's buffered
    per-step scalars, which are read from the device only then; a non-finite loss raises
    TrainingError naming the exact step (``TrainStep.flush``)."""

    def __init__(self, run_dir: Path, is_main: bool, console: Console):
        self.path = run_dir / METRICS_FILE
        self.is_main = is_main
        self.console = console
        self.images = 0  # since the last flush, over all processes
        self.total_images = 0
        self.total_time = 0.0
        self.t0 = time.perf_counter()
        self.last_loss: float | None = None
        self.tb = _tensorboard(run_dir) if is_main else None

    def flush(self, train_step: TrainStep, epoch: float) -> dict[str, Any]:
        # the mean over processes (identical on every rank, so all stop on a bad loss together)
        values = train_step.flush()  # key -> [steps since the last flush]
        if not values:
            return {"loss": self.last_loss or float("nan"), "img_per_s": 0.0}
        step = train_step.step
        now = time.perf_counter()
        dt = now - self.t0
        self.total_time += dt
        self.total_images += self.images
        row = {"step": step, "epoch": round(epoch, 4), "lr": train_step.lr,
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
        self.images, self.t0 = 0, now
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
    write_text_atomic(path, "".join(f"{k}\n" for k in kept))


class FittedText(ProgressColumn):
    """A text column that gives way first on a narrow terminal: one line, cut with an ellipsis,
    so that the columns that must show in full (steps, elapsed, ETA: fixed, ``no_wrap``) keep
    their width. Rich shrinks only wrapable table columns before it cuts every column evenly,
    so this one is wrapable for the table and unwrapped in its own rendering."""

    def __init__(self, text_format: str, style: str = "") -> None:
        self.text_format, self.style = text_format, style
        super().__init__(table_column=Column(no_wrap=False))

    def render(self, task: Task) -> Text:
        return Text(self.text_format.format(task=task), style=self.style, no_wrap=True,
                    overflow="ellipsis")


def _progress(console: Console, enabled: bool) -> Progress:
    kept = Column(no_wrap=True)  # never shrunk: steps, elapsed and ETA show in full
    return Progress(
        FittedText("{task.description}", style="bold"), BarColumn(),
        MofNCompleteColumn(table_column=kept),
        FittedText("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[ips]} img/s"),
        TimeElapsedColumn(table_column=kept), TextColumn("ETA", table_column=kept),
        TimeRemainingColumn(table_column=kept), console=console, disable=not enabled,
        transient=False,
    )


def _with_history(path: Path, now: dict[str, Any], step: int) -> dict[str, Any]:
    """``run.json`` for a run (re)starting at ``step``: this segment's provenance, the first
    segment's ``command``, and ``segments``: one entry per start (command, step, commit,
    device, precision, time), so a resumed run never loses how it was made."""
    segment = {"command": now["command"], "start_step": step, "git_sha": now["git_sha"],
               "device_name": now["device_name"], "precision": now["precision"],
               "mae_bench": now["mae_bench"],
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        old = json.loads(path.read_text()) if step > 0 else {}
    except (OSError, ValueError):
        old = {}
    segments = old.get("segments")
    if segments is None and old:  # written before segments were kept: its start was step 0
        segments = [{"command": old.get("command"), "start_step": 0,
                     "git_sha": old.get("git_sha"), "device_name": old.get("device_name"),
                     "precision": old.get("precision"), "mae_bench": old.get("mae_bench")}]
    return now | {"command": old.get("command", now["command"]),
                  "segments": [*(segments or []), segment]}


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
