"""mae_bench/training/host_memory.py: glibc keeps freed blocks for reuse once the setting is made.

Each check runs in a fresh interpreter: mallopt changes the whole process, for good.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.multiprocess]  # every check runs in a fresh interpreter

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the setting exists on glibc only")

# Allocates and frees a 64 MiB block with the C library; prints whether the setting was
# applied, whether glibc served the block with its own mmap, and whether the freed block
# stayed in the heap (mallinfo2's free bytes).
PROBE = textwrap.dedent("""
    import ctypes
    from mae_bench.training.host_memory import describe, keep_freed_memory
    applied = keep_freed_memory() if CALL else None
    libc = ctypes.CDLL(None)
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblks - before
    libc.free(block)
    kept = libc.mallinfo2().fordblks >= 64 << 20
    print(applied, mmapped, kept, describe(), sep="|")
""")


def probe(call: bool, mode: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAE_BENCH_MALLOC"}
    if mode is not None:
        env["MAE_BENCH_MALLOC"] = mode
    out = subprocess.run([sys.executable, "-c", f"CALL = {call}\n" + PROBE], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split("|")


@needs_glibc
def test_glibc_own_behaviour_maps_and_returns_a_large_block():
    # the baseline the setting changes: without it the block is mmapped and unmapped on free
    applied, mmapped, kept, text = probe(call=False, mode=None)
    assert (applied, mmapped, kept) == ("None", "1", "False")
    assert text == "glibc's own (returns freed memory)"


@needs_glibc
def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    applied, mmapped, kept, text = probe(call=True, mode=None)
    assert (applied, mmapped, kept) == ("True", "0", "True")
    assert text.startswith("glibc malloc keeps freed memory")


@needs_glibc
def test_malloc_default_leaves_glibc_alone():
    applied, mmapped, kept, text = probe(call=True, mode="default")
    assert (applied, mmapped, kept) == ("False", "1", "False")
    assert text == "glibc's own (returns freed memory)"


def test_an_unknown_mode_is_a_one_line_usage_error():
    env = dict(os.environ, MAE_BENCH_MALLOC="fast")
    out = subprocess.run([sys.executable, "-m", "mae_bench", "datasets"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: MAE_BENCH_MALLOC='fast' is not a mode; valid: retain, default (retain keeps "
        "freed memory for reuse; default is glibc's behaviour)"]


@needs_glibc
def test_the_command_line_makes_the_setting_before_any_command():
    code = textwrap.dedent("""
        import atexit, sys
        from mae_bench.training import host_memory
        atexit.register(lambda: print("applied", host_memory._state.get("applied")))
        sys.argv = ["mae-bench", "datasets"]
        from mae_bench.cli import main
        main()
    """)
    env = {k: v for k, v in os.environ.items() if k != "MAE_BENCH_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "applied True"


def test_the_package_root_exports_it():
    import mae_bench
    from mae_bench.training.host_memory import keep_freed_memory

    assert mae_bench.keep_freed_memory is keep_freed_memory
