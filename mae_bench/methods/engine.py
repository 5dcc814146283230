"""THE training loop, shared by every method.

The method's optimizer (``train.optimizer``: AdamW(0.9, 0.95), LARS or SGD with momentum,
``mae_bench.training.optim``) with weight decay except on biases / norms / tokens / position
embeddings; lr = blr x effective batch / 256 or the square-root rule (``config.peak_lr``),
linear warmup then cosine, set every optimizer step; gradient accumulation; bf16 autocast
where the hardware runs it fast, fp16 + grad scaler on GPU, or fp32; a non-finite loss stops
the run naming the step (the last good checkpoint stays); JSONL metrics (and TensorBoard when
installed); atomic checkpoints; automatic resume.

The step itself (autocast, accumulation, scaler, clipping, hooks, update) is
``mae_bench.training.step.TrainStep``; this module builds a run around it as explicit values, each
made by one function from what the previous ones returned:

    Where    where_to_train(cfg.train)            device, precision, torchrun rank and world
    Setup    build_setup(cfg, where, checkpoint)  data, method, views, attention, Plan, optimizer:
                                                  everything checked before anything is written
    Start    restore(setup, checkpoint)           the step and training time a checkpoint gave
    Segment  open_segment(setup, where, start)    this start's train step, batches, logger, files

``train_segment`` then runs the loop on a Segment and ``finish`` returns the ``PretrainResult``.
What changes while it runs lives in the objects built for it: the step count in ``TrainStep``,
the logged numbers in ``MetricLogger``, the micro-batch index in the loop itself.

Everything random in a step (crops, flips, masking) comes from a generator seeded by the global
micro-batch index, and the data order from (seed, epoch): a resumed run replays exactly.
The run folder's checks and files are in ``mae_bench.methods.run_folder``; the logger, the signal
flag and the progress bar in ``mae_bench.methods.train_log``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, TaskID
from torch import Tensor, nn

from mae_bench.config import RunConfig, TrainConfig, validate, warmup_epochs
from mae_bench.config import peak_lr as config_peak_lr
from mae_bench.data import StreamingDataset, cache_writes_held, load_dataset
from mae_bench.data.augment import BatchViews
from mae_bench.data.loader import TrainBatches
from mae_bench.data.pipeline import jpeg_decoder, resolve_pipeline
from mae_bench.errors import ConfigError, RunInterrupted
from mae_bench.files import (
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    FolderLock,
    write_text_atomic,
)
from mae_bench.methods.monitor import Monitor
from mae_bench.methods.registry import Batch, Method, build_method, resolve_config
from mae_bench.methods.run_folder import (
    check_out_folder,
    checkpoint_to_resume,
    last_logged_loss,
    provenance,
    remove_stale_temp_files,
    run_history,
    truncate_metrics,
)
from mae_bench.methods.trackers import check_tracker, open_tracker
from mae_bench.methods.train_log import FittedText, MetricLogger, StopSignals, progress_bar
from mae_bench.models.attention import choose_attention
from mae_bench.models.backbones import is_vit
from mae_bench.models.conv import set_conv
from mae_bench.models.vit import get_preset
from mae_bench.training import optim
from mae_bench.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointSaveError,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_mismatch,
)
from mae_bench.training.distributed import (
    join_process_group,
    rank_and_world,
    sync_batchnorm,
    wait_for_main,
)
from mae_bench.training.runtime import (
    lr_at,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from mae_bench.training.step import TrainStep, grad_scaler

__all__ = ["FittedText", "PretrainResult", "build_optimizer", "build_train_step", "pretrain"]

METRICS = METRICS_FILE  # the old name, still importable
_progress = progress_bar  # the old name, still importable
# What a non-finite loss tells the user (the run stops; its last checkpoint is kept).
NON_FINITE_ADVICE = ("the last good checkpoint was kept: lower the learning rate or use "
                     "--precision fp32, then resume")


# --- optimizer and step ----------------------------------------------------------------------


def build_optimizer(method: Method, train_cfg: TrainConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The run's optimizer: AdamW, LARS or SGD as ``train_cfg.optimizer`` says, lr 0 (set every
    step); ``mae_bench.training.optim.build_optimizer``."""
    return optim.build_optimizer(method, train_cfg, device)


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
    wd_schedule = None
    if t.weight_decay_end is not None:  # the method's schedule (I-JEPA's spans 1.25 runs)
        wd_schedule = functools.partial(method.weight_decay_at, total_steps=total_steps,
                                        start=t.weight_decay, end=t.weight_decay_end)
    return TrainStep(module if module is not None else method, optimizer, lr_schedule,
                     device=device, precision=precision,
                     accum_iter=t.accum_iter if accum_iter is None else accum_iter,
                     scaler=scaler, clip_grad=t.clip_grad, hooks=method,
                     total_steps=total_steps, step=step, advice=NON_FINITE_ADVICE,
                     wd_schedule=wd_schedule)


