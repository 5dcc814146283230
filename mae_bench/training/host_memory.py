"""The host allocator: keep freed memory for reuse instead of handing it back to the kernel.

glibc's ``malloc`` serves a large block (over 128 KiB, a threshold it raises to at most 32 MiB
as blocks are freed) with its own ``mmap`` and unmaps it again on ``free``; memory freed at the
top of the heap above 128 KiB is trimmed the same way. A training step allocates and frees its
activations (MBs each) every step, so on a CPU each step runs on fresh pages, and the kernel
zero-fills every 4 KiB page on its first touch: the time shows up in GELU, LayerNorm, the
bias copy of ``addmm`` and other memory-bound ops. Keeping freed blocks in the heap makes the
second step onward reuse warm pages. It pays most in bf16, where the memory-bound ops are a
larger share of the step; ``benchmarks/host_memory.py`` measures it side by side (alternating
processes), and the measurements are in results/speed-cpu.md ("The host allocator").

The price: a process keeps its peak heap until it exits, as PyTorch's CUDA caching allocator
does on a GPU. ``mae-bench`` sets this once at start (``MAE_BENCH_MALLOC=default`` turns it
off); from Python, call ``keep_freed_memory()`` before training. Elsewhere than glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

from mae_bench.errors import ConfigError

ENV = "MAE_BENCH_MALLOC"
MODES = ("retain", "default")
# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks under 1 GiB come from the heap, and up to 1 GiB of free heap top is kept (mallopt
# takes an int, so 2 GiB is out of reach anyway).
RETAIN_BYTES = 1 << 30

_state: dict[str, bool] = {}


def malloc_mode() -> str:
    """The mode ``MAE_BENCH_MALLOC`` asks for: retain (the default) or default (glibc's own).

    Raises:
        ConfigError: any other value.
    """
    mode = os.environ.get(ENV, "retain").strip() or "retain"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={mode!r} is not a mode; valid: {', '.join(MODES)} "
                          "(retain keeps freed memory for reuse; default is glibc's behaviour)")
    return mode


def _glibc() -> ctypes.CDLL | None:
    """The running process's C library when it is glibc (the only one with these knobs)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks in the heap for reuse (see the module docstring).

    Idempotent; the first call decides. Returns True when the setting is in force, False when
    ``MAE_BENCH_MALLOC=default`` asked for glibc's behaviour or the C library is not glibc.

    Raises:
        ConfigError: ``MAE_BENCH_MALLOC`` has an unknown value.
    """
    if "applied" not in _state:
        applied = False
        if malloc_mode() == "retain":
            libc = _glibc()
            # M_MMAP_THRESHOLD first: setting either also stops glibc adapting the other.
            applied = libc is not None and all(
                libc.mallopt(ctypes.c_int(param), ctypes.c_int(RETAIN_BYTES)) == 1
                for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
        _state["applied"] = applied
    return _state["applied"]


def describe() -> str:
    """One phrase for reports: what the host allocator does in this process."""
    if _state.get("applied"):
        return "glibc malloc keeps freed memory (mae-bench's default)"
    if "applied" in _state and malloc_mode() == "retain":
        return "the C library's own (not glibc: nothing to set)"
    return "glibc's own (returns freed memory)"
