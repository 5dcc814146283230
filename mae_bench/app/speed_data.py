"""``mae-bench speed --data-only``: the streamed data path alone, mae-bench's against torchvision's,
timed side by side in one process.

At 224 px a GPU is fed by CPU cores that decode JPEGs and crop them, so the number that matters
is images per second per loading core. Per ``--workers`` value, two paths run in interleaved
rounds (their order alternating, so that a busy spell of a shared machine hits both):

* mae-bench's, through its public pieces exactly as the pretraining engine drives them:
  ``load_dataset(name, "train", dir, max_in_memory_bytes=0)`` (streamed), ``TrainBatches`` with
  MAE's one view (``ViewSpec(img_size)``: crop scale 0.2-1, flip, bicubic), and per batch on the
  device ``BatchViews.finish`` as ``mae_bench.methods.engine._forward`` calls it. However
  ``TrainBatches`` splits the work between the workers and ``finish`` by default (the decode and
  the crop in the workers, the resize on the device, say), this measures it.
* torchvision's: ``ImageFolder(dir/train)`` with ``RandomResizedCrop(img_size, scale=(0.2,
  1.0))``, ``RandomHorizontalFlip()`` and ``PILToTensor()`` in a ``DataLoader`` drawing a random
  sample (``RandomSampler``, which is what ``shuffle=True`` uses, capped at the round's count); on
  the device its uint8 batch is normalised, as any training loop must.

Each round starts fresh workers (``persistent_workers=False``, as the engine's epochs do), gives
``warmup`` untimed batches per worker, then times ``images`` images (whole batches). Measured:

* wall images/s over the timed images;
* the loading CPU per image: the CPU seconds of the worker processes, read with
  ``getrusage(RUSAGE_CHILDREN)`` after the round ended and the workers were reaped, over every
  image they decoded in it (warm-up and start-up included). With 0 workers the loading runs in
  this process and its CPU time (all threads) is read around each ``next()`` of the timed
  batches;
* the device-side time per image (the main process's per-batch work, synchronised on CUDA) and
  its CPU time;
* peak memory: the main process's peak resident set in the round (``/proc/self/clear_refs``
  resets it) and the largest worker's (``VmHWM``, read while the last batch is in hand, pages
  shared with the main process included). ``getrusage``'s maxima span the process's whole life
  and all children, so they could not tell the two paths apart.

Ratios are taken from the reported medians: per loading core (mae-bench over torchvision), and
for the whole path, loading plus the device-side work when that runs on the CPU.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mae_bench.app.speed import _status_mib
from mae_bench.app.speed_run import BUSY_SPREAD, describe_machine
from mae_bench.data import IMAGE_SUFFIXES, load_dataset
from mae_bench.data.augment import BatchViews, ViewSpec
from mae_bench.data.loader import TrainBatches
from mae_bench.data.pipeline import PIPELINES, jpeg_decoder, resolve_pipeline
from mae_bench.data.sample_photos import JpegFolder, default_sample_dir, make_jpeg_folder
from mae_bench.errors import ConfigError, DataError
from mae_bench.training.runtime import device_name, resolve_device

OURS, TORCHVISION = "mae-bench", "torchvision"
_SAMPLE_MIN = 1000  # images in a generated folder (more when a run needs more)
_SIZES_READ = 256  # image headers read for the size distribution


@dataclass(frozen=True)
class DataSpeedSpec:
    """What ``mae-bench speed --data-only`` measures (see the module docstring).

    Attributes:
        dataset: a streamed data set (imagefolder; shards where registered).
        data_dir: its folder; None: the registry's default, or for imagefolder a folder of
            JPEGs generated once in the cache (``make_jpeg_folder``).
        baseline_dir: an image folder (``train/<class>/*``) for torchvision's path; None: the
            data dir when it is one, else torchvision's path is not measured.
        img_size: the crop side.
        workers: one configuration per value; 0 loads in this process.
        batch_size: images per batch, both paths.
        images: images timed per round and path (rounded up to whole batches).
        warmup: untimed batches per worker (per round, at least 1 batch when > 0).
        rounds: interleaved rounds.
        device: where the per-batch device-side work runs (auto | cpu | cuda).
        seed: the order of the images and the generator of ``finish``.
        pipeline: mae-bench's split between workers and device (``data.pipeline``).
        command: the command line, recorded in the Markdown.
    """

    dataset: str = "imagefolder"
    data_dir: Path | None = None
    baseline_dir: Path | None = None
    img_size: int = 224
    workers: tuple[int, ...] = (1,)
    batch_size: int = 64
    images: int = 512
    warmup: int = 1
    rounds: int = 2
    device: str = "auto"
    seed: int = 0
    pipeline: str = "auto"
    command: str = ""

    @property
    def timed_batches(self) -> int:
        return -(-self.images // self.batch_size)

    def warm_batches(self, workers: int) -> int:
        return self.warmup * max(1, workers)

    def round_images(self, workers: int) -> int:
        """Images one round of one path reads: warm-up and timed batches."""
        return (self.warm_batches(workers) + self.timed_batches) * self.batch_size


@dataclass(frozen=True)
class RoundTiming:
    """One round of one path.

    Attributes:
        wall_seconds: from the first timed batch's request to the last one's device-side work.
        loader_cpu_seconds: CPU seconds of the loading (the workers, or this process with 0).
        loader_images: the images that CPU time covers (with workers: the whole round).
        main_seconds: the device-side work of the timed batches, synchronised.
        main_cpu_seconds: this process's CPU time during that work.
        main_peak_mib: this process's peak resident set in the round.
        worker_peak_mib: the largest worker's peak resident set; None with 0 workers.
    """

    wall_seconds: float
    loader_cpu_seconds: float
    loader_images: int
    main_seconds: float
    main_cpu_seconds: float
    main_peak_mib: float | None
    worker_peak_mib: float | None


@dataclass(frozen=True)
class PathSpeed:
    """One path at one worker count, over its rounds; the numbers reported are medians."""

    path: str
    workers: int
    images: int  # timed per round
    device: str  # where the device-side work ran: "cpu" or "cuda"
    rounds: tuple[RoundTiming, ...]

    @property
    def images_per_second(self) -> float:
        return statistics.median(self.images / r.wall_seconds for r in self.rounds)

    @property
    def loader_cpu_per_image(self) -> float:
        return statistics.median(r.loader_cpu_seconds / r.loader_images for r in self.rounds)

    @property
    def images_per_core_second(self) -> float:
        """Images per second per loading core: 1 / the loading CPU per image."""
        return _inverse(self.loader_cpu_per_image)

    @property
    def main_seconds_per_image(self) -> float:
        return statistics.median(r.main_seconds / self.images for r in self.rounds)

    @property
    def main_cpu_per_image(self) -> float:
        return statistics.median(r.main_cpu_seconds / self.images for r in self.rounds)

    @property
    def cpu_per_image(self) -> float:
        """CPU seconds per image of the whole path: loading, plus the device-side work when the
        device is the CPU."""
        return self.loader_cpu_per_image + (self.main_cpu_per_image if self.device == "cpu"
                                            else 0.0)

    @property
    def cores_per_1000(self) -> float:
        """CPU cores kept busy by 1,000 images/s."""
        return 1000 * self.cpu_per_image

    @property
    def spread(self) -> float | None:
        """Largest over smallest per-round loading CPU per image; None with one round."""
        per_round = [r.loader_cpu_seconds / r.loader_images for r in self.rounds]
        if len(per_round) < 2 or min(per_round) <= 0:
            return None
        return max(per_round) / min(per_round)

    @property
    def main_peak_mib(self) -> float | None:
        return _max_known(r.main_peak_mib for r in self.rounds)

    @property
    def worker_peak_mib(self) -> float | None:
        return _max_known(r.worker_peak_mib for r in self.rounds)


@dataclass(frozen=True)
class WorkersResult:
    """Both paths at one worker count."""

    workers: int
    ours: PathSpeed
    baseline: PathSpeed | None

    @property
    def ratio_per_core(self) -> float | None:
        """mae-bench's images per loading-core second over torchvision's."""
        if self.baseline is None:
            return None
        return self.ours.images_per_core_second / self.baseline.images_per_core_second

    @property
    def ratio_whole(self) -> float | None:
        """The same for the whole path: torchvision's CPU per image over mae-bench's."""
        if self.baseline is None:
            return None
        return self.baseline.cpu_per_image / self.ours.cpu_per_image


@dataclass
class DataSpeedOutcome:
    """Everything measured, and the Markdown."""

    spec: DataSpeedSpec
    data_dir: Path | None  # the folder read (a generated one when none was given)
    baseline_dir: Path | None
    baseline_note: str  # why torchvision's path was not measured ("" when it was)
    device: str
    results: list[WorkersResult] = field(default_factory=list)
    generated: JpegFolder | None = None
    train_images: int = 0
    sizes: str = ""
    machine: str = ""
    versions: str = ""
    markdown: str = ""


def validate_data_spec(spec: DataSpeedSpec) -> None:
    """Check the request before anything runs. Raises ConfigError naming the bad value."""
    if not spec.workers:
        raise ConfigError("--workers is empty; give a count or a comma list, e.g. 1,2")
    for name, value, low in (("--workers", min(spec.workers), 0), ("--img-size", spec.img_size, 8),
                             ("--batch-size", spec.batch_size, 1), ("--images", spec.images, 1),
                             ("--warmup", spec.warmup, 0), ("--rounds", spec.rounds, 1)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    resolve_device(spec.device)
    if spec.pipeline != "auto" and spec.pipeline not in PIPELINES:
        raise ConfigError(f"unknown --pipeline {spec.pipeline!r}; valid: auto, "
                          f"{', '.join(PIPELINES)}")
    if spec.baseline_dir is not None and not (spec.baseline_dir / "train").is_dir():
        raise ConfigError(f"--baseline-dir {spec.baseline_dir} has no train/ folder; torchvision's "
                          "ImageFolder reads DIR/train/<class>/<image>")
    # the platform's default start method is the first listed; asking does not fix it
    start = (multiprocessing.get_start_method(allow_none=True)
             or multiprocessing.get_all_start_methods()[0])
    if max(spec.workers) > 0 and start != "fork":
        raise ConfigError(f"--workers {max(spec.workers)} needs DataLoader workers started by fork "
                          f"(this Python starts them by {start!r}): their CPU time is read as "
                          "this process's children; use --workers 0")


def run_data_speed(spec: DataSpeedSpec,
                   log: Callable[[str], None] = lambda _: None) -> DataSpeedOutcome:
    """Measure the data paths ``spec`` asks for; nothing is written (except a generated folder
    of JPEGs in the cache, when imagefolder is asked for without a data dir)."""
    validate_data_spec(spec)
    device = resolve_device(spec.device)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu":
            # The device-side work is timed in CPU seconds per image: on one thread, so that
            # intra-op threads spinning beside busy workers are not counted as work.
            torch.set_num_threads(1)
        return _run(spec, device, log)
    finally:
        torch.set_num_threads(threads)


def _run(spec: DataSpeedSpec, device: torch.device,
         log: Callable[[str], None]) -> DataSpeedOutcome:
    data_dir, generated = spec.data_dir, None
    needed = max(spec.round_images(w) for w in spec.workers)
    if data_dir is None and spec.dataset == "imagefolder":
        n = max(_SAMPLE_MIN, -(-needed // 500) * 500)
        generated = make_jpeg_folder(default_sample_dir(n), n_images=n)
        data_dir = generated.root
        log(f"no --data-dir: {'reusing' if generated.reused else 'generated'} {n} JPEGs of "
            f"ImageNet sizes (scikit-learn's sample photos, cropped and scaled) in {data_dir}")
    dataset = load_dataset(spec.dataset, "train", data_dir, max_in_memory_bytes=0)
    view = ViewSpec(spec.img_size)  # MAE's view: crop scale 0.2-1, flip, bicubic
    probe = TrainBatches(dataset, spec.batch_size, 1, spec.seed, views=[view])
    if not probe.streaming:
        raise ConfigError(f"--dataset {spec.dataset} is held in memory, not streamed; --data-only "
                          "measures the streamed path (imagefolder, shards)")
    if len(dataset) < needed:
        raise ConfigError(
            f"--images {spec.images} with warm-up needs {needed} images per round; "
            f"{data_dir or spec.dataset} has {len(dataset)} train images: lower --images, "
            "--warmup or --batch-size")
    baseline_dir, note = _baseline_dir(spec, data_dir)
    outcome = DataSpeedOutcome(spec, data_dir, baseline_dir, note, device.type,
                               generated=generated, train_images=len(dataset))
    folder = baseline_dir or (data_dir if spec.dataset == "imagefolder" else None)
    outcome.sizes = image_sizes(Path(folder) / "train") if folder is not None else ""
    baseline_set = _torchvision_set(baseline_dir, spec.img_size) if baseline_dir else None
    finishers = [BatchViews(view, dataset.info.mean, dataset.info.std)]
    mean = torch.tensor(dataset.info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.info.std, device=device).view(1, -1, 1, 1)
    gen = torch.Generator(device=device)

    def ours_work(images: Any, labels: Tensor, micro: int) -> None:
        # engine._forward, streamed branch: one batch per view, finished on the device
        gen.manual_seed(spec.seed * 1_000_003 + micro * 7919)
        views = [v.finish(x.to(device, non_blocking=True), gen)
                 for v, x in zip(finishers, images, strict=True)]
        del views, labels  # synchronised by the caller before the clock is read

    def baseline_work(images: Tensor, labels: Tensor, micro: int) -> None:
        x = images.to(device, non_blocking=True)  # uint8 [B, 3, S, S]
        views = (x.float() / 255.0 - mean) / std  # what a training loop does with it
        del views, labels

    for workers in spec.workers:
        batches = TrainBatches(dataset, spec.batch_size,
                               spec.warm_batches(workers) + spec.timed_batches, spec.seed,
                               num_workers=workers, views=[view],
                               pin_memory=device.type == "cuda",
                               pipeline=resolve_pipeline(spec.pipeline))
        paths: dict[str, list[RoundTiming]] = {OURS: []}
        if baseline_set is not None:
            paths[TORCHVISION] = []
        for r in range(spec.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                log(f"round {r + 1}/{spec.rounds}: {name}, {_workers(workers)}")
                source: Iterable = (batches.epoch(r) if name == OURS else
                                    _torchvision_batches(baseline_set, spec, workers, r, device))
                paths[name].append(_time_round(
                    source, spec.warm_batches(workers), spec.timed_batches, spec.batch_size,
                    ours_work if name == OURS else baseline_work, device, workers))
        speeds = {name: PathSpeed(name, workers, spec.timed_batches * spec.batch_size,
                                  device.type, tuple(rounds)) for name, rounds in paths.items()}
        outcome.results.append(WorkersResult(workers, speeds[OURS], speeds.get(TORCHVISION)))
    outcome.machine = describe_machine(torch.device("cpu")) + (
        f"; device-side work on {device_name(device)}" if device.type == "cuda" else "")
    outcome.machine += f"; {len(os.sched_getaffinity(0))} CPUs available to the process"
    outcome.versions = library_versions(resolve_pipeline(spec.pipeline))
    outcome.markdown = to_markdown(outcome)
    return outcome


def _baseline_dir(spec: DataSpeedSpec, data_dir: Path | None) -> tuple[Path | None, str]:
    if spec.baseline_dir is not None:
        return spec.baseline_dir, ""
    if spec.dataset == "imagefolder" and data_dir is not None and (Path(data_dir) /
                                                                   "train").is_dir():
        return Path(data_dir), ""
    why = (f"--dataset {spec.dataset} is no image folder" if spec.dataset != "imagefolder"
           else f"{data_dir} has no train/ folder (an archive?)")
    return None, (f"torchvision's path was not measured: {why}; give --baseline-dir DIR "
                  "(DIR/train/<class>/<image>) to time it beside mae-bench's")


def _torchvision_set(root: Path, img_size: int):
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0)),
                           T.RandomHorizontalFlip(), T.PILToTensor()])
    try:
        return datasets.ImageFolder(str(Path(root) / "train"), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{root}/train is not an image folder for torchvision's path: "
                        f"{e}") from None


def _torchvision_batches(dataset, spec: DataSpeedSpec, workers: int, r: int,
                         device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
    from torch.utils.data import DataLoader, RandomSampler

    # shuffle=True is a RandomSampler over all of the folder; capped, a round reads what ours does
    sampler = RandomSampler(dataset, num_samples=spec.round_images(workers),
                            generator=torch.Generator().manual_seed(spec.seed * 100_003 + r))
    return DataLoader(dataset, batch_size=spec.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False)


def _time_round(batches: Iterable[tuple[Any, Tensor]], warm: int, timed: int, batch_size: int,
                work: Callable[[Any, Tensor, int], None], device: torch.device,
                workers: int) -> RoundTiming:
    """Run one epoch of ``warm + timed`` batches through ``work`` and time it (see the module
    docstring for what each number covers)."""
    children_cpu = _children_cpu()
    _reset_main_peak()
    loader_cpu = main_wall = main_cpu = 0.0
    worker_peak = None
    it = iter(batches)
    start = time.perf_counter()
    for i in range(warm + timed):
        if i == warm:
            start = time.perf_counter()
        c0 = time.process_time()
        images, labels = next(it)
        c1 = time.process_time()
        t0 = time.perf_counter()
        if workers and i == warm + timed - 1:  # the workers are alive, their work all done
            worker_peak = _children_peak_mib()
            start += time.perf_counter() - t0  # not the benchmark's time: left out of the wall
        t0, c2 = time.perf_counter(), time.process_time()
        work(images, labels, i)
        _sync(device)
        if i >= warm:
            loader_cpu += c1 - c0
            main_wall += time.perf_counter() - t0
            main_cpu += time.process_time() - c2
    wall = time.perf_counter() - start
    received = warm + timed + sum(1 for _ in it)  # ends the epoch: the workers exit, are reaped
    if workers:
        loader_cpu, loader_images = _children_cpu() - children_cpu, received * batch_size
    else:
        loader_images = timed * batch_size
    return RoundTiming(wall, loader_cpu, loader_images, main_wall, main_cpu, _main_peak_mib(),
                       worker_peak)


# --- what the round reads from the OS --------------------------------------------------------


def _children_cpu() -> float:
    """CPU seconds (user + system) of every child process this process has reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reset_main_peak() -> None:
    try:  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then spans the process's life


def _main_peak_mib() -> float | None:
    peak = _status_mib("VmHWM")
    if peak is None:  # no /proc: the life-long peak (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def _children_peak_mib() -> float | None:
    """The largest peak resident set among this process's live children, from /proc."""
    peaks = [_status_mib("VmHWM", Path(f"/proc/{pid}/status")) for pid in _children()]
    return _max_known(peaks)


def _children() -> set[int]:
    """This process's live children: /proc/self/task/*/children where the kernel has it, else
    every process whose parent is this one."""
    listed = list(Path("/proc/self/task").glob("*/children"))
    if listed:
        return {int(pid) for f in listed for pid in _read(f).split()}
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _read(stat).rsplit(")", 1)[-1].split()  # after "pid (name)"
        if len(fields) > 1 and int(fields[1]) == me:
            found.add(int(stat.parent.name))
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # gone meanwhile
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- description -----------------------------------------------------------------------------


def image_sizes(folder: Path, most: int = _SIZES_READ) -> str:
    """The size distribution of an image folder, from the headers of up to ``most`` images
    spread evenly over its sorted files: width and height ranges and medians, the median pixel
    count, and the shares of landscape, portrait and square images."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return ""
    n = min(most, len(files))
    picks = sorted({round(k * (len(files) - 1) / max(1, n - 1)) for k in range(n)})
    sizes = []
    for i in picks:
        try:
            with Image.open(files[i]) as im:
                sizes.append(im.size)
        except OSError:
            continue
    if not sizes:
        return ""
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    n = len(sizes)
    pixels = statistics.median(w * h for w, h in sizes) / 1e6

    def share(pred: Callable[[int, int], bool]) -> float:
        return 100 * sum(pred(w, h) for w, h in sizes) / n

    return (f"{n} of {len(files)} images read: width {min(ws)}-{max(ws)} px (median "
            f"{statistics.median(ws):.0f}), height {min(hs)}-{max(hs)} px (median "
            f"{statistics.median(hs):.0f}), median {pixels:.2f} Mpixel; landscape "
            f"{share(lambda w, h: w > h):.0f} %, portrait {share(lambda w, h: w < h):.0f} %, "
            f"square {share(lambda w, h: w == h):.0f} %")


def library_versions(pipeline: str) -> str:
    """torch, torchvision and Pillow versions, how Pillow decodes JPEGs (Pillow-SIMD is released
    as x.y.z.postN; libjpeg-turbo decodes several times faster than libjpeg), and where and with
    what mae-bench's ``pipeline`` decodes them."""
    import PIL
    import torchvision
    from PIL import features

    turbo = features.check_feature("libjpeg_turbo")
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow "
            f"{PIL.__version__} (Pillow-SIMD: {'yes' if '.post' in PIL.__version__ else 'no'}; "
            f"libjpeg-turbo: {'unknown' if turbo is None else 'yes' if turbo else 'no'}); "
            f"mae-bench decodes JPEGs {jpeg_decoder(pipeline)}")


