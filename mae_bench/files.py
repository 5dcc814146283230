"""File names of run folders and results stores, and the one way to write a file atomically.

Every file mae-bench writes that another process (or a later run) reads is written to a
temporary file in the same folder, flushed, and renamed into place: a reader sees the old file or
the new one, never half of one, and a killed process leaves at most a hidden ``.*.tmp`` file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# A run folder (``mae-bench pretrain --out DIR``).
CONFIG_FILE = "config.yaml"  # the final config; --config / --resume read it back
RUN_FILE = "run.json"  # provenance: versions, device, precision, effective batch and lr
METRICS_FILE = "metrics.jsonl"  # one line per logging interval
SUMMARY_FILE = "summary.json"  # written when a run (or a segment of it) ends
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
# A results store (``--results-dir DIR``).
RESULTS_FILE = "results.jsonl"  # one row per measured number, append-only
MANIFEST_FILE = "sweeps.jsonl"  # one line per finished sweep point attempt


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        mode: "w" (text) or "wb" (bytes).
        fsync: flush the data to disk before the rename (checkpoints: survive a power loss).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_with(path: str | Path, writer: Callable[[IO[bytes]], None], *,
               fsync: bool = False) -> None:
    """Atomically write a binary file whose content ``writer(fh)`` produces (``np.savez``,
    ``torch.save``)."""
    with atomic_file(path, "wb", fsync=fsync) as fh:
        writer(fh)