# --- the run, as values --------------------------------------------------------------------


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


@dataclass(frozen=True)
class Where:
    """Where this process trains: its device, the resolved precision, its torchrun rank."""

    device: torch.device
    precision: str
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Plan:
    """The run's length and learning-rate schedule, fixed by the config and the data size."""

    micro_per_epoch: int  # micro-batches per epoch and process, a multiple of accum_iter
    steps_per_epoch: int
    total_steps: int
    warm_epochs: float
    eff_batch: int  # images per optimizer step, over every process
    peak_lr: float
    epochs: float
    min_lr: float

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): warmup, then cosine."""
        return lr_at(step, self.steps_per_epoch, self.epochs, self.warm_epochs, self.peak_lr,
                     self.min_lr)


@dataclass(frozen=True)
class Setup:
    """Everything a run builds from its config before it writes anything."""

    cfg: RunConfig  # resolved: the method's defaults filled in
    dataset: Any  # what ``load_dataset`` returns (in memory or streamed)
    img_size: int
    method: Method
    views: list[BatchViews]  # one per view spec of the method
    attention: str  # the setting ("auto" or a forced path), kept by a resumed run
    kernel: str  # what the encoder runs on the whole image
    conv: str  # the convolution setting ("auto" or a forced path), kept by a resumed run
    plan: Plan
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


@dataclass(frozen=True)
class Start:
    """Where a run (re)starts: what its checkpoint gave back, or step 0."""

    step: int
    seconds_before: float  # training time of the earlier segments
    resumed: bool


@dataclass(frozen=True)
class EncoderInit:
    """Weights a run's encoder starts from (``--init``), resolved by the application: the
    source as given, the tensors (the encoder's keys; a MAE encoder's without its decoder) and
    their content hash."""

    source: str
    state: dict[str, Tensor]
    sha256: str

    def record(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256}


def load_init(method: Method, init: EncoderInit, arch: str) -> None:
    """Load ``init`` into ``method.encoder``: every tensor of the source must be one of the
    encoder's with the same shape, and every encoder tensor must come from it (a MAE model's
    decoder excepted: it starts at random); then the method's teachers copy the encoder.

    Raises:
        ConfigError: one line naming the missing, unexpected and mis-shaped keys.
    """
    encoder = method.encoder
    own = encoder.state_dict()
    needed = (encoder.encoder_state_dict().keys() if hasattr(encoder, "encoder_state_dict")
              else None)
    problems = state_mismatch(own, init.state, needed)
    if problems:
        raise ConfigError(f"--init {init.source} does not fit --arch {arch}: {problems}")
    encoder.load_state_dict(init.state, strict=False)
    method.after_init()


@dataclass
class Watch:
    """What watches a segment: the monitor (None: nothing) and what it saw so far."""

    monitor: Monitor | None = None  # the online evaluation, measured between steps
    collapse: dict[str, Any] | None = None  # the run's first collapse: step, reason
    seconds: float = 0.0  # the run's time in the monitor (every segment)
    stopping: bool = False  # a collapse under --stop-on-collapse: stop after this step


@dataclass(frozen=True)
class Segment:
    """One start of a run, up to its stop: what was built, and what this start opened."""

    setup: Setup
    where: Where
    start: Start
    run_dir: Path
    console: Console
    train_step: TrainStep  # holds the step count
    module: nn.Module  # what the forward runs: the method or its DDP wrapper
    batches: TrainBatches
    logger: MetricLogger
    gen: torch.Generator  # reseeded for every micro-batch
    t_start: float  # perf_counter when its training began
    watch: Watch  # the monitor and what it saw
    init: dict[str, str] | None = None  # the --init weights the encoder started from

    def seconds(self) -> float:
        """Training time of the whole run so far (every segment)."""
        return self.start.seconds_before + time.perf_counter() - self.t_start


def pretrain(cfg: RunConfig, run_dir: str | Path, *, resume: bool = True,
             max_steps: int | None = None, progress: bool = True,
             console: Console | None = None, monitor: Monitor | None = None,
             init: EncoderInit | None = None) -> PretrainResult:
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
        monitor: what measures the method between steps (``mae_bench.methods.monitor``; the
            application's online evaluation); None: nothing.
        init: weights the encoder starts from (``--init``, resolved by the application); a
            resumed run takes its weights from its checkpoint instead.

    Raises:
        ConfigError / DataError: bad configuration or data (nothing is written).
        TrainingError: a non-finite loss (the last good checkpoint is kept).
    """
    console = console or Console(stderr=True)
    validate(cfg)
    cfg = resolve_config(cfg)  # the method's lr / weight decay / knobs, recorded in config.yaml
    run_dir = Path(run_dir)
    where = where_to_train(cfg.train)
    # One trainer per run folder. An existing folder is locked before its checkpoint is read
    # (no other process may be writing it); a new one when training starts.
    lock = FolderLock(run_dir)
    if where.is_main and run_dir.is_dir():
        lock.acquire()
    try:
        # Everything that can fail on user input happens before anything is written.
        check_out_folder(run_dir, console if where.is_main else None)
        check_tracker(cfg.train.tracker)
        ckpt = checkpoint_to_resume(cfg, run_dir, resume, console)
        with cache_writes_held():  # a decoded image folder's cache is written once checks pass
            setup = build_setup(cfg, where, ckpt)
        if init is not None and ckpt is None:  # a resumed run has its weights already
            load_init(setup.method, init, cfg.model.arch)
        if where.is_main:
            lock.claim()
            remove_stale_temp_files(run_dir)  # the lock: no live writer made them
        start = restore(setup, ckpt)
        if monitor is not None and ckpt is not None and ckpt.get("monitor"):
            monitor.load_state_dict(ckpt["monitor"])
        extra = ckpt.get("extra", {}) if ckpt else {}
        watch = Watch(monitor, extra.get("collapse"), float(extra.get("online_seconds", 0.0)))
        started_from = extra.get("init") if ckpt else (init.record() if init else None)
        del ckpt  # the weights are loaded: the checkpoint's memory can go
        segment = open_segment(setup, where, start, run_dir, console, watch, started_from)
        if monitor is not None:
            plan = setup.plan
            monitor.start(device=where.device, precision=where.precision,
                          img_size=setup.img_size, steps_per_epoch=plan.steps_per_epoch,
                          images_per_epoch=plan.steps_per_epoch * plan.eff_batch)
        train_segment(segment, max_steps, progress)
        return finish(segment)
    finally:
        lock.release()