def ratio_lines(r: WorkersResult) -> list[str]:
    """The result lines of one worker count; a ratio line ends in ``N.NNx``."""
    core = "worker core" if r.workers else "core (in-process)"
    ours = r.ours
    lines = []
    if r.baseline is None:
        lines.append(f"data path, {_workers(r.workers)}: mae-bench "
                     f"{ours.images_per_core_second:,.0f} img/s per {core}")
    else:
        base = r.baseline
        lines.append(f"data path, {_workers(r.workers)}: mae-bench "
                     f"{ours.images_per_core_second:,.0f} img/s per {core}, torchvision "
                     f"{base.images_per_core_second:,.0f}: {r.ratio_per_core:.2f}x")
        if ours.device == "cpu":
            lines.append(f"whole path (loading + device-side work on the CPU), "
                         f"{_workers(r.workers)}: mae-bench {_inverse(ours.cpu_per_image):,.0f} "
                         f"img/s per core, torchvision {_inverse(base.cpu_per_image):,.0f}: "
                         f"{r.ratio_whole:.2f}x")
    side = f"device-side work ({ours.device}) per image: mae-bench's finish " \
           f"{1e6 * ours.main_seconds_per_image:,.1f} us"
    if r.baseline is not None:
        side += (f", torchvision's batch normalised "
                 f"{1e6 * r.baseline.main_seconds_per_image:,.1f} us")
    lines.append(side)
    return lines


