"""File names of run folders and results stores, and the one way to write a file atomically.

Every file mae-bench writes that another process (or a later run) reads is written to a
temporary file in the same folder, flushed, and renamed into place: a reader sees the old file or
the new one, never half of one, and a killed process leaves at most a hidden ``.*.tmp`` file.
The append-only files (the results store, the sweep manifest) go through :func:`append_whole`:
all of an append or none of it. Files get the mode a plain ``open()`` would give them (the umask
applies), so a group can share a store, a run folder or a cache.
"""

from __future__ import annotations

import errno
import json
import os
import stat
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
        # mkstemp makes the file 0600; give it the mode a plain open() would: the old file's,
        # else what the umask allows, so that a group can share runs, stores and caches.
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, _mode_of(path))
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_of(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: those of the file it replaces, else
    ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask. Read from ``/proc`` where it can be (setting the umask to read it
    back would briefly change it for every thread of the process)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def append_whole(path: str | Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created with the umask's mode if needed): all of it or none.

    The one writer of the append-only files (the results store, the sweep manifest): one
    ``O_APPEND`` write under an exclusive ``flock``, then ``fsync``, so concurrent writers never
    interleave. A torn last line (a writer killed mid-write) is closed with a newline first. A
    write that fails part-way (a full disk) is undone, truncating the file back to its old size
    while the lock is still held, and the error is raised: a failed append leaves the file
    byte-identical to before, never a torn line or part of the lines.

    Raises:
        OSError: the file cannot be opened or written (nothing was added).
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)
    try:
        locked = _lock(fd)
        size = os.fstat(fd).st_size
        if size > 0:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:  # one write in practice; a short write (disk nearly full) continues it
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            # Undo only under the lock: without it another writer's lines may follow ours.
            if locked:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # readers skip a torn line; the first error is the one to report
            raise
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd``; False where there is none (Windows, or a network
    file system that refuses it: one ``O_APPEND`` write is then the only guard)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


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


# A run folder is locked while a process trains in it (an ``flock`` on the folder itself);
# this file holds the trainer's pid, for the message another process gets.
LOCK_FILE = ".lock"


class FolderLock:
    """An exclusive, non-blocking lock on a folder, so that two processes never train into one
    run folder: an ``flock`` on the folder itself (the kernel drops it when the holder exits or
    dies, so a crash never leaves a stale lock). ``acquire`` writes nothing (a command refused
    for bad input leaves the folder as it was); ``claim`` creates the folder if needed, locks it
    and writes the pid file ``.lock``, which ``release`` removes.

    Raises (from ``acquire`` / ``claim``):
        ConfigError: another live process holds the folder (the message names its pid), or the
            folder cannot be created or written.
    """

    def __init__(self, folder: str | Path, what: str = "--out") -> None:
        self.folder, self.what = Path(folder), what
        self.fd: int | None = None
        self.claimed = False

    def acquire(self) -> None:
        """Lock the existing folder (nothing is written)."""
        import fcntl

        from mae_bench.errors import ConfigError

        if self.fd is not None:
            return
        fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.folder / LOCK_FILE).read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise ConfigError(f"{self.what} {self.folder} is in use: process {holder} is "
                              "training in it; wait for it to finish (or stop it), or pick "
                              "another folder") from None
        self.fd = fd

    def claim(self) -> None:
        """Create the folder if needed, lock it and write the pid file."""
        from mae_bench.errors import ConfigError

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.acquire()
            (self.folder / LOCK_FILE).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            self.release()
            raise ConfigError(f"{self.what} {self.folder}: cannot write there "
                              f"({exc.strerror or exc}); pick a folder you can write to"
                              ) from None
        self.claimed = True

    def release(self) -> None:
        if self.claimed:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)  # while still holding the lock
            self.claimed = False
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None