# --- build: nothing is written ---------------------------------------------------------------


def where_to_train(t: TrainConfig) -> Where:
    """The device (joining the torchrun process group, gloo / NCCL), precision and rank."""
    device = join_process_group(resolve_device(t.device))
    rank, world_size = rank_and_world()
    return Where(device, resolve_precision(t.precision, device), rank, world_size)


def build_setup(cfg: RunConfig, where: Where, ckpt: dict | None) -> Setup:
    """Data, method, views, attention, plan and optimizer of a resolved config.

    Raises:
        ConfigError / DataError: what the data or the model cannot take.
    """
    t = cfg.train
    dataset = load_dataset(cfg.data.dataset, cfg.data.split, cfg.data.data_dir,
                           shuffle_buffer=cfg.data.shuffle_buffer,
                           **({"max_in_memory_bytes": 0} if cfg.data.stream else {}))
    if cfg.data.stream and not isinstance(dataset, StreamingDataset):
        logging.getLogger("mae_bench.data").warning(
            "%s is held in memory whatever --stream says (it is not read from image files)",
            cfg.data.dataset)
    info = dataset.info
    img_size = cfg.model.img_size or info.img_size
    seed_everything(t.seed + where.rank, t.deterministic)
    method = sync_batchnorm(
        build_method(cfg, info.channels, img_size).to(where.device), where.device)
    views = [BatchViews(spec, info.mean, info.std) for spec in method.view_specs()]
    attention, kernel = _attention(cfg, method, img_size, where, ckpt)
    conv = _conv(cfg, method, ckpt)
    type(method).check_data(cfg, len(dataset))
    plan = plan_run(cfg, len(dataset), where.world_size)
    optimizer = build_optimizer(method, t, where.device)
    return Setup(cfg, dataset, img_size, method, views, attention, kernel, conv, plan,
                 optimizer, grad_scaler(where.precision))