def table_rows(o: DataSpeedOutcome) -> list[list[str]]:
    """One row per path and worker count, in the order of ``TABLE_COLUMNS``."""
    rows = []
    for r in o.results:
        for s in (r.ours, r.baseline):
            if s is None:
                continue
            rows.append([str(s.workers), s.path, f"{s.images_per_second:,.0f}",
                         f"{1e3 * s.loader_cpu_per_image:.2f}", f"{s.images_per_core_second:,.0f}",
                         f"{s.spread:.2f}" if s.spread is not None else "-",
                         f"{1e6 * s.main_seconds_per_image:,.1f}", f"{s.cores_per_1000:.2f}",
                         _mib(s.main_peak_mib), _mib(s.worker_peak_mib)])
    return rows


TABLE_COLUMNS = ("workers", "path", "img/s", "CPU ms/img", "img/s/core", "spread",
                 "device us/img", "cores/1k img/s", "main MiB", "worker MiB")
LEGEND = ("img/s: wall, timed images; CPU ms/img: the loading's CPU per image (the workers', "
          "start-up and warm-up included; with 0 workers this process's); img/s/core: 1000 / "
          "CPU ms/img; spread: largest / smallest per-round CPU ms/img; device us/img: the "
          "per-batch work in the main process (mae-bench: finish; torchvision: normalisation); "
          "cores/1k img/s: CPU cores for 1,000 images/s (loading, plus the device-side work on a "
          "CPU device); MiB: peak resident sets of the main process and the largest worker.")


