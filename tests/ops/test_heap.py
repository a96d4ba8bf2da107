"""torchntk.ops.heap: large temporaries reuse heap memory inside `reuse_heap`."""

import os
import subprocess
import sys

import pytest
import torch

from torchntk.ops import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason='glibc only')

MIB = 2**20


FAULTS_SCRIPT = """
import resource, sys, torch
from torchntk.ops import heap

def faults():  # filling a fresh 64 MiB tensor twice, each freed before the next
    # The blocks freed before are 16 KiB larger: torch asks for 64-byte
    # alignment (posix_memalign), which needs a few bytes of slack beyond a
    # block of the same size, and small blocks left next to it decide whether
    # that slack is there (a third of fresh interpreters, by their layout).
    for _ in range(3):
        torch.ones(2**24 + 2**12)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        torch.ones(2**24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

outside = faults()
with heap.reuse_heap():
    with heap.reuse_heap():
        nested = faults()
    inner_left = faults()
print(outside, nested, inner_left, heap._depth)
"""


def resident_mib() -> float:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / MIB


def test_freed_blocks_are_reused_inside():
    """In a fresh interpreter (the heap's state decides where blocks go): 64 MiB
    is above glibc's largest mmap threshold, so outside `reuse_heap` each such
    block is mapped afresh, one fault per page; inside, freed blocks are reused."""
    result = subprocess.run([sys.executable, '-c', FAULTS_SCRIPT], capture_output=True,
                            text=True, check=True)
    outside, nested, inner_left, depth = map(int, result.stdout.split())
    pages = 64 * MIB // os.sysconf('SC_PAGE_SIZE')
    assert outside >= 2 * pages
    assert nested < pages / 10 and inner_left < pages / 10   # until the outer one is left
    assert depth == 0


def test_leaving_returns_free_memory_beyond_the_allowance(monkeypatch):
    monkeypatch.setattr(heap, '_KEPT_FREE_BYTES', 128 * MIB)
    with heap.reuse_heap():
        block = torch.ones(256 * MIB // 4)
        before = resident_mib()
        del block
        assert resident_mib() > before - 16   # kept inside, for the next temporaries
    assert resident_mib() < before - 200


KEEP_SCRIPT = """
import os, torch
from torchntk.ops import heap

def resident_mib():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

heap._KEPT_FREE_BYTES = 512 * 2**20
with heap.reuse_heap():
    block, after_it = torch.ones(2**26), torch.ones(2**22)   # 256 MiB, then 16 MiB above it
    before = resident_mib()
    del block   # a free chunk inside the heap, below its top
left = resident_mib()
with heap.reuse_heap():
    block = torch.ones(50 * 2**20)   # 200 MiB
print(before, left, resident_mib())
"""


def test_leaving_keeps_free_memory_within_the_allowance():
    """In a fresh interpreter: the freed block stays, and the next call's
    temporaries reuse it (those that fit in it: torch's aligned allocations
    ask for a little more than their size)."""
    result = subprocess.run([sys.executable, '-c', KEEP_SCRIPT], capture_output=True,
                            text=True, check=True)
    before, left, reused = map(float, result.stdout.split())
    assert left > before - 16
    assert reused < before + 16


def test_allowance_is_at_most_a_sixteenth_of_memory():
    physical = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    assert 0 < heap._KEPT_FREE_BYTES <= min(2**30, physical / 16)
