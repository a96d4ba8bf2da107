"""torchntk.ops.heap: large temporaries reuse heap memory inside `reuse_heap`."""

import os
import resource

import pytest
import torch

from torchntk.ops import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason='glibc only')

MIB = 2**20


def faults_of_two_fresh_tensors(mib: int) -> int:
    """Page faults while filling a fresh tensor of `mib` MiB twice (each freed
    before the next), after three such tensors (aligned blocks can alternate
    between two places of the heap). 64 MiB is above glibc's largest mmap
    threshold: outside `reuse_heap` such a block is mapped afresh, with
    one fault per page, unless the heap happens to hold a free block as large."""
    for _ in range(3):
        torch.ones(mib * MIB // 4)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        torch.ones(mib * MIB // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


def resident_mib() -> float:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / MIB


def test_freed_blocks_are_reused_inside():
    pages = 64 * MIB // os.sysconf('SC_PAGE_SIZE')
    with heap.reuse_heap():
        with heap.reuse_heap():             # nested: one setting
            assert faults_of_two_fresh_tensors(64) < pages / 10
        assert faults_of_two_fresh_tensors(64) < pages / 10   # still inside the outer one
    assert heap._depth == 0


def test_leaving_returns_free_memory_beyond_the_allowance():
    with heap.reuse_heap():
        block = torch.ones(2 * heap._KEPT_FREE_BYTES // 4)
        before = resident_mib()
        del block
        assert resident_mib() > before - 16   # kept inside, for the next temporaries
    assert resident_mib() < before - heap._KEPT_FREE_BYTES / MIB
