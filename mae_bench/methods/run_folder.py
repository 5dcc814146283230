"""The run folder of a pretraining: whether a folder may hold a run, which checkpoint a run
resumes from, what ``run.json`` records across segments, and the clean-up a killed trainer needs.

Pure helpers of ``mae_bench.methods.engine``: each takes the folder (and what it checks) and
returns what it found; none keeps state.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mae_bench.config import ADDED_LATER, RunConfig
from mae_bench.errors import CheckpointError, ConfigError
from mae_bench.files import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    write_text_atomic,
)
from mae_bench.results import git_sha
from mae_bench.training.checkpoint import LATEST, PREVIOUS, find_checkpoint, load_checkpoint
from mae_bench.training.runtime import device_name
from mae_bench.version import __version__

# What a trainer leaves in its run folder when it dies mid-write: ``atomic_file``'s temporaries.
_TRAINER_FILES = (LATEST, CONFIG_FILE, RUN_FILE, METRICS_FILE, SUMMARY_FILE)


def _is_leftover(name: str) -> bool:
    """A file a killed trainer can leave behind: its pid file or a partly written temporary."""
    return name == LOCK_FILE or any(name.startswith(f".{f}-") and name.endswith(".tmp")
                                    for f in _TRAINER_FILES)


def remove_stale_temp_files(run_dir: Path) -> None:
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


def check_out_folder(run_dir: Path, console: Console | None) -> None:
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


def checkpoint_to_resume(cfg: RunConfig, run_dir: Path, resume: bool,
                         console: Console) -> dict | None:
    """The checkpoint a run in ``run_dir`` continues from: None for a new run; the latest one,
    or the previous one when the latest is damaged (kept aside, said on ``console``).

    Raises:
        ConfigError: a checkpoint with ``resume`` False, or one made with another config.
        CheckpointError: no readable checkpoint to fall back on.
    """
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
        older = _predates(saved, cfg)
        if older:  # no option gives the old behaviour back: say what the run can still do
            raise ConfigError(f"run folder {run_dir} was made before {', '.join(older)} existed "
                              f"({diffs}); this version cannot resume it: evaluate or export it "
                              "as it is, or pretrain into another --out")
        raise ConfigError(f"run folder {run_dir} holds a run with another config ({diffs}); "
                          "resume it with the same options or choose another --out")
    return ckpt


def _predates(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """The knobs added after ``saved`` was made (unset there, ``ADDED_LATER``) whose default for
    its method now differs: when they are all the difference, no option resumes the run."""
    da, db = saved.to_dict(), cfg.to_dict()
    differing = [(s, k) for s in da for k in da[s]
                 if da[s][k] != db[s][k] and (s, k) != ("train", "epochs")]
    if all(da[s][k] in ADDED_LATER.get((s, k), ()) for s, k in differing):
        return [f"{s}.{k}" for s, k in differing]
    return []


def _config_diff(a: RunConfig, b: RunConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    out = [f"{s}.{k}: {da[s][k]!r} -> {db[s][k]!r}" for s in da for k in da[s]
           if da[s][k] != db[s][k] and (s, k) != ("train", "epochs")]
    return "; ".join(out)


def last_logged_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None


def truncate_metrics(path: Path, step: int) -> None:
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


def run_history(path: Path, now: dict[str, Any], step: int) -> dict[str, Any]:
    """``run.json`` for a run (re)starting at ``step``: this segment's provenance, the first
    segment's ``command``, and ``segments``: one entry per start (command, step, commit,
    device, precision, convolution kernels, time), so a resumed run never loses how it was
    made."""
    segment = {"command": now["command"], "start_step": step, "git_sha": now["git_sha"],
               "device_name": now["device_name"], "precision": now["precision"],
               "mae_bench": now["mae_bench"], "conv": now.get("conv"),
               "data_pipeline": now.get("data_pipeline"), "jpeg_decoder": now.get("jpeg_decoder"),
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


def provenance(cfg: RunConfig, device: torch.device, precision: str, img_size: int,
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
