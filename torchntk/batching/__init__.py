"""Kernels at scale: tiles, memory bounds, progress, checkpoints, several processes.

`batch(kernel_fn, batch_size)` computes `kernel_fn(x1, x2)` in tiles and
assembles them into the kernel of the untiled call (`tiling`); `estimate_memory`
bounds the memory of such a computation before it runs (`memory`).
"""

from .memory import AUTO_MEMORY_FRACTION, MemoryEstimate, estimate_memory
from .tiling import batch

__all__ = ['AUTO_MEMORY_FRACTION', 'MemoryEstimate', 'batch', 'estimate_memory']