def _attention(cfg: RunConfig, method: Method, img_size: int, where: Where,
               ckpt: dict | None) -> tuple[str, str]:
    """The attention setting ("auto": the rule, per call; or a forced path) and the kernel the
    encoder runs on the whole image. A resumed run keeps the setting it started with: a
    checkpoint from before the rule recorded the kernel its start-up timing picked, and
    replaying exactly needs that same kernel. The rule is a pure function of the run's
    settings, so every process agrees without a broadcast."""
    attention = cfg.train.attention or "auto"
    if attention == "auto" and ckpt is not None:
        attention = ckpt.get("extra", {}).get("attention", "auto")
    if not is_vit(cfg.model.arch):  # no mae-bench attention to choose
        return attention, "-"
    tokens = 1 + (img_size // get_preset(cfg.model.arch).patch_size) ** 2
    return attention, choose_attention(method, attention, tokens, where.device, where.precision)


def _conv(cfg: RunConfig, method: Method, ckpt: dict | None) -> str:
    """The convolution setting ("auto": the rule, per call; or a forced path), applied to every
    2-D convolution of ``method``. A resumed run keeps the setting it started with, and one
    whose checkpoint predates the rule ran every convolution natively, so it resumes natively:
    the same kernels, the same rounding, as an uninterrupted run."""
    conv = cfg.train.conv or "auto"
    if cfg.train.conv is None and ckpt is not None:
        conv = ckpt.get("extra", {}).get("conv", "native")
    set_conv(method, conv)
    return conv


def plan_run(cfg: RunConfig, n_images: int, world_size: int) -> Plan:
    """The run's steps and schedule for ``n_images`` training images.

    Raises:
        ConfigError: fewer images than one optimizer step needs.
    """
    t = cfg.train
    micro = n_images // world_size // t.batch_size
    micro_per_epoch = micro - micro % t.accum_iter
    if micro_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.dataset}/{cfg.data.split} has {n_images} images, fewer "
            f"than one optimizer step needs ({t.batch_size} x {t.accum_iter} accumulation x "
            f"{world_size} processes); lower --batch-size"
        )
    steps_per_epoch = micro_per_epoch // t.accum_iter
    eff_batch = t.batch_size * t.accum_iter * world_size
    return Plan(micro_per_epoch, steps_per_epoch,
                total_steps=max(1, round(steps_per_epoch * t.epochs)),  # fractional epochs
                warm_epochs=warmup_epochs(t, steps_per_epoch), eff_batch=eff_batch,
                peak_lr=config_peak_lr(t, eff_batch), epochs=t.epochs, min_lr=t.min_lr)


# --- start: restore, open the folder ---------------------------------------------------------


def restore(setup: Setup, ckpt: dict | None) -> Start:
    """Load the checkpoint being resumed (if any) into the method, optimizer, scaler and RNGs."""
    if ckpt is None:
        return Start(0, 0.0, resumed=False)
    setup.method.load_state_dict(ckpt["model"])
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    if setup.scaler is not None and ckpt.get("scaler"):
        setup.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return Start(int(ckpt["step"]), float(ckpt.get("extra", {}).get("train_seconds", 0.0)),
                 resumed=True)


