"""The results store: one JSON object per measured number, appended, never rewritten.

A store is a folder holding ``results.jsonl``; each line is one row built by :func:`make_row`::

    {"run_id": "mae-s0", "method": "mae", "arch": "vit_tiny_patch4", "dataset": "cifar10",
     "protocol": "knn", "metric": "top1", "value": 71.2, "k": 20, "seed": 0, "status": "ok",
     "timestamp": "2026-11-29T12:00:00+00:00", "git_sha": "b8e10fb...", ...}

Metric names say what was measured (``top1``, ``top5``, ``recall@5``, ``map@r``); knobs such as
``k`` live in their own fields, never inside the metric name, so tables can split or average
over them. ``pandas.read_json(path, lines=True)`` loads the file; :func:`read_results` does the
same but survives a torn last line. ``mae_bench.results.tables`` averages and lays rows out.

Replacing without rewriting: ``mae-bench eval`` gives each row an ``eval_key``, a hash of the
evaluation's identity (the encoder, the data, the protocol and its options, the seed, the
precision). An evaluation already in the store is skipped; ``--force`` runs it again and appends
its rows, which supersede the older ones: :func:`read_results` (and ``tables.aggregate``) keep
only the latest append of each (``eval_key``, ``metric``, ``k``) (:func:`drop_superseded`), so a
repeat is never counted as another seed. Rows without an ``eval_key`` (older stores, failure
records, the Python API's callables, whose code no hash sees) are all kept, as before.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import warnings
from collections.abc import Iterable
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mae_bench.errors import ConfigError
from mae_bench.files import RESULTS_FILE, append_whole

IDENTITY = ("run_id", "method", "arch", "dataset", "protocol", "metric", "checkpoint")
RESULT = ("value", "status", "error")
# How a protocol was run (they tell table columns apart) and how the encoder was pretrained.
EVAL_KNOBS = ("k", "temperature", "pool", "probe", "label_fraction", "init", "blocks", "epochs",
              "precision")
PRETRAIN_KNOBS = ("mask_ratio", "pretrain_epochs", "seed")
KNOBS = EVAL_KNOBS + PRETRAIN_KNOBS
COST = ("pretrain_seconds", "eval_seconds", "gflops_per_image", "pretrain_gflops")
PROVENANCE = ("timestamp", "git_sha", "config_hash")
COLUMNS = IDENTITY + RESULT + KNOBS + COST + PROVENANCE

REQUIRED = ("run_id", "method", "arch", "dataset", "protocol", "metric")
STATUSES = ("ok", "failed")
# Averaged over (they differ between seeds of one configuration) or not a description of it.
# ``skipped_images`` describes how the data were read, not what was measured: a streamed data
# set counts its unreadable files only when it reads them, so a row from cached features lacks it.
NOT_GROUPED = frozenset(("run_id", "checkpoint", "seed", "command", "pretrain_command", "weights",
                         "eval_key", "skipped_images") + RESULT + COST + PROVENANCE)
# One measured number: a later row with the same values replaces an earlier one (a --force
# re-run). ``k`` tells apart the rows of one k-NN evaluation.
MEASUREMENT = ("eval_key", "metric", "k")
STAT_COLUMNS = ("mean", "std", "n", "ci95_low", "ci95_high", "failed")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ------------------------------------------------------------------------------------- writing


def make_row(
    *,
    run_id: str,
    method: str,
    arch: str,
    dataset: str,
    protocol: str,
    metric: str,
    value: float | None,
    status: str = "ok",
    **fields: Any,
) -> dict[str, Any]:
    """Build one validated result row, with ``timestamp`` (UTC) and ``git_sha`` filled in.

    Args:
        run_id: The pretraining run the number belongs to.
        method, arch, dataset, protocol, metric: What was measured (``metric`` without knobs:
            ``top1``, not ``top1@k20``).
        value: The number (percent for accuracies); None only when ``status == "failed"``.
        status: ``"ok"`` or ``"failed"``.
        **fields: Knobs, cost and provenance (``k=20, seed=0, eval_seconds=3.1, ...``); unknown
            names become new columns. Values must be JSON scalars. ``timestamp`` and
            ``git_sha`` may be given to override the defaults.

    Raises:
        ValueError: A field is missing, empty, not a scalar, or not finite.
    """
    row: dict[str, Any] = {}
    for name, given in zip(
        REQUIRED, (run_id, method, arch, dataset, protocol, metric), strict=True
    ):
        if not isinstance(given, str) or not given.strip():
            raise ValueError(f"result field '{name}' must be a non-empty string, got {given!r}")
        row[name] = given
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    row["status"] = status
    row["value"] = _check_value(value, status)
    for name, given in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"result field name {name!r} must be a Python-style identifier")
        if name in STAT_COLUMNS or name in row:
            raise ValueError(f"result field name {name!r} is reserved")
        row[name] = _check_scalar(name, given)
    row.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    row.setdefault("git_sha", git_sha())
    return row


def _check_value(value: Any, status: str) -> float | None:
    if value is None:
        if status == "failed":
            return None
        raise ValueError("value is None but status is 'ok'; pass status='failed' for a failed run")
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise ValueError(f"value must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}; use status='failed', value=None")
    return value


def _check_scalar(name: str, value: Any) -> str | int | float | bool | None:
    if isinstance(value, np.generic):  # numpy scalars from metric code: plain Python values
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"result field '{name}' must be finite, got {value}")
        return value
    raise ValueError(
        f"result field '{name}' must be a str, int, float, bool or None, "
        f"got {type(value).__name__}: {value!r}"
    )


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the git checkout holding this package; None when it is not in one.

    Read once per process (sweeps and compare call it when they start), so the rows of a long
    run name the commit it started from, not one that landed while it ran."""
    package_root = Path(__file__).resolve().parents[2]  # mae_bench/results/store.py -> the checkout
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"],
            cwd=package_root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    # An installed copy inside someone else's repository (a venv in a project) is not ours.
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package_root:
        return None
    return lines[1]