def busy_warning(o: DataSpeedOutcome) -> str | None:
    """A warning line when some path's per-round loading CPU scattered as on a busy machine."""
    spreads = {f"{s.path}, {_workers(s.workers)}": s.spread for r in o.results
               for s in (r.ours, r.baseline) if s is not None and s.spread is not None}
    busy = {k: v for k, v in spreads.items() if v > BUSY_SPREAD}
    if not busy:
        return None
    worst = max(busy, key=busy.__getitem__)
    return (f"warning: the machine was busy: the loading CPU per image varied by "
            f"{busy[worst]:.2f}x between rounds ({worst}); rerun on a quiet machine")


def to_markdown(o: DataSpeedOutcome) -> str:
    """The measurement as a Markdown section: date, machine, command, versions, data, table,
    ratio lines."""
    spec = o.spec
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Measured {now} on {o.machine}.", ""]
    if spec.command:
        lines += ["```", spec.command, "```", ""]
    where = f"{spec.dataset} from {o.data_dir}" if o.data_dir else spec.dataset
    if o.generated is not None:
        where += (" (generated by mae_bench.data.sample_photos.make_jpeg_folder: JPEGs cut from "
                  "scikit-learn's two sample photos)")
    lines += [f"Data path at {spec.img_size} px: {where}, {o.train_images:,} train images; "
              f"batch {spec.batch_size}; per round and path {spec.timed_batches * spec.batch_size}"
              f" images timed after {spec.warmup} warm-up batch(es) per worker; median of "
              f"{spec.rounds} interleaved rounds; device-side work on {o.device}"
              f"{' (one thread)' if o.device == 'cpu' else ''}; mae-bench's "
              f"pipeline {resolve_pipeline(spec.pipeline)}.", "",
              f"Versions: {o.versions}.", ""]
    if o.sizes:
        lines += [f"Image sizes: {o.sizes}.", ""]
    if o.baseline_dir is not None and o.baseline_dir != o.data_dir:
        lines += [f"torchvision's path reads {o.baseline_dir}.", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(o)]
    lines += ["", LEGEND, ""]
    if busy := busy_warning(o):
        lines += [f"**{busy}**", ""]
    for r in o.results:
        lines += [f"- {line}" for line in ratio_lines(r)]
    if o.baseline_note:
        lines.append(f"- {o.baseline_note}")
    return "\n".join(lines) + "\n"


def _workers(n: int) -> str:
    return "in-process (0 workers)" if n == 0 else f"{n} worker{'s' * (n > 1)}"


def _inverse(x: float) -> float:
    return 1 / x if x > 0 else math.inf


def _max_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"
