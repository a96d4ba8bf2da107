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
    for _ in range(3):
        torch.ones(2**24)
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


def test_leaving_returns_free_memory_beyond_the_allowance():
    with heap.reuse_heap():
        block = torch.ones(2 * heap._KEPT_FREE_BYTES // 4)
        before = resident_mib()
        del block
        assert resident_mib() > before - 16   # kept inside, for the next temporaries
    assert resident_mib() < before - heap._KEPT_FREE_BYTES / MIB
