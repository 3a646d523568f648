"""Giving freed memory back to the system between the phases of a run.

Peak RSS is what limits how many files one machine can back up, and freed
memory that the allocators keep counts in it. Arrow's default pool
(mimalloc) keeps the pages of freed buffers for reuse, and glibc's malloc
keeps freed heap space (Python's large objects: file data, pack buffers).
Each is reused by its own allocator only, so a phase that frees Arrow memory
and the next one that needs Python memory add up. On 1M files the scan
left 340 MiB resident for an 82 MiB table; ``release`` brought it to 216 MiB.
One call costs 0.5 ms (mimalloc) plus 1-12 ms (``malloc_trim``), so it runs
between phases, never per file or per batch.

Arrow's pool stays its default (mimalloc). ``use_lean_pool`` switches it to
jemalloc, which measured lower (peak RSS of the core of a no-change backup of
1M files, bench/memory_phases.py, format 1: mimalloc 753 MiB, jemalloc 608,
mimalloc with ``MIMALLOC_PURGE_DELAY=0`` 681, glibc malloc with a fixed 128
KiB mmap threshold 562, the same CPU time), but it is not switched on at
import: with it, a `keepflow ls` on the CI run aborted at exit ("terminate
called without an active exception", exit -6) after printing its answer.
Until that is understood, ``ARROW_DEFAULT_MEMORY_POOL=jemalloc`` is the
user's choice, not ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Iterator

import pyarrow as pa

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _libc = ctypes.CDLL(_name)
        if not hasattr(_libc, "malloc_trim"):      # not glibc (musl, macOS)
            _libc = None
except OSError:
    _libc = None


def release() -> None:
    """Return the pages the allocators hold but nothing uses (never raises)."""
    try:
        pa.default_memory_pool().release_unused()
        if _libc is not None:
            _libc.malloc_trim(0)
    except Exception:
        pass


def use_lean_pool() -> None:
    """Make jemalloc Arrow's default pool, unless the environment chose one or
    this pyarrow lacks it (never raises)."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except Exception:   # built without jemalloc (some platforms): keep the default
        pass



_gc_lock = threading.Lock()
_gc_pauses = 0            # nested gc_paused() calls in force, any thread
_gc_resume = False        # whether the collector was on when the first of them began


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a phase that makes objects per entry.

    A scan makes a ``DirEntry``, a ``stat_result`` and a row tuple per entry
    and keeps up to 8,192 rows per folder: every 700 new objects the collector
    runs, and every tenth of those traverses what survived, so the walk pays
    for the size of the heap again and again. None of these objects form
    cycles (reference counting frees them), so nothing is lost by waiting.
    Scan of 1M files in one process: 9.9-10.8 s with the collector, 7.2-8.7 s
    without (user CPU 7.1-7.5 against 4.7-5.9 s). Nestable and thread-safe:
    the collector comes back when the last pause ends, if it was on before.
    """
    global _gc_pauses, _gc_resume
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_resume:
                gc.enable()