def check_writable(results_dir: str | Path) -> Path:
    """Make sure rows can be appended to ``results_dir``'s store before any work starts, without
    writing anything: the store (or else the folder, or else its nearest existing parent) must
    be writable, and what is in the way must not be a file. Returns the store's path.

    Raises:
        ConfigError: the store cannot be written (one line, with the reason and the fix).
    """
    results_dir = Path(results_dir)
    path = results_dir / RESULTS_FILE
    problem = None
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            problem = f"{path} is not a writable file"
    else:
        existing = results_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"--results-dir {results_dir}: cannot write the results store "
                          f"({problem}); pick a folder you can write to")
    return path


def append_rows(results_dir: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Append rows to ``results_dir/results.jsonl`` (created if needed); returns the file.

    All rows go out in one locked, all-or-nothing append (:func:`mae_bench.files.append_whole`):
    concurrent writers never interleave, existing bytes are never touched, and a write that
    fails part-way (a full disk) is undone, so the store holds all of the rows or none of them.
    The file is created with the umask's mode, so a group can share a store.

    Raises:
        ValueError: A row lacks a required field or holds a value JSON cannot carry.
        OSError: The rows could not be written (none were).
    """
    lines = []
    for row in rows:
        missing = [name for name in REQUIRED + ("value", "status") if name not in row]
        if missing:
            raise ValueError(f"result row lacks {', '.join(missing)}; build rows with make_row")
        lines.append(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_FILE
    if lines:
        append_whole(path, "".join(lines).encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------- reading


def _no_store(path: Path) -> str:
    """The error for a store that is not there, with the --results-dir that would make it
    (the folder asked for, not its parent)."""
    if path.suffix == ".jsonl":
        return (f"no results at {path}; run `mae-bench eval ...` with --results-dir "
                f"{path.parent} first")
    where = "" if path.is_dir() else f" (there is no folder {path})"
    return (f"no results at {path / RESULTS_FILE}{where}; run `mae-bench eval ...` with "
            f"--results-dir {path} first")


def read_results(path: str | Path, *, superseded: bool = False) -> pd.DataFrame:
    """Load a store (its folder or the ``.jsonl`` file) as one row per result.

    The frame has every column of :data:`COLUMNS` (NaN where a row lacks it) followed by any
    extra fields. Blank lines are skipped; unreadable lines (a torn last line, garbage, JSON
    that is not a result row) are skipped with one warning naming the file and line numbers.
    Rows a later ``--force`` re-run replaced are left out (:func:`drop_superseded`) unless
    ``superseded`` is True.

    Raises:
        ConfigError: There is no store at ``path``.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(_no_store(path))
    records, bad = [], []
    for number, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and all(name in record for name in REQUIRED):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.warn(
            f"skipped {len(bad)} unreadable line(s) in {file}: line {shown}", stacklevel=2
        )
    frame = pd.DataFrame.from_records(records)
    extra = [name for name in frame.columns if name not in COLUMNS]
    frame = frame.reindex(columns=list(COLUMNS) + extra)
    return frame if superseded else drop_superseded(frame)


def drop_superseded(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the rows a later row of the same measurement (:data:`MEASUREMENT`)
    replaced: of each (``eval_key``, ``metric``, ``k``) the last in file order stays. Rows
    without an ``eval_key`` all stay."""
    if "eval_key" not in df.columns or df.empty:
        return df
    subset = [name for name in MEASUREMENT if name in df.columns]
    keyed = df["eval_key"].notna()
    replaced = keyed & df.duplicated(subset=subset, keep="last")
    return df[~replaced].reset_index(drop=True) if replaced.any() else df


def stored_evaluation(path: str | Path, eval_key: str) -> pd.DataFrame:
    """The current ``ok`` rows of one evaluation (by ``eval_key``) in the store at ``path``;
    empty when there is no store or no such row."""
    file = Path(path) / RESULTS_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    df = read_results(file)
    return df[(df["eval_key"] == eval_key) & (df["status"] == "ok")] if "eval_key" in df \
        else df.iloc[:0]
