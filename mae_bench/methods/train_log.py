"""What a pretraining shows and logs while it runs: the metrics logger (``metrics.jsonl`` and
the tracker, ``mae_bench.methods.trackers``), the stop-on-signal flag, and the progress bar.
"""

from __future__ import annotations

import json
import signal
import threading
import time
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
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from mae_bench.files import METRICS_FILE
from mae_bench.methods.trackers import Tracker
from mae_bench.training.step import TrainStep


class MetricLogger:
    """Writes one JSONL line (and TensorBoard scalars) per flush of the train step's buffered
    per-step scalars, which are read from the device only then; a non-finite loss raises
    TrainingError naming the exact step (``TrainStep.flush``)."""

    def __init__(self, run_dir: Path, is_main: bool, console: Console,
                 tracker: Tracker | None = None):
        self.path = run_dir / METRICS_FILE
        self.is_main = is_main
        self.console = console
        self.images = 0  # since the last flush, over all processes
        self.total_images = 0
        self.total_time = 0.0
        self.t0 = time.perf_counter()
        self.last_loss: float | None = None
        self.tracker = tracker or Tracker()  # rank 0's; the others get none

    def flush(self, train_step: TrainStep, epoch: float,
              extra: dict[str, float] | None = None) -> dict[str, Any]:
        """Write the row of the steps since the last flush, with ``extra`` values (the online
        evaluation's) beside the training scalars."""
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
               "img_per_s": self.images / dt if dt > 0 else 0.0, **(extra or {}),
               "time": time.time()}
        self.last_loss = row["loss"]
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            self.tracker.log_row(row, step)
        self.images, self.t0 = 0, now
        return row

    def overall_ips(self) -> float | None:
        return self.total_images / self.total_time if self.total_time > 0 else None

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the tracker, giving it the run's summary when there is one."""
        if summary is not None:
            self.tracker.log_summary(summary)
        self.tracker.close()


class StopSignals:
    """Within ``with``: SIGTERM and SIGINT set a flag instead of killing the run, so the loop
    stops at the next optimizer-step boundary with a checkpoint (a second signal acts at once,
    as usual). Under torchrun the flag is all-reduced each step, so every process stops at the
    same step. Outside the main thread (no signal handlers there) it never fires."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
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


def progress_bar(console: Console, enabled: bool) -> Progress:
    kept = Column(no_wrap=True)  # never shrunk: steps, elapsed and ETA show in full
    return Progress(
        FittedText("{task.description}", style="bold"), BarColumn(),
        MofNCompleteColumn(table_column=kept),
        FittedText("loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[ips]} img/s"),
        TimeElapsedColumn(table_column=kept), TextColumn("ETA", table_column=kept),
        TimeRemainingColumn(table_column=kept), console=console, disable=not enabled,
        transient=False,
    )
