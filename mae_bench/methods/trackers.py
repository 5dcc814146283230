"""Experiment trackers: where a run's config, metrics rows (the online evaluation's included) and
summary go besides its run folder (``--tracker``).

* ``tensorboard``: scalars under ``RUN/tb`` (the default when the ``tensorboard`` package is
  installed: ``pip install 'mae-bench[tensorboard]'``);
* ``wandb``: Weights & Biases (``pip install 'mae-bench[wandb]'``): the config once, every
  metrics row at its optimizer step, the summary (``summary.json``) at the end; files under
  ``RUN/wandb``. The project is ``$WANDB_PROJECT`` or ``mae-bench``, the mode wandb's own
  (``WANDB_MODE=offline`` needs no account and no network; ``wandb sync`` uploads later). The
  run id is derived from the run folder, so a resumed run continues the same wandb run;
* ``none``: the run folder only.

No tracker is required: ``metrics.jsonl`` and ``summary.json`` hold everything.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mae_bench.config import TRACKERS, RunConfig
from mae_bench.errors import ConfigError


class Tracker:
    """Receives a run's config, rows and summary; the base class drops them."""

    def log_row(self, row: dict[str, Any], step: int) -> None:
        return

    def log_summary(self, summary: dict[str, Any]) -> None:
        return

    def close(self) -> None:
        return


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log_row(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, int | float):
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import wandb

        folder = run_dir.resolve()
        run_id = f"{folder.name[:40]}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
        run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mae-bench"),
                              dir=str(run_dir), name=folder.name, id=run_id, resume="allow",
                              config=cfg.to_dict(),
                              settings=wandb.Settings(quiet=True, silent=True, console="off"))

    def log_row(self, row: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, int | float | str | bool) or v is None:
                self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


def check_tracker(name: str | None) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before anything is written.

    Raises:
        ConfigError: naming the valid trackers, or the package to install.
    """
    if name is None or name == "none":
        return
    if name not in TRACKERS:
        raise ConfigError(f"unknown tracker '{name}'; valid: {', '.join(TRACKERS)}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"--tracker {name} needs the {module} package: pip install "
                          f"'mae-bench[{module}]'") from None


def open_tracker(name: str | None, run_dir: Path, cfg: RunConfig) -> Tracker:
    """The tracker ``name`` (checked by ``check_tracker``); None: TensorBoard when it is
    installed, else none."""
    if name is None:
        try:
            return TensorBoardTracker(run_dir)
        except ImportError:  # tensorboard is optional
            return Tracker()
    if name == "tensorboard":
        return TensorBoardTracker(run_dir)
    if name == "wandb":
        return WandbTracker(run_dir, cfg)
    return Tracker()