def open_segment(setup: Setup, where: Where, start: Start, run_dir: Path,
                 console: Console, watch: Watch | None = None,
                 init: dict[str, str] | None = None) -> Segment:
    """The DDP wrapper, the train step, the run folder's files, the batches, the logger."""
    cfg, device = setup.cfg, where.device
    module: nn.Module = setup.method
    if where.world_size > 1:
        module = nn.parallel.DistributedDataParallel(
            setup.method, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = build_train_step(
        cfg, setup.method, setup.optimizer, setup.plan.lr, device=device,
        precision=where.precision, total_steps=setup.plan.total_steps, module=module,
        scaler=setup.scaler, step=start.step)
    if cfg.data.pipeline == "dali" and isinstance(setup.dataset, StreamingDataset):
        from mae_bench.data import dali

        dali.check_installed()  # before anything is written to the run folder
    if where.is_main:
        _write_run_files(setup, where, run_dir, start.step, init)
    batches = TrainBatches(
        setup.dataset, cfg.train.batch_size, setup.plan.micro_per_epoch, cfg.train.seed,
        cfg.data.num_workers, setup.method.view_specs(), pin_memory=device.type == "cuda",
        rank=where.rank, world_size=where.world_size,
        pipeline=resolve_pipeline(cfg.data.pipeline))
    tracker = open_tracker(cfg.train.tracker, run_dir, cfg) if where.is_main else None
    logger = MetricLogger(run_dir, where.is_main, console, tracker)
    if start.resumed:
        logger.last_loss = last_logged_loss(run_dir / METRICS_FILE)
    gen = torch.Generator(device=device)
    setup.method.train()
    return Segment(setup, where, start, run_dir, console, train_step, module, batches, logger,
                   gen, t_start=time.perf_counter(), watch=watch or Watch(), init=init)


def _write_run_files(setup: Setup, where: Where, run_dir: Path, step: int,
                     init: dict[str, str] | None = None) -> None:
    """config.yaml, run.json (with this start added to its history), metrics.jsonl cut back to
    ``step`` (a resumed run never logs a step twice)."""
    cfg, plan = setup.cfg, setup.plan
    streamed = isinstance(setup.dataset, StreamingDataset)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
    now = provenance(cfg, where.device, where.precision, setup.img_size, plan.peak_lr,
                     plan.eff_batch, plan.total_steps) | {
        "attention": setup.attention, "attention_kernel": setup.kernel, "conv": setup.conv,
        "data_pipeline": (resolve_pipeline(cfg.data.pipeline) if streamed else None),
        "jpeg_decoder": (jpeg_decoder(resolve_pipeline(cfg.data.pipeline)) if streamed
                         else None),
        "warmup_epochs": plan.warm_epochs, "init": init}
    write_text_atomic(run_dir / RUN_FILE, json.dumps(run_history(run_dir / RUN_FILE, now, step),
                                                     indent=2))
    truncate_metrics(run_dir / METRICS_FILE, step)


# --- the loop --------------------------------------------------------------------------------


def train_segment(seg: Segment, max_steps: int | None, progress: bool) -> None:
    """Train until the run's last step or ``max_steps``, under a progress bar and a signal
    flag (SIGTERM / SIGINT save a checkpoint at the next step and raise RunInterrupted)."""
    total = seg.setup.plan.total_steps
    stop_at = min(total, max_steps) if max_steps is not None else total
    bar = progress_bar(seg.console, progress and seg.where.is_main)
    stop = StopSignals()
    with bar, stop:
        cfg = seg.setup.cfg
        task = bar.add_task(f"{cfg.train.method} {cfg.data.dataset}", total=total,
                            completed=seg.start.step, loss="-", lr="-", ips="-")
        _train(seg, stop_at, lambda: _after_step(seg, stop_at, bar, task, stop, progress))


def _train(seg: Segment, stop_at: int, after_step: Callable[[], bool]) -> None:
    """Epoch by epoch until ``stop_at`` steps; ``after_step`` returns True to stop."""
    t, step = seg.setup.cfg.train, seg.train_step
    per_epoch = seg.setup.plan.micro_per_epoch
    micro = step.step * t.accum_iter  # global micro-batch index
    while step.step < stop_at and not seg.watch.stopping:
        epoch = micro // per_epoch
        for images, labels in seg.batches.epoch(epoch, micro % per_epoch):
            forward = _forward(seg, images, labels, micro)
            micro += 1
            stepped = step.micro_batch(forward)
            if seg.watch.monitor is not None:  # the online classifier's step on this batch
                seg.watch.monitor.observe(seg.setup.method, labels)
            seg.logger.images += labels.shape[0] * seg.where.world_size
            if stepped and after_step():
                break
        epoch_done = micro % per_epoch == 0
        if (step.step >= stop_at or seg.watch.stopping
                or (epoch_done and (epoch + 1) % t.save_every == 0)):
            _save(seg)


def _forward(seg: Segment, images: Tensor | list[Tensor], labels: Tensor,
             micro: int) -> Callable[[], dict[str, Tensor]]:
    """Micro-batch ``micro``'s views (its generator seeded by the index) and forward."""
    device, gen = seg.where.device, seg.gen
    gen.manual_seed(seg.setup.cfg.train.seed * 1_000_003 + micro * 7919 + seg.where.rank)
    if seg.batches.streaming:  # cropped in the workers: one uint8 batch per view
        views = [v.finish(x.to(device, non_blocking=True), gen)
                 for v, x in zip(seg.setup.views, images, strict=True)]
    else:
        images = images.to(device, non_blocking=True)  # [N, C, H, W] uint8
        views = [v(images, gen) for v in seg.setup.views]  # each [N, C, S, S]
    batch = Batch(views, labels.to(device), gen, seg.train_step.step, seg.setup.plan.total_steps)
    return lambda: seg.module(batch)


def _after_step(seg: Segment, stop_at: int, bar: Progress, task: TaskID, stop: StopSignals,
                progress: bool) -> bool:
    """Measure (when the monitor is due), log, show progress, honour a signal; True when the
    run has reached ``stop_at`` or a collapse stops it."""
    step = seg.train_step.step
    online = None
    monitor = seg.watch.monitor
    if monitor is not None and monitor.due(step, seg.setup.plan.total_steps):
        online = _measure(seg, monitor, step)
    if online is not None or step % seg.setup.cfg.train.log_every == 0 or step == stop_at:
        _log(seg, bar, task, progress, online)
    bar.update(task, completed=step)
    if stop.requested(seg.where.world_size):  # SIGTERM / SIGINT: save here, then stop
        _stop(seg, stop.signum)
    return step >= stop_at or seg.watch.stopping


def _measure(seg: Segment, monitor: Monitor, step: int) -> dict[str, float]:
    """The monitor's values at ``step`` (its time left out of the logged img/s); a first
    collapse is one warning line, kept for summary.json, and stops the run under
    ``--stop-on-collapse``."""
    t0, watch = time.perf_counter(), seg.watch
    values = monitor.measure(seg.setup.method, step)
    seconds = time.perf_counter() - t0
    watch.seconds += seconds
    seg.logger.t0 += seconds  # img/s counts training only
    why = monitor.collapse(values)
    if why is not None and watch.collapse is None:
        watch.collapse = {"step": step, "reason": why}
        if seg.where.is_main:
            seg.console.print(f"warning: the representation collapsed at step {step}: {why}"
                              + ("; stopping (--stop-on-collapse)"
                                 if seg.setup.cfg.train.stop_on_collapse else ""),
                              markup=False, highlight=False)
    if why is not None and seg.setup.cfg.train.stop_on_collapse:
        watch.stopping = True
    # the run's training time at this step (every segment, the monitor's own time left out):
    # the x axis of the report's online curves
    return {**values, "online_seconds": seconds,
            "train_seconds": seg.seconds() - watch.seconds}


# --- log, save, stop, finish -----------------------------------------------------------------


def _log(seg: Segment, bar: Progress, task: TaskID, progress: bool,
         online: dict[str, float] | None = None) -> None:
    step, lr = seg.train_step.step, seg.train_step.lr
    plan = seg.setup.plan
    row = seg.logger.flush(seg.train_step, step / plan.steps_per_epoch, online)  # NaN: raises
    bar.update(task, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{row['img_per_s']:.0f}")
    if progress and seg.where.is_main and not seg.console.is_terminal:
        # no live bar in a log file (nohup, a cluster job): plain lines instead
        seg.console.print(f"step {step}/{plan.total_steps} epoch {row['epoch']:.2f} "
                          f"loss {row['loss']:.4f} lr {lr:.2e} "
                          f"{row['img_per_s']:.0f} img/s", highlight=False)
    if online and progress and seg.where.is_main:
        shown = " ".join(f"{k} {v:.4g}" for k, v in online.items() if k != "online_seconds")
        seg.console.print(f"step {step} online: {shown}", highlight=False, markup=False)
    if seg.batches.streaming:
        seg.setup.dataset.check_bad_fraction()


def _save(seg: Segment) -> None:
    """Log what is pending, then (rank 0) write a checkpoint at this step."""
    step = seg.train_step.step
    seg.logger.flush(seg.train_step, step / seg.setup.plan.steps_per_epoch)
    if seg.where.is_main:
        try:
            save_checkpoint(seg.run_dir, checkpoint_state(seg.setup, step, seg.seconds(), seg))
        except CheckpointSaveError as exc:  # a full disk: one line, not torch's tracebacks
            raise CheckpointSaveError(f"{exc}, then resume with: mae-bench pretrain "
                                      f"--resume {seg.run_dir}", step) from None


def _stop(seg: Segment, signum: int) -> None:
    """A signal arrived: save at this step boundary and stop the run."""
    _save(seg)
    seg.logger.close()
    raise RunInterrupted(signum, seg.train_step.step, str(seg.run_dir))


def checkpoint_state(setup: Setup, step: int, train_seconds: float,
                     seg: Segment | None = None) -> dict[str, Any]:
    """The checkpoint of a run at optimizer step ``step``: tensors and plain values only (with
    the monitor's state and the first collapse of ``seg``, when given)."""
    t = setup.cfg.train
    watch = seg.watch if seg is not None else Watch()
    monitor = watch.monitor.state_dict() if watch.monitor is not None else None
    return {
        "format_version": FORMAT_VERSION, "method": t.method, "config": setup.cfg.to_dict(),
        "model": setup.method.state_dict(), "optimizer": setup.optimizer.state_dict(),
        "scaler": setup.scaler.state_dict() if setup.scaler is not None else None,
        "step": step, "micro_step": step * t.accum_iter,
        "epoch": step // setup.plan.steps_per_epoch,
        "rng": rng_state(), "extra": {"train_seconds": train_seconds,
                                      "total_steps": setup.plan.total_steps,
                                      "img_size": setup.img_size,
                                      "channels": setup.dataset.info.channels,
                                      "attention": setup.attention,
                                      "conv": setup.conv,
                                      "collapse": watch.collapse,
                                      "online_seconds": watch.seconds,
                                      "init": seg.init if seg is not None else None},
        "monitor": monitor,
    }


def finish(seg: Segment) -> PretrainResult:
    """The run's result; rank 0 writes summary.json when this segment trained a step."""
    step, start, plan = seg.train_step.step, seg.start, seg.setup.plan
    if step == start.step and start.resumed:  # nothing left to do: keep the run's record
        train_seconds = start.seconds_before
    else:
        train_seconds = seg.seconds()
    result = PretrainResult(
        run_dir=seg.run_dir, step=step, total_steps=plan.total_steps,
        epoch=step // plan.steps_per_epoch, final_loss=seg.logger.last_loss,
        # over the whole run (every segment), like train_seconds
        train_seconds=train_seconds,
        images_per_second=step * plan.eff_batch / train_seconds if train_seconds else 0.0,
        device=str(seg.where.device), precision=seg.where.precision,
        finished=step >= plan.total_steps)
    summary = None
    if seg.where.is_main and step > start.step:
        summary = {k: (str(v) if isinstance(v, Path) else v)
                   for k, v in result.__dict__.items()}
        summary["segment_images_per_second"] = seg.logger.overall_ips()  # this one only
        if seg.watch.monitor is not None:
            summary["online_seconds"] = seg.watch.seconds  # the run's, within train_seconds
        summary["collapse"] = seg.watch.collapse  # the first collapse the monitor saw, or None
        write_text_atomic(seg.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    seg.logger.close(summary)  # the tracker gets the summary this segment wrote, if any
    wait_for_main()  # every rank returns once rank 0's checkpoint and summary are on disk
    return result
