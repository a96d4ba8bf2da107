"""Large temporaries from reused heap memory instead of fresh pages (glibc).

glibc serves an allocation above its mmap threshold (128 KiB at start, raised
as large blocks are freed, to 32 MiB at most) with new pages from `mmap`, which
the kernel zeroes on first touch, and gives them back to the system on
`free`. A computation that makes many temporaries of tens of MiB, as the
empirical NTK of a CNN does, can spend much of its time in those page faults
(`benchmarks/bench_empirical.py`; its numbers are in `benchmarks/README.md`).
Inside `reuse_heap()`, blocks up to 1 GiB come from the heap and freed memory
stays in it, to be reused by the next temporaries. On leaving, the heap keeps
up to 1 GiB of free memory (1/16 of the machine's where that is less) for the
next call, whose temporaries are the same again; beyond that, free memory goes
back to the system.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from typing import Iterator

import torch

# mallopt() parameters, from malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INSIDE_MMAP_THRESHOLD, _INSIDE_TRIM_THRESHOLD = 1 << 30, 2**31 - 1
# Where glibc's own adjustment of the thresholds ends (DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit systems, and twice it): restored on leaving, since setting them once
# turns that adjustment off.
_OUTSIDE_MMAP_THRESHOLD, _OUTSIDE_TRIM_THRESHOLD = 32 << 20, 64 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (2.33 and later)."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return None
    libc = ctypes.CDLL(None)
    if not (hasattr(libc, 'mallopt') and hasattr(libc, 'malloc_trim')):
        return None
    if hasattr(libc, 'mallinfo2'):
        libc.mallinfo2.restype = _MallInfo2
    return libc


_LIBC = _glibc()


def _kept_free_bytes() -> int:
    """Free heap memory kept on leaving: 1 GiB, or 1/16 of physical memory where less."""
    return min(1 << 30, os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 16)


_KEPT_FREE_BYTES = _kept_free_bytes() if _LIBC is not None else 0


def _free_heap_bytes() -> float:
    """Free bytes held by malloc's arenas (infinite where glibc cannot say)."""
    return _LIBC.mallinfo2().fordblks if hasattr(_LIBC, 'mallinfo2') else float('inf')


_lock = threading.Lock()
_depth = 0


@contextlib.contextmanager
def reuse_heap() -> Iterator[None]:
    """Inside: allocations up to 1 GiB from the heap, freed memory kept for
    reuse. On leaving the outermost one: the thresholds glibc's adjustment
    settles at (32 MiB for mmap, 64 MiB for trimming), and, if the heap holds
    more free memory than `_KEPT_FREE_BYTES` (1 GiB, less on machines with
    less than 16 GiB), all of it returned to the system (`malloc_trim`);
    less stays, for the next call's temporaries. Nothing elsewhere than
    glibc, or while torch.compile traces; nested and concurrent uses share one
    setting."""
    global _depth
    # torch.compile traces no ctypes calls (and its graphs need no heap advice).
    if _LIBC is None or torch.compiler.is_compiling():
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _INSIDE_MMAP_THRESHOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _INSIDE_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _OUTSIDE_MMAP_THRESHOLD)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _OUTSIDE_TRIM_THRESHOLD)
                if _free_heap_bytes() > _KEPT_FREE_BYTES:
                    _LIBC.malloc_trim(0)
